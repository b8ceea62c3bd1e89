"""Restore an archive into NATS, reproducing sequence numbers (and so KV revisions) exactly.

A stream is created with its original configuration, relaxed while it is loaded (no limits, no
deny-delete/purge, the shortest duplicate window, one extra subject for gap fillers, a
`fabrik.restoring` metadata marker), starting at the archived first sequence. Messages are
published in order with their subject, header block and payload; a gap in the archived sequence
numbers (messages deleted, expired or superseded in the source) is filled with placeholder
messages on the filler subject, which are purged at the end, so every message gets its original
sequence number and the stream's last sequence is the archived one. Finally the original
configuration is put back and the durable consumers are recreated and advanced to their ack floor.

Not reproducible: the server stamps a new timestamp on every publish (the original is in the
archive); header lines that are publish-time conditions (`Nats-Expected-Last-Subject-Sequence`,
`Nats-Expected-Last-Msg-Id`) are dropped from a message when their condition cannot hold any more
because the message they referred to is not in the archive; consumers' redelivery counts and
acknowledgements above the ack floor.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
from nats.aio.subscription import Subscription

from fabrik_backup import jsapi
from fabrik_backup.archive.format import (
    ArchiveError,
    ConsumerEntry,
    Manifest,
    Record,
    StreamEntry,
    decode_chunk,
)
from fabrik_backup.jsapi import RawClient
from fabrik_backup.targets.base import Target

log = logging.getLogger(__name__)

MARKER = "fabrik.restoring"
GAP_SUBJECT = "_fabrik.restore.gap.{stream}"
WINDOW = 2000
DUPLICATE_WINDOW_NS = 100_000_000
_CONDITIONAL = re.compile(rb"^(Nats-Expected-[A-Za-z-]+):\s*(.*)$", re.IGNORECASE)

Report = Callable[[int, int], Awaitable[None]]


async def _no_report(_bytes: int, _parts: int) -> None:
    return None


class RestoreError(RuntimeError):
    pass


@dataclass
class StreamResult:
    name: str
    messages: int = 0
    fillers: int = 0
    skipped: bool = False
    conditions_dropped: int = 0
    consumers: int = 0


@dataclass
class RestoreResult:
    backup_id: str
    streams: list[StreamResult] = field(default_factory=list)


def _restore_config(entry: StreamEntry, backup_id: str, first_seq: int) -> dict[str, Any]:
    config = dict(entry.config)
    for key in ("mirror", "sources", "subject_delete_marker_ttl", "first_seq"):
        config.pop(key, None)
    config["subjects"] = [*(config.get("subjects") or []), GAP_SUBJECT.format(stream=entry.name)]
    config.update(
        deny_delete=False,
        deny_purge=False,
        max_age=0,
        max_msgs=-1,
        max_bytes=-1,
        max_msgs_per_subject=-1,
        duplicate_window=DUPLICATE_WINDOW_NS,
        sealed=False,
        discard="old",
        discard_new_per_subject=False,
        metadata={**(config.get("metadata") or {}), MARKER: backup_id},
    )
    if first_seq > 1:
        config["first_seq"] = first_seq
    return config


def _final_config(entry: StreamEntry) -> dict[str, Any]:
    config = dict(entry.config)
    for key in ("mirror", "sources", "first_seq"):
        config.pop(key, None)
    config["metadata"] = {k: v for k, v in (config.get("metadata") or {}).items() if k != MARKER}
    return config


class _PubAck(msgspec.Struct):
    seq: int = 0
    duplicate: bool = False
    error: dict[str, Any] | None = None


_ack_decoder = msgspec.json.Decoder(_PubAck)


class _Publisher:
    """Pipelined JetStream publishing with checkpoints.

    Messages go out without waiting for acks; every `CHECKPOINT`-th message (and the last one,
    which is held back until the next arrives or `drain()`) asks for an ack, and the ack's
    sequence must be the expected one. One connection keeps its messages in order, so a
    checkpoint's sequence proves that every message before it was stored once and in place; a
    rejected or de-duplicated message shifts it and fails the restore. At most `IN_FLIGHT`
    checkpoints are outstanding, which bounds what the server has to buffer.
    """

    CHECKPOINT = 256
    IN_FLIGHT = 32

    def __init__(self, nc: RawClient, stream: str) -> None:
        self.nc = nc
        self.stream = stream
        self.prefix = nc.new_inbox()
        self.expected: dict[bytes, int] = {}
        self.window = asyncio.Semaphore(self.IN_FLIGHT)
        self.idle = asyncio.Event()
        self.idle.set()
        self.error: str | None = None
        self.counter = 0
        self.sub: Subscription | None = None
        self.held: tuple[str, bytes, bytes | None, int] | None = None

    async def start(self) -> None:
        self.sub = await self.nc.fast_subscribe(f"{self.prefix}.*", self._on_ack)

    def _on_ack(self, subject: bytes, _reply: bytes, data: bytes, _headers: bytes) -> None:
        token = subject.rsplit(b".", 1)[1]
        expected = self.expected.pop(token, None)
        if expected is None:
            return
        self.window.release()
        if not self.expected:
            self.idle.set()
        try:
            ack = _ack_decoder.decode(data)
        except msgspec.DecodeError:
            ack = _PubAck(error={"description": f"not an ack: {data[:100]!r}"})
        if self.error is None:
            if ack.error is not None:
                self.error = (
                    f"{self.stream}: message for sequence {expected} (or one before it) was not stored: "
                    f"{ack.error.get('description')}"
                )
            elif ack.duplicate or ack.seq != expected:
                self.error = (
                    f"{self.stream}: message for sequence {expected} was stored as {ack.seq}"
                    f"{' (duplicate)' if ack.duplicate else ''}"
                )

    async def _send(self, item: tuple[str, bytes, bytes | None, int], checkpoint: bool) -> None:
        subject, data, headers, seq = item
        reply = ""
        if checkpoint:
            await self.window.acquire()
            self.counter += 1
            token = str(self.counter)
            self.expected[token.encode()] = seq
            self.idle.clear()
            reply = f"{self.prefix}.{token}"
        await self.nc.send_raw(subject, data, headers, reply)
        if checkpoint:
            await self.nc.flush_pending()

    async def publish(self, subject: str, data: bytes, headers: bytes | None, seq: int) -> None:
        if self.error is not None:
            raise RestoreError(self.error)
        held, self.held = self.held, (subject, data, headers, seq)
        if held is not None:
            await self._send(held, checkpoint=held[3] % self.CHECKPOINT == 0)

    async def drain(self, wait: float = 60.0) -> None:
        held, self.held = self.held, None
        if held is not None:
            await self._send(held, checkpoint=True)
        await self.nc.flush()
        try:
            await asyncio.wait_for(self.idle.wait(), wait)
        except TimeoutError as exc:
            raise RestoreError(f"{self.stream}: {len(self.expected)} checkpoints not acknowledged") from exc
        if self.error is not None:
            raise RestoreError(self.error)

    async def stop(self) -> None:
        if self.sub is not None:
            await self.nc.fast_unsubscribe(self.sub)


def _header_lines(raw: bytes) -> list[bytes]:
    return raw.split(b"\r\n")


_MSG_ID = re.compile(rb"\r\nnats-msg-id:[ \t]*([^\r]*)", re.IGNORECASE)
_HAS_CONDITION = re.compile(rb"\r\nnats-expected-", re.IGNORECASE)


def _msg_id(raw: bytes) -> bytes | None:
    match = _MSG_ID.search(raw)
    return match.group(1).strip() if match else None


class _Conditions:
    """Keeps just enough state to tell whether a publish-time condition in a header still holds."""

    def __init__(self) -> None:
        self.last_by_subject: dict[str, int] = {}
        self.last_msg_id: bytes | None = None
        self.dropped = 0

    def apply(self, record: Record) -> bytes | None:
        raw = record.headers
        if not raw or (b"Nats-Expected" not in raw and b"nats-expected" not in raw.lower()):
            return raw
        lines = _header_lines(raw)
        kept = [lines[0]]
        has_subject_filter = any(
            line.lower().startswith(b"nats-expected-last-subject-sequence-subject:") for line in lines
        )
        changed = False
        for line in lines[1:]:
            match = _CONDITIONAL.match(line)
            if match is None:
                kept.append(line)
                continue
            name = match.group(1).lower()
            value = match.group(2).strip()
            holds = True
            if name == b"nats-expected-last-subject-sequence":
                holds = not has_subject_filter and self.last_by_subject.get(record.subject, 0) == int(
                    value or b"0"
                )
            elif name == b"nats-expected-last-subject-sequence-subject":
                holds = False
            elif name == b"nats-expected-last-msg-id":
                holds = self.last_msg_id == value
            if holds:
                kept.append(line)
            else:
                changed = True
        if not changed:
            return raw
        self.dropped += 1
        return b"\r\n".join(kept)

    def published(self, record: Record, msg_id: bytes | None) -> None:
        self.last_by_subject[record.subject] = record.seq
        self.last_msg_id = msg_id

    def filler(self) -> None:
        self.last_msg_id = None


class _RecentIds:
    """Message ids published within the (shortest possible) duplicate window of the stream."""

    def __init__(self, window: float = DUPLICATE_WINDOW_NS / 1e9 * 1.5) -> None:
        self.window = window
        self.current: set[bytes] = set()
        self.previous: set[bytes] = set()
        self.since = time.monotonic()

    def seen_recently(self, msg_id: bytes) -> bool:
        now = time.monotonic()
        if now - self.since > self.window:
            self.previous, self.current = self.current, set()
            self.since = now
        return msg_id in self.current or msg_id in self.previous

    def add(self, msg_id: bytes) -> None:
        self.current.add(msg_id)

    def clear(self) -> None:
        self.current.clear()
        self.previous.clear()
        self.since = time.monotonic()


async def restore_stream(
    nc: RawClient,
    target: Target,
    manifest: Manifest,
    entry: StreamEntry,
    *,
    replace: bool,
    report: Callable[[int], Awaitable[None]],
) -> StreamResult:
    result = StreamResult(entry.name)
    existing = await jsapi.stream_info(nc, entry.name)
    if existing is not None:
        state = existing.get("state") or {}
        marker = ((existing.get("config") or {}).get("metadata") or {}).get(MARKER)
        empty = int(state.get("messages", 0)) == 0 and int(state.get("last_seq", 0)) == 0
        done_before = (
            marker is None
            and int(state.get("last_seq", 0)) == entry.last_seq
            and int(state.get("messages", 0)) == entry.messages
        )
        if marker == manifest.backup_id or empty or replace:
            await jsapi.delete_stream(nc, entry.name)
        elif done_before:
            result.skipped = True
            result.messages = entry.messages
            return result
        else:
            raise RestoreError(
                f"stream {entry.name} exists with {state.get('messages', 0)} messages; "
                "restore it with replace, or into an empty server"
            )
    first_record = entry.parts[0].first_seq if entry.parts else entry.last_seq + 1
    await jsapi.create_stream(nc, _restore_config(entry, manifest.backup_id, first_record))
    publisher = _Publisher(nc, entry.name)
    await publisher.start()
    gap_subject = GAP_SUBJECT.format(stream=entry.name)
    conditions = _Conditions()
    recent = _RecentIds()
    next_seq = first_record
    # Pull consumers with an ack floor are created when the stream holds exactly the messages up
    # to that floor (fillers purged) and acknowledge all of them: their floor is the archived one.
    advancing = sorted(
        (c for c in entry.consumers if c.ack_floor_stream_seq > 0 and not c.config.get("deliver_subject")),
        key=lambda c: c.ack_floor_stream_seq,
    )
    created: set[str] = set()
    fillers_pending = 0

    async def settle(upto: int) -> None:
        nonlocal fillers_pending
        while advancing and advancing[0].ack_floor_stream_seq <= upto:
            consumer = advancing.pop(0)
            await publisher.drain()
            if fillers_pending:
                await jsapi.purge_stream(nc, entry.name, filter=gap_subject)
                fillers_pending = 0
            await _ack_through(nc, entry.name, consumer)
            created.add(consumer.name)

    async def load(index: int) -> list[Record]:
        ref = entry.parts[index]
        blob = await target.get(ref.name)
        return await asyncio.to_thread(decode_chunk, ref, blob, entry.name)

    upcoming: asyncio.Task[list[Record]] | None = None
    try:
        # The next chunk is read and decoded off the event loop while this one is published.
        upcoming = asyncio.create_task(load(0)) if entry.parts else None
        for index, ref in enumerate(entry.parts):
            assert upcoming is not None
            records = await upcoming
            upcoming = asyncio.create_task(load(index + 1)) if index + 1 < len(entry.parts) else None
            for record in records:
                if advancing and record.seq > advancing[0].ack_floor_stream_seq:
                    await settle(record.seq - 1)
                while next_seq < record.seq:
                    await publisher.publish(gap_subject, b"", None, next_seq)
                    conditions.filler()
                    result.fillers += 1
                    fillers_pending += 1
                    next_seq += 1
                headers = conditions.apply(record)
                msg_id = _msg_id(headers) if headers else None
                if msg_id is not None:
                    if recent.seen_recently(msg_id):
                        # Same id again within the duplicate window: let the window pass first.
                        await publisher.drain()
                        await asyncio.sleep(DUPLICATE_WINDOW_NS / 1e9 * 1.5)
                        recent.clear()
                    recent.add(msg_id)
                await publisher.publish(record.subject, record.data, headers, record.seq)
                conditions.published(record, msg_id)
                next_seq = record.seq + 1
                result.messages += 1
            await report(ref.size)
        await settle(next_seq - 1)
        while next_seq <= entry.last_seq:
            await publisher.publish(gap_subject, b"", None, next_seq)
            result.fillers += 1
            fillers_pending += 1
            next_seq += 1
        await publisher.drain()
        # A floor past the last archived message (messages removed before the backup read them).
        await settle(entry.last_seq)
    finally:
        if upcoming is not None and not upcoming.done():
            upcoming.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await upcoming
        await publisher.stop()
    result.conditions_dropped = conditions.dropped
    if fillers_pending:
        await jsapi.purge_stream(nc, entry.name, filter=gap_subject)
    await jsapi.update_stream(nc, _final_config(entry))
    for consumer in entry.consumers:
        if consumer.name not in created:
            await jsapi.create_consumer(nc, entry.name, consumer.config)
    result.consumers = len(entry.consumers)
    return result


_CATCH_UP_BATCH = 10_000


def _catch_up_config(config: dict[str, Any]) -> dict[str, Any]:
    """The consumer's configuration while it is advanced to its ack floor: no limit on
    unacknowledged messages or on the size of a pull, and not paused. With the original limits a
    consumer such as `max_ack_pending=1` would hand out one message per round trip."""
    relaxed = {k: v for k, v in config.items() if k not in ("max_batch", "max_bytes", "pause_until")}
    relaxed["max_ack_pending"] = -1
    return relaxed


class _Pull:
    """`no_wait` pull requests, one at a time: the server sends what it has, up to the batch, then
    a status (404 when there is nothing more) instead of holding the request open until it
    expires. Each request has its own reply subject, so a late status of an earlier one cannot
    end it."""

    def __init__(self, nc: RawClient, stream: str, name: str) -> None:
        self.nc = nc
        self.stream = stream
        self.name = name
        self.inbox = nc.new_inbox()
        self.current = b""
        self.replies: list[bytes] = []
        self.ended = asyncio.Event()
        self.wanted = 0
        self.count = 0
        self.sub: Subscription | None = None

    def sink(self, subject: bytes, reply: bytes, _data: bytes, headers: bytes) -> None:
        # Deliveries carry the message's own subject; a status carries the request's reply subject.
        if reply:
            self.replies.append(reply)
            if len(self.replies) >= self.wanted:
                self.ended.set()
        elif subject == self.current and not (headers or b"").startswith(b"NATS/1.0 100"):
            self.ended.set()

    async def start(self) -> None:
        self.sub = await self.nc.fast_subscribe(f"{self.inbox}.*", self.sink)

    async def stop(self) -> None:
        if self.sub is not None:
            await self.nc.fast_unsubscribe(self.sub)

    async def next(self, batch: int) -> list[bytes]:
        self.count += 1
        reply = f"{self.inbox}.{self.count}"
        self.current, self.replies, self.wanted = reply.encode(), [], batch
        self.ended.clear()
        body = json.dumps({"batch": batch, "no_wait": True}).encode()
        await self.nc.publish(f"{jsapi.API}.CONSUMER.MSG.NEXT.{self.stream}.{self.name}", body, reply=reply)
        try:
            await asyncio.wait_for(self.ended.wait(), 30.0)
        except TimeoutError as exc:
            raise RestoreError(f"{self.stream}: consumer {self.name} did not answer a pull request") from exc
        return self.replies


async def _ack_through(nc: RawClient, stream: str, consumer: ConsumerEntry) -> None:
    """Create the consumer and acknowledge every message it has pending (the stream holds nothing
    past its floor), then give it back its own configuration."""
    name = consumer.name
    await jsapi.create_consumer(nc, stream, _catch_up_config(consumer.config))
    policy = consumer.config.get("ack_policy", "explicit")
    info_subject = f"{jsapi.API}.CONSUMER.INFO.{stream}.{name}"
    pull = _Pull(nc, stream, name)
    await pull.start()
    deadline = time.monotonic() + 60.0
    try:
        while True:
            replies = await pull.next(_CATCH_UP_BATCH)
            # `all` acknowledges everything up to the message acked; `none` needs no ack at all.
            if policy == "explicit":
                for reply in replies:
                    await nc.send_raw(reply.decode(), b"+ACK", None, "")
            elif policy == "all" and replies:
                await nc.send_raw(replies[-1].decode(), b"+ACK", None, "")
            await nc.flush()
            if len(replies) == _CATCH_UP_BATCH:
                continue
            # Acks are applied by the server after they are sent: done once none is outstanding.
            info = await jsapi.request(nc, info_subject)
            pending, unacked = int(info.get("num_pending", 0)), int(info.get("num_ack_pending", 0))
            if pending == 0 and unacked == 0:
                break
            if time.monotonic() > deadline:
                raise RestoreError(
                    f"{stream}: consumer {name} still has {unacked} unacknowledged "
                    f"and {pending} pending messages at its ack floor"
                )
            if not replies:
                await asyncio.sleep(0.005)
    finally:
        await pull.stop()
    await jsapi.create_consumer(nc, stream, consumer.config)
    floor = int((info.get("ack_floor") or {}).get("stream_seq", 0))
    if floor != consumer.ack_floor_stream_seq:
        log.warning(
            "consumer restored at another ack floor",
            extra={
                "stream": stream,
                "consumer": name,
                "floor": floor,
                "archived": consumer.ack_floor_stream_seq,
            },
        )


def select_streams(manifest: Manifest, names: Sequence[str] | None) -> list[StreamEntry]:
    if names is None:
        return list(manifest.streams)
    known = {s.name for s in manifest.streams}
    missing = sorted(set(names) - known)
    if missing:
        raise ArchiveError(f"{manifest.backup_id}: holds no stream {', '.join(missing)}")
    return [s for s in manifest.streams if s.name in set(names)]


async def restore(
    nc: RawClient,
    target: Target,
    manifest: Manifest,
    *,
    streams: Sequence[str] | None = None,
    replace: Sequence[str] | bool = False,
    report: Report = _no_report,
) -> RestoreResult:
    """Restore `streams` (default all) of the archive. A stream that exists with messages is
    replaced only when named in `replace` (or `replace=True`); an empty one is replaced always."""
    selected = select_streams(manifest, streams)
    replace_all = replace is True
    replace_names = set() if isinstance(replace, bool) else set(replace)
    result = RestoreResult(manifest.backup_id)
    done_bytes = 0
    done_parts = 0

    async def part_done(size: int) -> None:
        nonlocal done_bytes, done_parts
        done_bytes += size
        done_parts += 1
        await report(done_bytes, done_parts)

    for entry in selected:
        started = time.monotonic()
        stream_result = await restore_stream(
            nc, target, manifest, entry, replace=replace_all or entry.name in replace_names, report=part_done
        )
        result.streams.append(stream_result)
        log.info(
            "stream restored",
            extra={
                "stream": entry.name,
                "messages": stream_result.messages,
                "fillers": stream_result.fillers,
                "skipped": stream_result.skipped,
                "seconds": round(time.monotonic() - started, 2),
            },
        )
    return result
