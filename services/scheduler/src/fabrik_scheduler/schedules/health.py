"""Schedule health from the expectations: which conditions hold now, and the one state they make."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from fabrik_common.events import TERMINAL_STATES
from fabrik_common.schedules.model import (
    HEALTH_PRIORITY,
    Expectations,
    ScheduleHealth,
    SlotRecord,
)

FAILED_OUTCOMES = frozenset({"failed", "timed_out", "budget_exceeded"})


@dataclass(frozen=True)
class Health:
    state: ScheduleHealth
    conditions: dict[str, str]
    """Condition → what it is about (the alert's message)."""

    @property
    def message(self) -> str:
        return self.conditions.get(self.state, "")


def _seconds(delta: timedelta) -> int:
    return int(delta.total_seconds())


def evaluate(
    history: list[SlotRecord], consecutive_failures: int, expectations: Expectations, now: datetime
) -> Health:
    """The conditions that hold at `now` (history oldest first):

    - `failing`: at least `failure_tolerance` runs in a row ended failed, timed out or out of budget;
    - `too_slow`: a run is still running past `max_runtime_seconds`, or the last finished run took
      longer than `expected_duration_seconds` (or `max_runtime_seconds`);
    - `late`: a fired slot's run has not started `start_grace_seconds` after the slot;
    - `missed`: the newest decided slot was skipped (concurrency) or missed (downtime);
    - `too_fast`: the last finished run succeeded in less than `min_runtime_seconds`.
    """
    e = expectations
    conditions: dict[str, str] = {}
    if consecutive_failures >= e.failure_tolerance:
        conditions["failing"] = f"{consecutive_failures} consecutive failed run(s)"

    grace = timedelta(seconds=e.start_grace_seconds)
    last_finished: SlotRecord | None = None
    for record in reversed(history):
        if record.run_id is None:
            continue
        if record.outcome in TERMINAL_STATES and record.outcome != "cancelled":
            last_finished = last_finished or record
            continue
        if record.outcome in TERMINAL_STATES:
            continue
        # Active (or not yet recorded) run of this slot.
        if record.started_at is None:
            if now - record.slot > grace:
                conditions.setdefault(
                    "late",
                    f"the run of the slot {record.slot.isoformat()} has not started "
                    f"{_seconds(now - record.slot)} s after it (grace {e.start_grace_seconds} s)",
                )
        elif e.max_runtime_seconds is not None and now - record.started_at > timedelta(
            seconds=e.max_runtime_seconds
        ):
            conditions.setdefault(
                "too_slow",
                f"run {record.run_id} has been running for {_seconds(now - record.started_at)} s "
                f"(max runtime {e.max_runtime_seconds} s)",
            )

    if last_finished is not None and last_finished.started_at and last_finished.finished_at:
        took = _seconds(last_finished.finished_at - last_finished.started_at)
        limit = e.expected_duration_seconds or e.max_runtime_seconds
        if limit is not None and took > limit:
            conditions.setdefault(
                "too_slow",
                f"run {last_finished.run_id} took {took} s (expected at most {limit} s)",
            )
        if (
            e.min_runtime_seconds is not None
            and last_finished.outcome == "succeeded"
            and took < e.min_runtime_seconds
        ):
            conditions["too_fast"] = (
                f"run {last_finished.run_id} succeeded in {took} s "
                f"(expected at least {e.min_runtime_seconds} s)"
            )

    decided = [r for r in history if r.status in ("fired", "skipped", "missed")]
    if decided and decided[-1].status != "fired":
        newest = decided[-1]
        conditions["missed"] = f"the slot {newest.slot.isoformat()} was {newest.status}" + (
            f": {newest.reason}" if newest.reason else ""
        )

    state: ScheduleHealth = "ok"
    for condition in HEALTH_PRIORITY:
        if condition in conditions:
            state = condition  # type: ignore[assignment]
            break
    return Health(state, conditions)


def count_failures(history: list[SlotRecord]) -> int:
    """Consecutive failed runs, newest backwards; a success ends the count, a cancel is neither."""
    count = 0
    for record in reversed(history):
        if record.outcome is None or record.outcome not in TERMINAL_STATES:
            continue
        if record.outcome in FAILED_OUTCOMES:
            count += 1
        elif record.outcome == "succeeded":
            break
    return count
