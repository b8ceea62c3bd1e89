"""Experiments end to end over a real NATS server: the REAL scheduler assigns arms at dispatch, the
REAL optimizer evaluates them from its analytics store (driven clock, crafted run outcomes published
on the RUNS stream as the scheduler and executor publish them) and rolls defaults out and back, and
the REAL gateway serves `/api/v1/experiments` and `/api/v1/optimizer/*`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
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
from fabrik_common.clock import ManualClock
from fabrik_common.events import (
    Resources,
    RunDispatched,
    RunFinished,
    RunParameters,
    RunRequested,
    RunResumeRequested,
    RunStarted,
    RunStateChanged,
)
from fabrik_common.ids import new_ulid
from fabrik_common.metrics import BusMetrics
from fabrik_common.service import Service
from fabrik_common.testing import running_service
from fabrik_common.topology import RUNS, ensure_topology
from fabrik_gateway.app import build as build_gateway
from fabrik_gateway.auth.jwt import mint_hs256
from fabrik_gateway.settings import GatewaySettings
from fabrik_optimizer.app import build as build_optimizer
from fabrik_optimizer.settings import OptimizerSettings
from fabrik_scheduler.app import build as build_scheduler
from fabrik_scheduler.settings import SchedulerSettings

SECRET = "experiments-test-hs256-secret-0123456789"
MONDAY_NOON = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
SMALL = Resources(cpu_request="100m", memory_request="64Mi", cpu_limit="1", memory_limit="4Gi")


def bearer(roles: object, subject: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {mint_hs256(SECRET, subject, roles)}"}


ADMIN = bearer("admin", "root@example.com")
MAINTAINER = bearer({"demo": "maintainer", "sim": "maintainer"}, "mia@example.com")
OTHER_MAINTAINER = bearer({"demo": "maintainer"}, "olga@example.com")


async def until(predicate: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} not reached in time"
        await asyncio.sleep(0.05)


@dataclass
class Stack:
    http: httpx.AsyncClient
    bus: Bus
    clock: ManualClock
    dispatched: list[RunDispatched]

    async def submit(self, project: str = "demo") -> str:
        run_id = new_ulid()
        await self.bus.publish(
            RunRequested(
                run_id=run_id,
                project=project,
                env="dev",
                params=RunParameters(resources=SMALL, template="default", spec={"id": "hello"}),
                requested_by="test",
            )
        )
        return run_id

    def dispatch_of(self, run_id: str, attempt: int = 1) -> RunDispatched | None:
        return next((d for d in self.dispatched if d.run_id == run_id and d.attempt == attempt), None)

    async def dispatched_now(self, run_id: str) -> RunDispatched:
        await until(lambda: self.dispatch_of(run_id) is not None, f"dispatch of {run_id}")
        found = self.dispatch_of(run_id)
        assert found is not None
        return found

    async def outcomes(self, experiment_id: str, arm: str, succeeded: int, failed: int) -> None:
        """Decided runs of one arm, as the scheduler and executor announce them."""
        await self.publish_in_order(self.outcome_events(experiment_id, arm, succeeded, failed))

    async def mixed_outcomes(self, experiment_id: str, arms: dict[str, tuple[int, int]]) -> None:
        """Decided runs of several arms (arm: (succeeded, failed)), interleaved in proportion as
        assignment interleaves them: the optimizer may decide after any prefix of them, and a prefix
        of one arm's runs alone is a sample-ratio mismatch."""
        runs: list[tuple[float, list[Any]]] = []
        for arm, (succeeded, failed) in arms.items():
            events = self.outcome_events(experiment_id, arm, succeeded, failed)
            per_run = [events[i : i + 2] for i in range(0, len(events), 2)]
            runs += [((i + 0.5) / len(per_run), pair) for i, pair in enumerate(per_run)]
        runs.sort(key=lambda r: r[0])
        await self.publish_in_order([e for _, pair in runs for e in pair])

    async def publish_in_order(self, events: list[Any]) -> None:
        for start in range(0, len(events), 200):
            await asyncio.gather(*(self.bus.publish(e) for e in events[start : start + 200]))

    def outcome_events(self, experiment_id: str, arm: str, succeeded: int, failed: int) -> list[Any]:
        """Each run's dispatch and its end, run after run."""
        events: list[Any] = []
        for i in range(succeeded + failed):
            run_id, outcome = new_ulid(), ("succeeded" if i < succeeded else "failed")
            events.append(
                RunDispatched(
                    run_id=run_id,
                    project="sim",
                    env="dev",
                    attempt=1,
                    params=RunParameters(resources=SMALL, template="default"),
                    experiment_arm=f"{experiment_id}/{arm}",
                    deadline=MONDAY_NOON + timedelta(hours=1),
                )
            )
            events.append(
                RunStateChanged(
                    run_id=run_id,
                    project="sim",
                    attempt=1,
                    from_state="running",
                    to_state=outcome,  # type: ignore[arg-type]
                    reason=None if outcome == "succeeded" else "workload_error",
                    revision=5,
                )
            )
        return events

    async def experiment(self, experiment_id: str) -> dict[str, Any]:
        response = await self.http.get(f"/api/v1/experiments/{experiment_id}", headers=ADMIN)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    async def wait_state(self, experiment_id: str, state: str) -> dict[str, Any]:
        deadline = time.monotonic() + 20
        while True:
            body = await self.experiment(experiment_id)
            if body["experiment"]["state"] == state:
                return body
            assert time.monotonic() < deadline, f"{experiment_id} stayed {body['experiment']['state']}"
            await asyncio.sleep(0.1)

    async def create(self, headers: dict[str, str] | None = None, **changes: Any) -> httpx.Response:
        body: dict[str, Any] = {
            "name": "more memory",
            "target": {"project": "demo"},
            "parameter": "resources.memory_limit",
            "control": {"name": "control"},
            "treatments": [{"name": "six", "overrides": {"resources.memory_limit": "6Gi"}}],
            "treatment_share": 0.2,
            "guardrails": ["failure_rate", "cost_per_run"],
        }
        body.update(changes)
        return await self.http.post("/api/v1/experiments", json=body, headers=headers or ADMIN)


