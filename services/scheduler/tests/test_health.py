"""Run health without NATS: the rules in `fabrik_scheduler.health`, and the scheduler applying them
to its run records (an in-memory store, a recording publisher, a manual clock)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest

from fabrik_common.clock import ManualClock
from fabrik_common.events import (
    AlertRaised,
    AlertResolved,
    Event,
    Resources,
    RunCancelRequested,
    RunDispatched,
    RunFinished,
    RunHealthChanged,
    RunImported,
    RunParameters,
    RunProgress,
    RunRequested,
    RunResumeRequested,
    RunStarted,
    RunStateChanged,
)
from fabrik_common.ids import new_ulid
from fabrik_common.portable import PortableOrigin, PortableRun
from fabrik_common.runs import RunHealthRecord, RunRecord, resume_refusal
from fabrik_scheduler import health
from fabrik_scheduler.health import HealthPolicy
from fabrik_scheduler.imports import apply_import
from fabrik_scheduler.scheduler import Scheduler
from fabrik_scheduler.settings import SchedulerSettings

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
SMALL = Resources(cpu_request="500m", memory_request="1Gi", cpu_limit="2", memory_limit="4Gi")
POLICY = HealthPolicy()


def record(**changes: Any) -> RunRecord:
    base = RunRecord(
        run_id=new_ulid(),
        project="demo",
        env="dev",
        params=RunParameters(resources=SMALL),
        state="running",
        created_at=T0,
        state_entered_at=T0,
    )
    return msgspec.structs.replace(base, **changes)


# ---------------------------------------------------------------------------------- the rules


def test_a_run_with_recent_progress_is_left_alone() -> None:
    r = record(health=RunHealthRecord(last_progress_at=T0 + timedelta(minutes=20)))
    assert health.assess(r, T0 + timedelta(minutes=49), POLICY) == []


def test_no_progress_for_the_threshold_stalls_and_heals() -> None:
    r = record()
    assert health.assess(r, T0 + timedelta(minutes=29, seconds=59), POLICY) == []
    stall, heal = health.assess(r, T0 + timedelta(minutes=30), POLICY)
    assert (stall.decision, stall.to_health, stall.reason) == ("stall", "stalled", "no_progress")
    assert "no progress for 30m" in stall.message
    assert (heal.decision, heal.to_health) == ("heal", "healing")
    assert "attempt 2" in heal.message and "1 of 3" in heal.message


def test_only_running_runs_are_judged() -> None:
    for state in ("queued", "starting", "cancelling", "failed"):
        assert health.assess(record(state=state), T0 + timedelta(hours=5), POLICY) == []


def test_a_healing_attempt_has_the_shorter_grace() -> None:
    now = T0 + timedelta(hours=1)
    h = RunHealthRecord(state="healing", heals=1, first_heal_at=now)
    r = record(attempt=2, state_entered_at=now, health=h)
    assert health.assess(r, now + timedelta(minutes=9), POLICY) == []
    stall, heal = health.assess(r, now + timedelta(minutes=10), POLICY)
    assert "the healing attempt showed no progress" in stall.message
    assert heal.decision == "heal" and "2 of 3" in heal.message


def test_three_heals_used_up_fails_as_transient_exhausted() -> None:
    first = T0 + timedelta(hours=1)
    h = RunHealthRecord(state="healing", heals=3, first_heal_at=first)
    r = record(attempt=4, state_entered_at=first + timedelta(minutes=15), health=h)
    _, fail = health.assess(r, first + timedelta(minutes=25), POLICY)
    assert (fail.decision, fail.to_health, fail.reason, fail.category) == (
        "fail",
        "failed",
        "heals_exhausted",
        "transient_exhausted",
    )
    assert "after 3 healing attempts" in fail.message


def test_no_heal_after_the_window_of_the_first_heal() -> None:
    first = T0 + timedelta(hours=1)
    h = RunHealthRecord(state="healing", heals=1, first_heal_at=first)
    r = record(attempt=2, state_entered_at=first + timedelta(minutes=25), health=h)
    _, fail = health.assess(r, first + timedelta(minutes=35), POLICY)
    assert (fail.reason, fail.category) == ("heal_window_passed", "transient_exhausted")


def test_the_23_hour_rule() -> None:
    r = record(state_entered_at=T0 + timedelta(hours=22))
    # Stalled at 22h40m: healed.
    assert health.assess(r, T0 + timedelta(hours=22, minutes=40), POLICY)[1].decision == "heal"
    # Stalled at 23h: never healed, failed instead (no heal was made: the cause is unknown).
    _, fail = health.assess(r, T0 + timedelta(hours=23), POLICY)
    assert (fail.decision, fail.reason, fail.category) == ("fail", "too_old", "unknown")
    assert "23h00m" in fail.message
    healing = record(
        state_entered_at=T0 + timedelta(hours=22, minutes=50),
        health=RunHealthRecord(state="healing", heals=1, first_heal_at=T0 + timedelta(hours=22, minutes=50)),
    )
    _, fail = health.assess(healing, T0 + timedelta(hours=23, minutes=1), POLICY)
    assert (fail.reason, fail.category) == ("too_old", "transient_exhausted")


def test_healing_off_only_flags_the_run() -> None:
    policy = HealthPolicy(heal_attempts=0)
    (stall,) = health.assess(record(), T0 + timedelta(hours=1), policy)
    assert stall.to_health == "stalled"
    flagged = record(health=RunHealthRecord(state="stalled"))
    assert health.assess(flagged, T0 + timedelta(hours=5), policy) == []
    recover = health.on_progress(flagged)
    assert recover is not None and recover.to_health == "healthy"


def test_progress_recovers_and_ends_the_episode() -> None:
    h = RunHealthRecord(state="healing", heals=2, heals_total=2, first_heal_at=T0, changes=4)
    change = health.on_progress(record(health=h))
    assert change is not None
    after = health.apply(h, change, T0 + timedelta(minutes=12))
    assert (after.state, after.heals, after.heals_total, after.first_heal_at, after.changes) == (
        "healthy",
        0,
        2,
        None,
        5,
    )
    assert health.on_progress(record()) is None


@pytest.mark.parametrize(
    ("state", "reason", "exit_code", "to", "category"),
    [
        ("failed", "workload_error", 1, "failed", "workload_error"),
        ("failed", "oom_killed", 137, "failed", "workload_error"),
        ("failed", None, 2, "failed", "workload_error"),
        ("failed", "infra_error", None, "failed", "infra_error"),
        ("failed", "image_pull", None, "failed", "infra_error"),
        ("failed", "lost", None, "failed", "infra_error"),
        ("failed", "something_new", None, "failed", "unknown"),
        ("timed_out", "timeout", None, "failed", "unknown"),
        ("succeeded", None, 0, "healthy", None),
        ("cancelled", "cancelled", None, "healthy", None),
    ],
)
def test_a_run_that_ends_while_healing(
    state: str, reason: str | None, exit_code: int | None, to: str, category: str | None
) -> None:
    r = record(exit_code=exit_code, health=RunHealthRecord(state="healing", heals=1))
    change = health.on_run_ended(r, state, reason, "boom")
    assert change is not None
    assert (change.to_health, change.category) == (to, category)
    assert health.on_run_ended(record(), state, reason, "") is None


def test_apply_for_a_heal_counts_and_forgets_progress() -> None:
    h = RunHealthRecord(last_progress_at=T0, changes=1)
    heal = health.Change("heal", "healing", "no_progress")
    after = health.apply(h, heal, T0 + timedelta(hours=1))
    assert (after.heals, after.heals_total, after.first_heal_at, after.last_progress_at) == (
        1,
        1,
        T0 + timedelta(hours=1),
        None,
    )
    assert h.heals == 0  # the input is not changed


# ---------------------------------------------------------------------------------- in the scheduler


class MemoryStore:
    """RunStore's contract in memory: create-only, compare-and-set updates."""

    def __init__(self) -> None:
        self.records: dict[str, bytes] = {}
        self.revisions: dict[str, int] = {}
        self.revision = 0

    def _decode(self, run_id: str) -> RunRecord:
        r = msgspec.json.decode(self.records[run_id], type=RunRecord)
        r.revision = self.revisions[run_id]
        return r

    async def get(self, run_id: str) -> RunRecord | None:
        return self._decode(run_id) if run_id in self.records else None

    async def create(self, record: RunRecord) -> RunRecord | None:
        if record.run_id in self.records:
            return None
        self.revision += 1
        self.records[record.run_id] = msgspec.json.encode(record)
        self.revisions[record.run_id] = record.revision = self.revision
        return record

    async def update(
        self, record: RunRecord, change: Callable[[RunRecord], RunRecord | None], *, attempts: int = 5
    ) -> RunRecord | None:
        current = self._decode(record.run_id)
        if current.revision != record.revision:
            record = current
        updated = change(msgspec.structs.replace(record))
        if updated is None:
            return None
        self.revision += 1
        self.records[record.run_id] = msgspec.json.encode(updated)
        self.revisions[record.run_id] = updated.revision = self.revision
        return updated

    async def load_all(self) -> dict[str, RunRecord]:
        return {k: self._decode(k) for k in self.records}

    async def write_snapshot(self, snapshot: Any) -> int:
        return 0


