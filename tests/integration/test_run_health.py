"""Run health over a real NATS server: the real scheduler (driven by a manual clock) watches a run
that stops reporting progress, heals it with new attempts, and gives up after three; the real
gateway and the CLI show the health and filter by it; the health alerts reach a local webhook.
The first two tests play the executor (started, progress); the last one runs the real executor
with a workload that hangs once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import msgspec
import nats.js.errors
from aiohttp import web
from prometheus_client import CollectorRegistry

from fabrik_common.bus import Bus, BusOptions
from fabrik_common.clock import ManualClock
from fabrik_common.envs import generate_env_key
from fabrik_common.events import (
    Event,
    Resources,
    RunCancelRequested,
    RunDispatched,
    RunFinished,
    RunHealthChanged,
    RunParameters,
    RunProgress,
    RunRequested,
    RunStarted,
    Workload,
)
from fabrik_common.ids import new_ulid, utcnow
from fabrik_common.metrics import BusMetrics
from fabrik_common.runs import RunRecord
from fabrik_common.service import Service
from fabrik_common.testing import running_service
from fabrik_common.testing.http_double import HttpDouble
from fabrik_common.topology import RUNS, ensure_topology
from fabrik_executor.app import build as build_executor
from fabrik_executor.settings import ExecutorSettings
from fabrik_gateway.app import build as build_gateway
from fabrik_gateway.settings import GatewaySettings
from fabrik_scheduler.app import build as build_scheduler
from fabrik_scheduler.settings import SchedulerSettings
from fabrik_scheduler.state import SchedulerState

SMALL = Resources(cpu_request="500m", memory_request="1Gi", cpu_limit="2", memory_limit="4Gi")


class Webhook(HttpDouble):
    def __init__(self) -> None:
        super().__init__()
        self.bodies: list[dict[str, Any]] = []

    def make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/hook", self._hook)
        return app

    async def _hook(self, request: web.Request) -> web.Response:
        self.bodies.append(await request.json())
        return web.json_response({"ok": True})


async def until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not met within {timeout} s")
        await asyncio.sleep(0.02)


async def alert_consumer_bound(bus: Bus) -> None:
    """The alert consumer starts at new messages when first created: wait until it exists."""
    deadline = time.monotonic() + 10
    while True:
        try:
            await bus.js.consumer_info("OPS", "scheduler-alerts")
            return
        except nats.js.errors.NotFoundError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


@dataclass
class Env:
    bus: Bus
    clock: ManualClock
    scheduler: Service[SchedulerState]
    http: httpx.AsyncClient
    hook: Webhook
    events: list[Event]
    home: Path

    def of(self, kind: type[Any], run_id: str) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind) and getattr(e, "run_id", None) == run_id]

    def health(self, run_id: str) -> list[tuple[str, str, int]]:
        return [(e.decision, e.to_health, e.attempt) for e in self.of(RunHealthChanged, run_id)]

    async def record(self, run_id: str) -> RunRecord:
        kv = await self.bus.js.key_value("runs")
        entry = await kv.get(run_id)
        assert entry.value is not None
        return msgspec.json.decode(entry.value, type=RunRecord)

    async def submit(self) -> str:
        run_id = new_ulid()
        await self.bus.publish(
            RunRequested(
                run_id=run_id,
                project="demo",
                env="dev",
                params=RunParameters(resources=SMALL),
                requested_by="test",
            )
        )
        return run_id

    async def start(self, run_id: str, attempt: int) -> None:
        """The executor's part: the dispatch of `attempt` arrives, the workload starts."""
        await until(
            lambda: any(d.attempt == attempt for d in self.of(RunDispatched, run_id)),
            what=f"dispatch of attempt {attempt}",
        )
        await self.bus.publish(
            RunStarted(run_id=run_id, attempt=attempt, backend="local", workload_ref=f"local:{attempt}")
        )
        await self.until_record(run_id, lambda r: r.state == "running" and r.attempt == attempt)

    async def until_record(self, run_id: str, predicate: Callable[[RunRecord], bool]) -> RunRecord:
        deadline = time.monotonic() + 10
        last = "no record yet"
        while True:
            try:
                record = await self.record(run_id)
            except nats.js.errors.KeyNotFoundError:  # the scheduler has not admitted the request yet
                pass
            else:
                if predicate(record):
                    return record
                last = f"{record.state} {record.health}"
            if time.monotonic() > deadline:
                raise AssertionError(f"record never matched; last: {last}")
            await asyncio.sleep(0.05)

    async def cli(self, *args: str) -> str:
        """`fabrik ...` in a subprocess against the gateway; its stdout (exit code 0 asserted)."""
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "fabrik_cli",
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "FABRIK_API_URL": str(self.http.base_url), "FABRIK_HOME": str(self.home)},
        )
        out, err = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode == 0, err.decode()
        return out.decode()

    async def listed(self, health: str) -> list[str]:
        response = await self.http.get("/api/v1/runs", params={"health": health})
        assert response.status_code == 200, response.text
        return [item["run_id"] for item in response.json()["items"]]


