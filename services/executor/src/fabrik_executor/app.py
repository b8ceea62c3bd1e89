"""Wiring and start-up of the executor service."""

from __future__ import annotations

import asyncio
import logging

import nats.errors

from fabrik_common.bus import Bus, PublishError
from fabrik_common.events import Event
from fabrik_common.service import Service, run_service
from fabrik_executor.handlers import router
from fabrik_executor.local_backend import LocalBackend
from fabrik_executor.metrics import ExecutorMetrics
from fabrik_executor.settings import ExecutorSettings
from fabrik_executor.state_types import ExecutorState

NAME = "executor"
log = logging.getLogger(__name__)


class BusSink:
    """Publishes through the service's bus; a publish that is not acknowledged (NATS down, a
    reconnect, a stream not there yet) is retried with the same event id, so it is stored once,
    until it is acknowledged or the service stops. Nothing the executor reports is dropped."""

    def __init__(self, bus: Bus, max_backoff: float = 10.0) -> None:
        self.bus = bus
        self.max_backoff = max_backoff

    async def publish(self, event: Event) -> None:
        delay = 0.5
        while True:
            try:
                await self.bus.publish(event)
                return
            except (PublishError, nats.errors.Error) as exc:
                log.warning(
                    "publish not acknowledged, retrying",
                    extra={"type": event.event_type(), "error": str(exc), "retry_in_s": delay},
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_backoff)


def build(settings: ExecutorSettings) -> Service[ExecutorState]:
    async def on_start(service: Service[ExecutorState]) -> ExecutorState:
        metrics = ExecutorMetrics(service.registry, settings.backend)
        backend = LocalBackend(settings, BusSink(service.bus), metrics)
        backend.open()
        await backend.recover()
        return ExecutorState(backend=backend, metrics=metrics)

    async def on_stop(state: ExecutorState) -> None:
        await state.backend.close()

    async def maintain(state: ExecutorState) -> None:
        await state.backend.maintain()

    return Service(
        NAME, settings, routers=[router], on_start=on_start, on_stop=on_stop, background=[maintain]
    )


def main() -> None:
    run_service(ExecutorSettings, build, NAME)
