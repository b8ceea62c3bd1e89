"""Cron schedules over a real NATS server with the real scheduler, on a driven clock.

The test plays the gateway (it stores definitions in the `schedules` bucket, as the gateway
does) and the executor (it reports runs as started and finished, at the driven time). No test
sleeps through a slot: the clock jumps, the scheduler's schedule loop notices within its
interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import msgspec
from prometheus_client import CollectorRegistry

from fabrik_common.bus import Bus, BusOptions
from fabrik_common.clock import ManualClock
from fabrik_common.events import (
    AlertRaised,
    AlertResolved,
    Resources,
    RunCancelRequested,
    RunDispatched,
    RunFinished,
    RunParameters,
    RunRequested,
    RunStarted,
    RunStateChanged,
    Workload,
)
from fabrik_common.ids import new_ulid
from fabrik_common.metrics import BusMetrics
from fabrik_common.runs import RunRecord
from fabrik_common.schedules.model import (
    Expectations,
    ScheduleDefinition,
    ScheduleState,
    SlotRecord,
    def_key,
    fired_key,
    state_key,
)
from fabrik_common.service import Service
from fabrik_common.testing import running_service
from fabrik_common.topology import OPS, RUNS, ensure_topology
from fabrik_scheduler.app import build
from fabrik_scheduler.schedules.engine import run_id_for
from fabrik_scheduler.settings import SchedulerSettings
from fabrik_scheduler.state import SchedulerState

SMALL = Resources(cpu_request="500m", memory_request="1Gi", cpu_limit="2", memory_limit="4Gi")
START = datetime(2026, 1, 5, 9, 59, 50, tzinfo=UTC)


def hour(h: int, minute: int = 0, second: int = 0) -> datetime:
    return datetime(2026, 1, 5, h, minute, second, tzinfo=UTC)


def settings(url: str, **overrides: Any) -> SchedulerSettings:
    base: dict[str, Any] = {
        "nats_url": url,
        "http_port": 0,
        "log_format": "text",
        "dispatch_interval_seconds": 0.05,
        "reaper_interval_seconds": 0.5,
        "snapshot_interval_seconds": 0.5,
        "schedule_interval_seconds": 0.05,
        "lease_ttl_seconds": 2.0,
    }
    base.update(overrides)
    return SchedulerSettings(**base)


async def until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met in time")
        await asyncio.sleep(0.02)


class Platform:
    """Plays the gateway and the executor; records every run event and alert."""

    def __init__(self, bus: Bus, clock: ManualClock) -> None:
        self.bus = bus
        self.clock = clock
        self.events: list[Any] = []
        self.alerts: list[AlertRaised | AlertResolved] = []

    async def watch(self) -> None:
        async def runs(msg: Any) -> None:
            assert RUNS.codec is not None
            self.events.append(RUNS.codec.decode(msg.data))

        async def alerts(msg: Any) -> None:
            assert OPS.codec is not None
            event = OPS.codec.decode(msg.data)
            if isinstance(event, AlertRaised | AlertResolved):
                self.alerts.append(event)

        await self.bus.js.subscribe("fabrik.runs.>", ordered_consumer=True, cb=runs)
        await self.bus.js.subscribe("fabrik.alerts.>", ordered_consumer=True, cb=alerts)

    async def kv(self) -> Any:
        return await self.bus.js.key_value("schedules")

    async def define(self, name: str, cron: str = "@hourly", **fields: Any) -> ScheduleDefinition:
        now = self.clock.now()
        definition = ScheduleDefinition(
            schedule_id=new_ulid(),
            name=name,
            project="demo",
            params=RunParameters(resources=SMALL, workload=Workload(command=("true",))),
            cron=cron,
            created_at=now,
            updated_at=now,
            active_since=now,
            **fields,
        )
        await (await self.kv()).create(def_key(definition.schedule_id), msgspec.json.encode(definition))
        return definition

    async def state(self, schedule_id: str) -> ScheduleState | None:
        kv = await self.kv()
        try:
            entry = await kv.get(state_key(schedule_id))
        except Exception:
            return None
        return msgspec.json.decode(entry.value, type=ScheduleState) if entry.value else None

    async def wait_state(
        self, schedule_id: str, predicate: Callable[[ScheduleState], bool], timeout: float = 10.0
    ) -> ScheduleState:
        deadline = time.monotonic() + timeout
        while True:
            state = await self.state(schedule_id)
            if state is not None and predicate(state):
                return state
            if time.monotonic() > deadline:
                raise AssertionError(f"schedule state not reached in time; last: {state}")
            await asyncio.sleep(0.03)

    def requested(self, schedule_id: str) -> list[RunRequested]:
        return [e for e in self.events if isinstance(e, RunRequested) and e.params.schedule_id == schedule_id]

    def of(self, kind: type[Any], run_id: str | None = None) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind) and (run_id is None or e.run_id == run_id)]

    def states(self, run_id: str) -> list[str]:
        return [e.to_state for e in self.of(RunStateChanged, run_id)]

    async def start_run(self, run_id: str) -> None:
        await until(lambda: bool(self.of(RunDispatched, run_id)), what=f"dispatch of {run_id}")
        await self.bus.publish(
            RunStarted(
                run_id=run_id, attempt=1, backend="local", workload_ref="x", occurred_at=self.clock.now()
            )
        )
        await until(lambda: "running" in self.states(run_id), what=f"{run_id} running")

    async def finish_run(self, run_id: str, outcome: str = "succeeded") -> None:
        await self.bus.publish(
            RunFinished(
                run_id=run_id,
                attempt=1,
                outcome=outcome,  # type: ignore[arg-type]
                exit_code=0 if outcome == "succeeded" else 1,
                occurred_at=self.clock.now(),
            )
        )
        await until(lambda: outcome in self.states(run_id), what=f"{run_id} {outcome}")

    def raised(self, schedule_id: str, condition: str) -> list[AlertRaised]:
        key = f"schedule.{schedule_id}.{condition}"
        return [a for a in self.alerts if isinstance(a, AlertRaised) and a.key == key]

    def resolved(self, schedule_id: str, condition: str) -> list[AlertResolved]:
        key = f"schedule.{schedule_id}.{condition}"
        return [a for a in self.alerts if isinstance(a, AlertResolved) and a.key == key]


@contextlib.asynccontextmanager
async def platform(url: str, clock: ManualClock) -> AsyncIterator[Platform]:
    bus = Bus(BusOptions(url=url), BusMetrics(CollectorRegistry()))
    await bus.connect()
    await ensure_topology(bus.js)
    p = Platform(bus, clock)
    await p.watch()
    try:
        yield p
    finally:
        await bus.close()


def slot_statuses(state: ScheduleState) -> list[tuple[datetime, str]]:
    return [(r.slot, r.status) for r in state.history]


# --------------------------------------------------------------------------------------------


async def test_forbid_skips_a_slot_while_its_run_is_active(nats_url: str) -> None:
    clock = ManualClock(START)
    async with platform(nats_url, clock) as p, running_service(build(settings(nats_url), clock=clock)):
        schedule = await p.define("forbid", concurrency="forbid")
        sid = schedule.schedule_id
        await p.wait_state(sid, lambda s: s.next_fire_at == hour(10))

        clock.set(hour(10, 0, 1))
        first = run_id_for(sid, hour(10))
        await until(lambda: len(p.requested(sid)) == 1, what="the 10:00 slot fired")
        request = p.requested(sid)[0]
        assert request.run_id == first
        assert request.params.schedule_id == sid
        assert request.params.schedule_slot == hour(10)
        assert request.requested_by == f"schedule:{sid}"
        await p.start_run(first)

        clock.set(hour(11, 0, 1))
        state = await p.wait_state(sid, lambda s: any(r.slot == hour(11) for r in s.history))
        skipped = state.history[-1]
        assert skipped.status == "skipped"
        assert first in skipped.reason
        assert state.health == "missed"
        assert len(p.requested(sid)) == 1

        await p.finish_run(first)
        clock.set(hour(12, 0, 1))
        await until(lambda: len(p.requested(sid)) == 2, what="the 12:00 slot fired")
        state = await p.wait_state(sid, lambda s: s.health == "ok" and s.last_success_at is not None)
        assert slot_statuses(state) == [(hour(10), "fired"), (hour(11), "skipped"), (hour(12), "fired")]
        assert state.history[0].outcome == "succeeded"
        assert p.requested(sid)[1].run_id == run_id_for(sid, hour(12))


async def test_replace_cancels_the_active_run_and_starts_the_new_one(nats_url: str) -> None:
    clock = ManualClock(START)
    async with platform(nats_url, clock) as p, running_service(build(settings(nats_url), clock=clock)):
        schedule = await p.define("replace", concurrency="replace")
        sid = schedule.schedule_id
        await p.wait_state(sid, lambda s: s.next_fire_at is not None)
        clock.set(hour(10, 0, 1))
        first = run_id_for(sid, hour(10))
        await until(lambda: len(p.requested(sid)) == 1)
        await p.start_run(first)

        clock.set(hour(11, 0, 1))
        second = run_id_for(sid, hour(11))
        await until(lambda: len(p.requested(sid)) == 2, what="the 11:00 slot fired")
        cancels = p.of(RunCancelRequested, first)
        assert [c.requested_by for c in cancels] == [f"schedule:{sid}"]
        await until(lambda: "cancelling" in p.states(first), what="the replaced run cancelling")
        # The executor stops the workload; the old run ends cancelled, the new one runs.
        await p.bus.publish(RunFinished(run_id=first, attempt=1, outcome="failed", exit_code=-15))
        await until(lambda: "cancelled" in p.states(first))
        await p.start_run(second)
        state = await p.wait_state(sid, lambda s: s.active_runs == [second])
        assert [r.status for r in state.history] == ["fired", "fired"]
        assert state.history[0].outcome == "cancelled"
        assert "replaces run " + first == state.history[1].reason
        # A cancelled (replaced) run is no failure.
        assert state.consecutive_failures == 0


async def test_catch_up_after_a_three_hour_outage_for_each_policy(nats_url: str) -> None:
    clock = ManualClock(START)
    async with platform(nats_url, clock) as p:
        first = build(settings(nats_url), clock=clock)
        async with running_service(first):
            skip = await p.define("skip", catch_up="skip")
            latest = await p.define("latest", catch_up="latest")
            every = await p.define("all", catch_up="all")
            bounded = await p.define("all-bounded", catch_up="all", catch_up_limit=2)
            for s in (skip, latest, every, bounded):
                await p.wait_state(s.schedule_id, lambda st: st.next_fire_at == hour(10))
        # The scheduler is down from 09:59:50 to 12:30: the 10:00, 11:00 and 12:00 slots pass.
        clock.set(hour(12, 30))
        async with running_service(build(settings(nats_url), clock=clock)):
            states = {
                s.name: await p.wait_state(s.schedule_id, lambda st: st.last_slot == hour(12))
                for s in (skip, latest, every, bounded)
            }
            await asyncio.sleep(0.3)  # a few more ticks: nothing else may fire

            assert p.requested(skip.schedule_id) == []
            assert slot_statuses(states["skip"]) == [(hour(h), "missed") for h in (10, 11, 12)]
            assert states["skip"].next_fire_at == hour(13)
            assert states["skip"].health == "missed"

            assert [r.params.schedule_slot for r in p.requested(latest.schedule_id)] == [hour(12)]
            assert slot_statuses(states["latest"]) == [
                (hour(10), "missed"),
                (hour(11), "missed"),
                (hour(12), "fired"),
            ]

            assert [r.params.schedule_slot for r in p.requested(every.schedule_id)] == [
                hour(10),
                hour(11),
                hour(12),
            ]
            assert [r.run_id for r in p.requested(every.schedule_id)] == [
                run_id_for(every.schedule_id, hour(h)) for h in (10, 11, 12)
            ]

            assert [r.params.schedule_slot for r in p.requested(bounded.schedule_id)] == [hour(11), hour(12)]
            assert slot_statuses(states["all-bounded"]) == [
                (hour(10), "missed"),
                (hour(11), "fired"),
                (hour(12), "fired"),
            ]
            for s in (skip, latest, every, bounded):
                assert (await p.state(s.schedule_id)).next_fire_at == hour(13)  # type: ignore[union-attr]


async def test_leader_failover_at_a_slot_fires_it_exactly_once(nats_url: str) -> None:
    clock = ManualClock(START)
    async with platform(nats_url, clock) as p:
        cfg = settings(nats_url)
        leader: Service[SchedulerState] = build(msgspec.structs.replace(cfg, instance_id="one"), clock=clock)
        standby: Service[SchedulerState] = build(msgspec.structs.replace(cfg, instance_id="two"), clock=clock)
        await leader.start()
        await until(lambda: leader.is_leader, 5)
        await standby.start()
        try:
            schedule = await p.define("failover", cron="*/5 * * * *", catch_up="all")
            sid = schedule.schedule_id
            await p.wait_state(sid, lambda s: s.next_fire_at == hour(10))

            # The slot comes; the leader dies without a goodbye while it handles it.
            clock.set(hour(10, 0, 1))
            await asyncio.sleep(0.03)
            assert leader._campaign is not None
            leader._campaign.cancel()
            await leader.bus.nc.close()
            await until(lambda: standby.is_leader, 10, "standby took over")

            # A previous leader that claimed the next slot and died before publishing its run:
            # the new leader finds the claim and publishes the run (no lost slot).
            kv = await p.kv()
            claimed = SlotRecord(
                slot=hour(10, 5),
                status="fired",
                run_id=run_id_for(sid, hour(10, 5)),
                outcome="requested",
                recorded_at=clock.now(),
            )
            await kv.create(fired_key(sid, hour(10, 5)), msgspec.json.encode(claimed))
            # And one that decided to skip the slot after it: the decision stands, no run.
            skipped = SlotRecord(
                slot=hour(10, 10), status="skipped", reason="decided before", recorded_at=clock.now()
            )
            await kv.create(fired_key(sid, hour(10, 10)), msgspec.json.encode(skipped))
            clock.set(hour(10, 5, 2))
            await p.wait_state(sid, lambda s: s.last_slot == hour(10, 5))
            clock.set(hour(10, 10, 2))

            await p.wait_state(sid, lambda s: s.last_slot == hour(10, 10))
            await asyncio.sleep(0.5)  # more ticks of the new leader: still nothing twice
            runs_kv = await p.bus.js.key_value("runs")
            for slot in (hour(10), hour(10, 5)):
                run_id = run_id_for(sid, slot)
                assert len(p.of(RunRequested, run_id)) == 1, f"slot {slot} requested once"
                entry = await runs_kv.get(run_id)
                record = msgspec.json.decode(entry.value, type=RunRecord)  # type: ignore[arg-type]
                assert record.params.schedule_slot == slot
            assert {r.params.schedule_slot for r in p.requested(sid)} == {hour(10), hour(10, 5)}
            assert len(p.requested(sid)) == 2
            state = await p.state(sid)
            assert state is not None
            assert slot_statuses(state) == [
                (hour(10), "fired"),
                (hour(10, 5), "fired"),
                (hour(10, 10), "skipped"),
            ]
            assert state.history[-1].reason == "decided before"
            assert p.of(RunRequested, run_id_for(sid, hour(10, 10))) == []
        finally:
            await standby.stop()
            await leader.http.stop()


async def test_too_fast_and_too_slow_runs_raise_alerts_that_resolve(nats_url: str) -> None:
    clock = ManualClock(START)
    async with platform(nats_url, clock) as p, running_service(build(settings(nats_url), clock=clock)):
        schedule = await p.define(
            "watched",
            expectations=Expectations(
                min_runtime_seconds=60,
                max_runtime_seconds=600,
                expected_duration_seconds=900,
                realert_interval_seconds=86400,
                alert_channels=["ops"],
            ),
        )
        sid = schedule.schedule_id
        await p.wait_state(sid, lambda s: s.next_fire_at is not None)

        # 10:00: a run that "succeeds" in 10 s.
        clock.set(hour(10, 0, 1))
        fast = run_id_for(sid, hour(10))
        await until(lambda: len(p.requested(sid)) == 1)
        await p.start_run(fast)
        clock.set(hour(10, 0, 11))
        await p.finish_run(fast)
        await until(lambda: bool(p.raised(sid, "too_fast")), what="too_fast alert")
        alert = p.raised(sid, "too_fast")[0]
        assert alert.entity_kind == "schedule"
        assert alert.entity_id == sid
        assert alert.labels["channels"] == "ops"
        assert "succeeded in 10 s" in alert.message

        # 11:00: a run still running 11 minutes later (max runtime 10 min).
        clock.set(hour(11, 0, 1))
        slow = run_id_for(sid, hour(11))
        await until(lambda: len(p.requested(sid)) == 2)
        await p.start_run(slow)
        clock.set(hour(11, 11))
        await until(lambda: bool(p.raised(sid, "too_slow")), what="too_slow alert")
        assert "has been running" in p.raised(sid, "too_slow")[0].message
        state = await p.wait_state(sid, lambda s: s.health == "too_slow")
        assert set(state.conditions) >= {"too_slow", "too_fast"}

        # It ends after 20 minutes (expected 15): still too slow, the episode stays open.
        clock.set(hour(11, 20, 1))
        await p.finish_run(slow)
        state = await p.wait_state(sid, lambda s: s.active_runs == [])
        assert state.health == "too_slow"
        assert "too_fast" not in state.conditions
        await until(lambda: bool(p.resolved(sid, "too_fast")), what="too_fast resolved")

        # 12:00: a normal 5-minute run: healthy again, the too_slow episode resolves.
        clock.set(hour(12, 0, 1))
        normal = run_id_for(sid, hour(12))
        await until(lambda: len(p.requested(sid)) == 3)
        await p.start_run(normal)
        clock.set(hour(12, 5))
        await p.finish_run(normal)
        await p.wait_state(sid, lambda s: s.health == "ok")
        await until(lambda: bool(p.resolved(sid, "too_slow")), what="too_slow resolved")
        await asyncio.sleep(0.2)
        # One raise per episode (the re-alert interval, a day, did not pass while it was open).
        assert len(p.raised(sid, "too_fast")) == 1
        assert len(p.raised(sid, "too_slow")) == 1
        assert len(p.resolved(sid, "too_fast")) == 1
        assert len(p.resolved(sid, "too_slow")) == 1
        assert p.resolved(sid, "too_slow")[0].alert_id == p.raised(sid, "too_slow")[0].alert_id


async def test_failing_schedule_re_alerts_at_the_interval(nats_url: str) -> None:
    clock = ManualClock(START)
    service = build(settings(nats_url), clock=clock)
    async with platform(nats_url, clock) as p, running_service(service):
        schedule = await p.define(
            "flaky",
            expectations=Expectations(failure_tolerance=2, realert_interval_seconds=3600),
        )
        sid = schedule.schedule_id
        await p.wait_state(sid, lambda s: s.next_fire_at is not None)
        for h in (10, 11):
            clock.set(hour(h, 0, 1))
            run_id = run_id_for(sid, hour(h))
            await until(lambda run_id=run_id: bool(p.of(RunRequested, run_id)))  # type: ignore[misc]
            await p.start_run(run_id)
            await p.finish_run(run_id, "failed")
        state = await p.wait_state(sid, lambda s: s.health == "failing")
        assert state.consecutive_failures == 2
        await until(lambda: len(p.raised(sid, "failing")) == 1)
        assert p.raised(sid, "failing")[0].severity == "critical"

        # An hour later the episode is raised again (same alert id); metrics show it.
        clock.set(hour(12, 0, 30))
        await until(lambda: len(p.raised(sid, "failing")) == 2, what="re-alert")
        first, again = p.raised(sid, "failing")
        assert first.alert_id == again.alert_id
        metrics = service.registry.get_sample_value(
            "fabrik_schedule_consecutive_failures", {"schedule": sid, "project": "demo"}
        )
        assert metrics == 2
        assert (
            service.registry.get_sample_value(
                "fabrik_schedule_health", {"schedule": sid, "project": "demo", "state": "failing"}
            )
            == 1
        )


async def test_a_run_not_started_within_the_grace_is_late(nats_url: str) -> None:
    clock = ManualClock(START)
    async with platform(nats_url, clock) as p, running_service(build(settings(nats_url), clock=clock)):
        schedule = await p.define("late", expectations=Expectations(start_grace_seconds=60))
        sid = schedule.schedule_id
        await p.wait_state(sid, lambda s: s.next_fire_at is not None)
        clock.set(hour(10, 0, 1))
        run_id = run_id_for(sid, hour(10))
        await until(lambda: bool(p.of(RunDispatched, run_id)), what="dispatched")
        # Dispatched, but the workload does not start.
        clock.set(hour(10, 2))
        state = await p.wait_state(sid, lambda s: s.health == "late")
        assert "has not started" in state.health_message
        await until(lambda: bool(p.raised(sid, "late")), what="late alert")
        await p.start_run(run_id)
        await p.wait_state(sid, lambda s: s.health == "ok")
        await until(lambda: bool(p.resolved(sid, "late")), what="late resolved")
