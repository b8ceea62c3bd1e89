"""JetStream wiring: connection, publishing with dedupe and trace context, typed durable consumers.

A service is a set of typed subscribers. Each subscriber is an async function
`handler(event: SomeEvent, ctx: Context[State]) -> None` bound to a durable pull consumer that all
replicas of the service share. Success acks; `Retry` or any other exception naks with backoff; a
message that does not decode, is `Reject`-ed, or fails `max_deliver` times is published to the
dead-letter subject with the reason in a header and then acked, so nothing loops and nothing is
dropped silently.

A batch subscriber (`@router.batch_subscriber(...)`) gets up to `batch` messages at once as
`Delivery` values, for handlers that apply many events in one transaction: every message is acked
after the handler returns (after its commit), the whole batch is nak'ed when it raises, and the
handler can mark single deliveries to be retried or dead-lettered.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, get_type_hints

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api
from prometheus_client import Counter, Histogram

from fabrik_common.aio import cancel_all
from fabrik_common.codec import EventCodec, EventDecodeError, encode
from fabrik_common.events import Event
from fabrik_common.metrics import BusMetrics
from fabrik_common.topology import DEAD_LETTER_PREFIX, StreamSpec, stream_for_subject
from fabrik_common.tracing import TRACEPARENT, continue_trace, outgoing_traceparent
from fabrik_common.urls import redact_url

log = logging.getLogger(__name__)

StateT = TypeVar("StateT")
E = TypeVar("E")
T = TypeVar("T")

MSG_ID = "Nats-Msg-Id"
EVENT_TYPE = "Fabrik-Event-Type"
DLQ_REASON = "Fabrik-Dead-Letter-Reason"
DLQ_SUBJECT = "Fabrik-Dead-Letter-Subject"
DLQ_STREAM = "Fabrik-Dead-Letter-Stream"
DLQ_SEQUENCE = "Fabrik-Dead-Letter-Sequence"
DLQ_CONSUMER = "Fabrik-Dead-Letter-Consumer"
DLQ_DELIVERIES = "Fabrik-Dead-Letter-Deliveries"

_RETRYABLE_PUBLISH = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.StaleConnectionError,
    nats.js.errors.ServiceUnavailableError,
    asyncio.TimeoutError,
)
_TRANSIENT_FETCH = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.StaleConnectionError,
    nats.js.errors.ServiceUnavailableError,
    nats.js.errors.APIError,
    asyncio.TimeoutError,
)


class Retry(Exception):  # noqa: N818 - it is an instruction, not an error condition
    """Raised by a handler: nak this message and try again after `delay` seconds (or the backoff)."""

    def __init__(self, reason: str, delay: float | None = None) -> None:
        super().__init__(reason)
        self.delay = delay


class Reject(Exception):  # noqa: N818 - see Retry
    """Raised by a handler: this message can never succeed; dead-letter it with `reason`."""


class PublishError(RuntimeError):
    """JetStream did not acknowledge a publish before the deadline."""


@dataclass(frozen=True)
class BusOptions:
    url: str = "nats://127.0.0.1:4222"
    name: str = "fabrik"
    connect_timeout: float = 2.0
    max_reconnect_wait: float = 5.0
    publish_timeout: float = 5.0
    publish_deadline: float = 60.0
    user_credentials: str | None = None


class Bus:
    """One NATS connection with JetStream, shared by a service's publishers and consumers."""

    def __init__(self, options: BusOptions, metrics: BusMetrics) -> None:
        self.options = options
        self.metrics = metrics
        self.nc = NatsClient()
        self._js: JetStreamContext | None = None
        self._closing = False

    @property
    def js(self) -> JetStreamContext:
        if self._js is None:
            raise RuntimeError("bus is not connected")
        return self._js

    @property
    def connected(self) -> bool:
        return self.nc.is_connected

    async def connect(self) -> None:
        """Connect, retrying with backoff until it works; later disconnects reconnect forever."""
        delay = 0.1
        while True:
            try:
                await self.nc.connect(
                    servers=self.options.url.split(","),
                    name=self.options.name,
                    connect_timeout=max(1, int(self.options.connect_timeout)),
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=1,
                    error_cb=self._on_error,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                    user_credentials=self.options.user_credentials,
                )
                break
            except (TimeoutError, OSError, nats.errors.NoServersError, nats.errors.Error) as exc:
                log.warning(
                    "NATS not reachable, retrying",
                    extra={"url": redact_url(self.options.url), "error": str(exc), "retry_in_s": delay},
                )
                self.nc = NatsClient()
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.options.max_reconnect_wait)
        self._js = self.nc.jetstream(timeout=self.options.publish_timeout)
        self.metrics.connected.set(1)
        log.info(
            "connected to NATS",
            extra={"url": redact_url(self.nc.connected_url.geturl()) if self.nc.connected_url else ""},
        )

    async def _on_error(self, exc: Exception) -> None:
        log.debug("NATS connection error", extra={"error": str(exc)})

    async def _on_disconnected(self) -> None:
        self.metrics.connected.set(0)
        if not self._closing:
            log.warning("disconnected from NATS, reconnecting")

    async def _on_reconnected(self) -> None:
        self.metrics.connected.set(1)
        self.metrics.reconnects.inc()
        log.info("reconnected to NATS")

    async def publish(self, event: Event, *, headers: Mapping[str, str] | None = None) -> api.PubAck:
        """Publish an event and wait for JetStream's ack; duplicates (same event_id) are stored once."""
        hdrs = {
            MSG_ID: event.event_id,
            EVENT_TYPE: event.event_type(),
            TRACEPARENT: outgoing_traceparent(),
        }
        if headers:
            hdrs.update(headers)
        ack = await self.publish_bytes(event.subject(), encode(event), hdrs)
        self.metrics.published.labels(event.event_type()).inc()
        return ack

    async def publish_bytes(self, subject: str, payload: bytes, headers: dict[str, str]) -> api.PubAck:
        """Publish raw bytes; timeouts and disconnects are retried with the same message id until deadline."""
        deadline = time.monotonic() + self.options.publish_deadline
        delay = 0.05
        while True:
            try:
                return await self.js.publish(
                    subject, payload, timeout=self.options.publish_timeout, headers=headers
                )
            except _RETRYABLE_PUBLISH as exc:
                if time.monotonic() + delay >= deadline:
                    raise PublishError(f"publish to {subject} not acknowledged: {exc!r}") from exc
                self.metrics.publish_retries.inc()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def close(self) -> None:
        self._closing = True
        if self.nc.is_connected or self.nc.is_reconnecting:
            with contextlib.suppress(nats.errors.ConnectionClosedError, nats.errors.FlushTimeoutError):
                await self.nc.drain()
        if not self.nc.is_closed:
            await self.nc.close()
        self.metrics.connected.set(0)


