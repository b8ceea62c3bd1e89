"""The scheduler service against a real NATS server.

The test plays the gateway (publishing requests) and the executor (publishing started/finished);
the scheduler itself is the real service.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
from prometheus_client import CollectorRegistry

from fabrik_common.bus import Bus, BusOptions
from fabrik_common.events import (
    LlmUsage,
    Resources,
    RunCancelRequested,
    RunDispatched,
    RunEvent,
    RunFinished,
    RunParameters,
    RunProgress,
    RunRequested,
    RunResumeRequested,
    RunStarted,
    RunStateChanged,
)
from fabrik_common.ids import new_ulid
from fabrik_common.metrics import BusMetrics
from fabrik_common.runs import QueueSnapshot, RunRecord
from fabrik_common.service import Service
from fabrik_common.testing import running_service
from fabrik_common.topology import RUNS, ensure_topology
from fabrik_scheduler.app import build
from fabrik_scheduler.settings import SchedulerSettings
from fabrik_scheduler.state import SchedulerState

SMALL = Resources(cpu_request="500m", memory_request="1Gi", cpu_limit="2", memory_limit="4Gi")


def settings(url: str, **overrides: Any) -> SchedulerSettings:
    base: dict[str, Any] = {
        "nats_url": url,
        "http_port": 0,
        "log_format": "text",
        "dispatch_interval_seconds": 0.1,
        "reaper_interval_seconds": 0.2,
        "snapshot_interval_seconds": 0.2,
        "lease_ttl_seconds": 2.0,
    }
    base.update(overrides)
    return SchedulerSettings(**base)


class Platform:
    """The test's own connection: publishes what gateway and executor would, records every run event."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.events: list[RunEvent] = []

    async def watch(self) -> None:
        async def collect(msg: Any) -> None:
            self.events.append(RUNS.codec.decode(msg.data) if RUNS.codec else msg)

        await self.bus.js.subscribe("fabrik.runs.>", ordered_consumer=True, cb=collect)

    async def submit(self, project: str = "demo", priority: str = "normal", **params: Any) -> str:
        run_id = new_ulid()
        await self.bus.publish(
            RunRequested(
                run_id=run_id,
                project=project,
                env="dev",
                params=RunParameters(resources=SMALL, priority=priority, **params),  # type: ignore[arg-type]
                requested_by="test",
            )
        )
        return run_id

    def of(self, kind: type[Any], run_id: str | None = None) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind) and (run_id is None or e.run_id == run_id)]

    def states(self, run_id: str) -> list[tuple[str | None, str]]:
        return [(e.from_state, e.to_state) for e in self.of(RunStateChanged, run_id)]

    async def record(self, run_id: str) -> RunRecord:
        kv = await self.bus.js.key_value("runs")
        entry = await kv.get(run_id)
        assert entry.value is not None
        return msgspec.json.decode(entry.value, type=RunRecord)


@contextlib.asynccontextmanager
async def platform(url: str) -> AsyncIterator[Platform]:
    bus = Bus(BusOptions(url=url), BusMetrics(CollectorRegistry()))
    await bus.connect()
    await ensure_topology(bus.js)
    p = Platform(bus)
    await p.watch()
    try:
        yield p
    finally:
        await bus.close()


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def test_run_lifecycle_through_the_state_machine(nats_url: str) -> None:
    async with platform(nats_url) as p, running_service(build(settings(nats_url))):
        run_id = await p.submit(spec={"id": "hello-spec"})
        await until(lambda: bool(p.of(RunDispatched, run_id)))
        dispatched = p.of(RunDispatched, run_id)[0]
        assert dispatched.attempt == 1
        assert dispatched.params.resources == SMALL

        await p.bus.publish(RunStarted(run_id=run_id, attempt=1, backend="local", workload_ref="local:1"))
        await p.bus.publish(RunProgress(run_id=run_id, attempt=1, phase="implement", finished=3, total=6))
        await until(lambda: ("starting", "running") in p.states(run_id))
        await until(lambda: p.of(RunProgress, run_id) != [])
        await asyncio.sleep(0.3)
        record = await p.record(run_id)
        assert record.progress.phase == "implement"
        assert record.progress.finished == 3

        await p.bus.publish(RunFinished(run_id=run_id, attempt=1, outcome="succeeded", exit_code=0))
        await until(lambda: ("running", "succeeded") in p.states(run_id))
        assert p.states(run_id) == [
            (None, "queued"),
            ("queued", "starting"),
            ("starting", "running"),
            ("running", "succeeded"),
        ]
        record = await p.record(run_id)
        assert record.state == "succeeded"
        assert record.spec_id == "hello-spec"
        assert record.exit_code == 0
        assert record.deadline is None
        assert record.attempts[0].started_at is not None
        assert record.attempts[0].finished_at is not None


