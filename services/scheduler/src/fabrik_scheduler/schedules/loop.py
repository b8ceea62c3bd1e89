"""The schedule loop: one tick of the schedule engine per interval, while this replica leads."""

from __future__ import annotations

import asyncio

from fabrik_scheduler.state import SchedulerState


async def schedule_loop(state: SchedulerState) -> None:
    engine = state.schedules
    if engine is None:
        return
    interval = state.scheduler.settings.schedule_interval_seconds
    try:
        while True:
            await engine.tick()
            await asyncio.sleep(interval)
    finally:
        # Deposed or stopping: the new leader reports the schedules; no stale gauges here.
        engine.metrics.forget_all()