@dataclass
class Context(Generic[StateT]):
    """What a handler knows about the message it handles, plus the service's state."""

    state: StateT
    bus: Bus
    subject: str
    headers: Mapping[str, str]
    delivery: int
    stream_sequence: int
    consumer: str

    @property
    def redelivered(self) -> bool:
        return self.delivery > 1


Handler = Callable[[Any, Context[Any]], Awaitable[None]]


@dataclass(slots=True)
class Delivery(Generic[E]):
    """One message of a batch handed to a batch handler: the decoded event and where it came from.

    The handler may call `retry()` (nak with a delay; dead-lettered at the last allowed delivery)
    or `reject()` (dead-letter now) on single deliveries; the others are acked once it returns."""

    event: E
    subject: str
    headers: Mapping[str, str]
    delivery: int
    stream_sequence: int
    outcome: Retry | Reject | None = None

    @property
    def redelivered(self) -> bool:
        return self.delivery > 1

    def retry(self, reason: str, delay: float | None = None) -> None:
        self.outcome = Retry(reason, delay)

    def reject(self, reason: str) -> None:
        self.outcome = Reject(reason)


@dataclass
class BatchContext(Generic[StateT]):
    """What a batch handler gets besides its deliveries."""

    state: StateT
    bus: Bus
    consumer: str


BatchHandler = Callable[[Sequence[Delivery[Any]], BatchContext[Any]], Awaitable[None]]
BatchHandlerT = TypeVar("BatchHandlerT", bound=BatchHandler)


async def _not_per_message(event: Any, ctx: Context[Any]) -> None:
    raise TypeError("a batch subscriber has no per-message handler")


