"""The live event stream's fan-out hub (`GET /api/v1/stream`; docs/api.md, "Live stream").

One `LiveHub` per gateway replica reads the `RUNS` stream through **one** ordered consumer on
`fabrik.runs.>` and offers every event to every subscriber whose filter and principal accept it.
Nothing here waits for a subscriber: each has a bounded queue (`stream_queue_size`); one that
lets it overflow is dropped ("slow consumer") instead of slowing the others.

Log chunks (`logs=<run_id>`) come from the `LOGS` stream: one ordered consumer per *watched run*
(on `fabrik.logs.<run_id>`), shared by every subscriber of that run's log in this replica,
started with the first and stopped with the last.

**Cursors.** Every message carries the position a client resumes from. Without `logs` it is the
RUNS stream sequence (`"1842"`); with `logs` it is `"<runs seq>:<logs seq>"` (`"1842:977"`), both
positions at once, since RUNS and LOGS number their messages separately. A cursor says "every
matching message up to these sequences was delivered".

**Resume without gaps or duplicates.** RUNS sequences are dense, so a resuming subscriber first
*catches up*: an ordered consumer reads the stored events after its cursor until it has read
everything the hub has already fanned out (`position`), and then, with no await in between,
joins the hub. A subscriber never sends a message whose sequence is not above the last one it
sent (per stream), so an event both replayed and fanned out is sent once. A run's log is sparse in
the LOGS sequence space, so a resuming log subscriber joins the run's log feed *first* (live chunks
wait in its queue), replays the stored chunks after its cursor until none is pending, and the
queued chunks it has already sent are then skipped by the same rule. A replay reads at most
`stream_max_replay` stored messages; when there are more (or they were removed), the client gets
a `gap` message saying what it missed.

**Visibility.** A principal sees an event only when it may see the run's project. Most RUNS
events carry `project`; for the others the project comes from the hub's memory of recent runs,
then from the read model, and last from the run's own `run.requested` event in the RUNS stream
(one direct get, cached). A run whose project cannot be found is shown only to principals with a
role in every project. Log chunks are checked once, when the subscription is made.

The fan-out (`Subscriber`, `Fanout`) is plain Python; the NATS side is behind `Source`, so that
the hub is tested with an in-memory stream (services/gateway/tests/test_live.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections import OrderedDict, deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Protocol

import msgspec
import nats.errors
import nats.js.errors
from nats.js import JetStreamContext, api
from prometheus_client import CollectorRegistry, Counter, Gauge

from fabrik_common.codec import EventCodec, EventDecodeError
from fabrik_common.events import RunEvent, RunLogChunk
from fabrik_common.ids import is_dns1123_label
from fabrik_gateway.auth import Principal, require_role
from fabrik_gateway.problems import ProblemError

if TYPE_CHECKING:
    from fabrik_common.service import Service
    from fabrik_gateway.gateway import Gateway

log = logging.getLogger(__name__)

RUNS_STREAM: Final = "RUNS"
LOGS_STREAM: Final = "LOGS"
RUNS_SUBJECTS: Final = "fabrik.runs.>"
EVENT_TYPE_HEADER: Final = "Fabrik-Event-Type"
_run_events: EventCodec[RunEvent] = EventCodec(RunEvent)
_chunks: EventCodec[RunLogChunk] = EventCodec(RunLogChunk)
RUN_EVENT_TYPES: Final[tuple[str, ...]] = tuple(cls.event_type() for cls in _run_events.members())
LOG_CHUNK_TYPE: Final = RunLogChunk.event_type()

SLOW_CONSUMER: Final = "slow consumer"
GOING_AWAY: Final = "going away"
CLOSE_GOING_AWAY: Final = 1001
CLOSE_TRY_AGAIN_LATER: Final = 1013
READ_TIMEOUT: Final = 5.0
"""How long a replay waits for a stored message it knows of before it gives up on it."""
CONSUMER_INACTIVE_SECONDS: Final = 60.0
PROJECT_CACHE_SIZE: Final = 20_000
FEED_RETRY_SECONDS: Final = 1.0

_json = msgspec.json.Encoder()
HEARTBEAT_TEXT: Final = '{"type":"heartbeat"}'


def log_subject(run_id: str) -> str:
    return f"fabrik.logs.{run_id}"


def requested_subject(run_id: str) -> str:
    return f"fabrik.runs.requested.{run_id}"


# ------------------------------------------------------------------------------------ cursors

CURSOR_RULE: Final = "must be a cursor this stream sent: `<runs seq>` or `<runs seq>:<logs seq>`"
_CURSOR = re.compile(r"^(\d{1,19})(?::(\d{1,19}))?$")


@dataclass(frozen=True, slots=True)
class Cursor:
    """Where a client resumes: after RUNS sequence `runs` and, with logs, LOGS sequence `logs`."""

    runs: int
    logs: int | None = None

    def __str__(self) -> str:
        return str(self.runs) if self.logs is None else f"{self.runs}:{self.logs}"


def parse_cursor(text: str) -> Cursor | None:
    match = _CURSOR.match(text.strip())
    if match is None:
        return None
    runs, logs = match.groups()
    return Cursor(int(runs), int(logs) if logs is not None else None)


# ------------------------------------------------------------------------------------ messages


@dataclass(frozen=True, slots=True)
class StreamFilter:
    """What a subscriber asked for; None: no restriction."""

    projects: frozenset[str] | None = None
    run_id: str | None = None
    types: frozenset[str] | None = None
    logs: str | None = None
    """Also the log chunks of this run."""


@dataclass(slots=True)
class Item:
    """A stored message as the hub fans it out: decoded once, shared by every subscriber."""

    logs: bool
    """False: a RUNS event; True: a LOGS chunk."""
    seq: int
    run_id: str
    type: str
    project: str | None
    body: str
    """The message after its cursor: `"subject":...,"type":...,"event":{...}}`."""
    shared: Message | None = field(default=None, compare=False, repr=False)
    """The message as every subscriber without `logs` gets it (its cursor is `seq`), built once."""

    def message(self, cursor: str) -> Message:
        return Message(cursor, '{"cursor":"' + cursor + '",' + self.body)


def item_body(subject: str, event_type: str, event_json: bytes) -> str:
    return (
        b'"subject":'
        + _json.encode(subject)
        + b',"type":'
        + _json.encode(event_type)
        + b',"event":'
        + event_json
        + b"}"
    ).decode()


@dataclass(frozen=True, slots=True)
class Message:
    cursor: str
    text: str
    """`{"cursor": ..., "subject": ..., "type": ..., "event": {...}}`"""


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Nothing to send for a while."""