class Recorder:
    def __init__(self) -> None:
        self.events: list[Event] = []
        self.ids: list[str] = []

    async def publish(self, event: Event, *, headers: Mapping[str, str] | None = None) -> None:
        message_id = (headers or {}).get("Nats-Msg-Id", event.event_id)
        if message_id in self.ids:
            return  # JetStream's de-duplication
        self.ids.append(message_id)
        self.events.append(event)

    def of(self, kind: type[Any]) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]


class World:
    def __init__(self, **settings: Any) -> None:
        self.clock = ManualClock(T0)
        self.store = MemoryStore()
        self.out = Recorder()
        self.scheduler = Scheduler(
            SchedulerSettings(**settings),
            self.store,  # type: ignore[arg-type]
            self.out,
            clock=self.clock,
        )

    async def running_run(self) -> str:
        run_id = new_ulid()
        await self.scheduler.handle(
            RunRequested(
                run_id=run_id,
                project="demo",
                env="dev",
                params=RunParameters(resources=SMALL),
                requested_by="test",
                occurred_at=self.clock(),
            )
        )
        await self.start_current(run_id)
        return run_id

    async def start_current(self, run_id: str) -> int:
        await self.scheduler.dispatch()
        attempt = self.scheduler.active[run_id].attempt
        assert self.scheduler.active[run_id].state == "starting"
        await self.scheduler.handle(
            RunStarted(run_id=run_id, attempt=attempt, backend="local", workload_ref=f"local:{attempt}")
        )
        return attempt

    async def progress(self, run_id: str, attempt: int) -> None:
        await self.scheduler.handle(RunProgress(run_id=run_id, attempt=attempt, finished=1, total=2))

    def health(self, run_id: str) -> list[tuple[str, str, str, int]]:
        return [
            (e.decision, e.from_health, e.to_health, e.attempt)
            for e in self.out.of(RunHealthChanged)
            if e.run_id == run_id
        ]


