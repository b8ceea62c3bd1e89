"""Wiring and start-up of the scheduler: leader-elected, one consumer, three loops."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import msgspec
from nats.js.errors import KeyNotFoundError
from prometheus_client import Gauge

from fabrik_common.clock import SYSTEM_CLOCK, Clock
from fabrik_common.runs import RunRecord
from fabrik_common.schedules.model import def_key
from fabrik_common.service import Service, run_service
from fabrik_scheduler import experiments
from fabrik_scheduler.alerting.channels import ChannelSender, SlackConfig, SmtpConfig
from fabrik_scheduler.alerting.engine import AlertEngine, AlertMetrics, RetryPolicy
from fabrik_scheduler.alerting.rules import load_rules
from fabrik_scheduler.experiments import ExperimentView
from fabrik_scheduler.handlers import router
from fabrik_scheduler.scheduler import Scheduler
from fabrik_scheduler.schedules.engine import ScheduleEngine
from fabrik_scheduler.schedules.loop import schedule_loop
from fabrik_scheduler.settings import SchedulerSettings
from fabrik_scheduler.state import (
    SchedulerState,
    alert_loop,
    dispatch_loop,
    health_loop,
    reaper_loop,
    snapshot_loop,
)
from fabrik_scheduler.store import RunStore

NAME = "scheduler"


def build(settings: SchedulerSettings, *, clock: Clock | None = None) -> Service[SchedulerState]:
    """`clock` drives the cron schedules, run health, alert re-alerts and retries, and the state
    machine's timestamps and deadlines (tests pass a manual one); the system clock by default."""

    async def on_start(service: Service[SchedulerState]) -> SchedulerState:
        js = service.bus.js
        store = RunStore(
            await js.key_value("runs"), await js.key_value("queue"), max_payload=service.bus.nc.max_payload
        )
        scheduler = Scheduler(settings, store, service.bus, clock=clock or SYSTEM_CLOCK)
        config_kv = await js.key_value("config")
        scheduler.experiments = ExperimentView(config_kv)
        await experiments.load(config_kv, scheduler.experiments)
        queued = Gauge("fabrik_scheduler_queued_runs", "Runs waiting in the queue", registry=service.registry)
        active = Gauge(
            "fabrik_scheduler_active_runs", "Runs starting, running or cancelling", registry=service.registry
        )
        queued.set_function(lambda: len(scheduler.queue))
        active.set_function(lambda: scheduler.queue.active_count)
        schedules = ScheduleEngine(
            await js.key_value("schedules"),
            service.bus,
            lambda run_id: _lookup(scheduler, run_id),
            clock or SYSTEM_CLOCK,
            service.registry,
        )
        by_health = Gauge(
            "fabrik_scheduler_runs_by_health",
            "Runs in progress by health (failed: runs given up on since this process started)",
            ["health"],
            registry=service.registry,
        )

        def counter(health: str) -> Callable[[], float]:
            return lambda: sum(1 for r in scheduler.active.values() if r.health.state == health)

        for name in ("healthy", "stalled", "healing"):
            by_health.labels(name).set_function(counter(name))
        by_health.labels("failed").set_function(
            lambda: sum(n for (d, _), n in scheduler.health_decisions.items() if d == "fail")
        )
        alerts = await build_alert_engine(settings, service, scheduler, clock or SYSTEM_CLOCK)
        return SchedulerState(scheduler, schedules=schedules, alerts=alerts)

    async def on_stop(state: SchedulerState) -> None:
        if state.alerts is not None:
            await state.alerts.sender.http.aclose()

    async def on_elected(state: SchedulerState) -> None:
        async with state.lock:
            await state.scheduler.load()
        if state.schedules is not None:
            state.schedules.reset()
        if state.alerts is not None:
            await state.alerts.load()

    return Service(
        NAME,
        settings,
        routers=[router],
        on_start=on_start,
        on_elected=on_elected,
        on_stop=on_stop,
        leader_lease=NAME,
        lease_ttl=settings.lease_ttl_seconds,
        background=[
            dispatch_loop,
            reaper_loop,
            snapshot_loop,
            schedule_loop,
            health_loop,
            alert_loop,
            experiments_loop,
        ],
    )


async def experiments_loop(state: SchedulerState) -> None:
    """Follow the experiments, defaults and pause in the `config` bucket while leading."""
    view = state.scheduler.experiments
    if view is None or view.kv is None:
        return
    await experiments.follow(view.kv, view)


async def _lookup(scheduler: Scheduler, run_id: str) -> RunRecord | None:
    return scheduler.active.get(run_id) or await scheduler.store.get(run_id)


async def build_alert_engine(
    settings: SchedulerSettings, service: Service[SchedulerState], scheduler: Scheduler, clock: Clock
) -> AlertEngine:
    """Alert delivery from the settings (validated when they were loaded)."""
    js = service.bus.js
    rules = load_rules(settings.alert_rules, settings.alert_rules_file)
    sender = ChannelSender(
        httpx.AsyncClient(timeout=settings.alert_http_timeout_seconds),
        SlackConfig(bot_token=settings.secret("alert_slack_bot_token"), api_url=settings.alert_slack_api_url),
        SmtpConfig(
            host=settings.smtp_host,
            port=settings.smtp_port,
            security=settings.smtp_security,
            username=settings.smtp_username,
            password=settings.secret("smtp_password"),
            sender=settings.smtp_from,
            timeout=settings.smtp_timeout_seconds,
            verify_tls=settings.smtp_verify_tls,
        ),
    )

    async def lookup(kind: str, entity_id: str) -> dict[str, Any] | None:
        if kind == "run":
            record = scheduler.active.get(entity_id) or await scheduler.store.get(entity_id)
            return msgspec.to_builtins(record) if record is not None else None
        if kind == "schedule":
            try:
                entry = await (await js.key_value("schedules")).get(def_key(entity_id))
            except KeyNotFoundError:
                return None
            value = msgspec.json.decode(entry.value) if entry.value else None
            return value if isinstance(value, dict) else None
        return None

    return AlertEngine(
        await js.key_value("alerts"),
        rules,
        sender,
        clock=clock,
        metrics=AlertMetrics(service.registry),
        base_url=settings.public_url,
        lookup=lookup,
        retry=RetryPolicy(
            max_attempts=settings.alert_delivery_attempts,
            base_seconds=settings.alert_retry_base_seconds,
            max_seconds=settings.alert_retry_max_seconds,
        ),
    )


def main() -> None:
    run_service(SchedulerSettings, build, NAME)
