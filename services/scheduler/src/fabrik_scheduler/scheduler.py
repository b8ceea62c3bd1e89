"""The run state machine: the scheduler's decisions, from requests and executor reports.

Only the leader runs this. Every change is written to the `runs` KV bucket with a revision check
first and announced as events second; announcements carry deterministic message ids, so a
redelivered input that finds its change already written re-announces it without duplicating it.
"""

from __future__ import annotations

import logging
import statistics
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, Protocol

import msgspec

from fabrik_common.bus import MSG_ID
from fabrik_common.events import (
    AlertRaised,
    AlertResolved,
    Event,
    LlmUsage,
    RunBudgetExceeded,
    RunCancelRequested,
    RunDispatched,
    RunFinished,
    RunHealthChanged,
    RunProgress,
    RunQueued,
    RunRequested,
    RunResultReported,
    RunResumeRequested,
    RunStarted,
    RunStateChanged,
)
from fabrik_common.ids import derived_ulid, utcnow
from fabrik_common.runs import (
    ACTIVE_STATES,
    AttemptRecord,
    Progress,
    QueueEntry,
    QueueSnapshot,
    RunHealthRecord,
    RunRecord,
    Tokens,
    TransitionError,
    check_transition,
    is_terminal,
    parse_cpu,
    parse_memory,
    resume_refusal,
)
from fabrik_scheduler import health
from fabrik_scheduler.experiments import ExperimentView
from fabrik_scheduler.fairshare import Demand, FairShareQueue, QueuedRun
from fabrik_scheduler.settings import SchedulerSettings
from fabrik_scheduler.store import RunStore

log = logging.getLogger(__name__)

SchedulerInput = (
    RunRequested
    | RunCancelRequested
    | RunResumeRequested
    | RunStarted
    | RunProgress
    | RunResultReported
    | RunFinished
    | RunBudgetExceeded
)

SNAPSHOT_MAX_ENTRIES = 10_000
DISPATCH_PASS_LIMIT = 100
DEFAULT_RECENT_DURATIONS = 100


class Publisher(Protocol):
    async def publish(self, event: Event, *, headers: Mapping[str, str] | None = None) -> Any: ...


def build_queue(settings: SchedulerSettings) -> FairShareQueue:
    cluster = Demand(settings.max_running, settings.max_cpu, parse_memory(settings.max_memory))
    default = Demand(
        settings.project_max_running or cluster.runs,
        settings.project_max_cpu or cluster.cpu,
        parse_memory(settings.project_max_memory) if settings.project_max_memory else cluster.memory,
    )
    overrides = {
        name: Demand(
            limits.runs if limits.runs is not None else default.runs,
            limits.cpu if limits.cpu is not None else default.cpu,
            parse_memory(limits.memory) if limits.memory else default.memory,
        )
        for name, limits in settings.project_limits.items()
    }
    return FairShareQueue(cluster, default, overrides, dict(settings.project_weights))


def demand_of(record: RunRecord) -> Demand:
    resources = record.params.resources
    return Demand(1, parse_cpu(resources.cpu_request), parse_memory(resources.memory_request))


def _queued_seq(record: RunRecord) -> int:
    queued_at = record.queued_at or record.created_at
    return int(queued_at.timestamp() * 1_000_000)