@dataclass(frozen=True, slots=True)
class Gap:
    """Stored messages the replay could not deliver: sequences in (`after`, `resumed_at`)."""

    stream: str
    after: int
    resumed_at: int
    reason: str

    @property
    def text(self) -> str:
        return _json.encode(
            {
                "type": "gap",
                "stream": self.stream,
                "after": self.after,
                "resumed_at": self.resumed_at,
                "reason": self.reason,
            }
        ).decode()


@dataclass(frozen=True, slots=True)
class Closed:
    """The stream ends: `reason` is the close reason (`slow consumer`, `going away`)."""

    reason: str
    code: int


Output = Message | Heartbeat | Gap | Closed

SLOW: Final = Closed(SLOW_CONSUMER, CLOSE_TRY_AGAIN_LATER)
SHUTDOWN: Final = Closed(GOING_AWAY, CLOSE_GOING_AWAY)


# ------------------------------------------------------------------------------------ fan-out


class Subscriber:
    """One client's filter, visibility, bounded queue and sent positions. No I/O."""

    __slots__ = (
        "_closing",
        "_queue",
        "_wakeup",
        "closed",
        "filter",
        "queue_size",
        "sent_logs",
        "sent_runs",
        "visible",
    )

    def __init__(
        self,
        stream_filter: StreamFilter,
        visible: frozenset[str] | None,
        *,
        queue_size: int,
        sent_runs: int = 0,
        sent_logs: int | None = None,
    ) -> None:
        self.filter = stream_filter
        self.visible = visible
        """Projects the principal sees; None: every project."""
        self.queue_size = queue_size
        self.sent_runs = sent_runs
        """Everything in RUNS up to this sequence was sent or did not match."""
        self.sent_logs = sent_logs
        """The same in LOGS (None until the log subscription has a position)."""
        self.closed: Closed | None = None
        self._queue: deque[Item] = deque()
        self._wakeup = asyncio.Event()
        self._closing = asyncio.Event()

    def wants(self, item: Item) -> bool:
        f = self.filter
        if item.logs:
            return item.run_id == f.logs
        if f.types is not None and item.type not in f.types:
            return False
        if f.run_id is not None and item.run_id != f.run_id:
            return False
        project = item.project
        if f.projects is not None and project not in f.projects:
            return False
        return self.visible is None or project in self.visible

    @property
    def scoped(self) -> bool:
        """Whether what it sees depends on the project of an event."""
        return self.visible is not None or self.filter.projects is not None

    def offer(self, item: Item) -> bool:
        """Queue `item` (already matched); False when the queue is full."""
        if self.closed is not None:
            return True
        if len(self._queue) >= self.queue_size:
            return False
        self._queue.append(item)
        self._wakeup.set()
        return True

    @property
    def queued(self) -> int:
        return len(self._queue)

    def close(self, closed: Closed, *, discard: bool = False) -> None:
        """End the stream after what is queued (or at once with `discard`). First reason wins."""
        if self.closed is not None:
            return
        self.closed = closed
        if discard:
            self._queue.clear()
        self._wakeup.set()
        self._closing.set()

    async def wait_closed(self) -> Closed:
        await self._closing.wait()
        assert self.closed is not None
        return self.closed

    async def next(self, idle_seconds: float) -> Item | Closed | None:
        """The next queued item; `closed` once the queue is empty; None after `idle_seconds`."""
        while True:
            if self._queue:
                return self._queue.popleft()
            if self.closed is not None:
                return self.closed
            self._wakeup.clear()
            try:
                async with asyncio.timeout(idle_seconds):
                    await self._wakeup.wait()
            except TimeoutError:
                return None

    def render(self, item: Item) -> Message | None:
        """The message for `item`, advancing the sent position; None for what was sent already."""
        if item.logs:
            if self.sent_logs is not None and item.seq <= self.sent_logs:
                return None
            self.sent_logs = item.seq
        else:
            if item.seq <= self.sent_runs:
                return None
            self.sent_runs = item.seq
        if self.filter.logs is None:
            if item.shared is None:
                item.shared = item.message(str(item.seq))
            return item.shared
        return item.message(self.cursor)

    @property
    def cursor(self) -> str:
        if self.filter.logs is None:
            return str(self.sent_runs)
        return f"{self.sent_runs}:{self.sent_logs or 0}"