@contextlib.asynccontextmanager
async def environment(nats_url: str, home: Path) -> AsyncIterator[Env]:
    bus = Bus(BusOptions(url=nats_url), BusMetrics(CollectorRegistry()))
    await bus.connect()
    await ensure_topology(bus.js)
    events: list[Event] = []

    async def collect(msg: Any) -> None:
        assert RUNS.codec is not None
        events.append(RUNS.codec.decode(msg.data))

    await bus.js.subscribe("fabrik.runs.>", ordered_consumer=True, cb=collect)
    clock = ManualClock(utcnow())
    async with Webhook() as hook:
        rules = {
            "channels": {"hook": {"type": "webhook", "url": f"{hook.url}/hook"}},
            "rules": [{"match": {"kind": ["run_health"]}, "channels": ["hook"]}],
        }
        scheduler = build_scheduler(
            SchedulerSettings(
                nats_url=nats_url,
                http_port=0,
                log_format="text",
                dispatch_interval_seconds=0.05,
                reaper_interval_seconds=0.1,
                snapshot_interval_seconds=0.2,
                health_interval_seconds=0.05,
                alert_interval_seconds=0.05,
                lease_ttl_seconds=2.0,
                alert_rules=json.dumps(rules),
                public_url="https://fabrik.example.com",
            ),
            clock=clock,
        )
        gateway = build_gateway(
            GatewaySettings(nats_url=nats_url, http_port=0, log_format="text", anonymous_role="admin")
        )
        async with (
            running_service(scheduler),
            running_service(gateway),
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.http.port}", timeout=10) as http,
        ):
            await until(lambda: scheduler.is_leader, what="scheduler leads")
            await alert_consumer_bound(bus)
            try:
                yield Env(bus, clock, scheduler, http, hook, events, home)
            finally:
                await bus.close()


async def test_a_run_that_stops_reporting_progress_is_stalled_healed_and_healthy_again(
    nats_url: str, tmp_path: Path
) -> None:
    async with environment(nats_url, tmp_path) as env:
        run_id = await env.submit()
        await env.start(run_id, 1)
        await env.bus.publish(RunProgress(run_id=run_id, attempt=1, phase="implement", finished=1, total=9))
        await env.until_record(run_id, lambda r: r.health.last_progress_at is not None)

        # 29 minutes of silence: still healthy.
        env.clock.advance(timedelta(minutes=29))
        await asyncio.sleep(0.3)
        assert env.health(run_id) == []
        # 30: stalled, and healed at once with attempt 2.
        env.clock.advance(timedelta(minutes=1))
        await env.start(run_id, 2)
        assert env.health(run_id) == [("stall", "stalled", 1), ("heal", "healing", 2)]
        heal = env.of(RunHealthChanged, run_id)[1]
        assert heal.heal_attempt == 1 and "healing attempt 1 of 3" in heal.message
        assert not env.of(RunCancelRequested, run_id)  # the new attempt's dispatch supersedes the old one
        assert await env.listed("stalled,healing") == [run_id]
        # The CLI, as an operator runs it.
        listed = json.loads(await env.cli("runs", "list", "--health", "stalled,healing", "-o", "json"))
        assert [item["run_id"] for item in listed["items"]] == [run_id]
        assert listed["items"][0]["health"]["state"] == "healing"
        table = await env.cli("runs", "list", "--health", "healing")
        assert run_id in table and "[healing]" in table
        assert run_id not in await env.cli("runs", "list", "--health", "failed")
        view = (await env.http.get(f"/api/v1/runs/{run_id}")).json()
        assert view["health"]["state"] == "healing" and view["attempt"] == 2
        await until(lambda: len(env.hook.bodies) == 1, what="the stall alert")

        # Attempt 2 reports progress: healthy again, the alert resolved.
        await env.bus.publish(RunProgress(run_id=run_id, attempt=2, phase="implement", finished=2, total=9))
        record = await env.until_record(run_id, lambda r: r.health.state == "healthy")
        assert (record.state, record.attempt, record.health.heals, record.health.heals_total) == (
            "running",
            2,
            0,
            1,
        )
        await until(lambda: len(env.hook.bodies) == 2, what="the resolution")
        raised, resolved = env.hook.bodies
        assert (raised["event"], raised["alert"]["key"], raised["run"]["run_id"]) == (
            "alert.raised",
            f"run.health.{run_id}",
            run_id,
        )
        assert raised["dashboard_url"] == f"https://fabrik.example.com/runs/{run_id}"
        assert resolved["event"] == "alert.resolved" and resolved["episode"] == raised["episode"]
        assert env.health(run_id)[-1] == ("recover", "healthy", 2)
        assert await env.listed("stalled,healing") == []
        assert await env.listed("healthy") == [run_id]
        metrics = (await httpx.AsyncClient().get(f"http://127.0.0.1:{env.scheduler.http.port}/metrics")).text
        assert 'fabrik_scheduler_runs_by_health{health="healthy"} 1.0' in metrics


