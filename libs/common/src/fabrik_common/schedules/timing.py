"""Slot arithmetic: next slots in a time zone (DST-correct, by cronsim) and the catch-up plan."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cronsim import CronSim

from fabrik_common.schedules.model import CatchUpPolicy, expand_cron, zone


def iter_slots(cron: str, timezone: str, after: datetime) -> Iterator[datetime]:
    """The slots strictly after `after`, in UTC, in order. Wall-clock times in `timezone`: a slot
    in a skipped hour (spring forward) fires once when the clock resumes, a slot in a repeated
    hour (fall back) fires once, at its first occurrence."""
    tz = zone(timezone)
    local = after.astimezone(tz)
    for slot in CronSim(expand_cron(cron), local):
        at = slot.astimezone(UTC)
        if at <= after:
            # cronsim works on wall-clock times; in a repeated hour it may step back in UTC.
            continue
        yield at


def next_slot(cron: str, timezone: str, after: datetime) -> datetime | None:
    return next(iter_slots(cron, timezone, after), None)


def due_slots(
    cron: str, timezone: str, after: datetime, now: datetime, limit: int
) -> tuple[list[datetime], int]:
    """The slots in (`after`, `now`], at most the newest `limit` of them, oldest first, and how
    many older ones there were beyond the limit."""
    slots: list[datetime] = []
    dropped = 0
    for slot in iter_slots(cron, timezone, after):
        if slot > now:
            break
        slots.append(slot)
        if len(slots) > limit:
            slots.pop(0)
            dropped += 1
    return slots, dropped


@dataclass(frozen=True)
class SlotPlan:
    """What to do with the slots that came due: fire these, record those as missed."""

    fire: list[datetime]
    missed: list[datetime]
    missed_beyond_limit: int = 0
    """Older missed slots not even listed (beyond the catch-up bound); counted only."""


def plan_slots(
    due: list[datetime],
    now: datetime,
    *,
    grace: timedelta,
    policy: CatchUpPolicy,
    limit: int,
    dropped: int = 0,
) -> SlotPlan:
    """On-time slots (at most `grace` old) fire. Older ones were missed — the scheduler was down
    or not leading — and the catch-up policy decides: `skip` fires none of them, `latest` fires
    the most recent one, `all` fires the newest `limit` of them, oldest first."""
    on_time = [s for s in due if now - s <= grace]
    late = [s for s in due if now - s > grace]
    if not late:
        return SlotPlan(fire=on_time, missed=[], missed_beyond_limit=dropped)
    if policy == "skip":
        fire_late: list[datetime] = []
    elif policy == "latest":
        # The most recent missed slot, unless an on-time slot supersedes it.
        fire_late = [] if on_time else late[-1:]
    else:
        fire_late = late[-limit:] if limit > 0 else []
    missed = [s for s in late if s not in fire_late]
    return SlotPlan(fire=fire_late + on_time, missed=missed, missed_beyond_limit=dropped)
