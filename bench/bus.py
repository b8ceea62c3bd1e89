"""Consume throughput of the fabrik bus against a bare nats-py JetStream pull loop.

    uv run python bench/bus.py [--events N] [--batch B] [--rounds R] [--warmup W]

Starts its own nats-server (temporary store, free port), creates the Fabrik topology and, on that
one server, measures per round:

* publish:   N pre-encoded `RunProgress` events published with `js.publish_async` to a fresh
             subject of the RUNS stream, with the headers `Bus.publish` would set; for information.
* baseline:  a bare durable pull consumer (same server-side config as a framework subscriber)
             fetching batches of B and acking each message; timed from the first fetch until N
             messages are acked.
* framework: a `Router` subscriber with a typed no-op handler run by a `ConsumerGroup` on a `Bus`
             (decode, trace context, heartbeat, handler, ack, metrics); timed from
             `ConsumerGroup.start()` until the handler has seen N events.

Publishing always happens before a consume timer starts. Baseline and framework alternate which
goes first in each round, every measurement gets its own subject and durable consumer, and the
subject is purged afterwards. Besides wall-clock rates, the client process's CPU time per event
is recorded: it is much less sensitive to other load on the machine. The medians over the rounds
are reported, and whether the framework keeps at least 70% of the bare rate (printed, never
asserted).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import nats
import nats.errors
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext, api
from prometheus_client import CollectorRegistry

from fabrik_common.bus import EVENT_TYPE, MSG_ID, Bus, BusOptions, ConsumerGroup, Context, Router
from fabrik_common.codec import encode
from fabrik_common.events import RunProgress
from fabrik_common.ids import new_ulid
from fabrik_common.metrics import BusMetrics
from fabrik_common.natsserver import NatsServer, free_port
from fabrik_common.topology import RUNS, ensure_topology
from fabrik_common.tracing import TRACEPARENT, outgoing_traceparent

AIM = 0.70
FETCH_TIMEOUT = 1.0  # the ConsumerGroup default; the baseline uses the same
CONSUME_TIMEOUT = 60.0  # a measurement that takes longer than this is a failure, not a figure
Kind = Literal["baseline", "framework"]
KINDS: tuple[Kind, Kind] = ("baseline", "framework")


@dataclass(frozen=True)
class Batch:
    """N encoded events for one subject, with the headers `Bus.publish` would put on them."""

    subject: str
    payloads: list[bytes]
    headers: list[dict[str, str]]


@dataclass(frozen=True)
class Sample:
    """One consume measurement: wall-clock rate and client CPU time per event."""

    rate: float  # events per second, wall clock
    cpu_us: float  # microseconds of this process's CPU time per event


class Stopwatch:
    """Wall clock and this process's CPU time, started together."""

    def __init__(self) -> None:
        self.wall = time.perf_counter()
        self.cpu = time.process_time()

    def elapsed(self) -> float:
        return time.perf_counter() - self.wall

    def sample(self, n: int) -> Sample:
        wall = time.perf_counter() - self.wall
        cpu = time.process_time() - self.cpu
        return Sample(rate=n / wall, cpu_us=cpu / n * 1e6)


@dataclass
class Results:
    publish: list[float] = field(default_factory=list)
    samples: dict[Kind, list[Sample]] = field(default_factory=lambda: {"baseline": [], "framework": []})

    def median_rate(self, kind: Kind) -> float:
        return statistics.median(s.rate for s in self.samples[kind])

    def median_cpu_us(self, kind: Kind) -> float:
        return statistics.median(s.cpu_us for s in self.samples[kind])


def make_batch(n: int) -> Batch:
    run_id = new_ulid()
    payloads: list[bytes] = []
    headers: list[dict[str, str]] = []
    for i in range(n):
        event = RunProgress(run_id=run_id, attempt=1, phase="implement", task="bench", finished=i, total=n)
        payloads.append(encode(event))
        headers.append(
            {
                MSG_ID: event.event_id,
                EVENT_TYPE: event.event_type(),
                TRACEPARENT: outgoing_traceparent(),
            }
        )
    subject = RunProgress(run_id=run_id, attempt=1).subject()
    return Batch(subject, payloads, headers)


async def publish(js: JetStreamContext, batch: Batch) -> float:
    """Publish the batch and wait for every JetStream ack; returns events per second."""
    futures: list[asyncio.Future[api.PubAck]] = []
    watch = Stopwatch()
    for payload, headers in zip(batch.payloads, batch.headers, strict=True):
        futures.append(await js.publish_async(batch.subject, payload, headers=headers))
    acks = await asyncio.gather(*futures)
    elapsed = watch.elapsed()
    if any(ack.duplicate for ack in acks):
        raise RuntimeError("JetStream reported duplicates: event ids are not unique")
    return len(batch.payloads) / elapsed


