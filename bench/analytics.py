"""The optimizer's analytics store: ingest rate of run and usage events, latency of cost and insight queries.

    uv run python bench/analytics.py [--events 1000000] [--live-events 100000] [--baseline-seconds 20]
                                     [--no-nats] [--repeat 3] [--database-url postgresql://...]

1. A generated history of `--events` events (default 1,000,000): runs of 7 run events each
   (requested, queued, dispatched, started, running, finished, terminal state; 12 % of them resumed
   once more) and 3 LLM usage events per run, over three months, 8 specs, 5 projects, 3 models;
   encoded as they are on the wire. Generation is not timed; the generated events are then kept
   out of the garbage collector's way (`gc.freeze()`), as a service holds no such list.
2. In this process, without NATS, the store's own rates (decode + fold + write):
   - **rebuild batches**: every event, `apply_events` per `rebuild.BATCH` events into a file opened
     as a rebuild opens it (`bulk`: no syncs until it is finished);
   - **live, group commit**: the first `--live-events` events, `apply_events` per
     `handlers.BATCH` events into a WAL store (one commit per batch, as the live handlers do);
   - **live, commit per event** (baseline, the former live path): the same events with one commit
     per event.
3. Unless `--no-nats`, against a local nats-server (temporary store, free ports), every event
   published with the headers `Bus.publish` sets (rate printed for information), then:
   - **live consumers**: the optimizer's own subscribers (`handlers.router`: batch subscribers,
     group commit, ack after commit) in a `ConsumerGroup` on a `Bus`, over a fresh WAL store,
     from their first fetch until both durable consumers have nothing pending and nothing unacked;
   - **former live consumers** (baseline, in the same run): per-message subscribers on the six
     folded run subjects and the usage subject with one commit per event, as `handlers.py` was
     before group commit, for `--baseline-seconds`;
   - **replay (rebuild path)**: `replay_into` into a bulk store, as `Rebuilder` does;
   - **former replay** (baseline, in the same run): RUNS read as the rebuild read it before (an
     ordered push consumer, one `next_msg` per message, a commit per 2,000 events into a WAL
     store), for `--baseline-seconds`.
   Events/s, and the CPU time of this process per event.
4. **Queries** on the rebuilt store, reopened as the service opens it (WAL): `costs` by project,
   spec, model and day (all time, one month, one project), `insights()` (every insight, as the
   insights request answers) and, as a baseline, the same insights one query per insight and group
   (as `insights()` computed them before its single scan), `insights()` of one project, a month's
   budget spend — each `--repeat` times, median and worst latency in ms.

With `--database-url`, every store above is a schema (`bench_<name>`) of that PostgreSQL database
instead of a SQLite file: the same code paths as the service with `FABRIK_ANALYTICS_DATABASE_URL`
(a bulk store commits without waiting for the WAL flush; "WAL store" reads "ordinary store").
The schemas are dropped before and after the run.

Figures are printed, never asserted; a non-zero exit means the benchmark itself broke (e.g. the
store does not hold what was ingested).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import nats.errors
from nats.js import api
from prometheus_client import CollectorRegistry

from fabrik_common.bus import EVENT_TYPE, MSG_ID, Bus, BusOptions, ConsumerGroup, Context, Router
from fabrik_common.codec import decode_any, encode
from fabrik_common.events import (
    LlmUsage,
    Resources,
    RunDispatched,
    RunEvent,
    RunFinished,
    RunParameters,
    RunRequested,
    RunStarted,
    RunStateChanged,
)
from fabrik_common.ids import new_ulid
from fabrik_common.metrics import BusMetrics
from fabrik_common.natsserver import NatsServer, free_port
from fabrik_common.topology import RUNS, ensure_topology
from fabrik_common.tracing import TRACEPARENT
from fabrik_common.urls import redact_url
from fabrik_optimizer import handlers
from fabrik_optimizer.analytics import queries, rebuild
from fabrik_optimizer.analytics.ingest import (
    RUN_SUBJECTS,
    Costing,
    apply_events,
    apply_llm_usage,
    apply_run_event,
)
from fabrik_optimizer.analytics.store import AnalyticsStore, PostgresLocation
from fabrik_optimizer.budgets import month_bounds
from fabrik_optimizer.prices import PriceBook, default_node_price_file
from fabrik_optimizer.state import OptimizerState

T0 = datetime(2026, 1, 1, tzinfo=UTC)
SPECS = [f"spec-{i}" for i in range(8)]
PROJECTS = [f"project-{i}" for i in range(5)]
MODELS = ["gpt-5", "claude-sonnet-4-5", "gpt-5-mini"]
TRACE = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def generate(n_events: int, seed: int = 1) -> list[tuple[str, bytes]]:
    """(subject, payload) of about n_events events, run by run."""
    rng = random.Random(seed)
    out: list[tuple[str, bytes]] = []
    span = 90 * 86400
    while len(out) < n_events:
        rid = new_ulid()
        project, spec, model = rng.choice(PROJECTS), rng.choice(SPECS), rng.choice(MODELS)
        limit = rng.choice(["2Gi", "4Gi"])
        params = RunParameters(
            spec={"id": spec},
            resources=Resources(cpu_request="500m", memory_request="1Gi", cpu_limit="2", memory_limit=limit),
        )
        t = T0 + timedelta(seconds=rng.randrange(span))
        events: list[Any] = [
            RunRequested(
                run_id=rid, project=project, env="dev", params=params, requested_by="b", occurred_at=t
            )
        ]
        attempts = 2 if rng.random() < 0.12 else 1
        revision = 0
        for n in range(1, attempts + 1):
            started = t + timedelta(seconds=rng.randrange(1, 120))
            ended = started + timedelta(seconds=rng.randrange(30, 3600))
            final = n == attempts
            roll = rng.random()
            outcome = "succeeded" if final and roll < 0.7 else ("timed_out" if roll > 0.95 else "failed")
            reason = None if outcome != "failed" else ("oom_killed" if roll > 0.9 else "workload_error")
            events += [
                RunStateChanged(
                    run_id=rid,
                    project=project,
                    attempt=n,
                    from_state=None,
                    to_state="queued",
                    revision=revision + 1,
                    occurred_at=t,
                ),
                RunDispatched(
                    run_id=rid,
                    project=project,
                    env="dev",
                    attempt=n,
                    params=params,
                    deadline=ended,
                    occurred_at=started,
                ),
                RunStarted(
                    run_id=rid, attempt=n, backend="kubernetes", workload_ref="job", occurred_at=started
                ),
                RunStateChanged(
                    run_id=rid,
                    project=project,
                    attempt=n,
                    from_state="starting",
                    to_state="running",
                    revision=revision + 2,
                    occurred_at=started,
                ),
                RunFinished(
                    run_id=rid,
                    attempt=n,
                    outcome=outcome,  # type: ignore[arg-type]
                    reason=reason,
                    peak_memory_bytes=rng.randrange(2**28, 2**32),
                    occurred_at=ended,
                ),
                RunStateChanged(
                    run_id=rid,
                    project=project,
                    attempt=n,
                    from_state="running",
                    to_state=outcome,  # type: ignore[arg-type]
                    revision=revision + 3,
                    reason=reason,
                    occurred_at=ended,
                ),
            ]
            revision += 3
            t = ended + timedelta(seconds=10)
            for _ in range(3 if final else 0):
                events.append(
                    LlmUsage(
                        call_id=new_ulid(),
                        run_id=rid,
                        project=project,
                        key_id="k",
                        endpoint="chat.completions",
                        model=model,
                        provider="openai",
                        deployment="d",
                        upstream_model=model,
                        streamed=True,
                        input_tokens=rng.randrange(100, 20000),
                        output_tokens=rng.randrange(10, 4000),
                        cache_read_tokens=rng.randrange(0, 50000),
                        cost_usd=rng.randrange(1, 100000) / 1e6,
                        latency_ms=100.0,
                        outcome="ok",
                        occurred_at=started + timedelta(seconds=20),
                    )
                )
        out += [(e.subject(), encode(e)) for e in events]
    return out[:n_events]


def rate(count: int, started: float, cpu_started: float) -> str:
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    return f"{count / elapsed:,.0f} events/s ({cpu / count * 1e6:.0f} µs CPU per event here)"


class Stores:
    """Where the benchmark's stores are: SQLite files in a directory, or schemas of a PostgreSQL database."""

    NAMES = ("analytics", "group", "one_by_one", "live", "former", "replay", "former_replay")

    def __init__(self, tmp: Path, database_url: str | None) -> None:
        self.tmp = tmp
        self.url = database_url

    def open(self, name: str, *, bulk: bool = False) -> AnalyticsStore:
        if self.url:
            return AnalyticsStore(PostgresLocation(self.url, schema=f"bench_{name}"), bulk=bulk)
        return AnalyticsStore(self.tmp / f"{name.replace('_', '-')}.db", bulk=bulk)

    def drop_all(self) -> None:
        """PostgreSQL: drop the benchmark's schemas (before and after a run)."""
        if not self.url:
            return
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.url, autocommit=True) as conn:
            for name in self.NAMES:
                conn.execute(
                    sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(f"bench_{name}"))
                )

    def size(self, store: AnalyticsStore) -> int:
        """Bytes the main store takes (file and WAL, or the schema's tables and indexes)."""
        if store.postgres is None:
            return sum(f.stat().st_size for f in self.tmp.glob("analytics.db*"))
        found = store.tuples(
            "SELECT SUM(pg_total_relation_size(c.oid)) FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = current_schema() AND c.relkind = 'r'"
        )
        return int(found[0][0] or 0)