class Fanout:
    """The subscribers of one feed; `publish` never waits and drops whoever overflows."""

    def __init__(self, on_drop: Callable[[Subscriber], None] | None = None) -> None:
        self.subscribers: set[Subscriber] = set()
        self.on_drop = on_drop

    def __len__(self) -> int:
        return len(self.subscribers)

    def add(self, subscriber: Subscriber) -> None:
        self.subscribers.add(subscriber)

    def discard(self, subscriber: Subscriber) -> None:
        self.subscribers.discard(subscriber)

    def publish(self, item: Item) -> int:
        """Offer `item` to every subscriber that wants it; returns how many took it."""
        taken = 0
        overflowed: list[Subscriber] = []
        for subscriber in self.subscribers:
            if subscriber.wants(item):
                if subscriber.offer(item):
                    taken += 1
                else:
                    overflowed.append(subscriber)
        for subscriber in overflowed:
            self.drop(subscriber)
        return taken

    def drop(self, subscriber: Subscriber, closed: Closed = SLOW) -> None:
        self.subscribers.discard(subscriber)
        subscriber.close(closed, discard=True)
        if self.on_drop is not None:
            self.on_drop(subscriber)

    def scoped(self) -> bool:
        """Whether some subscriber's view depends on the project of an event."""
        return any(s.scoped for s in self.subscribers)


