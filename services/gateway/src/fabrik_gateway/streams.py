"""Reading a run's log (LOGS stream) and its lifecycle events (RUNS stream) for the API.

Everything reads through short-lived *ordered* consumers (ephemeral, in memory, flow-controlled,
filtered on the run's subject) or single-message gets; nothing here creates durable state.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Final

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api

from fabrik_common.codec import EventCodec, EventDecodeError
from fabrik_common.events import RunEvent, RunLogChunk
from fabrik_gateway.logtail import ChunkAt, find_tail_start
from fabrik_gateway.models import LogLineView, RunEventItem

log = logging.getLogger(__name__)

LOGS_STREAM: Final = "LOGS"
RUNS_STREAM: Final = "RUNS"
_chunks: EventCodec[RunLogChunk] = EventCodec(RunLogChunk)
_run_events: EventCodec[RunEvent] = EventCodec(RunEvent)
READ_TIMEOUT: Final = 5.0
CONSUMER_INACTIVE_SECONDS: Final = 60.0


def log_subject(run_id: str) -> str:
    return f"fabrik.logs.{run_id}"


def events_subject(run_id: str) -> str:
    return f"fabrik.runs.*.{run_id}"


@dataclass(frozen=True)
class LogLineAt:
    """A line with where it is stored: `seq` of its chunk and its `index` in the chunk."""

    seq: int
    index: int
    line: LogLineView

    @property
    def cursor(self) -> str:
        return f"{self.seq}-{self.index}"


@dataclass(frozen=True)
class FollowIdle:
    """Nothing new for a while (send a keep-alive)."""


@dataclass(frozen=True)
class FollowEnd:
    reason: str


FollowItem = LogLineAt | FollowIdle | FollowEnd


def parse_log_cursor(text: str) -> tuple[int, int] | None:
    """`<seq>-<index>` (an SSE event id) or None if malformed."""
    seq, sep, index = text.partition("-")
    if not sep or not seq.isdigit() or not index.isdigit():
        return None
    return int(seq), int(index)


def _lines(seq: int, chunk: RunLogChunk, skip_through: int = -1) -> list[LogLineAt]:
    return [
        LogLineAt(
            seq,
            i,
            LogLineView(
                ts=line.ts,
                stream=line.stream,
                text=line.text,
                attempt=chunk.attempt,
                line=chunk.first_line + i,
            ),
        )
        for i, line in enumerate(chunk.lines)
        if i > skip_through
    ]


class _SeenLines:
    """Drops lines already delivered: after an executor crash a chunk may be published twice,
    with the same `first_line`; line numbers are consecutive per attempt."""

    def __init__(self) -> None:
        self._next: dict[int, int] = {}

    def fresh(self, lines: list[LogLineAt]) -> list[LogLineAt]:
        out: list[LogLineAt] = []
        for item in lines:
            view = item.line
            if view.line < self._next.get(view.attempt, 0):
                continue
            self._next[view.attempt] = view.line + 1
            out.append(item)
        return out


@contextlib.asynccontextmanager
async def _ordered(
    js: JetStreamContext, stream: str, subject: str, start_seq: int | None
) -> AsyncIterator[Any]:
    if start_seq is None:
        config = api.ConsumerConfig(deliver_policy=api.DeliverPolicy.ALL)
    else:
        config = api.ConsumerConfig(
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start_seq
        )
    sub = await js.subscribe(
        subject,
        stream=stream,
        ordered_consumer=True,
        config=config,
        inactive_threshold=CONSUMER_INACTIVE_SECONDS,
    )
    try:
        yield sub
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


def _seq(msg: Msg) -> int:
    return int(msg.metadata.sequence.stream)


class LogReader:
    def __init__(self, js: JetStreamContext, stream: str = LOGS_STREAM) -> None:
        self.js = js
        self.stream = stream

    async def _get(self, subject: str, seq: int | None = None) -> ChunkAt | None:
        """The last chunk (seq None) or the first at or after `seq`; undecodable ones are skipped."""
        for _ in range(1000):
            try:
                if seq is None:
                    raw = await self.js.get_msg(self.stream, subject=subject)
                else:
                    raw = await self.js.get_msg(self.stream, seq=seq, subject=subject, next=True)
            except nats.js.errors.NotFoundError:
                return None
            assert raw.seq is not None
            try:
                return ChunkAt(raw.seq, _chunks.decode(raw.data or b""))
            except EventDecodeError:
                log.warning("undecodable log chunk skipped", extra={"subject": subject, "seq": raw.seq})
                if seq is None:
                    return None
                seq = raw.seq + 1
        return None

    async def _first_seq(self) -> int:
        info = await self.js.stream_info(self.stream)
        return int(info.state.first_seq)

    async def _start_for_tail(self, subject: str, last: ChunkAt, lines: int) -> int:
        first_seq = await self._first_seq()
        return await find_tail_start(lambda seq: self._get(subject, seq), first_seq, last, lines)

    async def _read(self, subject: str, start_seq: int, stop_seq: int) -> list[ChunkAt]:
        chunks: list[ChunkAt] = []
        async with _ordered(self.js, self.stream, subject, start_seq) as sub:
            while True:
                try:
                    msg = await sub.next_msg(timeout=READ_TIMEOUT)
                except nats.errors.TimeoutError:
                    break  # retention removed what was there: return what we have
                seq = _seq(msg)
                with contextlib.suppress(EventDecodeError):
                    chunks.append(ChunkAt(seq, _chunks.decode(msg.data)))
                if seq >= stop_seq or msg.metadata.num_pending == 0:
                    break
        return chunks

    async def tail(self, run_id: str, lines: int) -> tuple[list[LogLineView], bool]:
        """The last `lines` lines and whether earlier ones exist."""
        subject = log_subject(run_id)
        last = await self._get(subject)
        if last is None or lines <= 0:
            return [], last is not None
        start = await self._start_for_tail(subject, last, lines)
        chunks = await self._read(subject, start, last.seq)
        seen = _SeenLines()
        out = [line.line for c in chunks for line in seen.fresh(_lines(c.seq, c.chunk))]
        truncated = len(out) > lines
        if not truncated and chunks:
            first = await self._get(subject, await self._first_seq())
            truncated = first is not None and first.seq < chunks[0].seq
        return out[-lines:], truncated

    async def follow(
        self,
        run_id: str,
        *,
        tail: int | None,
        resume_after: tuple[int, int] | None,
        finished: Callable[[], bool],
        stopping: Callable[[], bool],
        heartbeat_seconds: float,
        grace_seconds: float,
        poll_seconds: float = 0.25,
    ) -> AsyncIterator[FollowItem]:
        """Lines as they come (after the last `tail` ones, or everything if None, or after an SSE
        event id), until `finished()` holds and the log is drained, or `stopping()`."""
        subject = log_subject(run_id)
        last = await self._get(subject)
        skip_seq, skip_through = -1, -1
        if resume_after is not None:
            start: int | None = resume_after[0]
            skip_seq, skip_through = resume_after
            backlog_until = 0
        elif tail is None or last is None:
            start, backlog_until = None, 0
        else:
            start = await self._start_for_tail(subject, last, tail)
            backlog_until = last.seq
        delivered = 0
        seen = _SeenLines()
        async with _ordered(self.js, self.stream, subject, start) as sub:
            if backlog_until and tail is not None:
                backlog: list[LogLineAt] = []
                while delivered < backlog_until:
                    try:
                        msg = await sub.next_msg(timeout=READ_TIMEOUT)
                    except nats.errors.TimeoutError:
                        break
                    delivered = _seq(msg)
                    with contextlib.suppress(EventDecodeError):
                        backlog.extend(seen.fresh(_lines(delivered, _chunks.decode(msg.data))))
                for line in backlog[max(0, len(backlog) - tail) :]:
                    yield line
            idle = 0.0
            finished_at: float | None = None
            while True:
                if stopping():
                    yield FollowEnd("shutdown")
                    return
                try:
                    msg = await sub.next_msg(timeout=poll_seconds)
                except nats.errors.TimeoutError:
                    idle += poll_seconds
                    if finished():
                        now = time.monotonic()
                        if finished_at is None:
                            finished_at = now
                        if now - finished_at >= grace_seconds:
                            final = await self._get(subject)
                            if final is None or final.seq <= delivered:
                                yield FollowEnd("finished")
                                return
                    if idle >= heartbeat_seconds:
                        idle = 0.0
                        yield FollowIdle()
                    continue
                except (nats.errors.ConnectionClosedError, nats.errors.BadSubscriptionError):
                    yield FollowEnd("unavailable")
                    return
                idle = 0.0
                delivered = _seq(msg)
                try:
                    chunk = _chunks.decode(msg.data)
                except EventDecodeError:
                    continue
                for line in seen.fresh(
                    _lines(delivered, chunk, skip_through if delivered == skip_seq else -1)
                ):
                    yield line


class EventReader:
    def __init__(self, js: JetStreamContext, stream: str = RUNS_STREAM) -> None:
        self.js = js
        self.stream = stream

    async def events(self, run_id: str, *, after: int, limit: int) -> tuple[list[RunEventItem], str | None]:
        """A run's lifecycle events in stream order, after sequence `after`, at most `limit`."""
        items: list[RunEventItem] = []
        more = False
        async with _ordered(
            self.js, self.stream, events_subject(run_id), after + 1 if after else None
        ) as sub:
            info = await sub.consumer_info()
            if info.num_pending == 0 and (info.delivered is None or info.delivered.consumer_seq == 0):
                return [], None
            while len(items) < limit:
                try:
                    msg = await sub.next_msg(timeout=READ_TIMEOUT)
                except nats.errors.TimeoutError:
                    break
                items.append(_event_item(msg))
                more = msg.metadata.num_pending > 0
                if not more:
                    break
        return items, str(items[-1].seq) if more and items else None


def _event_item(msg: Msg) -> RunEventItem:
    event: dict[str, Any]
    try:
        event = msgspec.to_builtins(_run_events.decode(msg.data))
    except EventDecodeError:
        # A newer or damaged event: show it as stored rather than hide it.
        try:
            decoded = msgspec.json.decode(msg.data)
        except msgspec.DecodeError:
            decoded = {"undecodable": msg.data.decode(errors="replace")}
        event = decoded if isinstance(decoded, dict) else {"value": decoded}
    event_type = str(event.get("type") or (msg.headers or {}).get("Fabrik-Event-Type", ""))
    return RunEventItem(seq=_seq(msg), subject=msg.subject, type=event_type, event=event)