def consumer_config(durable: str, subject: str, batch: int) -> api.ConsumerConfig:
    """The server-side config the framework uses for a subscriber of this subject."""
    router = Router()

    async def unused(event: RunProgress, ctx: Context[None]) -> None:
        return None

    router.subscriber(subject, durable=durable, batch=batch)(unused)
    return router.subscribers[0].consumer_config()


async def consume_bare(js: JetStreamContext, durable: str, n: int, batch: int) -> Sample:
    """Bare pull loop: fetch B, ack each."""
    psub = await js.pull_subscribe_bind(durable=durable, stream=RUNS.name)
    try:
        acked = 0
        watch = Stopwatch()
        while acked < n:
            try:
                msgs = await psub.fetch(batch, timeout=FETCH_TIMEOUT)
            except (TimeoutError, nats.errors.TimeoutError):
                if watch.elapsed() > CONSUME_TIMEOUT:
                    raise RuntimeError(f"baseline saw only {acked} of {n} events") from None
                continue
            for msg in msgs:
                await msg.ack()
            acked += len(msgs)
        sample = watch.sample(n)
    finally:
        await psub.unsubscribe()
    if acked != n:
        raise RuntimeError(f"baseline acked {acked} events, expected {n}")
    return sample


async def consume_framework(
    bus: Bus, registry: CollectorRegistry, subject: str, durable: str, n: int, batch: int
) -> Sample:
    """A ConsumerGroup running one subscriber whose handler only counts."""
    seen = 0
    done = asyncio.Event()
    router = Router()

    @router.subscriber(subject, durable=durable, batch=batch)
    async def handle(event: RunProgress, ctx: Context[None]) -> None:
        nonlocal seen
        seen += 1
        if seen == n:
            done.set()

    group: ConsumerGroup[None] = ConsumerGroup(bus, router.subscribers, None, fetch_timeout=FETCH_TIMEOUT)
    watch = Stopwatch()
    try:
        await group.start()
        try:
            await asyncio.wait_for(done.wait(), CONSUME_TIMEOUT)
        except TimeoutError:
            raise RuntimeError(f"framework saw only {seen} of {n} events") from None
        sample = watch.sample(n)
    finally:
        await group.stop(grace=5)
    processed = registry.get_sample_value("fabrik_messages_processed_total", {"consumer": durable})
    if seen != n or processed != n:
        raise RuntimeError(f"framework handled {seen} and acked {processed} events, expected {n}")
    return sample


async def check_drained(nc: NatsClient, js: JetStreamContext, durable: str, n: int) -> None:
    """Every message was delivered exactly once and its ack reached the server."""
    await nc.flush()
    info = await js.consumer_info(RUNS.name, durable)
    for _ in range(50):
        if info.num_ack_pending == 0:
            break
        await asyncio.sleep(0.02)
        info = await js.consumer_info(RUNS.name, durable)
    if info.num_pending or info.num_ack_pending or info.num_redelivered:
        raise RuntimeError(
            f"consumer {durable} not drained: pending={info.num_pending} "
            f"ack_pending={info.num_ack_pending} redelivered={info.num_redelivered}"
        )
    if info.delivered.consumer_seq != n:
        raise RuntimeError(f"consumer {durable} delivered {info.delivered.consumer_seq}, expected {n}")


@dataclass(frozen=True)
class Clients:
    pub_js: JetStreamContext
    bare_nc: NatsClient
    bare_js: JetStreamContext
    bus: Bus
    registry: CollectorRegistry


async def measure(
    clients: Clients, kind: Kind, round_no: int, n: int, batch: int, results: Results
) -> Sample:
    """Publish N events to a fresh subject, then consume them with `kind`; returns the sample."""
    events = make_batch(n)
    results.publish.append(await publish(clients.pub_js, events))
    subject = events.subject
    # Drop the publisher's 2N objects and their garbage now, so no collection of them lands in
    # the timed window (it would tax the side that allocates more per message).
    del events
    gc.collect()
    durable = f"bench-{kind}-{round_no}-{new_ulid().lower()}"
    js = clients.bare_js
    # Create the consumer before any timer starts; the ConsumerGroup's own add_consumer is then an
    # idempotent update, as it is for a service restarting against an existing durable.
    info = await js.add_consumer(RUNS.name, consumer_config(durable, subject, batch))
    if info.num_pending != n:
        raise RuntimeError(f"{info.num_pending} events stored for {subject}, expected {n}")
    try:
        if kind == "baseline":
            sample = await consume_bare(js, durable, n, batch)
            await check_drained(clients.bare_nc, js, durable, n)
        else:
            bus = clients.bus
            sample = await consume_framework(bus, clients.registry, subject, durable, n, batch)
            await check_drained(bus.nc, bus.js, durable, n)
    finally:
        with contextlib.suppress(nats.errors.Error):
            await js.delete_consumer(RUNS.name, durable)
        with contextlib.suppress(nats.errors.Error):
            await js.purge_stream(RUNS.name, subject=subject)
    return sample