async def test_failure_is_never_reported_as_success_and_resume_starts_attempt_two(nats_url: str) -> None:
    async with platform(nats_url) as p, running_service(build(settings(nats_url))):
        run_id = await p.submit()
        await until(lambda: bool(p.of(RunDispatched, run_id)))
        await p.bus.publish(RunStarted(run_id=run_id, attempt=1, backend="local", workload_ref="local:1"))
        await p.bus.publish(
            RunFinished(run_id=run_id, attempt=1, outcome="failed", reason="workload_error", exit_code=3)
        )
        await until(lambda: ("running", "failed") in p.states(run_id))
        record = await p.record(run_id)
        assert record.reason == "workload_error"
        assert record.exit_code == 3

        # A late duplicate of a different outcome for the same attempt changes nothing.
        await p.bus.publish(RunFinished(run_id=run_id, attempt=1, outcome="succeeded", exit_code=0))
        await p.bus.publish(RunResumeRequested(run_id=run_id, requested_by="test"))
        await until(lambda: len(p.of(RunDispatched, run_id)) == 2)
        second = p.of(RunDispatched, run_id)[1]
        assert second.attempt == 2
        record = await p.record(run_id)
        assert record.state == "starting"
        assert record.attempt == 2
        assert [a.attempt for a in record.attempts] == [1, 2]
        assert record.attempts[0].outcome == "failed"
        assert "succeeded" not in [to for _, to in p.states(run_id)]


async def test_cancel_queued_and_running_runs(nats_url: str) -> None:
    async with platform(nats_url) as p, running_service(build(settings(nats_url, max_running=1))):
        running = await p.submit()
        await until(lambda: bool(p.of(RunDispatched, running)))
        queued = await p.submit()
        await until(lambda: (None, "queued") in p.states(queued))
        await p.bus.publish(RunCancelRequested(run_id=queued, requested_by="test"))
        await until(lambda: ("queued", "cancelled") in p.states(queued))
        assert p.of(RunDispatched, queued) == []

        await p.bus.publish(RunStarted(run_id=running, attempt=1, backend="local", workload_ref="local:1"))
        await p.bus.publish(RunCancelRequested(run_id=running, requested_by="test", reason="enough"))
        await until(lambda: ("running", "cancelling") in p.states(running))
        # The executor kills the workload; a non-zero exit after a cancel is a cancellation.
        await p.bus.publish(RunFinished(run_id=running, attempt=1, outcome="failed", exit_code=-15))
        await until(lambda: ("cancelling", "cancelled") in p.states(running))
        record = await p.record(running)
        assert record.reason == "cancelled"
        assert "enough" in record.message


async def test_reaper_ends_runs_past_their_deadlines(nats_url: str) -> None:
    cfg = settings(nats_url, starting_timeout_seconds=1, running_deadline_slack_seconds=0)
    async with platform(nats_url) as p, running_service(build(cfg)):
        never_started = await p.submit()
        overrunning = await p.submit(timeout_seconds=1)
        await until(lambda: bool(p.of(RunDispatched, overrunning)))
        await p.bus.publish(RunStarted(run_id=overrunning, attempt=1, backend="local", workload_ref="x"))
        await until(lambda: ("starting", "failed") in p.states(never_started), timeout=10)
        await until(lambda: ("running", "timed_out") in p.states(overrunning), timeout=10)
        assert (await p.record(never_started)).reason == "infra_error"
        assert (await p.record(overrunning)).reason == "timeout"
        # The reaper also tells the executor to make sure the workload is gone.
        reaper_cancels = [e for e in p.of(RunCancelRequested) if e.requested_by == "reaper"]
        assert {e.run_id for e in reaper_cancels} == {never_started, overrunning}


async def test_fair_share_and_limits_over_the_bus(nats_url: str) -> None:
    cfg = settings(nats_url, max_running=3)
    async with platform(nats_url) as p, running_service(build(cfg)):
        flood = [await p.submit(project="flood") for _ in range(200)]
        await until(lambda: len(p.of(RunDispatched)) == 3)
        small = [await p.submit(project="small") for _ in range(5)]
        await until(lambda: all((None, "queued") in p.states(r) for r in small))

        # Act as a fast executor: finish whatever is dispatched, and check the limit throughout.
        finished: set[str] = set()
        order: list[str] = []
        max_in_flight = 0
        while len(order) < 30:
            dispatched = [e.run_id for e in p.of(RunDispatched)]
            in_flight = [r for r in dispatched if r not in finished]
            max_in_flight = max(max_in_flight, len(in_flight))
            for run_id in in_flight:
                if run_id not in order:
                    order.append(run_id)
                finished.add(run_id)
                await p.bus.publish(RunFinished(run_id=run_id, attempt=1, outcome="succeeded", exit_code=0))
            await asyncio.sleep(0.05)
        assert max_in_flight <= 3
        small_positions = sorted(order.index(r) for r in small if r in order)
        assert len(small_positions) == 5, "the small project's runs all started within 30 dispatches"
        assert small_positions[0] <= 4
        assert set(flood[:3]) <= set(order[:3])


