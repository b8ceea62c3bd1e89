"""Run health: is a running run still making progress, and what to do when it is not.

Plain functions over a `RunRecord` and the time, no NATS: the scheduler calls `assess` for every
running run on its health pass, `on_progress` when a progress report arrives, `on_run_ended`
when a run reaches a terminal state, and writes what they return into the record (it is the
single writer of run records) before announcing it as `run.health_changed`.

Health overlays the run state: `healthy` (progress within the stall threshold), `stalled` (no
progress for the threshold), `healing` (resumed with a new attempt because it stalled, no progress
of that attempt yet), `failed` (the scheduler gave up on it; `category` says why). See
docs/run-health.md for the rules.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

import msgspec

from fabrik_common.events import HealthCategory, RunHealth
from fabrik_common.runs import RunHealthRecord, RunRecord

Decision = Literal["stall", "heal", "recover", "fail"]

# Failure reasons of a run (RunFinished / reaper) and the health category they fall into.
WORKLOAD_REASONS = frozenset({"workload_error", "oom_killed", "exit_code", "result_failed"})
INFRA_REASONS = frozenset({"infra_error", "image_pull", "lost", "queue_timeout", "node_lost", "evicted"})


@dataclass(frozen=True)
class HealthPolicy:
    stall_after: timedelta = timedelta(minutes=30)
    """No progress of a running attempt for this long: stalled."""
    heal_attempts: int = 3
    """Healing attempts per episode; 0 turns healing off (stalled runs are only flagged)."""
    heal_window: timedelta = timedelta(minutes=30)
    """Further heals only within this time of the episode's first heal."""
    heal_progress: timedelta = timedelta(minutes=10)
    """A healing attempt that shows no progress this long after it started running stalls again."""
    max_heal_age: timedelta = timedelta(hours=23)
    """No heal of a run older than this (from its creation): it is failed instead."""


@dataclass(frozen=True)
class Change:
    """One health change to write into the record and announce."""

    decision: Decision
    to_health: RunHealth
    reason: str
    message: str = ""
    category: HealthCategory | None = None


def last_activity(record: RunRecord) -> datetime:
    """The latest sign of life of the current attempt: its last progress, or entering `running`."""
    seen = record.health.last_progress_at
    entered = record.state_entered_at
    if seen is None or seen < entered:
        return entered
    return seen


def _duration(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    if seconds >= 3600:
        hours, rest = divmod(seconds, 3600)
        return f"{hours}h{rest // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s" if seconds % 60 else f"{seconds // 60}m"
    return f"{seconds}s"


def assess(record: RunRecord, now: datetime, policy: HealthPolicy) -> list[Change]:
    """What the health pass does with this run now: nothing, or stall (and heal or fail)."""
    if record.state != "running":
        return []
    health = record.health
    if health.state == "failed":
        return []
    if health.state == "stalled":
        # Only flagged (healing off): stays stalled until progress or the run's own end.
        return []
    limit = policy.heal_progress if health.state == "healing" else policy.stall_after
    quiet = now - last_activity(record)
    if quiet < limit:
        return []
    what = "the healing attempt showed" if health.state == "healing" else "showed"
    stall = Change(
        "stall",
        "stalled",
        "no_progress",
        f"attempt {record.attempt} {what} no progress for {_duration(quiet)}",
    )
    if policy.heal_attempts <= 0:
        return [stall]
    return [stall, decide(record, now, policy, quiet)]


def decide(record: RunRecord, now: datetime, policy: HealthPolicy, quiet: timedelta) -> Change:
    """Heal a stalled run, or give up on it (the 23 h rule, attempts used up, window passed)."""
    health = record.health
    heals = health.heals
    age = now - record.created_at
    category: HealthCategory = "transient_exhausted" if heals else "unknown"
    if age >= policy.max_heal_age:
        return Change(
            "fail",
            "failed",
            "too_old",
            f"no progress for {_duration(quiet)}; the run is {_duration(age)} old, and runs older than "
            f"{_duration(policy.max_heal_age)} are not healed"
            + (f" ({heals} healing attempt{'s' if heals != 1 else ''} made)" if heals else ""),
            category,
        )
    if heals >= policy.heal_attempts:
        return Change(
            "fail",
            "failed",
            "heals_exhausted",
            f"no progress for {_duration(quiet)} after {heals} healing attempt{'s' if heals != 1 else ''}",
            "transient_exhausted",
        )
    if health.first_heal_at is not None and now - health.first_heal_at > policy.heal_window:
        return Change(
            "fail",
            "failed",
            "heal_window_passed",
            f"no progress for {_duration(quiet)}; {_duration(now - health.first_heal_at)} since the first "
            f"healing attempt, more than the {_duration(policy.heal_window)} allowed",
            "transient_exhausted",
        )
    return Change(
        "heal",
        "healing",
        "no_progress",
        f"resumed as attempt {record.attempt + 1} (healing attempt {heals + 1} of {policy.heal_attempts})",
    )


def on_progress(record: RunRecord) -> Change | None:
    """Progress of the current attempt: a stalled or healing run is healthy again."""
    if record.health.state in ("stalled", "healing"):
        return Change("recover", "healthy", "progress", f"attempt {record.attempt} shows progress again")
    return None


def categorize(reason: str | None, exit_code: int | None) -> HealthCategory:
    if reason in WORKLOAD_REASONS or (reason is None and exit_code not in (None, 0)):
        return "workload_error"
    if reason in INFRA_REASONS:
        return "infra_error"
    return "unknown"


def on_run_ended(record: RunRecord, state: str, reason: str | None, message: str) -> Change | None:
    """A run that was stalled or healing reached a terminal state (its new attempt ended)."""
    if record.health.state not in ("stalled", "healing"):
        return None
    if state in ("failed", "timed_out"):
        category = categorize(reason, record.exit_code) if state == "failed" else "unknown"
        detail = f": {message}" if message else ""
        return Change(
            "fail",
            "failed",
            f"ended_{state}",
            f"attempt {record.attempt} ended {state} ({reason or 'no reason'}) while healing{detail}",
            category,
        )
    return Change("recover", "healthy", f"ended_{state}", f"the run ended {state}")


def apply(health: RunHealthRecord, change: Change, now: datetime) -> RunHealthRecord:
    """The health record after `change` (a new struct: records are copied shallowly)."""
    updated = msgspec.structs.replace(
        health,
        state=change.to_health,
        since=now,
        reason=change.reason,
        message=change.message,
        category=change.category if change.to_health == "failed" else None,
        changes=health.changes + 1,
    )
    if change.decision == "heal":
        updated.heals = health.heals + 1
        updated.heals_total = health.heals_total + 1
        updated.first_heal_at = health.first_heal_at or now
        updated.last_progress_at = None
    elif change.decision == "recover":
        updated.heals = 0
        updated.first_heal_at = None
    return updated