# ------------------------------------------------------------------------------------ source


@dataclass(frozen=True, slots=True)
class Stored:
    """A message as stored in a stream."""

    seq: int
    subject: str
    data: bytes
    pending: int
    """Messages after this one that the reader's filter matches (JetStream `num_pending`)."""
    headers: dict[str, str] | None = None


class Reader(Protocol):
    pending: int
    """About how many messages the filter matched when the reader started."""

    async def next(self, wait_seconds: float | None) -> Stored | None:
        """The next message in stream order; None after `wait_seconds` without one (None: wait)."""
        ...


class Source(Protocol):
    """The streams as the hub needs them (JetStream, or an in-memory stream in tests)."""

    async def last_seq(self, stream: str) -> int: ...

    async def first_seq(self, stream: str) -> int: ...

    def read(
        self, stream: str, subject: str, start_seq: int
    ) -> contextlib.AbstractAsyncContextManager[Reader]: ...

    async def last_message(self, stream: str, subject: str) -> Stored | None:
        """The last message on `subject`, or None."""
        ...


class _JetStreamReader:
    def __init__(self, sub: Any, pending: int) -> None:
        self._messages: AsyncIterator[Any] = sub.messages
        self.pending = pending

    async def next(self, wait_seconds: float | None) -> Stored | None:
        try:
            async with asyncio.timeout(wait_seconds):
                msg = await anext(self._messages)
        except (TimeoutError, StopAsyncIteration):
            return None
        meta = msg.metadata
        return Stored(
            seq=int(meta.sequence.stream),
            subject=msg.subject,
            data=msg.data,
            pending=int(meta.num_pending),
            headers=msg.headers,
        )


class JetStreamSource:
    """Ordered consumers (ephemeral, in memory, flow-controlled) and direct gets on JetStream."""

    def __init__(self, js: Callable[[], JetStreamContext]) -> None:
        self._js = js

    async def last_seq(self, stream: str) -> int:
        return int((await self._js().stream_info(stream)).state.last_seq)

    async def first_seq(self, stream: str) -> int:
        return int((await self._js().stream_info(stream)).state.first_seq)

    @contextlib.asynccontextmanager
    async def read(self, stream: str, subject: str, start_seq: int) -> AsyncIterator[Reader]:
        config = api.ConsumerConfig(
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=max(1, start_seq)
        )
        sub = await self._js().subscribe(
            subject,
            stream=stream,
            ordered_consumer=True,
            config=config,
            inactive_threshold=CONSUMER_INACTIVE_SECONDS,
        )
        try:
            info = await sub.consumer_info()
            yield _JetStreamReader(sub, int(info.num_pending or 0) + int(sub.pending_msgs))
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def last_message(self, stream: str, subject: str) -> Stored | None:
        try:
            raw = await self._js().get_msg(stream, subject=subject)
        except nats.js.errors.NotFoundError:
            return None
        return Stored(seq=int(raw.seq or 0), subject=raw.subject or subject, data=raw.data or b"", pending=0)


# ------------------------------------------------------------------------------------ items


def runs_item(stored: Stored) -> Item | None:
    """A RUNS message as an item; an event this gateway cannot decode is shown as stored."""
    try:
        event = _run_events.decode(stored.data)
    except EventDecodeError:
        return _undecodable_item(stored)
    project = getattr(event, "project", None)
    event_type = event.event_type()
    return Item(
        logs=False,
        seq=stored.seq,
        run_id=event.run_id,
        type=event_type,
        project=project,
        body=item_body(stored.subject, event_type, stored.data),
    )


def _undecodable_item(stored: Stored) -> Item | None:
    try:
        decoded = msgspec.json.decode(stored.data)
    except msgspec.DecodeError:
        decoded = {"undecodable": stored.data.decode(errors="replace")}
    event = decoded if isinstance(decoded, dict) else {"value": decoded}
    event_type = str(event.get("type") or (stored.headers or {}).get(EVENT_TYPE_HEADER, ""))
    run_id = stored.subject.rsplit(".", 1)[-1].upper()
    project = event.get("project")
    return Item(
        logs=False,
        seq=stored.seq,
        run_id=run_id,
        type=event_type,
        project=project if isinstance(project, str) and is_dns1123_label(project) else None,
        body=item_body(stored.subject, event_type, _json.encode(event)),
    )


