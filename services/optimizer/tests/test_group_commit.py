"""Group commit: a batch of events in one transaction, acked only after its commit.

Without NATS: `apply_events` (one commit per batch, idempotent, a failing event alone). With a
real NATS server: the optimizer's batch subscribers ack after the commit, a poison event goes to
the dead-letter subject without holding the rest, a failed commit is retried whole, and a durable
consumer created with the earlier filter is taken over.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import msgspec
import psycopg
import pytest
from nats.js import api
from optimizer_events import run_lifecycle, usage
from optimizer_stores import Stores, database_failure, statements
from prometheus_client import CollectorRegistry

from fabrik_common.bus import DLQ_REASON, BatchContext, Bus, BusOptions, ConsumerGroup, Delivery, Router
from fabrik_common.bus import dead_letter_subject as dlq_subject
from fabrik_common.events import LlmUsage
from fabrik_common.ids import new_ulid
from fabrik_common.metrics import BusMetrics
from fabrik_common.testing import running_service
from fabrik_common.topology import ensure_topology
from fabrik_optimizer import handlers
from fabrik_optimizer.analytics import ingest
from fabrik_optimizer.analytics.ingest import RUN_SUBJECTS, apply_events, apply_llm_usage, apply_run_event
from fabrik_optimizer.analytics.store import AnalyticsStore, PostgresLocation
from fabrik_optimizer.app import build
from fabrik_optimizer.settings import OptimizerSettings
from fabrik_optimizer.state import OptimizerState

GPT = (2.50, 10.00, 1.25, 3.75)


def history(runs: int = 6) -> list[Any]:
    events: list[Any] = []
    for i in range(runs):
        rid = new_ulid()
        events += run_lifecycle(rid, outcome="succeeded" if i % 3 else "failed", start=i * 50)
        events.append(usage(model="gpt-4o", tokens=(100 * (i + 1), 50, 0, 0), prices=GPT, run_id=rid))
        events.append(usage(model="claude", tokens=(10, 5, 0, 0), prices=GPT, run_id=rid))
    return events


def snapshot(store: AnalyticsStore) -> tuple[Any, ...]:
    return (
        store.runs(),
        store.llm_calls(),
        store.query("SELECT * FROM run_llm ORDER BY run_id"),
        store.query("SELECT * FROM run_models ORDER BY run_id, model"),
    )


@pytest.fixture
def store(stores: Stores) -> AnalyticsStore:
    """A store on each backend (SQLite file, PostgreSQL schema): the same assertions on both."""
    return stores.open()


# ------------------------------------------------------------------------------------------------
# apply_events


def test_a_batch_is_one_commit_and_equals_the_events_one_by_one(
    store: AnalyticsStore, stores: Stores
) -> None:
    events = history()
    one_by_one = stores.open("reference")
    try:
        for event in events:
            if isinstance(event, LlmUsage):
                apply_llm_usage(one_by_one, event)
            else:
                apply_run_event(one_by_one, event)
        batches = [events[i : i + 7] for i in range(0, len(events), 7)]
        with statements(store) as sent:
            for batch in batches:
                applied = apply_events(store, batch)
                assert applied.failed == {}
        assert sent.count("COMMIT") == len(batches)
        assert snapshot(store) == snapshot(one_by_one)
        assert {r["run_id"]: r["models"] for r in store.query("SELECT * FROM run_llm")} == {
            r["run_id"]: '["claude", "gpt-4o"]' for r in store.runs()
        }
    finally:
        one_by_one.close()


def test_a_redelivered_batch_changes_nothing(store: AnalyticsStore) -> None:
    events = history()
    first = apply_events(store, events)
    once = snapshot(store)
    again = apply_events(store, events)  # the same batch, redelivered after a crash before the acks
    assert snapshot(store) == once
    assert first.failed == again.failed == {}
    assert all(r["calls"] == 2 for r in store.query("SELECT * FROM run_llm"))


def test_an_event_that_cannot_be_folded_fails_alone(
    store: AnalyticsStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    events = history(3)
    poisoned = events[9].run_id  # the second run
    fold = ingest.fold_run_event

    def failing_fold(row: dict[str, Any], event: Any, costing: Any = None) -> bool:
        if event.run_id == poisoned and type(event).__name__ == "RunFinished":
            raise ValueError("cannot fold this")
        return fold(row, event, costing)

    monkeypatch.setattr(ingest, "fold_run_event", failing_fold)
    applied = apply_events(store, events)
    [(index, error)] = applied.failed.items()
    assert events[index].run_id == poisoned and isinstance(error, ValueError)
    rows = {r["run_id"]: r for r in store.runs()}
    assert len(rows) == 3 and len(store.llm_calls()) == 6
    # The events after it were applied; its own fields are missing until it is redelivered.
    assert rows[poisoned]["state"] == "failed" and rows[poisoned]["peak_memory_bytes"] is None
    monkeypatch.setattr(ingest, "fold_run_event", fold)
    assert apply_events(store, [events[index]]).failed == {}
    assert store.get_run(poisoned)["peak_memory_bytes"] == 512 * 1024**2  # type: ignore[index]


def test_a_row_the_database_refuses_fails_alone(store: AnalyticsStore, backend: str) -> None:
    events = history(2)
    huge = msgspec.structs.replace(events[-1], call_id=new_ulid(), input_tokens=2**70)  # > BIGINT
    batch = [*events[:5], huge, *events[5:]]
    with statements(store) as sent:
        applied = apply_events(store, batch)
    # SQLite's driver refuses the integer; PostgreSQL refuses the value ("bigint out of range").
    refused = OverflowError if backend == "sqlite" else psycopg.errors.NumericValueOutOfRange
    assert list(applied.failed) == [5] and isinstance(applied.failed[5], refused)
    # The batch was rolled back and applied again one event per transaction (the refused one rolled back).
    assert sent.count("ROLLBACK") == 2 and sent.count("COMMIT") == len(batch) - 1
    assert len(store.runs()) == 2 and len(store.llm_calls()) == 4
    assert applied.changed == len(batch) - 1


def test_a_database_failure_commits_nothing_and_raises(
    store: AnalyticsStore, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    events = history(2)
    apply_events(store, events[:3])
    before = snapshot(store)
    failure = database_failure(backend)

    def locked() -> None:
        raise failure("database is locked")

    with monkeypatch.context() as patch:
        patch.setattr(store, "_flush", locked)
        with pytest.raises(failure):
            apply_events(store, events[3:])
    assert snapshot(store) == before
    assert apply_events(store, events[3:]).failed == {}  # and all of it can be tried again
    assert len(store.runs()) == 2


# ------------------------------------------------------------------------------------------------
# through NATS


def settings_for(nats_url: str, db: Path, **store: Any) -> OptimizerSettings:
    where = store or {"analytics_db": str(db)}
    return OptimizerSettings(nats_url=nats_url, http_port=0, log_format="text", **where)


@contextlib.asynccontextmanager
async def connected(nats_url: str) -> AsyncIterator[Bus]:
    bus = Bus(BusOptions(url=nats_url), BusMetrics(CollectorRegistry()))
    await bus.connect()
    await ensure_topology(bus.js)
    try:
        yield bus
    finally:
        await bus.close()


async def until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not (await predicate() if asyncio.iscoroutinefunction(predicate) else predicate()):
        assert time.monotonic() < deadline, f"{what} not reached in time"
        await asyncio.sleep(0.05)


async def test_events_are_acked_only_after_their_commit(
    nats_url: str, tmp_path: Path, stores: Stores, monkeypatch: pytest.MonkeyPatch
) -> None:
    events = history(4)
    calls = sum(isinstance(e, LlmUsage) for e in events)
    gate = asyncio.Event()
    real = handlers.apply_deliveries

    async def slow_commit(deliveries: Sequence[Delivery[Any]], state: OptimizerState) -> None:
        await gate.wait()  # a commit that takes its time
        await real(deliveries, state)

    monkeypatch.setattr(handlers, "apply_deliveries", slow_commit)
    async with connected(nats_url) as bus:
        for event in events:
            await bus.publish(event)
        async with running_service(build(settings_for(nats_url, tmp_path, **stores.settings()))) as svc:
            state: OptimizerState = svc.state

            async def infos() -> tuple[Any, Any]:
                return (
                    await bus.js.consumer_info("RUNS", "optimizer-runs"),
                    await bus.js.consumer_info("LLM", "optimizer-llm-usage"),
                )

            async def delivered_unacked() -> bool:
                runs, llm = await infos()
                return runs.num_ack_pending == len(events) - calls and llm.num_ack_pending == calls

            await until(delivered_unacked, what="all delivered in one batch per stream")
            await asyncio.sleep(0.3)
            runs, llm = await infos()
            assert runs.ack_floor.stream_seq == 0 and llm.ack_floor.stream_seq == 0  # nothing acked
            assert state.store.runs() == [] and state.store.llm_calls() == []
            gate.set()

            async def acked() -> bool:
                runs, llm = await infos()
                return runs.num_ack_pending == 0 and llm.num_ack_pending == 0

            await until(acked, what="all acked")
            assert len(state.store.runs()) == 4 and len(state.store.llm_calls()) == calls
            runs, llm = await infos()
            assert runs.ack_floor.stream_seq == len(events) - calls and llm.ack_floor.stream_seq == calls


async def test_a_failed_commit_is_retried_with_the_whole_batch(
    nats_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    failures: list[int] = []
    real = handlers.apply_events

    def locked_once(store: AnalyticsStore, events: Sequence[Any], costing: Any = None) -> Any:
        if not failures:
            failures.append(len(events))
            raise sqlite3.OperationalError("database is locked")
        return real(store, events, costing)

    monkeypatch.setattr(handlers, "apply_events", locked_once)
    events = [e for e in history(3) if not isinstance(e, LlmUsage)]
    async with (
        connected(nats_url) as bus,
        running_service(build(settings_for(nats_url, tmp_path / "f.db"))) as svc,
    ):
        store: AnalyticsStore = svc.state.store
        for event in events:
            await bus.publish(event)
        await until(lambda: sum(r["state"] is not None for r in store.runs()) == 3, what="applied")
        assert failures and failures[0] >= 1

        async def settled() -> bool:
            info = await bus.js.consumer_info("RUNS", "optimizer-runs")
            return info.num_ack_pending == 0 and info.num_pending == 0

        await until(settled, what="all acked")
        assert {r["state"] for r in store.runs()} == {"succeeded", "failed"}


async def test_a_poison_event_is_dead_lettered_and_the_rest_applied(nats_url: str, tmp_path: Path) -> None:
    """The optimizer's own batch handler, on a test consumer with two deliveries and a short backoff."""
    router = Router()

    @router.batch_subscriber(
        "fabrik.llm.usage",
        event=LlmUsage,
        durable="t-optimizer-poison",
        batch=50,
        max_ack_pending=100,
        max_deliver=2,
        backoff=(0.05,),
    )
    async def on_usage(deliveries: Sequence[Delivery[LlmUsage]], ctx: BatchContext[OptimizerState]) -> None:
        await handlers.apply_deliveries(deliveries, ctx.state)

    calls = [usage(model="gpt-4o", tokens=(i + 1, 1, 0, 0), prices=GPT) for i in range(10)]
    poison = msgspec.structs.replace(
        calls[4], event_id=new_ulid(), call_id=new_ulid(), input_tokens=2**70
    )  # the database refuses it
    store = AnalyticsStore(tmp_path / "p.db")
    async with connected(nats_url) as bus:
        group: ConsumerGroup[OptimizerState] = ConsumerGroup(bus, router.subscribers, OptimizerState(store))
        await group.start()
        try:
            for event in [*calls[:5], poison, *calls[5:]]:
                await bus.publish(event)
            await until(lambda: len(store.llm_calls()) == 10, what="the other calls applied")
            sub = await bus.js.pull_subscribe(dlq_subject("LLM", "t-optimizer-poison"), stream="DEADLETTER")
            [letter] = await sub.fetch(1, timeout=10)
            await sub.unsubscribe()
            reason = letter.headers[DLQ_REASON]
            assert reason.startswith("failed 2 times: ") and "could not be applied: OverflowError(" in reason
            assert msgspec.json.decode(letter.data)["call_id"] == poison.call_id

            async def settled() -> bool:
                info = await bus.js.consumer_info("LLM", "t-optimizer-poison")
                return info.num_ack_pending == 0 and info.num_pending == 0

            await until(settled, what="nothing pending")
        finally:
            await group.stop(grace=5)
            store.close()