async def test_stall_heal_and_recover_in_the_scheduler() -> None:
    w = World()
    run_id = await w.running_run()
    await w.progress(run_id, 1)
    w.clock.advance(timedelta(minutes=29))
    assert await w.scheduler.check_health() == 0
    w.clock.advance(timedelta(minutes=2))
    assert await w.scheduler.check_health() == 1
    r = w.scheduler.active[run_id]
    assert (r.state, r.attempt, r.health.state, r.health.heals) == ("queued", 2, "healing", 1)
    assert w.health(run_id) == [("stall", "healthy", "stalled", 1), ("heal", "stalled", "healing", 2)]
    # The old attempt is not cancelled by run id (that would stop the new one too): the new
    # attempt's dispatch supersedes it at the executor.
    assert not w.out.of(RunCancelRequested)
    attempt = await w.start_current(run_id)
    assert attempt == 2
    dispatched = [e for e in w.out.of(RunDispatched) if e.run_id == run_id]
    assert [d.attempt for d in dispatched] == [1, 2]
    # A late report of the stalled attempt changes nothing.
    await w.progress(run_id, 1)
    assert w.scheduler.active[run_id].health.state == "healing"
    await w.progress(run_id, 2)
    r = w.scheduler.active[run_id]
    assert (r.state, r.health.state, r.health.heals, r.health.heals_total) == ("running", "healthy", 0, 1)
    assert w.health(run_id)[-1] == ("recover", "healing", "healthy", 2)
    alerts = [(type(e).__name__, e.key) for e in w.out.events if isinstance(e, AlertRaised | AlertResolved)]
    assert alerts == [("AlertRaised", f"run.health.{run_id}"), ("AlertResolved", f"run.health.{run_id}")]
    stored = await w.store.get(run_id)
    assert stored is not None and stored.health.state == "healthy"