async def test_a_run_that_never_recovers_fails_after_three_healing_attempts(
    nats_url: str, tmp_path: Path
) -> None:
    async with environment(nats_url, tmp_path) as env:
        run_id = await env.submit()
        await env.start(run_id, 1)
        env.clock.advance(timedelta(minutes=31))
        for attempt in (2, 3, 4):
            await env.start(run_id, attempt)
            env.clock.advance(timedelta(minutes=10))  # a healing attempt's grace
        record = await env.until_record(run_id, lambda r: r.state == "failed")
        assert (record.reason, record.attempt) == ("stalled", 4)
        assert (record.health.state, record.health.category, record.health.heals) == (
            "failed",
            "transient_exhausted",
            3,
        )
        await until(lambda: len(env.of(RunHealthChanged, run_id)) == 8, what="every health event")
        assert [d for d, _, _ in env.health(run_id)] == ["stall", "heal"] * 3 + ["stall", "fail"]
        fail = env.of(RunHealthChanged, run_id)[-1]
        assert fail.category == "transient_exhausted" and "after 3 healing attempts" in fail.message
        await until(
            lambda: bool(env.of(RunCancelRequested, run_id)), what="the cancel of the stalled workload"
        )
        assert await env.listed("failed") == [run_id]
        view = (await env.http.get(f"/api/v1/runs/{run_id}")).json()
        assert view["health"]["category"] == "transient_exhausted"
        # The episode's alert: raised once (stall), escalated once (failed); never repeated.
        await until(lambda: len(env.hook.bodies) == 2, what="raise and escalation")
        assert [b["event"] for b in env.hook.bodies] == ["alert.raised", "alert.escalated"]
        assert env.hook.bodies[1]["severity"] == "critical"
        env.clock.advance(timedelta(days=1))
        await asyncio.sleep(0.3)
        assert len(env.hook.bodies) == 2


HANGING_WORKLOAD = """
import json, os, sys, time
from pathlib import Path

workspace = Path(os.environ.get("FABRIK_WORKSPACE", "."))
marker = workspace / "attempts.txt"
seen = int(marker.read_text()) if marker.exists() else 0
marker.write_text(str(seen + 1))
attempt = os.environ.get("FABRIK_ATTEMPT", "?")
print("::fabrik::progress " + json.dumps({"phase": "work", "finished": 1, "total": 3,
      "message": f"attempt {attempt}, workspace seen {seen} times before"}), flush=True)
if seen == 0:
    time.sleep(3600)  # hangs: no more progress, ever
for step in (2, 3):
    time.sleep(0.3)
    print("::fabrik::progress " + json.dumps({"phase": "work", "finished": step, "total": 3}), flush=True)
"""


async def test_a_hanging_workload_is_healed_by_the_real_executor_in_its_workspace(
    nats_url: str, tmp_path: Path
) -> None:
    """The executor for real: the stalled attempt's process is stopped when the healing attempt's
    dispatch supersedes it, and the new attempt continues in the same workspace."""
    script = tmp_path / "hang_once.py"
    script.write_text(HANGING_WORKLOAD)
    executor = build_executor(
        ExecutorSettings(
            nats_url=nats_url,
            http_port=0,
            log_format="text",
            data_dir=str(tmp_path / "executor"),
            cancel_grace_seconds=1.0,
            shutdown_grace_seconds=2.0,
            env_encryption_key=generate_env_key(),
        )
    )
    async with environment(nats_url, tmp_path) as env, running_service(executor):
        run_id = new_ulid()
        await env.bus.publish(
            RunRequested(
                run_id=run_id,
                project="demo",
                env="dev",
                params=RunParameters(
                    resources=SMALL,
                    workload=Workload(command=(sys.executable, str(script))),
                    timeout_seconds=7200,
                ),
                requested_by="test",
            )
        )
        first = await env.until_record(run_id, lambda r: r.health.last_progress_at is not None)
        assert (first.state, first.attempt) == ("running", 1)
        env.clock.advance(timedelta(minutes=31))
        done = await env.until_record(run_id, lambda r: r.state == "succeeded")
        assert (done.attempt, done.health.state, done.health.heals_total) == (2, "healthy", 1)
        assert done.progress.finished == 3
        assert [d for d, _, _ in env.health(run_id)] == ["stall", "heal", "recover"]
        finished = {e.attempt: e for e in env.of(RunFinished, run_id)}
        assert finished[1].outcome == "cancelled" and "superseded" in finished[1].message
        assert finished[2].outcome == "succeeded"
        (workspace_marker,) = (tmp_path / "executor").rglob("attempts.txt")
        assert workspace_marker.read_text() == "2"  # both attempts worked in the one workspace
