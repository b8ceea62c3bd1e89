"""Wiring and start-up of the scheduler: leader-elected, one consumer, three loops."""

from __future__ import annotations

from prometheus_client import Gauge

from fabrik_common.service import Service, run_service
from fabrik_scheduler.handlers import router
from fabrik_scheduler.scheduler import Scheduler
from fabrik_scheduler.settings import SchedulerSettings
from fabrik_scheduler.state import SchedulerState, dispatch_loop, reaper_loop, snapshot_loop
from fabrik_scheduler.store import RunStore

NAME = "scheduler"


def build(settings: SchedulerSettings) -> Service[SchedulerState]:
    async def on_start(service: Service[SchedulerState]) -> SchedulerState:
        js = service.bus.js
        store = RunStore(
            await js.key_value("runs"), await js.key_value("queue"), max_payload=service.bus.nc.max_payload
        )
        scheduler = Scheduler(settings, store, service.bus)
        queued = Gauge("fabrik_scheduler_queued_runs", "Runs waiting in the queue", registry=service.registry)
        active = Gauge(
            "fabrik_scheduler_active_runs", "Runs starting, running or cancelling", registry=service.registry
        )
        queued.set_function(lambda: len(scheduler.queue))
        active.set_function(lambda: scheduler.queue.active_count)
        return SchedulerState(scheduler)

    async def on_elected(state: SchedulerState) -> None:
        async with state.lock:
            await state.scheduler.load()

    return Service(
        NAME,
        settings,
        routers=[router],
        on_start=on_start,
        on_elected=on_elected,
        leader_lease=NAME,
        lease_ttl=settings.lease_ttl_seconds,
        background=[dispatch_loop, reaper_loop, snapshot_loop],
    )


def main() -> None:
    run_service(SchedulerSettings, build, NAME)