async def test_never_recovers_fails_after_three_heals() -> None:
    w = World()
    run_id = await w.running_run()
    w.clock.advance(timedelta(minutes=30))
    await w.scheduler.check_health()
    for expected in (2, 3, 4):
        assert await w.start_current(run_id) == expected
        w.clock.advance(timedelta(minutes=9))
        await w.scheduler.check_health()
        assert w.scheduler.active[run_id].attempt == expected  # grace of a healing attempt: 10 min
        w.clock.advance(timedelta(minutes=1))
        await w.scheduler.check_health()
    assert run_id not in w.scheduler.active
    r = await w.store.get(run_id)
    assert r is not None
    assert (r.state, r.reason, r.attempt) == ("failed", "stalled", 4)
    assert (r.health.state, r.health.category, r.health.heals) == ("failed", "transient_exhausted", 3)
    assert [d for d, *_ in w.health(run_id)] == ["stall", "heal"] * 3 + ["stall", "fail"]
    fail = w.out.of(RunHealthChanged)[-1]
    assert fail.category == "transient_exhausted" and fail.heal_attempt == 3
    assert "after 3 healing attempts" in fail.message
    (cancel,) = w.out.of(RunCancelRequested)
    assert cancel.reason == "stalled"
    states = [(e.from_state, e.to_state) for e in w.out.of(RunStateChanged)]
    assert states[-1] == ("running", "failed")
    raised = [e for e in w.out.of(AlertRaised) if e.key == f"run.health.{run_id}"]
    assert raised[-1].severity == "critical" and raised[-1].labels["realert_seconds"] == "0"
    # A user may still resume it: health starts over.
    await w.scheduler.handle(RunResumeRequested(run_id=run_id, requested_by="alice"))
    r = w.scheduler.active[run_id]
    assert (r.state, r.attempt, r.health.state) == ("queued", 5, "healthy")
    assert w.health(run_id)[-1] == ("recover", "failed", "healthy", 5)
    resolved = w.out.of(AlertResolved)[-1]
    assert resolved.key == f"run.health.{run_id}"


async def test_no_heal_after_23_hours_of_the_runs_life() -> None:
    w = World()
    run_id = await w.running_run()
    for _ in range(45):  # progress every 30 minutes for 22.5 hours
        w.clock.advance(timedelta(minutes=30))
        await w.progress(run_id, 1)
        assert await w.scheduler.check_health() == 0
    w.clock.advance(timedelta(minutes=30))
    await w.scheduler.check_health()
    r = await w.store.get(run_id)
    assert r is not None
    assert (r.state, r.attempt, r.health.state, r.health.category) == ("failed", 1, "failed", "unknown")
    assert w.health(run_id) == [("stall", "healthy", "stalled", 1), ("fail", "stalled", "failed", 1)]


async def test_a_healing_attempt_that_fails_ends_the_episode_with_its_category() -> None:
    w = World()
    run_id = await w.running_run()
    w.clock.advance(timedelta(minutes=31))
    await w.scheduler.check_health()
    attempt = await w.start_current(run_id)
    await w.scheduler.handle(
        RunFinished(run_id=run_id, attempt=attempt, outcome="failed", reason="workload_error", exit_code=3)
    )
    r = await w.store.get(run_id)
    assert r is not None
    assert (r.state, r.health.state, r.health.category) == ("failed", "failed", "workload_error")
    assert w.health(run_id)[-1] == ("fail", "healing", "failed", 2)


async def test_redelivered_progress_and_repeated_passes_announce_once() -> None:
    w = World()
    run_id = await w.running_run()
    w.clock.advance(timedelta(minutes=31))
    await w.scheduler.check_health()
    await w.scheduler.check_health()
    attempt = await w.start_current(run_id)
    await w.progress(run_id, attempt)
    await w.progress(run_id, attempt)
    assert [d for d, *_ in w.health(run_id)] == ["stall", "heal", "recover"]


async def test_healing_off_flags_stalled_runs_without_touching_them() -> None:
    w = World(health_heal_attempts=0)
    run_id = await w.running_run()
    w.clock.advance(timedelta(hours=1))
    assert await w.scheduler.check_health() == 1
    r = w.scheduler.active[run_id]
    assert (r.state, r.attempt, r.health.state) == ("running", 1, "stalled")
    await w.progress(run_id, 1)
    assert w.scheduler.active[run_id].health.state == "healthy"


async def test_an_imported_run_is_never_resumed() -> None:
    """An imported run has no workspace or image digest here: a resume request that reaches the
    scheduler (the gateway answers 409 first) changes nothing, whatever the run's state."""
    w = World()
    run_id = new_ulid()
    document = PortableRun(
        run_id=run_id,
        project="legacy",
        env="prod",
        spec="fix",
        requested_at=T0,
        started_at=T0 + timedelta(seconds=1),
        finished_at=T0 + timedelta(seconds=61),
        state="failed",
        reason="workload_error",
        origin=PortableOrigin(system="smithers", source_run_id="run-failed"),
    )
    assert await apply_import(
        w.store,  # type: ignore[arg-type]
        w.out,
        RunImported(run_id=run_id, project="legacy", run=document, imported_by="admin"),
    )
    before = await w.store.get(run_id)
    assert before is not None and before.requested_by == "import:smithers:admin"
    refusal = resume_refusal(before)
    assert refusal is not None and "an imported run" in refusal
    published = len(w.out.events)
    await w.scheduler.handle(RunResumeRequested(run_id=run_id, requested_by="alice"))
    assert await w.store.get(run_id) == before
    assert len(w.out.events) == published and run_id not in w.scheduler.active
