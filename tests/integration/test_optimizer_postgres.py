"""The optimizer process with its analytics store on PostgreSQL.

The real `fabrik_optimizer` process (`python -m`) against a real NATS server and a real PostgreSQL
(pgserver, a fresh database): events published over NATS are folded into PostgreSQL, and costs are
read back over the request/reply subject as the gateway asks for them. A bad URL stops the start
with the setting named.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import msgspec
import nats
import psycopg
import pytest
from prometheus_client import CollectorRegistry

from fabrik_common import optimizer_rpc as rpc
from fabrik_common.bus import Bus, BusOptions
from fabrik_common.events import (
    LlmUsage,
    Resources,
    RunParameters,
    RunRequested,
    RunStarted,
    RunStateChanged,
)
from fabrik_common.ids import new_ulid
from fabrik_common.metrics import BusMetrics
from fabrik_common.testing import ServiceProcess
from fabrik_common.topology import ensure_topology

T0 = datetime(2026, 3, 2, 9, tzinfo=UTC)


def call(project: str, model: str, cost: str, run_id: str | None, tokens: int) -> LlmUsage:
    return LlmUsage(
        call_id=new_ulid(),
        run_id=run_id,
        project=project,
        key_id="k",
        endpoint="chat.completions",
        model=model,
        provider="openai",
        deployment="d",
        upstream_model=model,
        streamed=False,
        input_tokens=tokens,
        output_tokens=1,
        cost_usd=float(cost),
        latency_ms=5.0,
        outcome="ok",
        occurred_at=T0,
    )


def run(project: str, run_id: str) -> list[Any]:
    params = RunParameters(
        spec={"id": "spec-a"},
        resources=Resources(cpu_request="1", memory_request="1Gi", cpu_limit="2", memory_limit="2Gi"),
    )
    return [
        RunRequested(
            run_id=run_id, project=project, env="dev", params=params, requested_by="u", occurred_at=T0
        ),
        RunStarted(run_id=run_id, attempt=1, backend="kubernetes", workload_ref="job", occurred_at=T0),
        RunStateChanged(
            run_id=run_id,
            project=project,
            attempt=1,
            from_state="running",
            to_state="succeeded",
            revision=4,
            occurred_at=T0.replace(hour=10),
        ),
    ]


async def costs_by_project(nats_url: str, expected_calls: int) -> rpc.CostsResponse:
    """Ask until every call is counted (the optimizer folds them asynchronously)."""
    nc = await nats.connect(nats_url)
    try:
        deadline = time.monotonic() + 30
        while True:
            reply = await nc.request(rpc.COSTS, rpc.encode(rpc.CostsRequest(group_by="project")), timeout=10)
            found = rpc.decode_response(reply.data, rpc.CostsResponse)
            assert not isinstance(found, rpc.RpcError), found
            if sum(r.calls for r in found.rows) == expected_calls:
                return found
            assert time.monotonic() < deadline, f"calls not all counted: {found}"
            await asyncio.sleep(0.1)
    finally:
        await nc.close()


async def publish(nats_url: str, events: list[Any]) -> None:
    bus = Bus(BusOptions(url=nats_url), BusMetrics(CollectorRegistry()))
    await bus.connect()
    try:
        await ensure_topology(bus.js)
        for event in events:
            await bus.publish(event)
    finally:
        await bus.close()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_the_optimizer_process_keeps_its_store_in_postgres(
    nats_url: str, postgres_url: str, tmp_path: Path
) -> None:
    alpha, beta = new_ulid(), new_ulid()
    calls = [
        call("alpha", "m1", "0.1", alpha, 100),
        call("alpha", "m2", "0.2", alpha, 200),  # 0.1 + 0.2: exact, not 0.30000000000000004
        call("beta", "m1", "0.000000005", beta, 1),
    ]
    events = [*run("alpha", alpha), *run("beta", beta), *calls]
    optimizer = ServiceProcess(
        "fabrik_optimizer",
        {
            "FABRIK_NATS_URL": nats_url,
            "FABRIK_ANALYTICS_DATABASE_URL": postgres_url,
            # Set, and ignored: with a database URL the SQLite file is not used.
            "FABRIK_ANALYTICS_DB": str(tmp_path / "unused.db"),
            "FABRIK_COST_NODE_TYPE": "cx32",
        },
        log_path=tmp_path / "optimizer.log",
    )
    optimizer.start_process()
    try:
        optimizer.wait_ready(60)
        asyncio.run(publish(nats_url, [*events, msgspec.structs.replace(calls[0], event_id=new_ulid())]))
        found = asyncio.run(costs_by_project(nats_url, 3))
        rows = {r.group: r for r in found.rows}
        assert rows["alpha"].llm_cost_usd == Decimal("0.3") and rows["alpha"].calls == 2
        assert rows["alpha"].input_tokens == 300 and rows["alpha"].runs == 1
        assert rows["beta"].llm_cost_usd == Decimal("0.000000005")
        assert rows["alpha"].compute_runs == 1 and rows["alpha"].compute_cost_usd is not None
        assert rows["alpha"].compute_cost_usd > 0
        assert found.totals.llm_cost_usd == Decimal("0.300000005")
    finally:
        optimizer.kill()

    # The rows are in PostgreSQL, in the `analytics` schema, money as exact integer nano-dollars.
    assert not (tmp_path / "unused.db").exists()
    with psycopg.connect(postgres_url) as conn:
        nanos = conn.execute("SELECT SUM(cost_nanos), COUNT(*) FROM analytics.llm_calls").fetchone()
        assert nanos == (300_000_005, 3)
        version = conn.execute("SELECT value FROM analytics.analytics_meta WHERE name = 'schema_version'")
        assert version.fetchone() is not None
        assert conn.execute("SELECT COUNT(*) FROM analytics.runs").fetchone() == (2,)


def test_a_bad_database_url_stops_the_start_naming_the_setting(tmp_path: Path) -> None:
    env = {
        "FABRIK_NATS_URL": "nats://127.0.0.1:1",
        "FABRIK_ANALYTICS_DATABASE_URL": "mysql://fabrik:hidden@db/analytics",
        "FABRIK_DATA_DIR": str(tmp_path),
        "HOME": str(tmp_path),
        "PATH": "/usr/bin:/bin",
    }
    done = subprocess.run(
        [sys.executable, "-m", "fabrik_optimizer"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2, done.stderr
    assert "FABRIK_ANALYTICS_DATABASE_URL" in done.stderr and "postgresql://" in done.stderr
    assert "hidden" not in done.stderr