async def test_queue_snapshot_has_positions_in_dispatch_order(nats_url: str) -> None:
    async with platform(nats_url) as p, running_service(build(settings(nats_url, max_running=1))):
        first = await p.submit()
        low = await p.submit(priority="low")
        high = await p.submit(priority="high")
        await until(lambda: bool(p.of(RunDispatched, first)))
        kv = await p.bus.js.key_value("queue")

        async def snapshot() -> QueueSnapshot:
            entry = await kv.get("snapshot")
            assert entry.value is not None
            return msgspec.json.decode(entry.value, type=QueueSnapshot)

        deadline = time.monotonic() + 5
        while True:
            snap = await snapshot()
            if snap.total == 2 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        assert [e.run_id for e in snap.entries] == [high, low]
        assert snap.running == 1
        assert snap.usage["demo"]["runs"] == 1


async def test_leader_failover_dispatches_nothing_twice(nats_url: str) -> None:
    async with platform(nats_url) as p:
        cfg = settings(nats_url, max_running=2)
        leader: Service[SchedulerState] = build(msgspec.structs.replace(cfg, instance_id="one"))
        standby: Service[SchedulerState] = build(msgspec.structs.replace(cfg, instance_id="two"))
        await leader.start()
        await until(lambda: leader.is_leader, 5)
        await standby.start()
        try:
            runs = [await p.submit() for _ in range(6)]
            await until(lambda: len(p.of(RunDispatched)) == 2)

            # The leader dies without a goodbye.
            assert leader._campaign is not None
            leader._campaign.cancel()
            await leader.bus.nc.close()
            died = time.monotonic()
            await until(lambda: standby.is_leader, 10)
            assert time.monotonic() - died < 10

            for run_id in runs:
                while not p.of(RunDispatched, run_id):
                    for e in p.of(RunDispatched):
                        if not p.of(RunFinished, e.run_id):
                            await p.bus.publish(
                                RunFinished(run_id=e.run_id, attempt=1, outcome="succeeded", exit_code=0)
                            )
                    await asyncio.sleep(0.1)
            await until(
                lambda: all(
                    ("running", "succeeded") in p.states(r) or ("starting", "succeeded") in p.states(r)
                    for r in runs[:4]
                ),
                10,
            )
            per_attempt = Counter((e.run_id, e.attempt) for e in p.of(RunDispatched))
            assert max(per_attempt.values()) == 1
            assert set(r for r, _ in per_attempt) == set(runs)
        finally:
            await standby.stop()
            await leader.http.stop()


async def test_llm_usage_adds_up_on_the_run_exactly_once(nats_url: str) -> None:
    service = build(settings(nats_url))
    async with platform(nats_url) as p, running_service(service):
        run_id = await p.submit()
        await until(lambda: bool(p.of(RunDispatched, run_id)))
        costs = [0.0125, 0.5, 0.0000003]
        for i, cost in enumerate(costs):
            await p.bus.publish(
                LlmUsage(
                    call_id=f"call-{i}",
                    run_id=run_id,
                    project="demo",
                    key_id="k",
                    endpoint="chat.completions",
                    model="gpt-test",
                    provider="echo",
                    deployment="echo",
                    upstream_model="echo",
                    streamed=i % 2 == 0,
                    input_tokens=100 * (i + 1),
                    output_tokens=10 * (i + 1),
                    cache_read_tokens=i,
                    cost_usd=cost,
                    latency_ms=5.0,
                    outcome="ok",
                )
            )

        async def calls() -> int:
            return (await p.record(run_id)).llm_calls

        deadline = time.monotonic() + 10
        while await calls() < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        record = await p.record(run_id)
        assert record.llm_calls == 3
        assert record.cost_usd == round(sum(costs), 10)
        assert (record.tokens.input, record.tokens.output, record.tokens.cache_read) == (600, 60, 3)

        # Applying a usage event whose stream sequence was already counted changes nothing.
        scheduler = service.state.scheduler
        event = LlmUsage(
            call_id="again",
            run_id=run_id,
            project="demo",
            key_id="k",
            endpoint="messages",
            model="m",
            provider="echo",
            deployment="echo",
            upstream_model="echo",
            streamed=False,
            cost_usd=1.0,
            latency_ms=1.0,
            outcome="ok",
        )
        async with service.state.lock:
            assert await scheduler.apply_usage(event, record.usage_seq) is False
        assert (await p.record(run_id)).cost_usd == record.cost_usd