@dataclass(frozen=True)
class Subscriber:
    """A typed handler bound to a durable pull consumer."""

    handler: Handler
    durable: str
    subjects: tuple[str, ...]
    stream: StreamSpec
    codec: EventCodec[Any]
    max_deliver: int = 5
    backoff: tuple[float, ...] = (1.0, 5.0, 30.0, 120.0)
    ack_wait: float = 30.0
    batch: int = 128
    max_ack_pending: int = 2000
    deliver_new_only: bool = False
    concurrency: int = 1
    batch_handler: BatchHandler | None = None
    """Set for a batch subscriber (then `handler` is not used)."""

    @property
    def name(self) -> str:
        return self.durable

    def consumer_config(self) -> api.ConsumerConfig:
        return api.ConsumerConfig(
            durable_name=self.durable,
            ack_policy=api.AckPolicy.EXPLICIT,
            deliver_policy=api.DeliverPolicy.NEW if self.deliver_new_only else api.DeliverPolicy.ALL,
            # One more server-side delivery than we allow handling, so a replica that dies while
            # handling the last allowed delivery still gets the message back and dead-letters it.
            max_deliver=self.max_deliver + 1,
            ack_wait=self.ack_wait,
            max_ack_pending=self.max_ack_pending,
            filter_subject=self.subjects[0] if len(self.subjects) == 1 else None,
            filter_subjects=list(self.subjects) if len(self.subjects) > 1 else None,
        )

    def backoff_for(self, delivery: int) -> float:
        return self.backoff[min(delivery - 1, len(self.backoff) - 1)] if self.backoff else 0.0


class Router:
    """Collects subscribers declared with `@router.subscriber(...)` in a handlers module."""

    def __init__(self) -> None:
        self.subscribers: list[Subscriber] = []

    def subscriber(
        self,
        *subjects: str,
        durable: str,
        stream: StreamSpec | None = None,
        max_deliver: int = 5,
        backoff: Sequence[float] = (1.0, 5.0, 30.0, 120.0),
        ack_wait: float = 30.0,
        batch: int = 128,
        deliver_new_only: bool = False,
        max_ack_pending: int = 2000,
        concurrency: int = 1,
    ) -> Callable[
        [Callable[[E, Context[Any]], Awaitable[None]]], Callable[[E, Context[Any]], Awaitable[None]]
    ]:
        if not subjects:
            raise ValueError("a subscriber needs at least one subject")
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        resolved_stream = stream or stream_for_subject(subjects[0])

        def register(
            fn: Callable[[E, Context[Any]], Awaitable[None]],
        ) -> Callable[[E, Context[Any]], Awaitable[None]]:
            event_type = _event_type_of(fn)
            self.subscribers.append(
                Subscriber(
                    handler=fn,
                    durable=durable,
                    subjects=tuple(subjects),
                    stream=resolved_stream,
                    codec=EventCodec(event_type),
                    max_deliver=max_deliver,
                    backoff=tuple(backoff),
                    ack_wait=ack_wait,
                    batch=batch,
                    deliver_new_only=deliver_new_only,
                    max_ack_pending=max_ack_pending,
                    concurrency=concurrency,
                )
            )
            return fn

        return register

    def batch_subscriber(
        self,
        *subjects: str,
        event: Any,
        durable: str,
        stream: StreamSpec | None = None,
        max_deliver: int = 5,
        backoff: Sequence[float] = (1.0, 5.0, 30.0, 120.0),
        ack_wait: float = 30.0,
        batch: int = 256,
        deliver_new_only: bool = False,
        max_ack_pending: int = 2000,
    ) -> Callable[[BatchHandlerT], BatchHandlerT]:
        """Declare `handler(deliveries: Sequence[Delivery[event]], ctx: BatchContext[State])`.

        Up to `batch` messages are fetched at once and, once decoded (a message that does not
        decode, or came more than `max_deliver` times, is dead-lettered and not passed on), handed
        over together. When the handler returns, every delivery it did not mark is acked, so a
        handler that commits before it returns never has a message acked before its data is
        durable. When it raises, every message of the batch is nak'ed with the backoff of its own
        delivery count (or dead-lettered at its last allowed delivery). While it runs, the batch
        gets in-progress acks. After a full batch, the next one is requested before the handler
        starts, so that the server sends it meanwhile: `max_ack_pending` must leave room for two
        batches. Messages are fetched with pull requests on a plain subscription rather than
        nats-py's `fetch`, which spends a task and a timer on every message."""
        if not subjects:
            raise ValueError("a subscriber needs at least one subject")
        if batch < 1 or max_ack_pending < 2 * batch:
            raise ValueError("batch must be at least 1 and max_ack_pending at least twice the batch")
        resolved_stream = stream or stream_for_subject(subjects[0])

        def register(fn: BatchHandlerT) -> BatchHandlerT:
            self.subscribers.append(
                Subscriber(
                    handler=_not_per_message,
                    durable=durable,
                    subjects=tuple(subjects),
                    stream=resolved_stream,
                    codec=EventCodec(event),
                    max_deliver=max_deliver,
                    backoff=tuple(backoff),
                    ack_wait=ack_wait,
                    batch=batch,
                    deliver_new_only=deliver_new_only,
                    max_ack_pending=max_ack_pending,
                    batch_handler=fn,
                )
            )
            return fn

        return register


