"""Batch subscribers against a real NATS JetStream server: acks after the handler, naks, dead letters."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from fabrik_common.bus import (
    DLQ_REASON,
    DLQ_SUBJECT,
    BatchContext,
    Bus,
    BusOptions,
    ConsumerGroup,
    Delivery,
    Router,
    dead_letter_subject,
)
from fabrik_common.events import RunProgress
from fabrik_common.ids import new_ulid
from fabrik_common.metrics import BusMetrics
from fabrik_common.topology import ensure_topology

RUN_ID = new_ulid()
SUBJECT = "fabrik.runs.progress.*"


def progress(n: int) -> RunProgress:
    return RunProgress(run_id=RUN_ID, attempt=1, phase="implement", finished=n, total=1000)


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
async def consuming(bus: Bus, router: Router, state: Any = None) -> AsyncIterator[ConsumerGroup[Any]]:
    group: ConsumerGroup[Any] = ConsumerGroup(bus, router.subscribers, state, fetch_timeout=0.5)
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


async def settled(bus: Bus, consumer: str) -> Any:
    """The consumer's info once nothing is pending or waiting for an ack."""
    info: Any = None

    async def check() -> bool:
        nonlocal info
        info = await bus.js.consumer_info("RUNS", consumer)
        return info.num_pending == 0 and info.num_ack_pending == 0

    deadline = asyncio.get_running_loop().time() + 10
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, f"{consumer} did not settle: {info}"
        await asyncio.sleep(0.05)
    return info


def test_max_ack_pending_must_leave_room_for_two_batches() -> None:
    router = Router()
    with pytest.raises(ValueError, match="twice the batch"):
        router.batch_subscriber(SUBJECT, event=RunProgress, durable="t", batch=100, max_ack_pending=150)


async def test_a_batch_is_acked_after_the_handler_returns(nats_url: str) -> None:
    batches: list[list[int]] = []
    release = asyncio.Event()
    router = Router()

    @router.batch_subscriber(SUBJECT, event=RunProgress, durable="tb-ack", batch=50, max_ack_pending=100)
    async def handle(deliveries: Sequence[Delivery[RunProgress]], ctx: BatchContext[None]) -> None:
        batches.append([d.event.finished or 0 for d in deliveries])
        assert all(d.delivery == 1 and not d.redelivered and d.stream_sequence > 0 for d in deliveries)
        assert ctx.consumer == "tb-ack"
        await release.wait()  # e.g. a commit

    async with connected_bus(nats_url) as bus:
        for i in range(120):
            await bus.publish(progress(i))
        async with consuming(bus, router):
            await eventually(lambda: len(batches) == 1)
            await asyncio.sleep(0.3)
            # Handed over, not acked while the handler has not returned.
            info = await bus.js.consumer_info("RUNS", "tb-ack")
            assert info.num_ack_pending >= 50
            assert metric(bus, "fabrik_messages_processed_total", consumer="tb-ack") == 0
            release.set()
            await settled(bus, "tb-ack")
        assert [n for batch in batches for n in batch] == list(range(120))
        assert max(len(b) for b in batches) == 50
        assert metric(bus, "fabrik_messages_redelivered_total", consumer="tb-ack") == 0
        assert metric(bus, "fabrik_messages_processed_total", consumer="tb-ack") == 120


async def test_a_failing_batch_is_redelivered_whole(nats_url: str) -> None:
    seen: list[tuple[int, int]] = []
    router = Router()

    @router.batch_subscriber(
        SUBJECT, event=RunProgress, durable="tb-fail", batch=10, max_ack_pending=20, backoff=(0.05,)
    )
    async def handle(deliveries: Sequence[Delivery[RunProgress]], ctx: BatchContext[None]) -> None:
        seen.extend((d.event.finished or 0, d.delivery) for d in deliveries)
        if any(d.delivery == 1 for d in deliveries):
            raise RuntimeError("the database is locked")

    async with connected_bus(nats_url) as bus:
        for i in range(5):
            await bus.publish(progress(i))
        async with consuming(bus, router):
            await eventually(lambda: sum(1 for _, d in seen if d == 2) == 5)
            info = await settled(bus, "tb-fail")
        assert sorted(n for n, d in seen if d == 1) == list(range(5))
        assert info.num_redelivered == 0  # none left to redeliver
        assert metric(bus, "fabrik_messages_redelivered_total", consumer="tb-fail") == 5
        assert metric(bus, "fabrik_messages_failed_total", consumer="tb-fail") == 5
        assert metric(bus, "fabrik_messages_processed_total", consumer="tb-fail") == 5