def log_item(stored: Stored, project: str | None) -> Item | None:
    try:
        chunk = _chunks.decode(stored.data)
    except EventDecodeError:
        log.warning("undecodable log chunk skipped", extra={"subject": stored.subject, "seq": stored.seq})
        return None
    return Item(
        logs=True,
        seq=stored.seq,
        run_id=chunk.run_id,
        type=LOG_CHUNK_TYPE,
        project=project,
        body=item_body(stored.subject, LOG_CHUNK_TYPE, stored.data),
    )


# ------------------------------------------------------------------------------------ the hub


class StreamMetrics:
    def __init__(self, registry: CollectorRegistry, subscribers: Callable[[], int]) -> None:
        self.subscribers = Gauge(
            "fabrik_gateway_stream_subscribers", "Open live-stream subscriptions", registry=registry
        )
        self.subscribers.set_function(lambda: float(subscribers()))
        self.dropped = Counter(
            "fabrik_gateway_stream_dropped",
            "Live-stream subscribers dropped because their queue overflowed",
            registry=registry,
        )
        self.events = Counter(
            "fabrik_gateway_stream_events", "RUNS events fanned out by the live-stream hub", registry=registry
        )


class _LogFeed:
    """The chunks of one run's log, for every subscriber of it in this replica."""

    def __init__(self, run_id: str, project: str | None) -> None:
        self.run_id = run_id
        self.project = project
        self.fanout = Fanout()
        self.position = 0
        """Every chunk of this run up to this LOGS sequence was offered (or predates the feed)."""
        self.ready = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.failed = False
        self.users = 0
        """Subscriptions using the feed (joined, or about to join)."""