async def run(url: str, n: int, batch: int, rounds: int, warmup: int) -> Results:
    pub_nc = await nats.connect(url, name="bench-publisher")
    bare_nc = await nats.connect(url, name="bench-baseline")
    registry = CollectorRegistry()
    bus = Bus(BusOptions(url=url, name="bench-framework"), BusMetrics(registry))
    try:
        await bus.connect()
        await ensure_topology(bus.js)
        clients = Clients(pub_nc.jetstream(), bare_nc, bare_nc.jetstream(), bus, registry)

        if warmup:
            scratch = Results()
            for kind in KINDS:
                await measure(clients, kind, 0, warmup, batch, scratch)

        results = Results()
        for round_no in range(1, rounds + 1):
            order = KINDS if round_no % 2 else KINDS[::-1]
            got: dict[Kind, Sample] = {}
            for kind in order:
                got[kind] = await measure(clients, kind, round_no, n, batch, results)
                results.samples[kind].append(got[kind])
            base, fw = got["baseline"], got["framework"]
            print(
                f"round {round_no}: baseline {base.rate:>7,.0f} ev/s {base.cpu_us:5.1f} us CPU/ev"
                f" | framework {fw.rate:>7,.0f} ev/s {fw.cpu_us:5.1f} us CPU/ev"
                f" | ratio {fw.rate / base.rate:6.1%} ({order[0]} first)",
                flush=True,
            )
        return results
    finally:
        await _close_quietly(bus.close)
        await _close_quietly(bare_nc.close)
        await _close_quietly(pub_nc.close)


async def _close_quietly(close: Callable[[], Awaitable[None]]) -> None:
    with contextlib.suppress(Exception):
        await close()


def report(results: Results, n: int, batch: int, load: tuple[float, float]) -> None:
    base_rate, fw_rate = (results.median_rate(k) for k in KINDS)
    base_cpu, fw_cpu = (results.median_cpu_us(k) for k in KINDS)
    ratio = fw_rate / base_rate
    rows = [
        ("publish rate (js.publish_async; info only)", f"{statistics.median(results.publish):,.0f} ev/s"),
        ("baseline: bare pull + ack", f"{base_rate:,.0f} ev/s"),
        ("framework: Router + ConsumerGroup", f"{fw_rate:,.0f} ev/s"),
        ("ratio framework/baseline (wall clock)", f"{ratio:.1%}"),
        ("baseline client CPU per event", f"{base_cpu:.1f} us"),
        ("framework client CPU per event", f"{fw_cpu:.1f} us"),
        ("ratio by client CPU (baseline/framework)", f"{base_cpu / fw_cpu:.1%}"),
        (f"aim: framework keeps >= {AIM:.0%} of bare rate", "met" if ratio >= AIM else "NOT met"),
    ]
    width = max(len(label) for label, _ in rows)
    rule = "-" * (width + 16)
    print()
    print(f"median of {len(results.samples['baseline'])} rounds, N={n:,} events, batch={batch}")
    print(rule)
    for label, value in rows:
        print(f"{label:<{width}}  {value:>14}")
    print(rule)
    cpus = os.cpu_count() or 1
    if max(load) > cpus:
        print(
            f"note: load average {load[0]:.1f} before / {load[1]:.1f} after on {cpus} CPUs: other "
            "processes competed for the CPU, so wall-clock rates are noisy; the CPU-per-event "
            "figures are the steadier comparison."
        )


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--events", type=int, default=50_000, help="events per measurement")
    parser.add_argument("--batch", type=int, default=128, help="fetch batch size (both sides)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; medians are reported")
    parser.add_argument(
        "--warmup", type=int, default=2_000, help="events of an unreported warm-up round (0: none)"
    )
    args = parser.parse_args(argv)
    if args.events < 1 or args.batch < 1 or args.rounds < 1 or args.warmup < 0:
        parser.error("--events, --batch and --rounds must be positive, --warmup not negative")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="fabrik-bench-bus-") as tmp:
        server = NatsServer(Path(tmp) / "nats", port=free_port(), monitor_port=free_port())
        try:
            server.start()
            print(f"nats-server {server.url}, store {server.store_dir}", flush=True)
            results = asyncio.run(run(server.url, args.events, args.batch, args.rounds, args.warmup))
        finally:
            server.stop()
    report(results, args.events, args.batch, (load_before, os.getloadavg()[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
