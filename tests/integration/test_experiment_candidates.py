"""Candidate experiments end to end over a real NATS server: run outcomes published on the RUNS
stream as the scheduler and executor publish them, the REAL optimizer proposing candidates from
its analytics store, and the REAL gateway listing and starting them (`/api/v1/experiments/
candidates`) and the CLI's `fabrik optimizer candidates|start-candidate`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner, Result
from prometheus_client import CollectorRegistry

from fabrik_cli.main import cli
from fabrik_common.bus import Bus, BusOptions
from fabrik_common.events import Resources, RunDispatched, RunFinished, RunParameters, RunStateChanged
from fabrik_common.ids import new_ulid
from fabrik_common.metrics import BusMetrics
from fabrik_common.service import Service
from fabrik_common.testing import running_service
from fabrik_common.topology import ensure_topology
from fabrik_gateway.app import build as build_gateway
from fabrik_gateway.auth.jwt import mint_hs256
from fabrik_gateway.settings import GatewaySettings
from fabrik_optimizer.app import build as build_optimizer
from fabrik_optimizer.settings import OptimizerSettings

SECRET = "candidates-test-hs256-secret-0123456789"
NOW = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
GI = 2**30
LIMIT_4GI = Resources(cpu_request="100m", memory_request="64Mi", cpu_limit="1", memory_limit="4Gi")


def bearer(roles: object, subject: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {mint_hs256(SECRET, subject, roles)}"}


ADMIN = bearer("admin", "root@example.com")
MAINTAINER = bearer({"demo": "maintainer"}, "mia@example.com")
VIEWER = bearer({"demo": "viewer"}, "vic@example.com")
STRANGER = bearer({"other": "maintainer"}, "sam@example.com")


@dataclass
class Stack:
    http: httpx.AsyncClient
    bus: Bus

    async def oom_heavy(self, spec: str, runs: int = 40, ooms: int = 8) -> None:
        """Decided runs of `spec` in `demo` at a 4Gi limit; `ooms` of them OOM-killed at the limit."""
        events: list[Any] = []
        for i in range(runs):
            run_id, oom = new_ulid(), i < ooms
            events += [
                RunDispatched(
                    run_id=run_id,
                    project="demo",
                    env="dev",
                    attempt=1,
                    params=RunParameters(resources=LIMIT_4GI, spec={"id": spec}),
                    deadline=NOW + timedelta(hours=1),
                ),
                RunFinished(
                    run_id=run_id,
                    attempt=1,
                    outcome="failed" if oom else "succeeded",
                    reason="oom_killed" if oom else None,
                    peak_memory_bytes=4 * GI if oom else 2 * GI,
                ),
                RunStateChanged(
                    run_id=run_id,
                    project="demo",
                    attempt=1,
                    from_state="running",
                    to_state="failed" if oom else "succeeded",
                    reason="oom_killed" if oom else None,
                    revision=5,
                ),
            ]
        for event in events:
            await self.bus.publish(event)

    async def candidates(self, headers: dict[str, str] = ADMIN) -> list[dict[str, Any]]:
        response = await self.http.get("/api/v1/experiments/candidates", headers=headers)
        assert response.status_code == 200, response.text
        found: list[dict[str, Any]] = response.json()["candidates"]
        return found

    async def wait_candidates(self, count: int) -> list[dict[str, Any]]:
        deadline = time.monotonic() + 20
        while len(found := await self.candidates()) < count:
            assert time.monotonic() < deadline, f"{len(found)} candidates, not {count}"
            await asyncio.sleep(0.1)
        return found


@contextlib.asynccontextmanager
async def running_stack(nats_url: str, tmp_path: Path, **optimizer: Any) -> AsyncIterator[Stack]:
    optimizer_service = build_optimizer(
        OptimizerSettings(
            nats_url=nats_url,
            http_port=0,
            log_format="text",
            analytics_db=str(tmp_path / "analytics.db"),
            candidate_min_runs=30,
            **optimizer,
        )
    )
    gateway = build_gateway(
        GatewaySettings(
            nats_url=nats_url,
            http_port=0,
            log_format="text",
            anonymous_role="none",
            jwt_hs256_secret=SECRET,
            rate_limit_per_minute=100000,
            rate_limit_burst=100000,
        )
    )
    bus = Bus(BusOptions(url=nats_url), BusMetrics(CollectorRegistry()))
    await bus.connect()
    await ensure_topology(bus.js)
    services: list[Service[Any]] = [optimizer_service, gateway]
    async with contextlib.AsyncExitStack() as stack_:
        for service in services:
            await stack_.enter_async_context(running_service(service))
        http = await stack_.enter_async_context(
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.http.port}", timeout=30)
        )
        deadline = time.monotonic() + 15
        while (await http.get("/readyz")).status_code != 200:
            assert time.monotonic() < deadline, "gateway not ready"
            await asyncio.sleep(0.05)
        try:
            yield Stack(http=http, bus=bus)
        finally:
            await bus.close()


@pytest.fixture
async def stack(nats_url: str, tmp_path: Path) -> AsyncIterator[Stack]:
    async with running_stack(nats_url, tmp_path) as running:
        yield running


def fabrik(stack: Stack, home: Path, headers: dict[str, str], *args: str) -> Result:
    env = {
        "FABRIK_API_URL": str(stack.http.base_url).rstrip("/"),
        "FABRIK_HOME": str(home),
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / "config"),
        "FABRIK_TOKEN": headers["Authorization"].removeprefix("Bearer "),
    }
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


async def test_list_and_start_candidates_through_the_api_and_the_cli(stack: Stack, tmp_path: Path) -> None:
    assert await stack.candidates() == []
    await stack.oom_heavy("hello")
    await stack.oom_heavy("big", runs=60, ooms=6)
    found = await stack.wait_candidates(2)
    by_spec = {c["target"]["spec"]: c for c in found}
    hello = by_spec["hello"]
    assert hello["risk"] == "low" and hello["parameter"] == "resources.memory_limit"
    assert hello["summary"] == "OOM rate 20% at 4Gi (8 of 40 runs), p95 peak 4.0Gi → try 5Gi"
    assert hello["evidence"]["oom_kills"] == 8 and hello["sample_size"] == 40
    assert hello["treatments"][0]["overrides"] == {"resources.memory_limit": "5Gi"}

    # visibility and roles: a stranger sees nothing, a viewer reads but may not start
    assert await stack.candidates(STRANGER) == []
    assert len(await stack.candidates(VIEWER)) == 2
    url = f"/api/v1/experiments/candidates/{hello['id']}/start"
    assert (await stack.http.post(url, headers=STRANGER)).status_code == 404
    assert (await stack.http.post(url, headers=VIEWER)).status_code == 403
    unknown = await stack.http.post(f"/api/v1/experiments/candidates/{'0' * 20}/start", headers=ADMIN)
    assert unknown.status_code == 404 and unknown.json()["errors"] == [{"field": "id", "rule": "unknown"}]
    malformed = await stack.http.post("/api/v1/experiments/candidates/nope/start", headers=ADMIN)
    assert malformed.status_code == 404
    bad_query = await stack.http.get("/api/v1/experiments/candidates?project=Not_A_Label", headers=ADMIN)
    assert bad_query.status_code == 400 and bad_query.json()["errors"][0]["field"] == "project"

    started = await stack.http.post(url, headers=MAINTAINER)
    assert started.status_code == 201, started.text
    experiment = started.json()["experiment"]
    assert experiment["state"] == "active" and experiment["created_by"] == "mia@example.com"
    assert experiment["target"] == {"project": "demo", "spec": "hello", "env": None, "labels": {}}
    assert [c["target"]["spec"] for c in await stack.candidates()] == ["big"]
    again = await stack.http.post(url, headers=MAINTAINER)
    assert again.status_code == 404
    history = await stack.http.get(
        f"/api/v1/optimizer/history?experiment_id={experiment['id']}", headers=ADMIN
    )
    assert [(e["status"], e["by"]) for e in history.json()["entries"]] == [
        ("created", "mia@example.com"),
        ("running", "mia@example.com"),
    ]

    async def run(*args: str) -> Result:
        return await asyncio.to_thread(fabrik, stack, tmp_path / "home", MAINTAINER, *args)

    listed = await run("optimizer", "candidates")
    assert listed.exit_code == 0, listed.stderr
    big = by_spec["big"]
    assert big["id"] in listed.stdout and "demo/big" in listed.stdout and "→ try" in listed.stdout
    assert "auto mode: off" in listed.stdout
    as_json = await run("optimizer", "candidates", "--project", "demo", "-o", "json")
    assert [c["id"] for c in json.loads(as_json.stdout)["candidates"]] == [big["id"]]
    started_cli = await run("optimizer", "start-candidate", big["id"])
    assert started_cli.exit_code == 0, started_cli.stderr
    assert "state: active" in started_cli.stdout and '"resources.memory_limit": "5Gi"' in started_cli.stdout
    missing = await run("optimizer", "start-candidate", big["id"])
    assert missing.exit_code == 1 and "404" in missing.stderr
    assert "no candidates" in (await run("optimizer", "candidates")).stdout


async def test_auto_mode_starts_the_low_risk_candidate(nats_url: str, tmp_path: Path) -> None:
    async with running_stack(nats_url, tmp_path, optimizer_auto=True, candidate_eval_seconds=0.2) as stack:
        await stack.oom_heavy("hello")
        deadline = time.monotonic() + 20
        while True:
            listed = (await stack.http.get("/api/v1/experiments", headers=ADMIN)).json()["experiments"]
            if listed:
                break
            assert time.monotonic() < deadline, "no experiment started by auto mode"
            await asyncio.sleep(0.1)
        [experiment] = listed
        assert experiment["created_by"] == "optimizer (auto)" and experiment["state"] == "active"
        assert experiment["treatments"][0]["overrides"] == {"resources.memory_limit": "5Gi"}
        body = (await stack.http.get("/api/v1/experiments/candidates", headers=ADMIN)).json()
        assert body["candidates"] == [] and body["auto"] is True
        history = await stack.http.get(
            f"/api/v1/optimizer/history?experiment_id={experiment['id']}", headers=ADMIN
        )
        assert [(e["status"], e["by"]) for e in history.json()["entries"]] == [
            ("created", "optimizer (auto)"),
            ("running", "optimizer (auto)"),
        ]
        await asyncio.sleep(0.5)  # later rounds start nothing more
        assert len((await stack.http.get("/api/v1/experiments", headers=ADMIN)).json()["experiments"]) == 1