class LiveHub:
    """The live stream of one gateway replica. `run()` is its background task."""

    def __init__(
        self,
        gateway: Gateway | None = None,
        *,
        source: Source | None = None,
        queue_size: int | None = None,
        max_replay: int | None = None,
        find_project: Callable[[str], str | None] | None = None,
    ) -> None:
        settings = gateway.settings if gateway is not None else None
        self.queue_size = queue_size or (settings.stream_queue_size if settings else 1000)
        self.max_replay = max_replay or (settings.stream_max_replay if settings else 100_000)
        self._gateway = gateway
        self.source: Source = source or JetStreamSource(self._js)
        self._find_project = find_project
        self.fanout = Fanout(on_drop=self._dropped)
        self.position: int | None = None
        """Every RUNS event up to this sequence was fanned out; None until the feed started."""
        self.running = False
        self.stopped = False
        self.subscriptions: set[Subscription] = set()
        self._projects: OrderedDict[str, str | None] = OrderedDict()
        self._log_feeds: dict[str, _LogFeed] = {}
        self.metrics: StreamMetrics | None = None

    def _js(self) -> JetStreamContext:
        assert self._gateway is not None
        return self._gateway.bus.js

    def attach(self, service: Service[Any]) -> None:
        """Metrics on the service's registry, and the `live_stream` readiness check."""
        self.metrics = StreamMetrics(service.registry, lambda: len(self.subscriptions))
        service.probe.add_check("live_stream", lambda: self.ready)

    # ---------------------------------------------------------------- the RUNS feed

    @property
    def ready(self) -> bool:
        return self.running and self.position is not None

    async def run(self, _: object = None) -> None:
        """The single RUNS consumer of this replica (a `Service` background task: restarted
        after an error, from where it stopped). Cancelled when the service stops: every open
        stream then ends with `going away`."""
        self.stopped = False
        try:
            if self.position is None:
                self.position = await self.source.last_seq(RUNS_STREAM)
            async with self.source.read(RUNS_STREAM, RUNS_SUBJECTS, self.position + 1) as reader:
                self.running = True
                log.info("live stream hub started", extra={"position": self.position})
                while True:
                    stored = await reader.next(None)
                    if stored is None:
                        raise ConnectionError("the RUNS feed of the live stream ended")
                    await self._fan_out(stored)
        except asyncio.CancelledError:
            self.close_all()
            raise
        finally:
            self.running = False

    async def _fan_out(self, stored: Stored) -> None:
        item = runs_item(stored)
        if item is not None:
            if item.project is not None:
                self._remember(item.run_id, item.project)
            elif self.fanout.scoped():
                item = _with_project(item, await self.project_of(item.run_id))
        # No await from here: a catching-up subscriber sees `position` and the fan-out together.
        if stored.seq <= (self.position or 0):
            return  # already fanned out (a restarted consumer)
        self.position = stored.seq
        if item is not None:
            self.fanout.publish(item)
            if self.metrics is not None:
                self.metrics.events.inc()

    def close_all(self, closed: Closed = SHUTDOWN) -> None:
        """End every open stream (the service stops)."""
        self.stopped = True
        for subscription in list(self.subscriptions):
            subscription.subscriber.close(closed)
        for feed in list(self._log_feeds.values()):
            if feed.task is not None:
                feed.task.cancel()
        self._log_feeds.clear()

    def _dropped(self, subscriber: Subscriber) -> None:
        log.info("live stream subscriber dropped: slow consumer", extra={"queue_size": self.queue_size})
        if self.metrics is not None:
            self.metrics.dropped.inc()

    # ---------------------------------------------------------------- projects of runs

    def _remember(self, run_id: str, project: str | None) -> None:
        cache = self._projects
        cache[run_id] = project
        cache.move_to_end(run_id)
        if len(cache) > PROJECT_CACHE_SIZE:
            cache.popitem(last=False)

    def known_project(self, run_id: str) -> str | None:
        project = self._projects.get(run_id)
        if project is not None:
            return project
        if self._find_project is not None:
            return self._find_project(run_id)
        if self._gateway is not None:
            record = self._gateway.readmodel.get(run_id)
            if record is not None:
                return record.project
        return None

    async def project_of(self, run_id: str) -> str | None:
        """The run's project: remembered, from the read model, or from its `run.requested`."""
        project = self.known_project(run_id)
        if project is not None or run_id in self._projects:
            return project
        try:
            stored = await self.source.last_message(RUNS_STREAM, requested_subject(run_id))
        except (nats.errors.Error, OSError) as exc:
            log.warning("project of a run unknown", extra={"run_id": run_id, "error": str(exc)})
            return None
        if stored is not None:
            with contextlib.suppress(EventDecodeError):
                project = getattr(_run_events.decode(stored.data), "project", None)
        self._remember(run_id, project)
        return project

    # ---------------------------------------------------------------- subscriptions

    async def subscribe(
        self, principal: Principal, stream_filter: StreamFilter, cursor: Cursor | None = None
    ) -> Subscription:
        """A subscription for `principal`, or a ProblemError: 503 before the hub runs, 401/403
        without any role, 404 for a log the principal does not see. It holds nothing until
        `outputs()` is iterated (which joins the hub and leaves it at the end)."""
        if not self.ready or self.stopped:
            raise ProblemError(
                503,
                "the live stream is not connected to NATS yet; retry shortly",
                headers={"Retry-After": "1"},
            )
        if principal.highest_role is None:
            require_role(principal, "viewer", "watch the live stream")
        log_project: str | None = None
        if stream_filter.logs is not None:
            log_project = await self.project_of(stream_filter.logs)
            if log_project is None or not principal.can_see(log_project):
                # A run of a project the principal does not see does not exist for it.
                raise ProblemError(
                    404,
                    f"run {stream_filter.logs} does not exist",
                    slug="not-found",
                    errors=[("logs", "is not a run you can see")],
                )
        subscriber = Subscriber(stream_filter, principal.visible_projects, queue_size=self.queue_size)
        return Subscription(self, subscriber, cursor, log_project)

    def _join(self, subscription: Subscription) -> bool:
        if self.stopped:
            return False
        self.fanout.add(subscription.subscriber)
        return True

    def _leave(self, subscription: Subscription) -> None:
        self.subscriptions.discard(subscription)
        self.fanout.discard(subscription.subscriber)
        run_id = subscription.subscriber.filter.logs
        feed = self._log_feeds.get(run_id) if run_id is not None else None
        if feed is not None:
            feed.fanout.discard(subscription.subscriber)
            feed.users -= 1
            if feed.users <= 0 and self._log_feeds.get(feed.run_id) is feed:
                del self._log_feeds[feed.run_id]
                if feed.task is not None:
                    feed.task.cancel()

    # ---------------------------------------------------------------- log feeds

    async def _log_feed(self, run_id: str, project: str | None) -> _LogFeed | None:
        """The run's log feed, started if needed (None if it cannot start). The caller is counted
        as a user until it leaves."""
        feed = self._log_feeds.get(run_id)
        if feed is None:
            feed = _LogFeed(run_id, project)
            self._log_feeds[run_id] = feed
            feed.task = asyncio.create_task(self._run_log_feed(feed), name=f"live-logs-{run_id}")
        feed.users += 1
        await feed.ready.wait()
        return None if feed.failed else feed

    async def _run_log_feed(self, feed: _LogFeed) -> None:
        started = False
        while True:
            try:
                if not started:
                    feed.position = await self.source.last_seq(LOGS_STREAM)
                async with self.source.read(
                    LOGS_STREAM, log_subject(feed.run_id), feed.position + 1
                ) as reader:
                    started = True
                    feed.ready.set()
                    await self._follow_log(feed, reader)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the feed outlives NATS trouble
                log.warning("live log feed failed", extra={"run_id": feed.run_id, "error": str(exc)})
                if not started:
                    feed.failed = True
                    feed.ready.set()
                    if self._log_feeds.get(feed.run_id) is feed:
                        del self._log_feeds[feed.run_id]
                    return
            await asyncio.sleep(FEED_RETRY_SECONDS)

    @staticmethod
    async def _follow_log(feed: _LogFeed, reader: Reader) -> None:
        """Until the reader ends (its subscription closed): then the feed reads again."""
        while (stored := await reader.next(None)) is not None:
            if stored.seq <= feed.position:
                continue
            item = log_item(stored, feed.project)
            feed.position = stored.seq
            if item is not None:
                feed.fanout.publish(item)