def _event_type_of(fn: Callable[..., Any]) -> Any:
    params = list(inspect.signature(fn).parameters)
    if len(params) != 2:
        raise TypeError(f"handler {fn.__qualname__} must take (event, ctx)")
    hints = get_type_hints(fn)
    if params[0] not in hints:
        raise TypeError(f"handler {fn.__qualname__} must annotate its event parameter")
    return hints[params[0]]


@dataclass
class _ConsumerRun:
    subscriber: Subscriber
    task: asyncio.Task[None] | None = None
    bound: asyncio.Event = field(default_factory=asyncio.Event)


class ConsumerGroup(Generic[StateT]):
    """Runs a service's subscribers: binds their durable consumers and pulls until stopped."""

    def __init__(
        self,
        bus: Bus,
        subscribers: Sequence[Subscriber],
        state: StateT,
        *,
        fetch_timeout: float = 1.0,
    ) -> None:
        self.bus = bus
        self.state = state
        self.fetch_timeout = fetch_timeout
        self._runs = [_ConsumerRun(s) for s in subscribers]
        self._stopping = asyncio.Event()
        self._in_flight = 0

    async def start(self) -> None:
        for run in self._runs:
            run.task = asyncio.create_task(self._consume(run), name=f"consumer:{run.subscriber.name}")
        waits = [asyncio.create_task(r.bound.wait()) for r in self._runs]
        if waits:
            await asyncio.wait(waits)

    @property
    def bound(self) -> bool:
        return all(r.bound.is_set() for r in self._runs)

    async def stop(self, grace: float) -> None:
        """Stop pulling, let the current batches finish (up to `grace`), return unstarted messages."""
        self._stopping.set()
        tasks = [r.task for r in self._runs if r.task is not None]
        if not tasks:
            return
        done, pending = await asyncio.wait(tasks, timeout=grace)
        await cancel_all(list(pending))
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                log.error("consumer ended with an error", exc_info=task.exception())

    async def _bind(self, sub: Subscriber) -> JetStreamContext.PullSubscription:
        async def bind() -> JetStreamContext.PullSubscription:
            await self.bus.js.add_consumer(sub.stream.name, sub.consumer_config())
            return await self.bus.js.pull_subscribe_bind(durable=sub.durable, stream=sub.stream.name)

        return await self._retrying(sub, bind)

    async def _retrying(self, sub: Subscriber, bind: Callable[[], Awaitable[T]]) -> T:
        delay = 0.2
        while True:
            try:
                return await bind()
            except _TRANSIENT_FETCH as exc:
                if self._stopping.is_set():
                    raise
                log.warning(
                    "binding consumer failed, retrying",
                    extra={"consumer": sub.durable, "error": repr(exc)},
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _consume(self, run: _ConsumerRun) -> None:
        sub = run.subscriber
        if sub.batch_handler is not None:
            await self._consume_batches(run, sub.batch_handler)
            return
        psub = await self._bind(sub)
        run.bound.set()
        if sub.concurrency > 1:
            await self._consume_concurrently(sub, psub)
            return
        # One heartbeat and one set of labelled metrics per consumer, not per message: it handles
        # its messages one at a time.
        heartbeat = _InProgressHeartbeat(asyncio.get_running_loop(), sub.ack_wait / 3)
        counters = _ConsumerMetrics(self.bus.metrics, sub.name)
        try:
            while not self._stopping.is_set():
                msgs = await self._fetch(psub, sub.batch)
                heartbeat.batch = msgs
                for index, msg in enumerate(msgs):
                    if self._stopping.is_set():
                        await self._return_unstarted(msgs[index:])
                        break
                    heartbeat.position = index
                    await self._handle(sub, msg, heartbeat, counters)
                heartbeat.batch = []
        finally:
            heartbeat.close()
            with contextlib.suppress(nats.errors.Error, asyncio.TimeoutError):
                await psub.unsubscribe()

    async def _consume_concurrently(self, sub: Subscriber, psub: JetStreamContext.PullSubscription) -> None:
        """Up to `sub.concurrency` messages in flight, each acked on its own. Only as many are
        fetched as there are free slots, so no fetched message waits without a heartbeat."""
        loop = asyncio.get_running_loop()
        counters = _ConsumerMetrics(self.bus.metrics, sub.name)
        in_flight: set[asyncio.Task[None]] = set()

        async def handle(msg: Msg) -> None:
            heartbeat = _InProgressHeartbeat(loop, sub.ack_wait / 3)
            try:
                await self._handle(sub, msg, heartbeat, counters)
            finally:
                heartbeat.close()

        def finished(task: asyncio.Task[None]) -> None:
            in_flight.discard(task)
            if not task.cancelled() and task.exception() is not None:
                log.error("message handling crashed", exc_info=task.exception(), extra={"consumer": sub.name})

        try:
            while not self._stopping.is_set():
                free = sub.concurrency - len(in_flight)
                if free <= 0:
                    await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                    continue
                msgs = await self._fetch(psub, min(free, sub.batch))
                for index, msg in enumerate(msgs):
                    if self._stopping.is_set():
                        await self._return_unstarted(msgs[index:])
                        break
                    task = asyncio.create_task(handle(msg))
                    in_flight.add(task)
                    task.add_done_callback(finished)
            if in_flight:
                await asyncio.wait(in_flight)
        finally:
            for task in in_flight:
                task.cancel()
            with contextlib.suppress(nats.errors.Error, asyncio.TimeoutError):
                await psub.unsubscribe()

    async def _consume_batches(self, run: _ConsumerRun, handler: BatchHandler) -> None:
        sub = run.subscriber
        puller = _Puller(self.bus.nc, sub.stream.name, sub.durable)

        async def bind() -> None:
            await self.bus.js.add_consumer(sub.stream.name, sub.consumer_config())
            await puller.start()

        await self._retrying(sub, bind)
        run.bound.set()
        counters = _ConsumerMetrics(self.bus.metrics, sub.name)
        try:
            while not self._stopping.is_set():
                msgs = await puller.fetch(sub.batch, self.fetch_timeout)
                if not msgs:
                    if puller.closed and not self._stopping.is_set():
                        await asyncio.sleep(0.5)  # the connection is closed
                    continue
                if self._stopping.is_set():
                    await self._return_unstarted(msgs)
                    break
                await self._handle_batch(sub, handler, msgs, puller, counters)
        finally:
            await self._return_unstarted(await puller.drain())  # fetched ahead, never handled
            await puller.stop()

    async def _handle_batch(
        self,
        sub: Subscriber,
        handler: BatchHandler,
        msgs: Sequence[Msg],
        puller: _Puller,
        counters: _ConsumerMetrics,
    ) -> None:
        metrics = self.bus.metrics
        deliveries: list[Delivery[Any]] = []
        taken: list[Msg] = []
        for msg in msgs:
            delivery, sequence = _delivery_and_sequence(msg)
            if delivery > 1:
                metrics.redelivered.labels(sub.name).inc()
            if delivery > sub.max_deliver:
                reason = f"handler did not finish within {sub.max_deliver} deliveries"
                await self._dead_letter(sub, msg, reason)
                continue
            try:
                event = sub.codec.decode(msg.data)
            except EventDecodeError as exc:
                await self._dead_letter(sub, msg, str(exc))
                continue
            deliveries.append(Delivery(event, msg.subject, msg.headers or {}, delivery, sequence))
            taken.append(msg)
        if not deliveries:
            return
        # In-progress acks while the handler runs, for the batch and for what was fetched ahead.
        keeper = asyncio.create_task(_keep_in_progress(taken, puller, max(sub.ack_wait / 3, 0.5)))
        started = time.perf_counter()
        try:
            with continue_trace(None):
                await handler(deliveries, BatchContext(self.state, self.bus, sub.name))
        except Exception as exc:
            metrics.failed.labels(sub.name).inc(len(deliveries))
            log.exception(
                "batch handler failed, will retry",
                extra={"consumer": sub.name, "messages": len(deliveries)},
            )
            for item, msg in zip(deliveries, taken, strict=True):
                await self._settle_failure(sub, msg, item.delivery, exc)
            return
        finally:
            keeper.cancel()
        counters.handling_seconds.observe(time.perf_counter() - started)
        acked = 0
        for item, msg in zip(deliveries, taken, strict=True):
            outcome = item.outcome
            if outcome is None:
                try:
                    await msg.ack()
                except nats.errors.Error as exc:
                    log.warning(
                        "ack failed; message will be redelivered",
                        extra={"consumer": sub.name, "error": repr(exc)},
                    )
                    continue
                acked += 1
            elif isinstance(outcome, Reject):
                await self._dead_letter(sub, msg, f"rejected: {outcome}")
            else:
                metrics.failed.labels(sub.name).inc()
                log.info(
                    "handler asked for a retry",
                    extra={"consumer": sub.name, "subject": msg.subject, "reason": str(outcome)},
                )
                await self._settle_failure(sub, msg, item.delivery, outcome)
        counters.processed.inc(acked)

    async def _settle_failure(self, sub: Subscriber, msg: Msg, delivery: int, exc: Exception) -> None:
        """A failed message of a batch: nak it with its backoff, or dead-letter it at its last delivery."""
        if delivery >= sub.max_deliver:
            await self._dead_letter(sub, msg, f"failed {delivery} times: {exc!r}")
            return
        delay = exc.delay if isinstance(exc, Retry) and exc.delay is not None else sub.backoff_for(delivery)
        with contextlib.suppress(nats.errors.Error):
            await msg.nak(delay=delay)

    async def _fetch(self, psub: JetStreamContext.PullSubscription, count: int) -> list[Msg]:
        """Up to `count` messages; none when nothing came, the server hiccuped or the
        connection is closed (then after a pause, unless stopping)."""
        try:
            return await psub.fetch(count, timeout=self.fetch_timeout)
        except _TRANSIENT_FETCH:
            return []
        except nats.errors.ConnectionClosedError:
            if not self._stopping.is_set():
                await asyncio.sleep(0.5)
            return []

    async def _return_unstarted(self, msgs: Sequence[Msg]) -> None:
        for msg in msgs:
            with contextlib.suppress(nats.errors.Error):
                await msg.nak()

    async def _handle(
        self, sub: Subscriber, msg: Msg, heartbeat: _InProgressHeartbeat, counters: _ConsumerMetrics
    ) -> None:
        metrics = self.bus.metrics
        meta = msg.metadata
        delivery = meta.num_delivered
        headers = msg.headers or {}
        if delivery > 1:
            metrics.redelivered.labels(sub.name).inc()
        if delivery > sub.max_deliver:
            await self._dead_letter(sub, msg, f"handler did not finish within {sub.max_deliver} deliveries")
            return
        try:
            event = sub.codec.decode(msg.data)
        except EventDecodeError as exc:
            await self._dead_letter(sub, msg, str(exc))
            return

        ctx: Context[Any] = Context(
            state=self.state,
            bus=self.bus,
            subject=msg.subject,
            headers=headers,
            delivery=delivery,
            stream_sequence=meta.sequence.stream,
            consumer=sub.name,
        )
        heartbeat.start(msg)
        started = time.perf_counter()
        try:
            with continue_trace(headers):
                await sub.handler(event, ctx)
        except Reject as exc:
            await self._dead_letter(sub, msg, f"rejected: {exc}")
            return
        except Exception as exc:
            metrics.failed.labels(sub.name).inc()
            if delivery >= sub.max_deliver:
                log.exception(
                    "handler failed for the last time",
                    extra={"consumer": sub.name, "subject": msg.subject},
                )
                await self._dead_letter(sub, msg, f"failed {delivery} times: {exc!r}")
                return
            delay = (
                exc.delay if isinstance(exc, Retry) and exc.delay is not None else sub.backoff_for(delivery)
            )
            if isinstance(exc, Retry):
                log.info(
                    "handler asked for a retry",
                    extra={"consumer": sub.name, "reason": str(exc), "delay_s": delay},
                )
            else:
                log.exception(
                    "handler failed, will retry",
                    extra={"consumer": sub.name, "subject": msg.subject, "delay_s": delay},
                )
            with contextlib.suppress(nats.errors.Error):
                await msg.nak(delay=delay)
            return
        finally:
            heartbeat.cancel()
        counters.handling_seconds.observe(time.perf_counter() - started)
        try:
            await msg.ack()
        except nats.errors.Error as exc:
            # The handler's work is done and idempotent; the redelivery will be a no-op.
            log.warning(
                "ack failed; message will be redelivered",
                extra={"consumer": sub.name, "error": repr(exc)},
            )
            return
        counters.processed.inc()

    async def _dead_letter(self, sub: Subscriber, msg: Msg, reason: str) -> None:
        meta = msg.metadata
        reason_text = " ".join(reason.split())[:1000]
        headers = {k: v for k, v in (msg.headers or {}).items() if k != MSG_ID}
        headers.update(
            {
                MSG_ID: f"dlq:{sub.stream.name}:{meta.sequence.stream}:{sub.name}",
                DLQ_REASON: reason_text,
                DLQ_SUBJECT: msg.subject,
                DLQ_STREAM: sub.stream.name,
                DLQ_SEQUENCE: str(meta.sequence.stream),
                DLQ_CONSUMER: sub.name,
                DLQ_DELIVERIES: str(meta.num_delivered),
            }
        )
        try:
            await self.bus.publish_bytes(dead_letter_subject(sub.stream.name, sub.name), msg.data, headers)
        except PublishError:
            log.exception(
                "dead-letter publish failed; the message stays in its stream",
                extra={"consumer": sub.name},
            )
            with contextlib.suppress(nats.errors.Error):
                await msg.nak(delay=sub.backoff_for(meta.num_delivered))
            return
        category = "decode" if reason.startswith(("invalid event", "malformed JSON")) else "handler"
        self.bus.metrics.dead_lettered.labels(sub.name, category).inc()
        log.warning(
            "message dead-lettered",
            extra={
                "consumer": sub.name,
                "subject": msg.subject,
                "sequence": meta.sequence.stream,
                "reason": reason_text,
            },
        )
        with contextlib.suppress(nats.errors.Error):
            await msg.ack()


def dead_letter_subject(stream: str, consumer: str) -> str:
    return f"{DEAD_LETTER_PREFIX}.{stream}.{consumer}"


class _Puller:
    """Pull requests to a durable consumer over a plain NATS subscription, for batch subscribers.

    nats-py's `fetch` waits for each message with a task and a timer of its own, which costs more
    than folding an event; here one callback appends the messages to a list, and the consumer is
    woken once a request is complete (as many messages as asked for) or ended by the server with a
    status (404 nothing there, 408 expired, 409 ...). At most one request is open at a time; each
    has a reply subject of its own, so a late status of a request given up on ends nothing else.
    """

    def __init__(self, nc: NatsClient, stream: str, durable: str) -> None:
        self._nc = nc
        self._next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self._inbox = nc.new_inbox()
        self._sub: Any = None
        self._buffer: list[Msg] = []
        self._wake = asyncio.Event()
        self._request = 0
        self._open: str | None = None
        """Reply subject of the open request, or None."""
        self._remaining = 0
        self.closed = False

    async def start(self) -> None:
        if self._sub is None:
            self._sub = await self._nc.subscribe(f"{self._inbox}.*", cb=self._on_msg)

    async def stop(self) -> None:
        self._open = None
        self._wake.set()
        if self._sub is not None:
            with contextlib.suppress(nats.errors.Error, asyncio.TimeoutError):
                await self._sub.unsubscribe()
            self._sub = None

    @property
    def buffered(self) -> Sequence[Msg]:
        return self._buffer

    async def drain(self) -> list[Msg]:
        """What was fetched and not taken, once the open request (if any) has ended."""
        await self._settled(1.0)
        taken, self._buffer = self._buffer, []
        return taken

    async def _on_msg(self, msg: Msg) -> None:
        headers = msg.headers
        if headers and not msg.data and api.Header.STATUS in headers:
            if headers[api.Header.STATUS] != "100" and msg.subject == self._open:
                self._open = None  # the server ended the request
                self._wake.set()
            return
        self._buffer.append(msg)
        if self._open is not None:
            self._remaining -= 1
            if self._remaining <= 0:
                self._open = None  # complete
                self._wake.set()

    async def _ask(self, count: int, *, expires: float | None = None) -> bool:
        self._request += 1
        reply = f"{self._inbox}.{self._request}"
        body: dict[str, Any] = {"batch": count}
        if expires is None:
            body["no_wait"] = True
        else:
            body["expires"] = int(expires * 1_000_000_000)
        self._open, self._remaining = reply, count
        try:
            await self._nc.publish(self._next_subject, json.dumps(body).encode(), reply=reply)
        except nats.errors.ConnectionClosedError:
            self._open = None
            self.closed = True
            return False
        except (TimeoutError, nats.errors.Error):
            self._open = None
            return False
        self.closed = False
        return True

    async def _settled(self, patience: float) -> None:
        """Until the open request ends (a request unanswered after `patience` s is given up)."""
        deadline = time.monotonic() + patience
        while self._open is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._open = None
                return
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), remaining)

    async def fetch(self, count: int, wait: float) -> list[Msg]:
        """Up to `count` messages: what the consumer has now, else the next one to come within
        `wait` seconds (with whatever came with it). When a whole batch came, the next one is asked for
        at once, so that the server sends it while this one is handled."""
        if self._open is None and len(self._buffer) < count:
            await self._ask(count - len(self._buffer))
        await self._settled(wait + 1.0)
        if not self._buffer and not self.closed:
            # Nothing there: wait for the next message, then take what came with it.
            if await self._ask(1, expires=wait):
                await self._settled(wait + 1.0)
            if self._buffer and count > 1 and await self._ask(count - len(self._buffer)):
                await self._settled(wait + 1.0)
        batch = self._buffer[:count]
        del self._buffer[:count]
        if len(batch) == count and self._open is None:
            await self._ask(count)
        return batch


