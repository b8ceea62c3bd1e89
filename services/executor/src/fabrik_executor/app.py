"""Wiring and start-up of the executor service."""

from __future__ import annotations

import asyncio
import logging

import nats.errors

from fabrik_common.bus import Bus, PublishError
from fabrik_common.envs import EnvKeyMissingError, load_env_cipher, require_key_if_used
from fabrik_common.events import Event
from fabrik_common.runkeys import load_run_key_secret
from fabrik_common.service import Service, run_service
from fabrik_executor.env import StoreEnvSource, legacy_env_files
from fabrik_executor.handlers import router
from fabrik_executor.llmkeys import SignedRunKeys
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
    cipher = load_env_cipher(settings.env_encryption_key, settings.env_encryption_key_file)

    async def on_start(service: Service[ExecutorState]) -> ExecutorState:
        try:
            await require_key_if_used(service.bus.js, cipher, "executor")
        except EnvKeyMissingError as exc:
            log.critical("cannot start: %s", exc)
            raise SystemExit(2) from None
        metrics = ExecutorMetrics(service.registry, settings.backend)
        project_envs = StoreEnvSource(lambda: service.bus.js, cipher)
        if settings.backend == "kubernetes":
            from fabrik_executor.kubernetes.backend import build_backend

            k8s_backend = await build_backend(
                settings, BusSink(service.bus), metrics, service.registry, project_envs=project_envs
            )
            # Recovery runs when this replica is elected (on_elected), not here.
            return ExecutorState(backend=k8s_backend, metrics=metrics)
        secret = load_run_key_secret(settings.run_key_secret, settings.run_key_secret_file)
        if secret is None:
            log.warning(
                "no FABRIK_RUN_KEY_SECRET: runs get no LLM key and the llm-proxy will refuse their calls"
            )
        backend = LocalBackend(
            settings,
            BusSink(service.bus),
            metrics,
            project_envs=project_envs,
            run_keys=SignedRunKeys(secret) if secret is not None else None,
        )
        if legacy := legacy_env_files(backend.layout.root):
            log.warning(
                "project env files are no longer read; import each with "
                "`fabrik env set --project P --env E --from-file FILE`",
                extra={"files": [str(p) for p in legacy]},
            )
        backend.open()
        await backend.recover()
        return ExecutorState(backend=backend, metrics=metrics)

    async def on_stop(state: ExecutorState) -> None:
        await state.backend.close()

    async def maintain(state: ExecutorState) -> None:
        await state.backend.maintain()

    async def on_elected(state: ExecutorState) -> None:
        await state.backend.recover()

    if settings.backend == "kubernetes":
        # One replica watches the cluster and reports (the others stand by): a Job's end is
        # reported by exactly one executor.
        return Service(
            NAME,
            settings,
            routers=[router],
            on_start=on_start,
            on_stop=on_stop,
            background=[maintain],
            leader_lease="executor-kubernetes",
            on_elected=on_elected,
        )
    return Service(
        NAME, settings, routers=[router], on_start=on_start, on_stop=on_stop, background=[maintain]
    )


def main() -> None:
    run_service(ExecutorSettings, build, NAME)