def ingest_batches(store: AnalyticsStore, costing: Costing, events: list[Any], batch: int) -> str:
    started, cpu = time.perf_counter(), time.process_time()
    for i in range(0, len(events), batch):
        applied = apply_events(store, [decode_any(payload) for _, payload in events[i : i + batch]], costing)
        if applied.failed:
            raise RuntimeError(f"events not applied: {applied.failed}")
    return rate(len(events), started, cpu)


def ingest_one_by_one(store: AnalyticsStore, costing: Costing, events: list[Any]) -> str:
    started, cpu = time.perf_counter(), time.process_time()
    for _, payload in events:
        event = decode_any(payload)
        if isinstance(event, LlmUsage):
            apply_llm_usage(store, event)
        else:
            apply_run_event(store, event, costing)  # type: ignore[arg-type]
    return rate(len(events), started, cpu)


async def publish(bus: Bus, events: list[tuple[str, bytes]]) -> float:
    """Every event with the headers `Bus.publish` sets, 5,000 acks in flight."""
    started = time.perf_counter()
    window = 5000
    for i in range(0, len(events), window):
        futures = []
        for subject, payload in events[i : i + window]:
            headers = {MSG_ID: new_ulid(), EVENT_TYPE: "bench", TRACEPARENT: TRACE}
            futures.append(await bus.js.publish_async(subject, payload, headers=headers))
        await asyncio.gather(*futures)
    return len(events) / (time.perf_counter() - started)


