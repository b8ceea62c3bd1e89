"""The optimizer service in-process against a real NATS server: events in, analytics rows out."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from decimal import Decimal

import msgspec
from optimizer_events import run_lifecycle, usage
from optimizer_stores import Stores
from prometheus_client import CollectorRegistry

from fabrik_common.bus import Bus, BusOptions
from fabrik_common.ids import new_ulid
from fabrik_common.metrics import BusMetrics
from fabrik_common.testing import running_service
from fabrik_common.topology import ensure_topology
from fabrik_optimizer.analytics.queries import costs
from fabrik_optimizer.analytics.store import AnalyticsStore
from fabrik_optimizer.app import build
from fabrik_optimizer.settings import OptimizerSettings

GPT = (2.50, 10.00, 1.25, 3.75)


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def test_service_builds_the_store_from_the_streams(nats_url: str, stores: Stores) -> None:
    settings = OptimizerSettings(nats_url=nats_url, http_port=0, log_format="text", **stores.settings())
    bus = Bus(BusOptions(url=nats_url), BusMetrics(CollectorRegistry()))
    await bus.connect()
    try:
        await ensure_topology(bus.js)
        ok, failed = new_ulid(), new_ulid()
        # The scheduler's and executor's own events are included as a real stream would have them.
        events = run_lifecycle(ok, outcome="succeeded") + run_lifecycle(failed, outcome="failed", peak=7)
        calls = [
            usage(model="gpt-4o", tokens=(1000, 500, 2000, 0), prices=GPT, run_id=ok),
            usage(model="gpt-4o", tokens=(3000, 1000, 0, 400), prices=GPT, run_id=failed),
        ]
        async with running_service(build(settings)) as service:
            for event in [*events, *calls]:
                await bus.publish(event)
            store: AnalyticsStore = service.state.store

            def complete() -> bool:
                rows = {r["run_id"]: r for r in store.runs()}
                return (
                    len(store.llm_calls()) == 2
                    and rows.get(ok, {}).get("state") == "succeeded"
                    and rows.get(failed, {}).get("state") == "failed"
                )

            await until(complete)
            # A redelivered (re-published with a new message id) usage event is stored once.
            await bus.publish(msgspec.structs.replace(calls[0], event_id=new_ulid()))
            await asyncio.sleep(0.3)
            assert len(store.llm_calls()) == 2
            rows = {r["run_id"]: r for r in store.runs()}
            assert rows[ok]["run_seconds"] == 60.0 and rows[ok]["queue_seconds"] == 5.0
            assert rows[failed]["reason"] == "exit 1" and rows[failed]["peak_memory_bytes"] == 7
            assert [(r["project"], r["llm_cost_usd"], r["runs"]) for r in costs(store, "project")] == [
                ("demo", Decimal("0.029"), 2)
            ]
    finally:
        await bus.close()

    # The rows are stored: a reopened store sees the same.
    reopened = stores.open()
    assert len(reopened.runs()) == 2 and len(reopened.llm_calls()) == 2