def _delivery_and_sequence(msg: Msg) -> tuple[int, int]:
    """(delivery count, stream sequence) of a JetStream message: what `msg.metadata` tells,
    read from the reply subject without building its objects (µs per message count in batches)."""
    tokens = msg.reply.split(".")
    # $JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<time>.<pending>
    if len(tokens) == 9 and tokens[0] == "$JS" and tokens[1] == "ACK":
        return int(tokens[4]), int(tokens[5])
    meta = msg.metadata
    return meta.num_delivered, meta.sequence.stream


async def _keep_in_progress(msgs: Sequence[Msg], puller: _Puller, interval: float) -> None:
    """Every `interval` seconds, an in-progress ack for a batch being handled and the messages
    fetched ahead of it (cancelled when the handler ends)."""
    while True:
        await asyncio.sleep(interval)
        for msg in [*msgs, *puller.buffered]:
            with contextlib.suppress(nats.errors.Error):
                await msg.in_progress()


class _ConsumerMetrics:
    """A consumer's labelled metric series, looked up once instead of on every message.

    Each is looked up on first use, so a series appears exactly when `labels()` would create it.
    """

    def __init__(self, metrics: BusMetrics, consumer: str) -> None:
        self._metrics = metrics
        self._consumer = consumer

    @functools.cached_property
    def handling_seconds(self) -> Histogram:
        return self._metrics.handling_seconds.labels(self._consumer)

    @functools.cached_property
    def processed(self) -> Counter:
        return self._metrics.processed.labels(self._consumer)


