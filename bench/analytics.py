"""The optimizer's analytics store: ingest rate of run and usage events, latency of cost and insight queries.

    uv run python bench/analytics.py [--events 1000000] [--live-events 100000] [--no-nats] [--repeat 3]

1. A generated history of `--events` events (default 1,000,000): runs of 7 run events each
   (requested, queued, dispatched, started, running, finished, terminal state; 12 % of them resumed
   once more) and 3 LLM usage events per run, over three months, 8 specs, 5 projects, 3 models;
   encoded as they are on the wire. Generation is not timed.
2. **ingest, batched**: decode + fold + write of every event into a fresh SQLite store, committed
   every 2,000 events — what a rebuild does per fetched batch. Events/s.
3. **ingest, commit per event**: the same for the first `--live-events` events with one commit
   per event — what a live consumer does before it acks. Events/s.
4. **replay from JetStream** (unless `--no-nats`): all events published to a local nats-server
   (temporary store, free ports; publish rate printed for information), then `replay_into`: the
   rebuild path end to end (fetch, decode, fold, write). Events/s.
5. **queries** on the full store: `costs` by project, spec, model and day (all time, and one
   month), every insight (`insights()`), a month's budget spend — each `--repeat` times, median
   and worst latency in ms.

Figures are printed, never asserted; a non-zero exit means the benchmark itself broke (e.g. the
store does not hold what was ingested).
"""

from __future__ import annotations

import argparse
import asyncio
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

from fabrik_common.codec import decode_any, encode
from fabrik_common.events import (
    LlmUsage,
    Resources,
    RunDispatched,
    RunFinished,
    RunParameters,
    RunRequested,
    RunStarted,
    RunStateChanged,
)
from fabrik_common.ids import new_ulid
from fabrik_common.natsserver import NatsServer, free_port
from fabrik_optimizer.analytics import queries
from fabrik_optimizer.analytics.ingest import Costing, apply_llm_usage, apply_run_event
from fabrik_optimizer.analytics.store import AnalyticsStore
from fabrik_optimizer.budgets import month_bounds
from fabrik_optimizer.prices import PriceBook, default_node_price_file

T0 = datetime(2026, 1, 1, tzinfo=UTC)
SPECS = [f"spec-{i}" for i in range(8)]
PROJECTS = [f"project-{i}" for i in range(5)]
MODELS = ["gpt-5", "claude-sonnet-4-5", "gpt-5-mini"]
BATCH = 2000


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


def fold(store: AnalyticsStore, costing: Costing, payload: bytes) -> None:
    event = decode_any(payload)
    if isinstance(event, LlmUsage):
        apply_llm_usage(store, event)
    else:
        apply_run_event(store, event, costing)  # type: ignore[arg-type]


def ingest(store: AnalyticsStore, costing: Costing, events: list[tuple[str, bytes]], batched: bool) -> float:
    started = time.perf_counter()
    if batched:
        for i in range(0, len(events), BATCH):
            with store.batch():
                for _, payload in events[i : i + BATCH]:
                    fold(store, costing, payload)
    else:
        for _, payload in events:
            fold(store, costing, payload)
    return len(events) / (time.perf_counter() - started)


async def replay(
    url: str, events: list[tuple[str, bytes]], db: Path, costing: Costing
) -> tuple[float, float, int]:
    import nats

    from fabrik_common.topology import ensure_topology
    from fabrik_optimizer.analytics.rebuild import replay_into

    nc = await nats.connect(url)
    try:
        js = nc.jetstream(timeout=30)
        await ensure_topology(js)
        started = time.perf_counter()
        window = 5000
        for i in range(0, len(events), window):
            futures = [
                await js.publish_async(subject, payload) for subject, payload in events[i : i + window]
            ]
            await asyncio.gather(*futures)
        publish_rate = len(events) / (time.perf_counter() - started)
        store = AnalyticsStore(db)
        try:
            started = time.perf_counter()
            counts = await replay_into(js, store, costing)
            rate = (counts.run_events + counts.usage_events) / (time.perf_counter() - started)
            return publish_rate, rate, counts.run_events + counts.usage_events
        finally:
            store.close()
    finally:
        await nc.close()


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
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-nats", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    price_file = default_node_price_file()
    costing = Costing(prices=PriceBook.load(price_file), node_type="cx32")

    started = time.perf_counter()
    events = generate(args.events)
    runs = sum(1 for subject, _ in events if subject.startswith("fabrik.runs.requested."))
    usages = sum(1 for subject, _ in events if subject == "fabrik.llm.usage")
    print(
        f"generated {len(events):,} events ({runs:,} runs, {usages:,} usage events) "
        f"in {time.perf_counter() - started:.1f} s",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="fabrik-bench-analytics-") as tmp:
        db = Path(tmp) / "analytics.db"
        store = AnalyticsStore(db)
        rate = ingest(store, costing, events, batched=True)
        print(f"ingest, batched ({BATCH:,} per commit): {rate:,.0f} events/s", flush=True)
        n_runs, n_calls = store.counts()
        if (n_runs, n_calls) != (runs, usages):
            print(f"store holds {n_runs} runs / {n_calls} calls, expected {runs} / {usages}", file=sys.stderr)
            return 1

        live = AnalyticsStore(Path(tmp) / "live.db")
        rate = ingest(live, costing, events[: args.live_events], batched=False)
        live.close()
        print(f"ingest, commit per event ({args.live_events:,} events): {rate:,.0f} events/s", flush=True)

        if not args.no_nats:
            server = NatsServer(Path(tmp) / "nats", port=free_port(), monitor_port=free_port())
            server.start()
            try:
                publish_rate, rate, replayed = asyncio.run(
                    replay(server.url, events, Path(tmp) / "replay.db", costing)
                )
            finally:
                server.stop()
            if replayed != len(events):
                print(f"replayed {replayed} events, expected {len(events)}", file=sys.stderr)
                return 1
            print(f"publish to JetStream: {publish_rate:,.0f} events/s (for information)")
            print(f"replay from JetStream (rebuild path): {rate:,.0f} events/s", flush=True)

        march = month_bounds("2026-02")
        checks: list[tuple[str, Callable[[], Any]]] = [
            *[
                (f"costs by {g}", lambda g=g: queries.costs(store, g))
                for g in ("project", "spec", "model", "day")
            ],  # type: ignore[misc]
            *[
                (f"costs by {g}, one month", lambda g=g: queries.costs(store, g, *march))
                for g in ("project", "day")
            ],  # type: ignore[misc]
            ("costs by project, one project", lambda: queries.costs(store, "project", project="project-1")),
            ("insights (all)", lambda: queries.insights(store, 20, 10)),
            ("insights, one project", lambda: queries.insights(store, 20, 10, "project-1")),
            ("budget spend, one month", lambda: queries.spend(store, *march)),
        ]
        print(f"queries over {n_runs:,} runs and {n_calls:,} calls (median / worst of {args.repeat}, ms):")
        for name, fn in checks:
            median, worst = timed(fn, args.repeat)
            print(f"  {name:<32} {median:8.1f} / {worst:8.1f}")
        store.close()
        size = sum(f.stat().st_size for f in Path(tmp).glob("analytics.db*"))
        print(f"store size: {size / 2**20:.0f} MiB; load average {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
