"""Cron-scheduled backups: one backup per slot of `FABRIK_BACKUP_SCHEDULE`, whichever replicas run.

Each slot is claimed in the `backups` bucket (`schedule.<slot>`, created once: the first replica to
claim it starts the backup, the others skip it). The backup id is derived from the slot, so even a
second start of the same slot resumes the same archive instead of making another. A slot missed
while no replica ran is fired late if it is at most `grace` old (the latest such slot only);
older ones are skipped and logged.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from cronsim import CronSim, CronSimError
from nats.js.errors import KeyWrongLastSequenceError
from nats.js.kv import KeyValue

log = logging.getLogger(__name__)

SLOT_PREFIX = "schedule."


def cron_problem(cron: str, timezone: str) -> str | None:
    """None when `cron` (five fields) and `timezone` (IANA name) are valid, else why not."""
    try:
        ZoneInfo(timezone)
    except (ValueError, KeyError) as exc:
        return f"unknown time zone {timezone!r}: {exc}"
    try:
        CronSim(cron, datetime.now(UTC))
    except CronSimError as exc:
        return f"invalid cron expression {cron!r}: {exc}"
    return None


def iter_slots(cron: str, timezone: str, after: datetime) -> Iterator[datetime]:
    """The slots strictly after `after`, in UTC, in order (wall-clock times in `timezone`)."""
    for slot in CronSim(cron, after.astimezone(ZoneInfo(timezone))):
        at = slot.astimezone(UTC)
        if at > after:  # in a repeated hour the wall clock may step back in UTC
            yield at


def next_slot(cron: str, timezone: str, after: datetime) -> datetime | None:
    return next(iter_slots(cron, timezone, after), None)


def slot_backup_id(slot: datetime) -> str:
    return f"{slot.astimezone(UTC):%Y%m%dT%H%M%SZ}-scheduled"


def last_slot_before(cron: str, timezone: str, now: datetime, grace: timedelta) -> datetime | None:
    """The latest slot in (now - grace, now], if any."""
    latest = None
    for slot in iter_slots(cron, timezone, now - grace):
        if slot > now:
            break
        latest = slot
    return latest


async def claim(kv: KeyValue, slot: datetime, instance: str) -> bool:
    try:
        await kv.create(f"{SLOT_PREFIX}{slot_backup_id(slot)}", instance.encode())
    except KeyWrongLastSequenceError:
        return False
    return True


async def run_schedule(
    kv: KeyValue,
    cron: str,
    timezone: str,
    instance: str,
    start_backup: Callable[[str], Awaitable[object]],
    *,
    grace: timedelta = timedelta(hours=1),
    clock: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> None:
    now = clock()
    missed = last_slot_before(cron, timezone, now, grace)
    if missed is not None and await claim(kv, missed, instance):
        log.info("scheduled backup slot fired late", extra={"slot": missed.isoformat()})
        await start_backup(slot_backup_id(missed))
    after = now
    while True:
        slot = next_slot(cron, timezone, after)
        if slot is None:
            return
        await asyncio.sleep(max(0.0, (slot - clock()).total_seconds()))
        after = slot
        if await claim(kv, slot, instance):
            log.info("scheduled backup", extra={"slot": slot.isoformat()})
            await start_backup(slot_backup_id(slot))