async def drained(bus: Bus, consumers: list[tuple[str, str]]) -> bool:
    for stream, durable in consumers:
        info = await bus.js.consumer_info(stream, durable)
        if info.num_pending or info.num_ack_pending:
            return False
    return True


async def live_consumers(bus: Bus, store: AnalyticsStore, costing: Costing, total: int) -> str:
    """The optimizer's subscribers, from the first fetch until every event is applied and acked."""
    state = OptimizerState(store, costing)
    group: ConsumerGroup[OptimizerState] = ConsumerGroup(bus, handlers.router.subscribers, state)
    consumers = [(s.stream.name, s.durable) for s in handlers.router.subscribers]
    started, cpu = time.perf_counter(), time.process_time()
    await group.start()
    try:
        while True:
            if await drained(bus, consumers):
                return rate(total, started, cpu)
            await asyncio.sleep(0.1)
    finally:
        await group.stop(grace=5)


async def former_consumers(bus: Bus, store: AnalyticsStore, costing: Costing, seconds: float) -> str:
    """handlers.py before group commit: one message at a time, a commit per event, then the ack;
    the run consumer filtered on the six folded subjects."""
    state = OptimizerState(store, costing)
    handled = 0
    router = Router()

    @router.subscriber(*RUN_SUBJECTS, durable="bench-former-runs", max_deliver=10, batch=256)
    async def on_run_event(event: RunEvent, ctx: Context[OptimizerState]) -> None:
        nonlocal handled
        async with ctx.state.write_lock:
            apply_run_event(ctx.state.store, event, ctx.state.costing)
        handled += 1

    @router.subscriber("fabrik.llm.usage", durable="bench-former-usage", max_deliver=10, batch=256)
    async def on_llm_usage(event: LlmUsage, ctx: Context[OptimizerState]) -> None:
        nonlocal handled
        async with ctx.state.write_lock:
            apply_llm_usage(ctx.state.store, event)
        handled += 1

    group: ConsumerGroup[OptimizerState] = ConsumerGroup(bus, router.subscribers, state)
    started, cpu = time.perf_counter(), time.process_time()
    await group.start()
    try:
        await asyncio.sleep(seconds)
        return rate(max(handled, 1), started, cpu) + f" over {handled:,} events"
    finally:
        await group.stop(grace=5)