async def test_single_deliveries_are_retried_or_dead_lettered_without_holding_the_rest(nats_url: str) -> None:
    handled: Counter[int] = Counter()
    router = Router()

    @router.batch_subscriber(
        SUBJECT,
        event=RunProgress,
        durable="tb-poison",
        batch=10,
        max_ack_pending=20,
        max_deliver=3,
        backoff=(0.05,),
    )
    async def handle(deliveries: Sequence[Delivery[RunProgress]], ctx: BatchContext[None]) -> None:
        for d in deliveries:
            n = d.event.finished or 0
            if n == 3:
                d.retry(f"cannot apply event {n}")  # every time: a poison event
            elif n == 5:
                d.reject("not for us")
            elif n == 7 and d.delivery == 1:
                d.retry("not yet", delay=0.1)
            else:
                handled[n] += 1

    async with connected_bus(nats_url) as bus, consuming(bus, router):
        for i in range(10):
            await bus.publish(progress(i))
        letters = await dead_letters(bus, "tb-poison", 2)
        reasons = sorted(m.headers[DLQ_REASON] for m in letters)
        assert reasons == ["failed 3 times: Retry('cannot apply event 3')", "rejected: not for us"]
        assert all(m.headers[DLQ_SUBJECT] == f"fabrik.runs.progress.{RUN_ID}" for m in letters)
        await settled(bus, "tb-poison")
        assert handled == {n: 1 for n in range(10) if n not in (3, 5)}
        assert metric(bus, "fabrik_messages_dead_lettered_total", consumer="tb-poison", reason="handler") == 2


async def test_undecodable_messages_are_dead_lettered_and_the_rest_handed_over(nats_url: str) -> None:
    handled: list[int] = []
    router = Router()

    @router.batch_subscriber(SUBJECT, event=RunProgress, durable="tb-decode", batch=10, max_ack_pending=20)
    async def handle(deliveries: Sequence[Delivery[RunProgress]], ctx: BatchContext[None]) -> None:
        handled.extend(d.event.finished or 0 for d in deliveries)

    async with connected_bus(nats_url) as bus:
        await bus.publish(progress(1))
        await bus.js.publish(f"fabrik.runs.progress.{RUN_ID}", b"{not json")
        await bus.publish(progress(2))
        async with consuming(bus, router):
            letters = await dead_letters(bus, "tb-decode", 1)
            assert letters[0].headers[DLQ_REASON].startswith("malformed JSON")
            await settled(bus, "tb-decode")
        assert handled == [1, 2]


async def test_a_batch_slower_than_ack_wait_is_not_redelivered(nats_url: str) -> None:
    calls: list[list[int]] = []
    router = Router()

    @router.batch_subscriber(
        SUBJECT, event=RunProgress, durable="tb-slow", batch=4, max_ack_pending=8, ack_wait=1.5
    )
    async def handle(deliveries: Sequence[Delivery[RunProgress]], ctx: BatchContext[None]) -> None:
        calls.append([d.delivery for d in deliveries])
        await asyncio.sleep(3.5)

    async with connected_bus(nats_url) as bus:
        for i in range(8):
            await bus.publish(progress(i))
        async with consuming(bus, router):
            await eventually(lambda: len(calls) == 2, timeout=15)
            await settled(bus, "tb-slow")
        # The second batch, fetched ahead while the first was handled, was kept alive too.
        assert calls == [[1, 1, 1, 1], [1, 1, 1, 1]]
        assert metric(bus, "fabrik_messages_redelivered_total", consumer="tb-slow") == 0


async def test_an_idle_consumer_gets_a_new_message_promptly(nats_url: str) -> None:
    arrived: list[float] = []
    router = Router()

    @router.batch_subscriber(SUBJECT, event=RunProgress, durable="tb-idle", batch=100, max_ack_pending=200)
    async def handle(deliveries: Sequence[Delivery[RunProgress]], ctx: BatchContext[None]) -> None:
        arrived.extend(asyncio.get_running_loop().time() for _ in deliveries)

    async with connected_bus(nats_url) as bus, consuming(bus, router):
        await asyncio.sleep(1.2)  # past the first empty fetches: waiting for the next message
        loop = asyncio.get_running_loop()
        sent = loop.time()
        await bus.publish(progress(1))
        await eventually(lambda: len(arrived) == 1)
        assert arrived[0] - sent < 0.3
        await settled(bus, "tb-idle")


async def test_messages_fetched_ahead_are_returned_on_stop(nats_url: str) -> None:
    handled: Counter[int] = Counter()
    router = Router()

    @router.batch_subscriber(SUBJECT, event=RunProgress, durable="tb-stop", batch=5, max_ack_pending=10)
    async def handle(deliveries: Sequence[Delivery[RunProgress]], ctx: BatchContext[None]) -> None:
        await asyncio.sleep(0.3)
        for d in deliveries:
            handled[d.event.finished or 0] += 1

    async with connected_bus(nats_url) as bus:
        for i in range(30):
            await bus.publish(progress(i))
        async with consuming(bus, router) as group:
            await eventually(lambda: sum(handled.values()) >= 5)
            await group.stop(grace=5)
        info = await bus.js.consumer_info("RUNS", "tb-stop")
        assert info.delivered.stream_seq > sum(handled.values())  # some were fetched ahead
        # ...and were given back (nak'ed) at the stop: the next consumer gets them at once, not
        # after ack_wait (30 s).
        async with consuming(bus, router):
            await eventually(lambda: len(handled) == 30, timeout=10)
            await settled(bus, "tb-stop")
        assert max(handled.values()) == 1
