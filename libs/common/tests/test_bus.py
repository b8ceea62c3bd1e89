"""The bus against a real NATS JetStream server: dead letters, dedupe, retries, redelivery."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

from prometheus_client import CollectorRegistry

from fabrik_common.bus import (
    DLQ_CONSUMER,
    DLQ_REASON,
    DLQ_SEQUENCE,
    DLQ_SUBJECT,
    Bus,
    BusOptions,
    ConsumerGroup,
    Context,
    Reject,
    Retry,
    Router,
    dead_letter_subject,
)
from fabrik_common.codec import encode
from fabrik_common.events import RunProgress, RunQueued
from fabrik_common.ids import new_ulid
from fabrik_common.metrics import BusMetrics
from fabrik_common.topology import ensure_topology
from fabrik_common.tracing import continue_trace, current_span

RUN_ID = new_ulid()


def progress(n: int, run_id: str = RUN_ID) -> RunProgress:
    return RunProgress(run_id=run_id, attempt=1, phase="implement", finished=n, total=1000)


@contextlib.asynccontextmanager
async def connected_bus(url: str) -> AsyncIterator[Bus]:
    bus = Bus(BusOptions(url=url, publish_deadline=30), BusMetrics(CollectorRegistry()))
    await bus.connect()
    await ensure_topology(bus.js)
    try:
        yield bus
    finally:
        await bus.close()


@contextlib.asynccontextmanager
async def consuming(bus: Bus, router: Router) -> AsyncIterator[ConsumerGroup[None]]:
    group: ConsumerGroup[None] = ConsumerGroup(bus, router.subscribers, None)
    await group.start()
    try:
        yield group
    finally:
        await group.stop(grace=5)


async def eventually(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def metric(bus: Bus, name: str, **labels: str) -> float:
    sample = bus.metrics.registry.get_sample_value(name, labels)
    return 0.0 if sample is None else float(sample)


async def dead_letters(bus: Bus, consumer: str, expected: int) -> list[Any]:
    sub = await bus.js.pull_subscribe(dead_letter_subject("RUNS", consumer), stream="DEADLETTER")
    msgs: list[Any] = []
    with contextlib.suppress(TimeoutError):
        while len(msgs) < expected:
            msgs.extend(await sub.fetch(expected - len(msgs), timeout=5))
    await sub.unsubscribe()
    return msgs


async def test_malformed_messages_are_dead_lettered_with_reason_and_counted(nats_url: str) -> None:
    handled: list[RunProgress] = []
    router = Router()

    @router.subscriber("fabrik.runs.progress.*", durable="t-dlq-decode", backoff=(0.05,))
    async def handle(event: RunProgress, ctx: Context[None]) -> None:
        handled.append(event)

    async with connected_bus(nats_url) as bus, consuming(bus, router):
        subject = f"fabrik.runs.progress.{RUN_ID}"
        await bus.js.publish(subject, b"{not json")
        bad = b'{"type":"run.progress","run_id":"%s","attempt":"one"}' % RUN_ID.encode()
        await bus.js.publish(subject, bad)
        await bus.publish(progress(7))

        await eventually(lambda: len(handled) == 1)
        letters = await dead_letters(bus, "t-dlq-decode", 2)
        reasons = sorted(m.headers[DLQ_REASON] for m in letters)
        assert reasons[0].startswith("invalid event") and "$.attempt" in reasons[0]
        assert reasons[1].startswith("malformed JSON")
        assert {m.data for m in letters} == {b"{not json", bad}
        assert all(m.headers[DLQ_SUBJECT] == subject for m in letters)
        assert all(m.headers[DLQ_CONSUMER] == "t-dlq-decode" for m in letters)
        assert sorted(int(m.headers[DLQ_SEQUENCE]) for m in letters) == [1, 2]
        assert (
            metric(bus, "fabrik_messages_dead_lettered_total", consumer="t-dlq-decode", reason="decode") == 2
        )
        assert handled[0].finished == 7

        # Nothing loops: the consumer has nothing pending or waiting for an ack.
        await asyncio.sleep(0.3)
        info = await bus.js.consumer_info("RUNS", "t-dlq-decode")
        assert info.num_ack_pending == 0
        assert info.num_pending == 0
        assert info.num_redelivered == 0


async def test_handler_failing_past_max_deliver_is_dead_lettered_once(nats_url: str) -> None:
    calls: Counter[int] = Counter()
    router = Router()

    @router.subscriber("fabrik.runs.progress.*", durable="t-dlq-fail", max_deliver=3, backoff=(0.05,))
    async def handle(event: RunProgress, ctx: Context[None]) -> None:
        calls[ctx.delivery] += 1
        raise RuntimeError("downstream exploded")

    async with connected_bus(nats_url) as bus, consuming(bus, router):
        await bus.publish(progress(1))
        letters = await dead_letters(bus, "t-dlq-fail", 1)
        assert len(letters) == 1
        assert "failed 3 times" in letters[0].headers[DLQ_REASON]
        assert "downstream exploded" in letters[0].headers[DLQ_REASON]
        await asyncio.sleep(0.5)
        assert calls == {1: 1, 2: 1, 3: 1}
        assert metric(bus, "fabrik_messages_failed_total", consumer="t-dlq-fail") == 3
        assert metric(bus, "fabrik_messages_redelivered_total", consumer="t-dlq-fail") == 2
        info = await bus.js.consumer_info("RUNS", "t-dlq-fail")
        assert info.num_ack_pending == 0


async def test_reject_dead_letters_at_once_and_retry_waits(nats_url: str) -> None:
    seen: list[tuple[int, int]] = []
    router = Router()

    @router.subscriber("fabrik.runs.progress.*", durable="t-reject", backoff=(5.0,))
    async def handle(event: RunProgress, ctx: Context[None]) -> None:
        seen.append((event.finished or 0, ctx.delivery))
        if event.finished == 1:
            raise Reject("not for us")
        if event.finished == 2 and ctx.delivery == 1:
            raise Retry("not yet", delay=0.2)

    async with connected_bus(nats_url) as bus, consuming(bus, router):
        loop = asyncio.get_running_loop()
        started = loop.time()
        await bus.publish(progress(1))
        await bus.publish(progress(2))
        await eventually(lambda: (2, 2) in seen)
        # The explicit Retry delay (0.2 s) wins over the configured 5 s backoff.
        assert loop.time() - started < 4
        letters = await dead_letters(bus, "t-reject", 1)
        assert letters[0].headers[DLQ_REASON] == "rejected: not for us"
        assert seen.count((1, 1)) == 1 and all(d == 1 for n, d in seen if n == 1)


async def test_duplicate_publish_is_stored_once(nats_url: str) -> None:
    handled: list[str] = []
    router = Router()

    @router.subscriber("fabrik.runs.progress.*", durable="t-dedupe")
    async def handle(event: RunProgress, ctx: Context[None]) -> None:
        handled.append(event.event_id)

    async with connected_bus(nats_url) as bus:
        event = progress(1)
        first = await bus.publish(event)
        second = await bus.publish(event)
        assert not first.duplicate
        assert second.duplicate
        assert second.seq == first.seq
        info = await bus.js.stream_info("RUNS")
        assert info.state.messages == 1
        async with consuming(bus, router):
            await eventually(lambda: len(handled) == 1)
            await asyncio.sleep(0.3)
        assert handled == [event.event_id]


async def test_redelivered_message_is_handled_idempotently(nats_url: str) -> None:
    """A handler that did its work but failed before the ack sees the message again, as a redelivery."""
    progress_by_run: dict[str, int] = {}
    applied: Counter[str] = Counter()
    deliveries: list[tuple[str, bool]] = []
    router = Router()

    @router.subscriber("fabrik.runs.progress.*", durable="t-idem", backoff=(0.05,))
    async def handle(event: RunProgress, ctx: Context[None]) -> None:
        deliveries.append((event.event_id, ctx.redelivered))
        # Idempotent by construction: the latest progress per run, keyed by event id.
        if progress_by_run.get(event.run_id, -1) < (event.finished or 0):
            progress_by_run[event.run_id] = event.finished or 0
            applied[event.event_id] += 1
        if not ctx.redelivered:
            raise ConnectionError("lost the connection before the ack")

    async with connected_bus(nats_url) as bus, consuming(bus, router):
        event = progress(42)
        await bus.publish(event)
        await eventually(lambda: len(deliveries) == 2)
        await asyncio.sleep(0.3)
        assert deliveries == [(event.event_id, False), (event.event_id, True)]
        assert applied[event.event_id] == 1
        assert progress_by_run == {RUN_ID: 42}
        assert metric(bus, "fabrik_messages_redelivered_total", consumer="t-idem") == 1
        assert metric(bus, "fabrik_messages_processed_total", consumer="t-idem") == 1


async def test_wrong_event_type_on_subject_is_dead_lettered(nats_url: str) -> None:
    router = Router()
    calls: list[object] = []

    @router.subscriber("fabrik.runs.progress.*", durable="t-wrong-type")
    async def handle(event: RunProgress, ctx: Context[None]) -> None:
        calls.append(event)

    async with connected_bus(nats_url) as bus, consuming(bus, router):
        queued = RunQueued(run_id=RUN_ID, project="demo", attempt=1)
        await bus.publish_bytes(
            f"fabrik.runs.progress.{RUN_ID}",
            encode(queued),
            {"Nats-Msg-Id": queued.event_id},
        )
        letters = await dead_letters(bus, "t-wrong-type", 1)
        assert "$.type" in letters[0].headers[DLQ_REASON], letters[0].headers[DLQ_REASON]
        assert calls == []


async def test_handler_slower_than_ack_wait_is_not_redelivered(nats_url: str) -> None:
    calls: list[int] = []
    router = Router()

    @router.subscriber("fabrik.runs.progress.*", durable="t-slow", ack_wait=1.5)
    async def handle(event: RunProgress, ctx: Context[None]) -> None:
        calls.append(ctx.delivery)
        await asyncio.sleep(3.0)

    async with connected_bus(nats_url) as bus, consuming(bus, router):
        await bus.publish(progress(1))
        await eventually(lambda: len(calls) == 1)
        await asyncio.sleep(4.0)
        assert calls == [1]
        assert metric(bus, "fabrik_messages_processed_total", consumer="t-slow") == 1


async def test_trace_context_crosses_the_bus(nats_url: str) -> None:
    seen: list[str | None] = []
    router = Router()

    @router.subscriber("fabrik.runs.progress.*", durable="t-trace")
    async def handle(event: RunProgress, ctx: Context[None]) -> None:
        span = current_span()
        seen.append(span.trace_id if span else None)

    async with connected_bus(nats_url) as bus, consuming(bus, router):
        parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        with continue_trace({"traceparent": parent}):
            await bus.publish(progress(1))
        await bus.publish(progress(2))
        await eventually(lambda: len(seen) == 2)
        assert seen[0] == "4bf92f3577b34da6a3ce929d0e0e4736"
        assert seen[1] is not None
        assert seen[1] != seen[0]


async def test_messages_waiting_behind_a_slow_handler_are_not_redelivered(nats_url: str) -> None:
    """A batch that takes longer than ack_wait to work through keeps every message of it."""
    calls: list[tuple[int, int]] = []
    router = Router()

    @router.subscriber("fabrik.runs.progress.*", durable="t-slow-batch", ack_wait=1.5, batch=4)
    async def handle(event: RunProgress, ctx: Context[None]) -> None:
        calls.append((event.finished or 0, ctx.delivery))
        await asyncio.sleep(0.9)

    async with connected_bus(nats_url) as bus:
        for i in range(4):
            await bus.publish(progress(i))
        async with consuming(bus, router):
            await eventually(lambda: len(calls) >= 4, timeout=15)
            await asyncio.sleep(2.0)
        assert sorted(calls) == [(0, 1), (1, 1), (2, 1), (3, 1)]
        info = await bus.js.consumer_info("RUNS", "t-slow-batch")
        assert info.num_redelivered == 0


async def test_concurrent_subscriber_handles_several_at_once_each_once(nats_url: str) -> None:
    active = 0
    peak = 0
    handled: Counter[int] = Counter()
    router = Router()

    @router.subscriber("fabrik.runs.progress.*", durable="t-concurrent", concurrency=4, ack_wait=2.0)
    async def handle(event: RunProgress, ctx: Context[None]) -> None:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await asyncio.sleep(0.4)
        active -= 1
        handled[event.finished or 0] += 1

    async with connected_bus(nats_url) as bus:
        for i in range(20):
            await bus.publish(progress(i))
        loop = asyncio.get_running_loop()
        started = loop.time()
        async with consuming(bus, router) as group:
            await eventually(lambda: sum(handled.values()) >= 6, timeout=10)
            # Stop mid-way: what is in flight finishes, the rest stays in the stream.
            await group.stop(grace=5)
        first_pass = dict(handled)
        async with consuming(bus, router):
            await eventually(lambda: sum(handled.values()) >= 20, timeout=10)
            await asyncio.sleep(0.5)
        assert peak == 4
        assert sorted(handled) == list(range(20))
        assert max(handled.values()) == 1
        assert sum(first_pass.values()) < 20
        # 20 messages of 0.4 s, four at a time: about 2 s of handling, not 8 s.
        assert loop.time() - started < 6.5
        info = await bus.js.consumer_info("RUNS", "t-concurrent")
        assert info.num_redelivered == 0
