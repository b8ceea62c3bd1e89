"""`fabrik cost show|export`, `fabrik budget set|status` and `fabrik analytics ...` against a real
gateway process and a real optimizer process over a real NATS server.

Usage events are published on the LLM stream as the llm-proxy publishes them; the CLI runs as an
operator runs it (`python -m fabrik_cli ...` in a subprocess) with its own empty home and HS256
JWTs in $FABRIK_TOKEN.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from fabrik_common.bus import Bus, BusOptions
from fabrik_common.events import LlmUsage
from fabrik_common.ids import new_ulid
from fabrik_common.metrics import BusMetrics
from fabrik_common.testing import ServiceProcess
from fabrik_gateway.auth.jwt import mint_hs256

SECRET = "cli-costs-test-hs256-secret-0123456789"
ADMIN = mint_hs256(SECRET, "root@example.com", "admin")
MAINTAINER = mint_hs256(SECRET, "lead@example.com", {"alpha": "maintainer"})
DEVELOPER = mint_hs256(SECRET, "dev@example.com", {"alpha": "developer"})
ALPHA_VIEWER = mint_hs256(SECRET, "viewer@example.com", ["alpha:viewer"])


ROOT = Path(__file__).resolve().parents[2]


class Cli:
    """`fabrik` as a subprocess with a temporary home (as in test_cli_auth.py); `token=` sets
    $FABRIK_TOKEN for one call."""

    def __init__(self, api: str, home: Path) -> None:
        home.mkdir(parents=True, exist_ok=True)
        self.env = {k: v for k, v in os.environ.items() if k != "FABRIK_TOKEN"}
        self.env.update(FABRIK_API_URL=api, FABRIK_HOME=str(home), HOME=str(home))
        self.env["XDG_CONFIG_HOME"] = str(home / "config")

    def __call__(self, *args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
        env = dict(self.env)
        if token is not None:
            env["FABRIK_TOKEN"] = token
        return subprocess.run(
            [sys.executable, "-m", "fabrik_cli", *args],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
            cwd=ROOT,
            input="",
        )

    def json(self, *args: str, token: str | None = None) -> Any:
        result = self(*args, "-o", "json", token=token)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)


def usage(project: str | None, model: str, cost: float, tokens: int) -> LlmUsage:
    return LlmUsage(
        call_id=new_ulid(),
        run_id=new_ulid(),
        project=project,
        key_id="k",
        endpoint="messages",
        model=model,
        provider="anthropic",
        deployment="d",
        upstream_model=model,
        streamed=True,
        input_tokens=tokens,
        output_tokens=0,
        cost_usd=cost,
        latency_ms=3.0,
        outcome="ok",
        occurred_at=datetime.now(UTC) - timedelta(minutes=1),
    )


EVENTS = [
    usage("alpha", "m1", 0.25, 1000),
    usage("alpha", "m2", 0.0151, 100),
    usage("alpha", "m1", 5e-9, 1),
    usage("beta", "m1", 1.5, 3000),
    usage(None, "m2", 2.0, 7),
]


async def publish(nats_url: str) -> None:
    bus = Bus(BusOptions(url=nats_url), BusMetrics(CollectorRegistry()))
    await bus.connect()
    try:
        for event in EVENTS:
            await bus.publish(event)
    finally:
        await bus.close()


@dataclass
class Stack:
    cli: Cli
    optimizer: ServiceProcess


@pytest.fixture
def stack(nats_url: str, tmp_path: Path) -> Iterator[Stack]:
    optimizer = ServiceProcess(
        "fabrik_optimizer",
        {"FABRIK_NATS_URL": nats_url, "FABRIK_ANALYTICS_DB": str(tmp_path / "analytics.db")},
        log_path=tmp_path / "optimizer.log",
    )
    gateway = ServiceProcess(
        "fabrik_gateway",
        {
            "FABRIK_NATS_URL": nats_url,
            "FABRIK_ANONYMOUS_ROLE": "none",
            "FABRIK_JWT_HS256_SECRET": SECRET,
            "FABRIK_OPTIMIZER_TIMEOUT_SECONDS": "5",
        },
        log_path=tmp_path / "gateway.log",
    )
    try:
        optimizer.start_process()
        gateway.start(ready_timeout=60)
        optimizer.wait_ready(60)
        asyncio.run(publish(nats_url))
        yield Stack(Cli(gateway.base_url, tmp_path / "cli-home"), optimizer)
    finally:
        gateway.kill()
        optimizer.kill()


def ok(result: Any) -> str:
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    out: str = result.stdout
    return out


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_cost_show_export_and_budgets(stack: Stack, tmp_path: Path) -> None:
    cli = stack.cli
    deadline = time.monotonic() + 30
    while True:  # the optimizer ingests asynchronously
        report = cli.json("cost", "show", token=ADMIN)
        if report["totals"]["llm_cost_usd"] == "3.765100005":
            break
        assert time.monotonic() < deadline, report
        time.sleep(0.2)

    # The table: one row per project, most expensive first, exact amounts, then the totals.
    lines = ok(cli("cost", "show", token=ADMIN)).splitlines()
    assert lines[0].split() == ["PROJECT", "LLM", "COMPUTE", "STORAGE", "TOTAL", "TOKENS", "CALLS", "RUNS"]
    assert [line.split()[0] for line in lines[1:]] == ["(none)", "beta", "alpha", "TOTAL"]
    alpha = lines[3].split()
    assert alpha[1] == "$0.265100005" and alpha[4] == "$0.265100005" and alpha[5:] == ["1,101", "3", "3"]
    assert lines[4].split()[1] == "$3.765100005"

    # -o json is the API's document.
    by_model = cli.json("cost", "show", "--group-by", "model", token=ADMIN)
    assert {r["group"]: r["llm_cost_usd"] for r in by_model["rows"]} == {"m1": "1.750000005", "m2": "2.0151"}

    # CSV: a header row and exact decimals; compute and storage are empty by model.
    exported = ok(cli("cost", "export", "--csv", "--group-by", "model", token=ADMIN))
    rows = list(csv.DictReader(io.StringIO(exported)))
    assert list(rows[0]) == [
        "model",
        "llm_cost_usd",
        "compute_cost_usd",
        "storage_cost_usd",
        "total_cost_usd",
        "input_tokens",
        "output_tokens",
        "cache_read_tokens",
        "cache_write_tokens",
        "tokens",
        "calls",
        "runs",
        "compute_runs",
    ]
    assert {r["model"]: (r["llm_cost_usd"], r["compute_cost_usd"], r["calls"]) for r in rows} == {
        "m1": ("1.750000005", "", "3"),
        "m2": ("2.0151", "", "2"),
    }
    target = tmp_path / "alpha.csv"
    result = cli(
        "cost", "export", "--csv", "-p", "alpha", "--from", "7d", "--output", str(target), token=ADMIN
    )
    assert ok(result) == "" and "wrote 1 row(s)" in result.stderr
    (only,) = list(csv.DictReader(io.StringIO(target.read_text())))
    assert only["project"] == "alpha" and only["total_cost_usd"] == "0.265100005"

    # A viewer of one project sees only that project.
    scoped = ok(cli("cost", "show", token=ALPHA_VIEWER)).splitlines()
    assert [line.split()[0] for line in scoped[1:3]] == ["alpha", "TOTAL"]
    assert "only project(s) alpha" in scoped[-1]

    # Budgets: maintainers set their project's, developers may not.
    refused = cli("budget", "set", "--project", "alpha", "--llm", "10", token=DEVELOPER)
    assert refused.returncode == 1 and "(403)" in refused.stderr and "maintainer" in refused.stderr
    line = ok(cli("budget", "set", "--project", "alpha", "--llm", "10", "--warning", "0.5", token=MAINTAINER))
    assert (
        line.strip().splitlines()[0]
        == "the budget of alpha: LLM $10/month, compute no limit; warning at 50.0%"
    )
    # Options not given keep their values.
    both = json.loads(
        ok(cli("budget", "set", "-p", "alpha", "--compute", "5", "-o", "json", token=MAINTAINER))
    )
    assert both["definition"]["llm_usd_per_month"] == 10 and both["definition"]["compute_usd_per_month"] == 5
    assert both["definition"]["warning"] == 0.5 and both["definition"]["updated_by"] == "lead@example.com"

    status = ok(cli("budget", "status", "--project", "alpha", token=ALPHA_VIEWER)).splitlines()
    assert status[0].startswith("period ") and "elapsed" in status[0]
    assert status[2].split() == ["BUDGET", "KIND", "SPENT", "LIMIT", "USED", "PROJECTED", "LEVEL"]
    llm_row = status[3].split()
    assert llm_row[:5] == ["alpha", "llm", "$0.265100005", "$10", "2.7%"] and llm_row[-1] == "ok"
    assert status[4].split()[:4] == ["alpha", "compute", "$0", "$5"]
    assert len(status) == 5  # no global budget shown to a viewer of one project
    assert cli.json("budget", "status", "--period", "2025-01", token=ADMIN)["period"] == "2025-01"

    # Usage errors are caught before anything is sent.
    for args in (
        ("budget", "status", "--period", "2026-13"),
        ("budget", "set", "--global"),
        ("budget", "set", "--global", "--project", "alpha", "--llm", "1"),
        ("budget", "set", "--project", "alpha", "--llm", "lots"),
    ):
        assert cli(*args, token=ADMIN).returncode == 2, args
    invalid = cli("budget", "set", "--project", "Not_A_Label", "--llm", "1", token=ADMIN)
    assert invalid.returncode == 2 and "(--project)" in invalid.stderr

    # `none` drops one limit; --clear the budget.
    dropped = json.loads(
        ok(cli("budget", "set", "-p", "alpha", "--llm", "none", "-o", "json", token=MAINTAINER))
    )
    assert dropped["definition"]["llm_usd_per_month"] is None
    assert dropped["definition"]["compute_usd_per_month"] == 5
    assert (
        ok(cli("budget", "set", "-p", "alpha", "--clear", token=MAINTAINER)).strip()
        == "the budget of alpha is removed"
    )
    assert ok(cli("budget", "status", token=ADMIN)).startswith("no budgets")

    # Analytics.
    insights = ok(cli("analytics", "insights", "--min-runs", "1", token=ADMIN))
    assert insights.startswith("every project: ") and "SUCCESS RATE BY MODEL" in insights
    needs_project = cli("analytics", "insights", token=ALPHA_VIEWER)
    assert needs_project.returncode == 2 and "project: is required" in needs_project.stderr
    assert cli("analytics", "rebuild", token=MAINTAINER).returncode == 1
    rebuilt = ok(cli("analytics", "rebuild", token=ADMIN))
    assert rebuilt.startswith("rebuilt the analytics store in ") and "5 LLM call(s)" in rebuilt
    assert cli.json("cost", "show", token=ADMIN)["totals"]["llm_cost_usd"] == "3.765100005"

    # Without the optimizer: a clear error (after the client's retries on 503).
    stack.optimizer.kill()
    gone = cli("cost", "show", token=ADMIN)
    assert gone.returncode == 1 and "(503)" in gone.stderr and "optimizer is not answering" in gone.stderr