class Scheduler:
    def __init__(
        self,
        settings: SchedulerSettings,
        store: RunStore,
        publisher: Publisher,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.settings = settings
        self.store = store
        self.publisher = publisher
        self.clock = clock
        self.queue = build_queue(settings)
        self.active: dict[str, RunRecord] = {}
        self.durations: deque[float] = deque(maxlen=DEFAULT_RECENT_DURATIONS)
        self.decisions = 0
        self.snapshot_dirty = True
        self.health_policy = health_policy(settings)
        self.health_decisions: dict[tuple[str, str], int] = {}
        # Experiment assignment at dispatch (fabrik_scheduler.experiments); None: no experiments.
        self.experiments: ExperimentView | None = None

    # ------------------------------------------------------------------ loading

    async def load(self) -> None:
        """Rebuild the in-memory view from the KV bucket (on becoming leader)."""
        records = await self.store.load_all()
        self.queue = build_queue(self.settings)
        self.active = {}
        finished: list[RunRecord] = []
        for record in records.values():
            if is_terminal(record.state):
                if record.started_at and record.finished_at:
                    finished.append(record)
            else:
                self._track(record)
        finished.sort(key=lambda r: r.finished_at or r.created_at)
        self.durations.clear()
        for record in finished[-DEFAULT_RECENT_DURATIONS:]:
            self._remember_duration(record)
        # A dispatch whose event may not have gone out before the previous leader stopped.
        for record in list(self.active.values()):
            if record.state == "starting" and not self._current_attempt(record).started_at:
                await self._publish_dispatch(record)
        self.snapshot_dirty = True
        log.info("scheduler state loaded", extra={"runs": len(records), "active": len(self.active)})

    # ------------------------------------------------------------------ inputs

    async def handle(self, event: SchedulerInput, *, redelivered: bool = False) -> None:
        if redelivered:
            await self._reannounce(event.run_id)
        if isinstance(event, RunRequested):
            await self._on_requested(event)
        elif isinstance(event, RunCancelRequested):
            await self._on_cancel_requested(event)
        elif isinstance(event, RunResumeRequested):
            await self._on_resume_requested(event)
        elif isinstance(event, RunStarted):
            await self._on_started(event)
        elif isinstance(event, RunProgress):
            await self._on_progress(event)
        elif isinstance(event, RunResultReported):
            await self._on_result(event)
        elif isinstance(event, RunFinished):
            await self._on_finished(event)
        else:
            await self._on_budget_exceeded(event)

    async def _on_requested(self, event: RunRequested) -> None:
        if event.run_id in self.active:
            return
        now = self.clock()
        spec_id = event.params.spec.get("id") if event.params.spec else None
        record = RunRecord(
            run_id=event.run_id,
            project=event.project,
            env=event.env,
            spec_id=spec_id if isinstance(spec_id, str) else None,
            params=event.params,
            state="queued",
            attempt=1,
            attempts=[AttemptRecord(attempt=1)],
            requested_by=event.requested_by,
            idempotency_key=event.idempotency_key,
            created_at=event.occurred_at,
            queued_at=now,
            state_entered_at=now,
            deadline=now + timedelta(seconds=self.settings.queued_timeout_seconds),
        )
        stored = await self.store.create(record)
        if stored is None:
            # Written before a crash or by the previous leader: carry on from what is stored.
            existing = await self.store.get(event.run_id)
            if existing is not None and not is_terminal(existing.state):
                self._track(existing)
            return
        self._track(stored)
        self.decisions += 1
        await self._emit(
            RunQueued(run_id=stored.run_id, project=stored.project, attempt=1), f"queued-{stored.run_id}-1"
        )
        await self._announce(stored, None)

    async def _on_cancel_requested(self, event: RunCancelRequested) -> None:
        record = self.active.get(event.run_id)
        if record is None:
            return
        message = f"cancelled by {event.requested_by}" + (f": {event.reason}" if event.reason else "")
        if record.state == "queued":
            await self._transition(record, "cancelled", reason="cancelled", message=message)
        elif record.state in ("starting", "running"):
            await self._transition(record, "cancelling", reason="cancelled", message=message)

    async def _on_resume_requested(self, event: RunResumeRequested) -> None:
        record = self.active.get(event.run_id) or await self.store.get(event.run_id)
        if record is None:
            return
        # The gateway refuses these with a 409; a request that got past it (a race with another
        # resume, an event published directly) is dropped here, since the scheduler decides.
        refusal = resume_refusal(record)
        if refusal is not None:
            log.info("resume ignored", extra={"run_id": record.run_id, "reason": refusal})
            return
        changes = (
            [health.Change("recover", "healthy", "resumed", f"resumed by {event.requested_by}")]
            if record.health.state == "failed"
            else []
        )
        resumed = await self._resume(record, f"resumed by {event.requested_by}", changes)
        if resumed is not None and changes:
            await self._announce_health(resumed, record.health, changes[0])

    async def _resume(
        self,
        record: RunRecord,
        message: str,
        health_changes: Sequence[health.Change] = (),
    ) -> RunRecord | None:
        """The next attempt of a run: same run id, image digest and workspace (the executor's
        volume is per run), back in the queue. A user's resume and a heal both come here."""
        attempt = record.attempt + 1

        def next_attempt(r: RunRecord) -> None:
            r.attempt = attempt
            r.attempts = [*r.attempts, AttemptRecord(attempt=attempt)]
            r.queued_at = self.clock()
            r.finished_at = None
            r.exit_code = None
            for change in health_changes:
                r.health = health.apply(r.health, change, self.clock())

        resumed = await self._transition(record, "queued", reason=None, message=message, mutate=next_attempt)
        if resumed is not None:
            await self._emit(
                RunQueued(run_id=resumed.run_id, project=resumed.project, attempt=attempt),
                f"queued-{resumed.run_id}-{attempt}",
            )
        return resumed

    async def _on_started(self, event: RunStarted) -> None:
        record = self.active.get(event.run_id)
        if record is None or event.attempt != record.attempt:
            return

        def started(r: RunRecord) -> None:
            r.started_at = r.started_at or event.occurred_at
            r.image_digest = event.image_digest or r.image_digest
            self._set_attempt(r, started_at=event.occurred_at, workload_ref=event.workload_ref)

        if record.state == "starting":
            await self._transition(record, "running", mutate=started)
        elif record.state == "cancelling":
            await self._write(record, started)

    async def _on_progress(self, event: RunProgress) -> None:
        record = self.active.get(event.run_id)
        if record is None or event.attempt != record.attempt or record.state not in ACTIVE_STATES:
            return

        before = record.health
        change = health.on_progress(record)

        def progressed(r: RunRecord) -> None:
            r.progress = Progress(
                phase=event.phase,
                task=event.task,
                finished=event.finished,
                total=event.total,
                message=event.message,
                updated_at=event.occurred_at,
            )
            now = self.clock()
            r.health = msgspec.structs.replace(r.health, last_progress_at=now)
            if change is not None and r.health.state == before.state:
                r.health = health.apply(r.health, change, now)

        updated = await self._write(record, progressed)
        if updated is not None and change is not None and updated.health.state != before.state:
            await self._announce_health(updated, before, change)

    async def _on_result(self, event: RunResultReported) -> None:
        record = self.active.get(event.run_id)
        if record is None or event.attempt != record.attempt:
            return

        def with_result(r: RunRecord) -> None:
            r.result = event.result

        await self._write(record, with_result)

    async def _on_finished(self, event: RunFinished) -> None:
        record = self.active.get(event.run_id)
        if record is None or event.attempt != record.attempt:
            return
        outcome: str = event.outcome
        if record.state == "cancelling" and outcome == "failed":
            # The workload died of our own SIGTERM/SIGKILL.
            outcome = "cancelled"

        def finished(r: RunRecord) -> None:
            r.finished_at = event.occurred_at
            r.exit_code = event.exit_code
            r.peak_memory_bytes = event.peak_memory_bytes
            self._set_attempt(
                r,
                finished_at=event.occurred_at,
                outcome=outcome,
                reason=event.reason,
                exit_code=event.exit_code,
            )

        reason = event.reason if outcome != "succeeded" else None
        if record.state == "cancelling" and outcome == "cancelled":
            reason = record.reason or "cancelled"
        message = event.message or record.message
        await self._transition(record, outcome, reason=reason, message=message, mutate=finished)

    async def _on_budget_exceeded(self, event: RunBudgetExceeded) -> None:
        record = self.active.get(event.run_id)
        if record is None:
            return
        message = f"{event.scope} budget of ${event.budget_usd:.2f} spent (${event.spent_usd:.2f})"

        def stopped(r: RunRecord) -> None:
            r.finished_at = self.clock()

        updated = await self._transition(
            record, "budget_exceeded", reason=f"{event.scope}_budget", message=message, mutate=stopped
        )
        if updated is not None and record.state != "queued":
            await self._emit(
                RunCancelRequested(run_id=record.run_id, requested_by="scheduler", reason="budget_exceeded"),
                f"cancel-budget-{record.run_id}-{record.attempt}",
            )

    async def apply_usage(self, event: LlmUsage, stream_sequence: int) -> bool:
        """Add one LLM call's tokens and cost to its run. Usage events are handled one at a time
        in stream order, so a sequence at or below the record's `usage_seq` was already counted."""
        if event.run_id is None:
            return False
        record = self.active.get(event.run_id) or await self.store.get(event.run_id)
        if record is None:
            log.warning("usage for an unknown run", extra={"run_id": event.run_id, "call_id": event.call_id})
            return False

        def add(r: RunRecord) -> RunRecord | None:
            if stream_sequence <= r.usage_seq:
                return None
            r.usage_seq = stream_sequence
            r.llm_calls += 1
            r.cost_usd = round(r.cost_usd + event.cost_usd, 10)
            r.tokens = Tokens(
                input=r.tokens.input + event.input_tokens,
                output=r.tokens.output + event.output_tokens,
                cache_read=r.tokens.cache_read + event.cache_read_tokens,
                cache_write=r.tokens.cache_write + event.cache_write_tokens,
            )
            return r

        updated = await self.store.update(record, add)
        if updated is not None and updated.run_id in self.active:
            self.active[updated.run_id] = updated
        return updated is not None

    # ------------------------------------------------------------------ periodic decisions

    async def dispatch(self, limit: int = DISPATCH_PASS_LIMIT) -> int:
        """Start queued runs that fit now, fairly, at most `limit` in this pass (so the caller's
        lock is not held for long when capacity opens up for thousands). Returns how many."""
        dispatched = 0
        for queued in self.queue.select(limit):
            record = self.active.get(queued.run_id)
            if record is None or record.state != "queued":
                continue

            def mark(r: RunRecord) -> None:
                self._set_attempt(r, dispatched_at=self.clock())
                if self.experiments is not None:
                    self.experiments.configure(r)

            starting = await self._transition(record, "starting", mutate=mark)
            if starting is not None:
                await self._publish_dispatch(starting)
                dispatched += 1
        return dispatched

    async def reap(self) -> int:
        """Force a terminal state on every run whose current state outlived its deadline."""
        now = self.clock()
        reaped = 0
        for record in list(self.active.values()):
            if record.deadline is None or record.deadline > now:
                continue
            waited = int((now - record.state_entered_at).total_seconds())
            if record.state == "queued":
                done = await self._transition(
                    record, "failed", reason="queue_timeout", message=f"still queued after {waited} s"
                )
            elif record.state == "starting":
                done = await self._transition(
                    record,
                    "failed",
                    reason="infra_error",
                    message=f"the workload did not start within {waited} s",
                    mutate=self._finish_now,
                )
            elif record.state == "running":
                done = await self._transition(
                    record,
                    "timed_out",
                    reason="timeout",
                    message=f"ran past its timeout of {record.params.timeout_seconds} s",
                    mutate=self._finish_now,
                )
            else:  # cancelling
                done = await self._transition(
                    record,
                    "cancelled",
                    reason=record.reason or "cancelled",
                    message=f"the workload did not confirm its end within {waited} s of the cancel",
                    mutate=self._finish_now,
                )
            if done is not None:
                reaped += 1
                if record.state != "queued":
                    # Make sure the workload is gone too.
                    await self._emit(
                        RunCancelRequested(
                            run_id=record.run_id, requested_by="reaper", reason=done.reason or ""
                        ),
                        f"cancel-reaper-{record.run_id}-{record.attempt}-{record.state}",
                    )
        return reaped

    async def check_health(self) -> int:
        """The health pass: stall the running runs without progress, then heal or fail them.
        Returns how many runs changed health."""
        now = self.clock()
        changed = 0
        for record in list(self.active.values()):
            changes = health.assess(record, now, self.health_policy)
            if not changes:
                continue
            stall, decision = changes[0], changes[1] if len(changes) > 1 else None
            if decision is None:
                before = record.health

                def stalled(r: RunRecord, change: health.Change = stall) -> None:
                    r.health = health.apply(r.health, change, now)

                updated = await self._write(record, stalled)
                if updated is not None:
                    await self._announce_health(updated, before, stall)
            elif decision.decision == "heal":
                updated = await self._heal(record, stall, decision, now)
            else:
                updated = await self._fail_unhealthy(record, stall, decision, now)
            if updated is not None:
                changed += 1
        return changed

    async def _heal(
        self, record: RunRecord, stall: health.Change, heal: health.Change, now: datetime
    ) -> RunRecord | None:
        """Resume a stalled run as a new attempt; the executor stops the stalled workload when
        the new attempt's dispatch reaches it (a newer attempt supersedes the older one)."""
        before = record.health
        healed = await self._resume(record, f"healing: {stall.message}; {heal.message}", [stall, heal])
        if healed is None:
            return None
        stalled_health = health.apply(before, stall, now)
        await self._announce_health(
            msgspec.structs.replace(healed, attempt=record.attempt, health=stalled_health), before, stall
        )
        await self._announce_health(healed, stalled_health, heal)
        return healed

    async def _fail_unhealthy(
        self, record: RunRecord, stall: health.Change, fail: health.Change, now: datetime
    ) -> RunRecord | None:
        before = record.health

        def give_up(r: RunRecord) -> None:
            self._finish_now(r)
            r.health = health.apply(health.apply(r.health, stall, now), fail, now)

        done = await self._transition(
            record, "failed", reason="stalled", message=f"{stall.message}; {fail.message}", mutate=give_up
        )
        if done is None:
            return None
        stalled_health = health.apply(before, stall, now)
        await self._announce_health(msgspec.structs.replace(done, health=stalled_health), before, stall)
        await self._announce_health(done, stalled_health, fail)
        await self._emit(
            RunCancelRequested(run_id=record.run_id, requested_by="scheduler", reason="stalled"),
            f"cancel-health-{record.run_id}-{record.attempt}",
        )
        return done

    async def _announce_health(
        self, record: RunRecord, before: RunHealthRecord, change: health.Change
    ) -> None:
        """`run.health_changed` for a change written in `record`, and the run's health alert."""
        after = record.health
        seq = after.changes
        self.health_decisions[(change.decision, change.category or "")] = (
            self.health_decisions.get((change.decision, change.category or ""), 0) + 1
        )
        log.warning(
            "run health changed",
            extra={
                "run_id": record.run_id,
                "from": before.state,
                "to": change.to_health,
                "decision": change.decision,
                "category": change.category,
                "detail": change.message,
            },
        )
        await self._emit(
            RunHealthChanged(
                run_id=record.run_id,
                project=record.project,
                attempt=record.attempt,
                from_health=before.state,
                to_health=change.to_health,
                decision=change.decision,
                reason=change.reason,
                heal_attempt=after.heals if change.decision == "heal" else before.heals,
                category=change.category,
                message=change.message,
                last_progress_at=before.last_progress_at,
            ),
            f"health-{record.run_id}-{seq}",
        )
        key = f"run.health.{record.run_id}"
        alert_id = derived_ulid(f"{key}#{seq}")
        if change.decision in ("stall", "fail"):
            failed = change.decision == "fail"
            await self._emit(
                AlertRaised(
                    event_id=alert_id,
                    alert_id=alert_id,
                    key=key,
                    severity="critical" if failed else "warning",
                    source="scheduler",
                    title=(
                        f"Run {record.run_id} in {record.project} failed its health check"
                        if failed
                        else f"Run {record.run_id} in {record.project} stalled"
                    ),
                    message=change.message,
                    entity_kind="run",
                    entity_id=record.run_id,
                    project=record.project,
                    labels={
                        "kind": "run_health",
                        "health": change.to_health,
                        **({"category": change.category} if change.category else {}),
                        # A failed run does not get better: say it once.
                        **({"realert_seconds": "0"} if failed else {}),
                    },
                ),
                f"alert-{alert_id}",
            )
        elif change.decision == "recover" and before.state != "healthy":
            await self._emit(
                AlertResolved(
                    event_id=alert_id, alert_id=alert_id, key=key, source="scheduler", message=change.message
                ),
                f"alert-{alert_id}",
            )

    def snapshot(self) -> QueueSnapshot:
        order = self.queue.order()
        cluster = self.queue.cluster
        median = statistics.median(self.durations) if self.durations else None
        free = max(cluster.runs - self.queue.active_count, 0)
        entries = [
            QueueEntry(
                run_id=q.run_id,
                project=q.project,
                priority=q.priority,  # type: ignore[arg-type]
                eta_seconds=estimate_eta(position, free, cluster.runs, median),
            )
            for position, q in enumerate(order[:SNAPSHOT_MAX_ENTRIES])
        ]
        usage = {p: {"runs": d.runs, "cpu": d.cpu, "memory": d.memory} for p, d in self.queue.usage.items()}
        limits = {"cluster": {"runs": cluster.runs, "cpu": cluster.cpu, "memory": cluster.memory}}
        for project in {q.project for q in order} | set(self.queue.usage):
            limit = self.queue.project_limit(project)
            limits[project] = {"runs": limit.runs, "cpu": limit.cpu, "memory": limit.memory}
        return QueueSnapshot(
            taken_at=self.clock(),
            entries=entries,
            total=len(order),
            running=self.queue.active_count,
            usage=usage,
            limits=limits,
        )

    async def write_snapshot(self) -> bool:
        if not self.snapshot_dirty:
            return False
        self.snapshot_dirty = False
        await self.store.write_snapshot(self.snapshot())
        return True

    # ------------------------------------------------------------------ mechanics

    def _track(self, record: RunRecord) -> None:
        self.active[record.run_id] = record
        queued = QueuedRun(
            run_id=record.run_id,
            project=record.project,
            priority=record.params.priority,
            queued_seq=_queued_seq(record),
            demand=demand_of(record),
        )
        if record.state == "queued":
            self.queue.add(queued)
        else:
            self.queue.mark_active(queued)
        self.snapshot_dirty = True

    def _untrack(self, record: RunRecord) -> None:
        self.active.pop(record.run_id, None)
        self.queue.remove(record.run_id)
        self.queue.release(record.run_id)
        self.snapshot_dirty = True

    def _remember_duration(self, record: RunRecord) -> None:
        attempt = self._current_attempt(record)
        start = attempt.started_at or record.started_at
        end = attempt.finished_at or record.finished_at
        if start and end and end > start and record.state == "succeeded":
            self.durations.append((end - start).total_seconds())

    @staticmethod
    def _current_attempt(record: RunRecord) -> AttemptRecord:
        for attempt in reversed(record.attempts):
            if attempt.attempt == record.attempt:
                return attempt
        return AttemptRecord(attempt=record.attempt)

    def _set_attempt(self, record: RunRecord, **changes: Any) -> None:
        attempts = list(record.attempts)
        for index, attempt in enumerate(attempts):
            if attempt.attempt == record.attempt:
                attempts[index] = msgspec.structs.replace(attempt, **changes)
                break
        else:
            attempts.append(AttemptRecord(attempt=record.attempt, **changes))
        record.attempts = attempts

    def _finish_now(self, record: RunRecord) -> None:
        now = self.clock()
        record.finished_at = now
        self._set_attempt(record, finished_at=now)

    def _deadline(self, record: RunRecord, state: str, now: datetime) -> datetime | None:
        s = self.settings
        if state == "queued":
            return now + timedelta(seconds=s.queued_timeout_seconds)
        if state == "starting":
            return now + timedelta(seconds=s.starting_timeout_seconds)
        if state == "running":
            return now + timedelta(seconds=record.params.timeout_seconds + s.running_deadline_slack_seconds)
        if state == "cancelling":
            return now + timedelta(seconds=s.cancelling_timeout_seconds)
        return None

    async def _transition(
        self,
        record: RunRecord,
        target: str,
        *,
        reason: str | None = None,
        message: str = "",
        mutate: Callable[[RunRecord], None] | None = None,
    ) -> RunRecord | None:
        try:
            check_transition(record.state, target)
        except TransitionError as exc:
            log.warning("transition refused", extra={"run_id": record.run_id, "error": str(exc)})
            return None
        expected = record.state

        def change(r: RunRecord) -> RunRecord | None:
            if r.state != expected:
                return None
            now = self.clock()
            r.state = target  # type: ignore[assignment]
            r.reason = reason
            r.message = message
            r.state_entered_at = now
            if mutate is not None:
                mutate(r)
            r.deadline = self._deadline(r, target, now)
            if is_terminal(target):
                ended = health.on_run_ended(r, target, reason, message)
                if ended is not None:
                    r.health = health.apply(r.health, ended, now)
                    health_changes.append(ended)
            return r

        health_changes: list[health.Change] = []
        health_before = record.health
        updated = await self.store.update(record, change)
        if updated is None:
            return None
        self.decisions += 1
        if health_changes:
            await self._announce_health(updated, health_before, health_changes[-1])
        if is_terminal(updated.state):
            self._untrack(updated)
            self._remember_duration(updated)
        else:
            self._untrack(record)
            self._track(updated)
        await self._announce(updated, expected)
        return updated

    async def _write(self, record: RunRecord, mutate: Callable[[RunRecord], None]) -> RunRecord | None:
        """A change of the record that is not a transition (progress, result, attempt details)."""

        def change(r: RunRecord) -> RunRecord | None:
            if r.state != record.state or r.attempt != record.attempt:
                return None
            mutate(r)
            return r

        updated = await self.store.update(record, change)
        if updated is not None and updated.run_id in self.active:
            self.active[updated.run_id] = updated
        return updated

    async def _announce(self, record: RunRecord, from_state: str | None) -> None:
        await self._emit(
            RunStateChanged(
                run_id=record.run_id,
                project=record.project,
                attempt=record.attempt,
                from_state=from_state,  # type: ignore[arg-type]
                to_state=record.state,
                reason=record.reason,
                message=record.message,
                revision=record.revision,
            ),
            f"state-{record.run_id}-{record.attempt}-{record.state}",
        )

    async def _reannounce(self, run_id: str) -> None:
        record = self.active.get(run_id) or await self.store.get(run_id)
        if record is None:
            return
        await self._announce(record, None)
        if record.state == "starting" and not self._current_attempt(record).started_at:
            await self._publish_dispatch(record)

    async def _publish_dispatch(self, record: RunRecord) -> None:
        now = self.clock()
        await self._emit(
            RunDispatched(
                run_id=record.run_id,
                project=record.project,
                env=record.env,
                attempt=record.attempt,
                params=record.params,
                image_digest=record.image_digest,
                experiment_arm=record.experiment_arm,
                experiment=record.experiments[0] if record.experiments else None,
                experiments=tuple(record.experiments),
                deadline=now + timedelta(seconds=record.params.timeout_seconds),
            ),
            f"dispatch-{record.run_id}-{record.attempt}",
        )

    async def _emit(self, event: Event, message_id: str) -> None:
        await self.publisher.publish(event, headers={MSG_ID: message_id})


def health_policy(settings: SchedulerSettings) -> health.HealthPolicy:
    return health.HealthPolicy(
        stall_after=timedelta(seconds=settings.health_stall_seconds),
        heal_attempts=settings.health_heal_attempts,
        heal_window=timedelta(seconds=settings.health_heal_window_seconds),
        heal_progress=timedelta(seconds=settings.health_heal_progress_seconds),
        max_heal_age=timedelta(seconds=settings.health_max_heal_age_seconds),
    )


def estimate_eta(position: int, free_slots: int, slots: int, median_duration: float | None) -> float | None:
    """Seconds until a queued run at `position` (0-based) starts, from recent run durations.

    Runs within the free slots start now; each further wave of `slots` runs waits one median
    duration. Unknown (None) until some run has finished.
    """
    if position < free_slots:
        return 0.0
    if median_duration is None or slots <= 0:
        return None
    return ((position - free_slots) // slots + 1) * median_duration
