"""What the scheduler's handlers and loops share, and the loops that run while it leads."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from fabrik_scheduler.alerting.engine import AlertEngine
from fabrik_scheduler.scheduler import DISPATCH_PASS_LIMIT, Scheduler
from fabrik_scheduler.schedules.engine import ScheduleEngine

log = logging.getLogger(__name__)


@dataclass
class SchedulerState:
    scheduler: Scheduler
    # Every decision (handler, dispatch, reaper) holds this lock: one decider at a time.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Cron schedules (fabrik_scheduler.schedules): fired and watched by the leader.
    schedules: ScheduleEngine | None = None
    # Alert delivery (fabrik_scheduler.alerting): episodes, rules, channels; the leader delivers.
    alerts: AlertEngine | None = None


async def dispatch_loop(state: SchedulerState) -> None:
    """Dispatch on a clock too, so capacity freed without an event (limits raised) is used."""
    interval = state.scheduler.settings.dispatch_interval_seconds
    while True:
        async with state.lock:
            dispatched = await state.scheduler.dispatch()
        # A full pass means more may fit: go again at once, letting inputs take the lock between.
        await asyncio.sleep(0 if dispatched >= DISPATCH_PASS_LIMIT else interval)


async def health_loop(state: SchedulerState) -> None:
    """Run health: stall the running runs that stopped making progress, heal or fail them."""
    interval = state.scheduler.settings.health_interval_seconds
    while True:
        async with state.lock:
            await state.scheduler.check_health()
        await asyncio.sleep(interval)


async def alert_loop(state: SchedulerState) -> None:
    """Send pending alert notices (with retries) and re-alerts of open episodes."""
    if state.alerts is None:
        return
    interval = state.scheduler.settings.alert_interval_seconds
    while True:
        await state.alerts.tick()
        await asyncio.sleep(interval)


async def reaper_loop(state: SchedulerState) -> None:
    interval = state.scheduler.settings.reaper_interval_seconds
    while True:
        async with state.lock:
            reaped = await state.scheduler.reap()
        if reaped:
            log.warning(
                "reaper forced runs past their deadline into a terminal state", extra={"runs": reaped}
            )
        await asyncio.sleep(interval)


async def snapshot_loop(state: SchedulerState) -> None:
    interval = state.scheduler.settings.snapshot_interval_seconds
    while True:
        async with state.lock:
            snapshot_needed = state.scheduler.snapshot_dirty
            snapshot = state.scheduler.snapshot() if snapshot_needed else None
            state.scheduler.snapshot_dirty = False
        if snapshot is not None:
            try:
                await state.scheduler.store.write_snapshot(snapshot)
            except BaseException:
                # Not stored: write it again on the next round (the supervisor restarts us).
                state.scheduler.snapshot_dirty = True
                raise
        await asyncio.sleep(interval)