async def former_replay(bus: Bus, store: AnalyticsStore, costing: Costing, seconds: float) -> str:
    """The rebuild's former read of RUNS (baseline): an ordered push consumer, one `next_msg`
    per message, folded one event at a time and committed every 2,000, for `seconds`."""
    sub = await bus.js.subscribe(
        "fabrik.runs.>",
        stream=RUNS.name,
        ordered_consumer=True,
        config=api.ConsumerConfig(
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=1, mem_storage=True
        ),
    )
    handled = 0
    started, cpu = time.perf_counter(), time.process_time()
    done = False
    try:
        while not done and time.perf_counter() - started < seconds:
            with store.batch():
                for _ in range(2000):
                    try:
                        msg = await sub.next_msg(timeout=1.0)
                    except nats.errors.TimeoutError:
                        done = True  # the whole stream read
                        break
                    event = decode_any(msg.data)
                    apply_run_event(store, event, costing)  # type: ignore[arg-type]
                    handled += 1
            await asyncio.sleep(0)
        if done:
            started += 1.0  # not the last wait, for a message after the end of the stream
        return rate(handled, started, cpu) + f" over {handled:,} events"
    finally:
        await sub.unsubscribe()


async def through_nats(
    url: str, events: list[tuple[str, bytes]], stores: Stores, costing: Costing, baseline_seconds: float
) -> int:
    bus = Bus(BusOptions(url=url, publish_timeout=30), BusMetrics(CollectorRegistry()))
    await bus.connect()
    try:
        await ensure_topology(bus.js)
        publish_rate = await publish(bus, events)
        print(f"publish to JetStream (with the headers Bus.publish sets): {publish_rate:,.0f} events/s")

        store = stores.open("live")
        figure = await live_consumers(bus, store, costing, len(events))
        counts = store.counts()
        store.close()
        print(f"live consumers (group commit of {handlers.BATCH:,}, ack after commit): {figure}", flush=True)

        store = stores.open("former")
        figure = await former_consumers(bus, store, costing, baseline_seconds)
        store.close()
        print(f"former live consumers (commit per event; baseline): {figure}", flush=True)

        store = stores.open("replay", bulk=True)
        started, cpu = time.perf_counter(), time.process_time()
        replayed = await rebuild.replay_into(bus.js, store, costing)
        total = replayed.run_events + replayed.usage_events
        figure = rate(total, started, cpu)
        store.finish()
        print(
            f"replay from JetStream (rebuild path, {rebuild.BATCH:,} per transaction): {figure}", flush=True
        )

        store = stores.open("former_replay")
        figure = await former_replay(bus, store, costing, baseline_seconds)
        store.close()
        print(f"former replay (ordered push consumer, next_msg per message; baseline): {figure}", flush=True)
        expected_runs = sum(1 for subject, _ in events if subject.startswith("fabrik.runs.requested."))
        if counts[0] != expected_runs or total != len(events):
            print(
                f"live store {counts}, replayed {total}: expected {expected_runs} runs, {len(events)} events"
            )
            return 1
        return 0
    finally:
        await bus.close()


def insights_query_by_query(store: AnalyticsStore, min_runs: int, top: int) -> dict[str, Any]:
    """How `insights()` answered before its single scan (baseline): one query per insight and group."""
    retried, retried_count = queries.most_retried(store, top)
    groups: tuple[Any, ...] = ("model", "spec", "project")
    return {
        "population": queries.population(store),
        "success_rate": {by: queries.success_rate(store, by, min_runs) for by in groups},
        "durations_p95": {by: queries.duration_p95(store, by, min_runs) for by in groups},
        "oom": queries.oom_rates(store, min_runs),
        "cost_per_success": {by: queries.cost_per_success(store, by, min_runs) for by in ("spec", "project")},
        "most_retried": (retried, retried_count),
        "failing_specs": queries.failing_specs(store, min_runs, top),
    }


