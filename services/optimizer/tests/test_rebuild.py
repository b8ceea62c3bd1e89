"""Rebuilding the store from the streams on both backends, through the service and a real NATS.

SQLite builds a fresh file and swaps it in; PostgreSQL builds a fresh schema and swaps it in with
two renames in one transaction. Both give the store built incrementally, keep serving readers,
leave nothing behind when a rebuild fails, and rebuild at start a store of another schema version.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client as NatsClient
from optimizer_events import imported_run, run_lifecycle, usage
from optimizer_stores import Stores
from prometheus_client import CollectorRegistry

from fabrik_common import optimizer_rpc as rpc
from fabrik_common.bus import Bus, BusOptions
from fabrik_common.events import LlmUsage, RunStateChanged
from fabrik_common.ids import new_ulid
from fabrik_common.metrics import BusMetrics
from fabrik_common.testing import running_service
from fabrik_common.topology import ensure_topology
from fabrik_optimizer.analytics import rebuild
from fabrik_optimizer.analytics.store import AnalyticsStore
from fabrik_optimizer.app import build
from fabrik_optimizer.settings import OptimizerSettings

GPT = (2.50, 10.00, 1.25, 3.75)


def history(runs: int = 12) -> list[Any]:
    events: list[Any] = []
    for i in range(runs):
        rid = new_ulid()
        events += run_lifecycle(rid, outcome="succeeded" if i % 3 else "failed", start=i * 50)
        events.append(usage(model="gpt-4o", tokens=(100 * (i + 1), 50, 0, 0), prices=GPT, run_id=rid))
        events.append(usage(model="claude", tokens=(10, 5, 0, 0), prices=GPT, run_id=rid))
    events.append(usage(model="gpt-4o", tokens=(7, 7, 0, 0), prices=GPT))  # a call without a run
    # Two runs imported from Smithers (`run.imported` and the scheduler's announcement).
    events += imported_run(outcome="failed") + imported_run(outcome="succeeded", start=500)
    return events


def snapshot(store: AnalyticsStore) -> tuple[Any, ...]:
    return (
        store.runs(),
        store.llm_calls(),
        store.query("SELECT * FROM run_llm ORDER BY run_id"),
        store.query("SELECT * FROM run_models ORDER BY run_id, model"),
    )


def schemas(store: AnalyticsStore) -> list[str]:
    """The PostgreSQL schemas of this store and its rebuilds; SQLite: the files beside the store."""
    if store.postgres is None:
        return sorted(p.name for p in Path(store.path).parent.iterdir() if p.name.startswith("analytics"))
    rows = store.tuples("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'analytics%' ORDER BY nspname")
    return [r[0] for r in rows]


async def until(predicate: Callable[[], bool], timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} not reached in time"
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def connected(nats_url: str) -> AsyncIterator[tuple[Bus, NatsClient]]:
    bus = Bus(BusOptions(url=nats_url), BusMetrics(CollectorRegistry()))
    await bus.connect()
    await ensure_topology(bus.js)
    nc = await nats.connect(nats_url)
    try:
        yield bus, nc
    finally:
        await nc.close()
        await bus.close()


def settings_for(nats_url: str, stores: Stores) -> OptimizerSettings:
    return OptimizerSettings(nats_url=nats_url, http_port=0, log_format="text", **stores.settings())


async def ingested(store: Callable[[], AnalyticsStore], events: list[Any]) -> None:
    """Until every call is stored and every run row has folded its last state change."""
    calls = sum(isinstance(e, LlmUsage) for e in events)
    revisions: dict[str, int] = {}
    for e in events:
        if isinstance(e, RunStateChanged):
            revisions[e.run_id] = max(revisions.get(e.run_id, 0), e.revision)
    await until(
        lambda: (
            len(store().llm_calls()) == calls
            and {r["run_id"]: r["state_revision"] for r in store().runs()} == revisions
        ),
        what="history ingested",
    )


async def test_a_rebuild_equals_the_incremental_store_and_swaps_in_whole(
    nats_url: str, stores: Stores
) -> None:
    events = history()
    async with (
        connected(nats_url) as (bus, nc),
        running_service(build(settings_for(nats_url, stores))) as svc,
    ):
        for event in events:
            await bus.publish(event)
        await ingested(lambda: svc.state.store, events)
        await asyncio.sleep(0.2)
        live = svc.state.store
        before = snapshot(live)
        reader = live.reader()  # opened before the swap, used after it
        try:
            reply = await nc.request(rpc.REBUILD, rpc.encode(rpc.RebuildRequest(actor="t")), timeout=60)
            rebuilt = rpc.decode_response(reply.data, rpc.RebuildResponse)
            assert isinstance(rebuilt, rpc.RebuildResponse), rebuilt
            assert (rebuilt.runs, rebuilt.llm_calls) == (14, 25)
            assert svc.state.store is not live  # swapped
            assert snapshot(svc.state.store) == before
            imported = [r for r in svc.state.store.runs() if r["backend"] == "imported"]
            assert sorted((r["spec_id"], r["state"], r["run_seconds"]) for r in imported) == [
                ("nightly-refactor", "failed", 300.0),
                ("nightly-refactor", "succeeded", 300.0),
            ]
            assert reader.counts() == (14, 25)
        finally:
            reader.close()
        # Nothing left behind: no rebuild file or schema, no old schema.
        expected = ["analytics"] if stores.backend == "postgres" else ["analytics.db"]
        assert [n for n in schemas(svc.state.store) if not n.endswith(("-wal", "-shm"))] == expected

        # The new store is live: events go on being applied to it.
        late = new_ulid()
        for event in run_lifecycle(late, outcome="succeeded", start=9000):
            await bus.publish(event)
        await until(lambda: (svc.state.store.get_run(late) or {}).get("state") == "succeeded", what="live")


async def test_a_failed_rebuild_leaves_the_live_store_and_nothing_behind(
    nats_url: str, stores: Stores, monkeypatch: pytest.MonkeyPatch
) -> None:
    events = history(4)
    real = rebuild.replay_into

    async def fails_halfway(js: Any, store: AnalyticsStore, costing: Any, **kwargs: Any) -> Any:
        await real(js, store, costing, **kwargs)  # the new store is written, then the replay fails
        raise RuntimeError("the stream went away")

    async with (
        connected(nats_url) as (bus, nc),
        running_service(build(settings_for(nats_url, stores))) as svc,
    ):
        for event in events:
            await bus.publish(event)
        await ingested(lambda: svc.state.store, events)
        before = snapshot(svc.state.store)
        monkeypatch.setattr(rebuild, "replay_into", fails_halfway)
        reply = await nc.request(rpc.REBUILD, rpc.encode(rpc.RebuildRequest(actor="t")), timeout=60)
        error = rpc.decode_response(reply.data, rpc.RebuildResponse)
        assert isinstance(error, rpc.RpcError) and error.status == 500, error
        assert snapshot(svc.state.store) == before
        expected = ["analytics"] if stores.backend == "postgres" else ["analytics.db"]
        assert [n for n in schemas(svc.state.store) if not n.endswith(("-wal", "-shm"))] == expected


async def test_a_store_of_another_version_is_rebuilt_at_start(nats_url: str, stores: Stores) -> None:
    events = history(5)
    settings = settings_for(nats_url, stores)
    async with connected(nats_url) as (bus, _):
        for event in events:
            await bus.publish(event)
        async with running_service(build(settings)) as svc:
            await ingested(lambda: svc.state.store, events)
            expected = snapshot(svc.state.store)
        old = stores.open()
        with old.transaction() as conn:
            conn.execute(old.sql("UPDATE analytics_meta SET value = ? WHERE name = 'schema_version'"), ["3"])
        if old.postgres is not None:  # and the leftovers of a rebuild interrupted by a crash
            for leftover in ("analytics_rebuild_01abc", "analytics_old_01abc"):
                old.conn.execute(f"CREATE SCHEMA {leftover}")
                old.conn.execute(f"CREATE TABLE {leftover}.runs (run_id TEXT)")
        old.close()
        async with running_service(build(settings)) as svc:
            await ingested(lambda: svc.state.store, events)
            await until(lambda: snapshot(svc.state.store) == expected, what="rebuilt at start")
            assert not svc.state.store.reset
            # The replaced store is dropped after the swap, as are the leftovers of the crash.
            expected_names = ["analytics"] if stores.backend == "postgres" else ["analytics.db"]
            await until(
                lambda: (
                    [n for n in schemas(svc.state.store) if not n.endswith(("-wal", "-shm"))]
                    == expected_names
                ),
                what="the old store dropped",
            )