def _with_project(item: Item, project: str | None) -> Item:
    if project is None:
        return item
    return Item(
        logs=item.logs,
        seq=item.seq,
        run_id=item.run_id,
        type=item.type,
        project=project,
        body=item.body,
    )


LOG_UNAVAILABLE: Final = Closed("log unavailable", 1011)


class Subscription:
    """One client's stream: replay from its cursor, then live, as `outputs()`."""

    def __init__(
        self, hub: LiveHub, subscriber: Subscriber, cursor: Cursor | None, log_project: str | None
    ) -> None:
        self.hub = hub
        self.subscriber = subscriber
        self.cursor = cursor
        self.log_project = log_project
        self._left = False

    async def outputs(self, heartbeat_seconds: float) -> AsyncGenerator[Output, None]:
        """Messages (replayed, then live), heartbeats when idle, gaps, and a last `Closed` when
        the hub drops or stops the stream. Leaves the hub when the iteration ends."""
        hub = self.hub
        sub = self.subscriber
        hub.subscriptions.add(self)
        try:
            if sub.filter.logs is not None:
                # The log position is fixed before anything is sent, so that every cursor has it.
                sub.sent_logs = (
                    self.cursor.logs
                    if self.cursor is not None and self.cursor.logs is not None
                    else await hub.source.last_seq(LOGS_STREAM)
                )
            async for out in self._catch_up_runs(heartbeat_seconds):
                yield out
            if sub.filter.logs is not None and sub.closed is None:
                async for out in self._catch_up_logs():
                    yield out
            while True:
                got = await sub.next(heartbeat_seconds)
                if got is None:
                    yield Heartbeat()
                elif isinstance(got, Closed):
                    yield got
                    return
                else:
                    message = sub.render(got)
                    if message is not None:
                        yield message
        finally:
            self.close()

    def close(self) -> None:
        """Leave the hub (idempotent)."""
        if not self._left:
            self._left = True
            self.hub._leave(self)

    async def _catch_up_runs(self, heartbeat_seconds: float) -> AsyncIterator[Output]:
        hub = self.hub
        sub = self.subscriber
        if self.cursor is None:
            sub.sent_runs = hub.position or 0
            if not hub._join(self):
                sub.close(SHUTDOWN)
            return
        after = self.cursor.runs
        last = await hub.source.last_seq(RUNS_STREAM)
        first = await hub.source.first_seq(RUNS_STREAM)
        position = hub.position or 0
        if after > max(last, position):
            yield Gap("runs", after, position + 1, "the cursor is ahead of the stream (was it recreated?)")
            after = position
        start = after + 1
        if start < first <= position:
            yield Gap("runs", after, first, "these events were removed from the stream")
            start = first
        if position - start + 1 > hub.max_replay:
            resumed = position - hub.max_replay + 1
            yield Gap("runs", after, resumed, f"more than {hub.max_replay} events to replay")
            start = resumed
        sub.sent_runs = replayed = start - 1
        if replayed < (hub.position or 0):
            async with hub.source.read(RUNS_STREAM, RUNS_SUBJECTS, start) as reader:
                quiet_since = time.monotonic()
                while replayed < (hub.position or 0):
                    if sub.closed is not None:
                        return
                    stored = await reader.next(READ_TIMEOUT)
                    if stored is None:
                        # Fanned out, so stored once; not readable now: removed meanwhile.
                        log.warning(
                            "live stream replay: stored events did not come; skipped",
                            extra={"after": replayed, "position": hub.position},
                        )
                        break
                    if stored.seq <= replayed:
                        continue
                    replayed = stored.seq
                    item = runs_item(stored)
                    if item is not None and item.project is not None:
                        hub._remember(item.run_id, item.project)
                    elif item is not None and sub.scoped:
                        item = _with_project(item, await hub.project_of(item.run_id))
                    if item is not None and sub.wants(item):
                        message = sub.render(item)
                        if message is not None:
                            yield message
                            quiet_since = time.monotonic()
                    elif time.monotonic() - quiet_since >= heartbeat_seconds:
                        yield Heartbeat()
                        quiet_since = time.monotonic()
        # No await between the loop's last check and joining: nothing fanned out in between is
        # missed, and what the replay read beyond `position` is not sent twice (`sent_runs`).
        sub.sent_runs = max(sub.sent_runs, replayed, min(after, hub.position or 0))
        if not hub._join(self):
            sub.close(SHUTDOWN)

    async def _catch_up_logs(self) -> AsyncIterator[Output]:
        hub = self.hub
        sub = self.subscriber
        run_id = sub.filter.logs
        assert run_id is not None and sub.sent_logs is not None
        feed = await hub._log_feed(run_id, self.log_project)
        if feed is None:
            sub.close(LOG_UNAVAILABLE, discard=True)
            return
        # Joined first: chunks fanned out from now on wait in the queue, stored ones are replayed
        # up to the last one stored now; what is both is sent once (`sent_logs`).
        feed.fanout.add(sub)
        after = sub.sent_logs
        last = await hub.source.last_message(LOGS_STREAM, log_subject(run_id))
        end = last.seq if last is not None else 0
        if end <= after:
            return
        async with hub.source.read(LOGS_STREAM, log_subject(run_id), after + 1) as reader:
            if reader.pending > hub.max_replay:
                yield Gap("logs", after, end + 1, f"more than {hub.max_replay} log chunks to replay")
                sub.sent_logs = max(after, end)
                return
            while sub.closed is None:
                stored = await reader.next(READ_TIMEOUT)
                if stored is None:
                    break
                item = log_item(stored, self.log_project)
                if item is not None:
                    message = sub.render(item)
                    if message is not None:
                        yield message
                if stored.seq >= end:
                    break