async def test_a_consumer_created_with_the_earlier_filter_is_taken_over(
    nats_url: str, tmp_path: Path
) -> None:
    """optimizer-runs filtered the six folded subjects; it now filters the stream's own subject."""
    async with connected(nats_url) as bus:
        await bus.js.add_consumer(
            "RUNS",
            api.ConsumerConfig(
                durable_name="optimizer-runs",
                ack_policy=api.AckPolicy.EXPLICIT,
                deliver_policy=api.DeliverPolicy.ALL,
                max_deliver=11,
                ack_wait=30.0,
                max_ack_pending=2000,
                filter_subjects=list(RUN_SUBJECTS),
            ),
        )
        events = run_lifecycle(outcome="succeeded")
        async with running_service(build(settings_for(nats_url, tmp_path / "t.db"))) as svc:
            for event in events:
                await bus.publish(event)
            store: AnalyticsStore = svc.state.store
            await until(lambda: [r["state"] for r in store.runs()] == ["succeeded"], what="applied")
        info = await bus.js.consumer_info("RUNS", "optimizer-runs")
        assert info.config.filter_subject == "fabrik.runs.>" and not info.config.filter_subjects


def test_a_lost_postgres_connection_fails_one_batch_and_the_next_reconnects(postgres_url: str) -> None:
    """The server ends the writer's connection (a restart, a failover): the batch in flight raises
    a database failure (the bus naks it whole), and the same batch applied again goes through on a
    new connection."""
    store = AnalyticsStore(PostgresLocation(postgres_url))
    try:
        events = history(3)
        apply_events(store, events[:4])
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", [store.conn.info.backend_pid])
        with pytest.raises(psycopg.OperationalError):
            apply_events(store, events[4:])
        assert apply_events(store, events[4:]).failed == {}
        assert len(store.runs()) == 3 and len(store.llm_calls()) == 6
    finally:
        store.close()


def test_a_batch_reads_its_runs_in_one_query_per_500(
    store: AnalyticsStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Folding a batch reads the rows of its runs that are not cached together, not one query per
    run (each a round trip on PostgreSQL); runs that do not exist yet are not asked for again."""
    earlier = history(3)
    apply_events(store, earlier)
    store._cache.clear()  # as after a restart: the known runs are only in the database
    events = earlier + history(600)
    reads: list[str] = []
    real = store._dicts

    def counted(statement: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        if "FROM runs" in statement:
            reads.append(statement)
        return real(statement, params)

    monkeypatch.setattr(store, "_dicts", counted)
    assert apply_events(store, events).failed == {}
    assert len(reads) == 2  # 603 runs: 500 + 103
    monkeypatch.undo()
    assert len(store.runs()) == 603 and len(store.llm_calls()) == 2 * 603
    assert {r["state"] for r in store.runs()} == {"succeeded", "failed"}