def timed(fn: Callable[[], Any], repeat: int) -> tuple[float, float]:
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples), max(samples)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--live-events", type=int, default=100_000)
    parser.add_argument("--baseline-seconds", type=float, default=20.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-nats", action="store_true")
    parser.add_argument(
        "--database-url",
        help="run the stores on this PostgreSQL database (schemas bench_*) instead of SQLite files",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    costing = Costing(prices=PriceBook.load(default_node_price_file()), node_type="cx32")

    started = time.perf_counter()
    events = generate(args.events)
    gc.collect()
    gc.freeze()
    runs = sum(1 for subject, _ in events if subject.startswith("fabrik.runs.requested."))
    usages = sum(1 for subject, _ in events if subject == "fabrik.llm.usage")
    print(
        f"generated {len(events):,} events ({runs:,} runs, {usages:,} usage events) "
        f"in {time.perf_counter() - started:.1f} s; load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="fabrik-bench-analytics-") as tmp_name:
        tmp = Path(tmp_name)
        stores = Stores(tmp, args.database_url)
        stores.drop_all()
        try:
            return run(args, stores, events, costing, runs, usages)
        finally:
            stores.drop_all()


def run(
    args: argparse.Namespace,
    stores: Stores,
    events: list[tuple[str, bytes]],
    costing: Costing,
    runs: int,
    usages: int,
) -> int:
    if stores.url:
        print(f"stores on PostgreSQL: {redact_url(stores.url)}, schemas bench_*", flush=True)
    tmp = stores.tmp
    store = stores.open("analytics", bulk=True)
    figure = ingest_batches(store, costing, events, rebuild.BATCH)
    store.finish()
    print(f"store, rebuild batches ({rebuild.BATCH:,} per transaction): {figure}", flush=True)

    live = events[: args.live_events]
    store = stores.open("group")
    figure = ingest_batches(store, costing, live, handlers.BATCH)
    store.close()
    print(f"store, live group commit ({handlers.BATCH:,} per commit, {len(live):,} events): {figure}")
    store = stores.open("one_by_one")
    figure = ingest_one_by_one(store, costing, live)
    store.close()
    print(f"store, live commit per event (baseline, {len(live):,} events): {figure}", flush=True)

    store = stores.open("analytics")  # as the service opens it (WAL), after a rebuild
    n_runs, n_calls = store.counts()
    if (n_runs, n_calls) != (runs, usages):
        print(f"store holds {n_runs} runs / {n_calls} calls, expected {runs} / {usages}", file=sys.stderr)
        return 1

    if not args.no_nats:
        server = NatsServer(tmp / "nats", port=free_port(), monitor_port=free_port())
        server.start()
        try:
            if asyncio.run(through_nats(server.url, events, stores, costing, args.baseline_seconds)):
                return 1
        finally:
            server.stop()

    february = month_bounds("2026-02")
    checks: list[tuple[str, Callable[[], Any]]] = [
        *[
            (f"costs by {g}", lambda g=g: queries.costs(store, g))
            for g in ("project", "spec", "model", "day")
        ],  # type: ignore[misc]
        *[
            (f"costs by {g}, one month", lambda g=g: queries.costs(store, g, *february))
            for g in ("project", "day")
        ],  # type: ignore[misc]
        ("costs by project, one project", lambda: queries.costs(store, "project", project="project-1")),
        ("insights (all)", lambda: queries.insights(store, 20, 10)),
        ("insights, query by query (former)", lambda: insights_query_by_query(store, 20, 10)),
        ("insights, one project", lambda: queries.insights(store, 20, 10, "project-1")),
        ("budget spend, one month", lambda: queries.spend(store, *february)),
    ]
    print(f"queries over {n_runs:,} runs and {n_calls:,} calls (median / worst of {args.repeat}, ms):")
    for name, fn in checks:
        median, worst = timed(fn, args.repeat)
        print(f"  {name:<34} {median:8.1f} / {worst:8.1f}")
    size = stores.size(store)
    store.close()
    print(f"store size: {size / 2**20:.0f} MiB; load average {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