class _InProgressHeartbeat:
    """Tells JetStream a slow handler is still working, so the message is not redelivered meanwhile.

    One per consumer, which handles one message at a time: `start(msg)` when a handler starts,
    `cancel()` when it ends. The messages of the batch still waiting behind a slow handler
    (`batch[position + 1:]`) get the same in-progress acks, so they are not redelivered to another
    replica while this one is busy. A message whose handler still runs `interval` seconds after it started
    gets an in-progress ack then and every `interval` seconds after. One timer serves all of the
    consumer's messages, so a fast handler costs no timer of its own: when the timer comes due for
    a message that has finished since, it is moved to the current message's due time.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, interval: float) -> None:
        self._loop = loop
        self._interval = max(interval, 0.5)
        self._tasks: set[asyncio.Task[None]] = set()
        self._msg: Msg | None = None
        self._due = 0.0
        self._armed_for = 0.0
        self._handle: asyncio.TimerHandle | None = None
        self.batch: Sequence[Msg] = []
        self.position = 0

    def start(self, msg: Msg) -> None:
        self._msg = msg
        self._due = self._loop.time() + self._interval
        if self._handle is None:
            self._arm()

    def _arm(self) -> None:
        self._armed_for = self._due
        self._handle = self._loop.call_at(self._due, self._tick)

    def _tick(self) -> None:
        self._handle = None
        msg = self._msg
        if msg is None:
            return  # idle; the next start() arms the timer again
        if self._armed_for < self._due:
            self._arm()  # armed for an earlier message: wait for this one's due time
            return
        task = self._loop.create_task(self._send([msg, *self.batch[self.position + 1 :]]))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self._due = self._loop.time() + self._interval
        self._arm()

    async def _send(self, msgs: Sequence[Msg]) -> None:
        for msg in msgs:
            with contextlib.suppress(nats.errors.Error):
                await msg.in_progress()

    def cancel(self) -> None:
        self._msg = None

    def close(self) -> None:
        """The consumer has stopped: drop the idle timer (a handler still running keeps its acks)."""
        if self._msg is None and self._handle is not None:
            self._handle.cancel()
            self._handle = None