@pytest.fixture
async def stack(nats_url: str, tmp_path: Path) -> AsyncIterator[Stack]:
    clock = ManualClock(MONDAY_NOON)
    optimizer = build_optimizer(
        OptimizerSettings(
            nats_url=nats_url,
            http_port=0,
            log_format="text",
            analytics_db=str(tmp_path / "analytics.db"),
            experiment_eval_seconds=0.1,
        ),
        clock=clock,
    )
    scheduler = build_scheduler(
        SchedulerSettings(
            nats_url=nats_url,
            http_port=0,
            log_format="text",
            dispatch_interval_seconds=0.05,
            lease_ttl_seconds=2.0,
            max_running=10_000,
            max_cpu=10_000.0,
            max_memory="100000Gi",
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
    dispatched: list[RunDispatched] = []

    async def collect(msg: Any) -> None:
        event = RUNS.codec.decode(msg.data) if RUNS.codec else None
        if isinstance(event, RunDispatched) and event.project != "sim":
            dispatched.append(event)

    await bus.js.subscribe("fabrik.runs.dispatched.>", ordered_consumer=True, cb=collect)
    services: list[Service[Any]] = [optimizer, scheduler, gateway]
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
            yield Stack(http=http, bus=bus, clock=clock, dispatched=dispatched)
        finally:
            await bus.close()


async def test_assignment_share_stickiness_pause_and_history(stack: Stack) -> None:
    created = await stack.create()
    assert created.status_code == 201, created.text
    exp = created.json()["experiment"]
    assert exp["state"] == "active" and exp["created_by"] == "root@example.com"
    await asyncio.sleep(0.3)  # the scheduler's watch sees the new experiment

    runs = [await stack.submit() for _ in range(150)]
    other = await stack.submit(project="elsewhere")  # not targeted
    await until(lambda: all(stack.dispatch_of(r) for r in [*runs, other]), "every run dispatched")
    arms: dict[str, str] = {}
    for run_id in runs:
        d = stack.dispatch_of(run_id)
        assert d is not None and d.experiment is not None and d.experiment.id == exp["id"]
        arms[run_id] = d.experiment.arm
        assert d.experiment_arm == f"{exp['id']}/{d.experiment.arm}"
        expected_memory = "6Gi" if d.experiment.arm == "six" else "4Gi"
        assert d.params.resources.memory_limit == expected_memory
    share = sum(1 for a in arms.values() if a == "six") / len(arms)
    assert 0.08 <= share <= 0.35, share  # 20 % of 150: sd 3.3 points
    untargeted = stack.dispatch_of(other)
    assert untargeted is not None and untargeted.experiment is None

    # sticky across a resume: attempt 2 keeps the arm and its configuration
    treated = next(r for r, a in arms.items() if a == "six")
    await stack.bus.publish(RunStarted(run_id=treated, attempt=1, backend="local", workload_ref="w"))
    await stack.bus.publish(RunFinished(run_id=treated, attempt=1, outcome="failed", exit_code=1))
    await asyncio.sleep(0.3)
    await stack.bus.publish(RunResumeRequested(run_id=treated, requested_by="test"))
    await until(lambda: stack.dispatch_of(treated, 2) is not None, "the resumed attempt")
    again = stack.dispatch_of(treated, 2)
    assert again is not None and again.experiment is not None
    assert again.experiment.arm == "six" and again.params.resources.memory_limit == "6Gi"

    # a global pause stops assignment at once; a resume restarts it
    denied = await stack.http.post("/api/v1/optimizer/pause", json={"reason": "x"}, headers=MAINTAINER)
    assert denied.status_code == 403
    paused = await stack.http.post("/api/v1/optimizer/pause", json={"reason": "incident 7"}, headers=ADMIN)
    assert paused.status_code == 200 and paused.json()["pause"]["paused"] is True
    await asyncio.sleep(0.3)
    during = [await stack.submit() for _ in range(40)]
    await until(lambda: all(stack.dispatch_of(r) for r in during), "runs during the pause")
    assert all(stack.dispatch_of(r).experiment is None for r in during)  # type: ignore[union-attr]
    assert all(stack.dispatch_of(r).params.resources.memory_limit == "4Gi" for r in during)  # type: ignore[union-attr]
    resumed = await stack.http.post("/api/v1/optimizer/resume", headers=ADMIN)
    assert resumed.status_code == 200 and resumed.json()["pause"]["paused"] is False
    await asyncio.sleep(0.3)
    after = [await stack.submit() for _ in range(20)]
    await until(lambda: all(stack.dispatch_of(r) for r in after), "runs after the resume")
    assert all(stack.dispatch_of(r).experiment is not None for r in after)  # type: ignore[union-attr]

    history = (await stack.http.get("/api/v1/optimizer/history", headers=ADMIN)).json()["entries"]
    what = [(e["type"], e.get("status") or e.get("decision"), e.get("by")) for e in history]
    assert what == [
        ("experiment", "created", "root@example.com"),
        ("experiment", "running", "root@example.com"),
        ("config", "pause", "root@example.com"),
        ("config", "resume", "root@example.com"),
    ]
    listed = (await stack.http.get("/api/v1/experiments", headers=MAINTAINER)).json()
    assert [e["id"] for e in listed["experiments"]] == [exp["id"]]


async def test_rollback_ship_defaults_and_approval(stack: Stack) -> None:
    bad = await stack.create(treatment_share=0.5, treatments=[{"name": "Six", "overrides": {}}])
    assert bad.status_code == 422
    assert {e["field"] for e in bad.json()["errors"]} >= {"treatment_share", "treatments[0].name"}

    hurts = (await stack.create(name="hurts")).json()["experiment"]
    # 10 % against 90 %: emergency rollback
    await stack.mixed_outcomes(hurts["id"], {"control": (36, 4), "six": (1, 9)})
    rolled = await stack.wait_state(hurts["id"], "rolled_back")
    assert rolled["experiment"]["decision"] == "ROLLBACK"
    assert [(a["name"], a["runs"]) for a in rolled["arms"]] == [("control", 40), ("six", 10)]

    wins = (await stack.create(name="wins", target={"project": "sim"})).json()["experiment"]
    await stack.mixed_outcomes(wins["id"], {"control": (80, 80), "six": (39, 1)})
    shipped = await stack.wait_state(wins["id"], "shipped")
    assert shipped["experiment"]["winner"] == "six"
    listed = (await stack.http.get("/api/v1/experiments", headers=ADMIN)).json()
    assert listed["defaults"]["overrides"] == {"resources.memory_limit": "6Gi"}
    await asyncio.sleep(0.3)
    fresh = await stack.dispatched_now(await stack.submit(project="elsewhere"))
    assert fresh.params.resources.memory_limit == "6Gi" and fresh.experiment is None  # the new default

    rollback = await stack.http.post(f"/api/v1/experiments/{wins['id']}/rollback", json={}, headers=ADMIN)
    assert rollback.status_code == 200 and rollback.json()["experiment"]["state"] == "rolled_back"
    await asyncio.sleep(0.3)
    restored = await stack.dispatched_now(await stack.submit(project="elsewhere"))
    assert restored.params.resources.memory_limit == "4Gi"

    medium = (await stack.create(name="careful", risk="medium", target={"project": "sim"})).json()[
        "experiment"
    ]
    assert medium["state"] == "pending_approval"
    # a maintainer approves, in the experiment's project only
    refused = await stack.http.post(f"/api/v1/experiments/{medium['id']}/approve", headers=OTHER_MAINTAINER)
    assert refused.status_code in (403, 404)
    approved = await stack.http.post(f"/api/v1/experiments/{medium['id']}/approve", headers=MAINTAINER)
    assert approved.status_code == 200 and approved.json()["experiment"]["state"] == "active"
    assert approved.json()["experiment"]["approvals"][0]["by"] == "mia@example.com"

    history = (await stack.http.get("/api/v1/optimizer/history", headers=ADMIN)).json()["entries"]
    steps = [(e.get("experiment_id"), e["type"], e.get("status") or e.get("decision")) for e in history]
    assert (hurts["id"], "decision", "rollback") in steps and (
        hurts["id"],
        "experiment",
        "rolled_back",
    ) in steps
    assert [s for s in steps if s[0] == wins["id"]] == [
        (wins["id"], "experiment", "created"),
        (wins["id"], "experiment", "running"),
        (wins["id"], "decision", "ship"),
        (wins["id"], "config", "ship"),
        (wins["id"], "experiment", "shipped"),
        (wins["id"], "config", "rollback"),
        (wins["id"], "experiment", "rolled_back"),
    ]
    assert [s[2] for s in steps if s[0] == medium["id"]] == [
        "created",
        "pending_approval",
        "approved",
        "running",
    ]
    approval = next(
        e for e in history if e.get("experiment_id") == medium["id"] and e.get("status") == "approved"
    )
    assert approval["by"] == "mia@example.com"


def fabrik(stack: Stack, home: Path, *args: str) -> Result:
    """`fabrik` (in this process, in a worker thread) against the stack's gateway, as an admin."""
    env = {
        "FABRIK_API_URL": str(stack.http.base_url).rstrip("/"),
        "FABRIK_HOME": str(home),
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / "config"),
        "FABRIK_TOKEN": ADMIN["Authorization"].removeprefix("Bearer "),
    }
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


async def test_cli_commands(stack: Stack, tmp_path: Path) -> None:
    spec = tmp_path / "experiment.json"
    spec.write_text(
        json.dumps(
            {
                "name": "cli experiment",
                "target": {"project": "demo"},
                "parameter": "model",
                "control": {"name": "control"},
                "treatments": [{"name": "small", "overrides": {"model": "gpt-small"}}],
                "risk": "high",
            }
        )
    )

    async def run(*args: str) -> Result:
        return await asyncio.to_thread(fabrik, stack, tmp_path / "home", *args)

    created = await run("optimizer", "experiments", "create", "-f", str(spec), "-o", "json")
    assert created.exit_code == 0, created.stderr
    exp_id = json.loads(created.stdout)["experiment"]["id"]
    listed = await run("optimizer", "experiments", "list")
    assert listed.exit_code == 0 and exp_id in listed.stdout and "pending_approval" in listed.stdout
    approved = await run("optimizer", "experiments", "approve", exp_id)
    assert approved.exit_code == 0, approved.stderr
    assert "state: active" in approved.stdout and "approved (start) by root@example.com" in approved.stdout
    shown = await run("optimizer", "experiments", "show", exp_id)
    assert shown.exit_code == 0 and "small" in shown.stdout and '"model": "gpt-small"' in shown.stdout
    paused = await run("optimizer", "pause", "--reason", "maintenance window")
    assert paused.exit_code == 0 and "paused by root@example.com: maintenance window" in paused.stdout
    assert (await run("optimizer", "resume")).exit_code == 0
    stopped = await run("optimizer", "experiments", "stop", exp_id, "--reason", "enough")
    assert stopped.exit_code == 0 and "state: stopped" in stopped.stdout
    again = await run("optimizer", "experiments", "stop", exp_id)
    assert again.exit_code == 1 and "409" in again.stderr
    history = await run("optimizer", "history", "--experiment", exp_id, "-o", "json")
    assert history.exit_code == 0, history.stderr
    statuses = [e["status"] for e in json.loads(history.stdout)["entries"]]
    assert statuses == ["created", "pending_approval", "approved", "running", "stopped"]
    everything = await run("optimizer", "history")
    assert "optimizer.paused" in everything.stdout and "maintenance window" in everything.stdout
