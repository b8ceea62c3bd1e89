"""Rebuilding the analytics store from the streams: replay RUNS and LLM from their first message.

`replay_into(js, store, costing)` reads the run subjects of RUNS and `fabrik.llm.usage` of LLM up
to each stream's last sequence at the start — or a given one — and applies every event with the
same function as the live consumers (`apply_events`: one transaction per batch of `BATCH`
events). Since folding is idempotent and order-tolerant, the result equals the store built
incrementally from the same events.

Each subject is read with an ephemeral pull consumer without acks (memory storage) and pull
requests of `BATCH` messages on a plain subscription (`_Reader`): the next batch is asked for
before the current one is applied, so the server sends it meanwhile, and no more than two batches
are ever held. (nats-py's ordered push consumer waited for each message with a task and a timer
of its own, which cost about as much as folding the event; its callback form has no flow control,
so a fast server would fill the client's memory.) A gap in the consumer's sequence (messages lost
on a reconnect) recreates the consumer after the last message read.

`Rebuilder` (used by the service) replays into a fresh store beside the live one — a file beside
the SQLite file, or a fresh schema of the PostgreSQL database — while the live consumers go on
writing the old store, then, holding the write lock (live handlers wait), replays what arrived
meanwhile and swaps the new store in (a file rename; on PostgreSQL two schema renames in one
transaction). Events the live consumers deliver again after the swap change nothing (idempotent).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api

from fabrik_common.codec import EventCodec, EventDecodeError
from fabrik_common.events import LlmUsage, RunEvent
from fabrik_common.ids import new_ulid
from fabrik_common.topology import LLM, RUNS
from fabrik_optimizer.analytics.ingest import RUN_SUBJECTS, Costing, apply_events
from fabrik_optimizer.analytics.store import OLD_INFIX, REBUILD_INFIX, AnalyticsStore, PostgresLocation

log = logging.getLogger(__name__)

BATCH = 2000
"""Events per pull request and per transaction."""
IDLE_SECONDS = 5.0
"""A pull request the server has not answered for this long is given up and asked again."""
_FOLDED_KINDS = frozenset(s.split(".")[2] for s in RUN_SUBJECTS)
_run_codec: EventCodec[RunEvent] = EventCodec(RunEvent)
_usage_codec: EventCodec[LlmUsage] = EventCodec(LlmUsage)


@dataclass
class ReplayCounts:
    run_events: int = 0
    usage_events: int = 0
    skipped: int = 0
    runs_end: int = 0
    """Last RUNS sequence replayed."""
    llm_end: int = 0
    """Last LLM sequence replayed."""


async def last_sequence(js: JetStreamContext, stream: str) -> int:
    info = await js.stream_info(stream)
    return int(info.state.last_seq or 0)


class _Reader:
    """One subject of a stream, in stream order from a start sequence, a batch at a time."""

    def __init__(self, js: JetStreamContext, stream: str, subject: str, start: int) -> None:
        self._js = js
        self._nc = js._nc
        self._stream = stream
        self._subject = subject
        self._next = start
        """The first stream sequence not read yet."""
        self._consumer = ""
        self._consumer_seq = 0
        self._inbox = self._nc.new_inbox()
        self._sub: Any = None
        self._buffer: list[Msg] = []
        self._wake = asyncio.Event()
        self._requests = 0
        self._open: str | None = None
        self._remaining = 0

    async def start(self) -> None:
        self._sub = await self._nc.subscribe(f"{self._inbox}.*", cb=self._on_msg)
        await self._create()

    async def close(self) -> None:
        with contextlib.suppress(nats.errors.Error, nats.js.errors.Error, asyncio.TimeoutError):
            if self._sub is not None:
                await self._sub.unsubscribe()
            if self._consumer:
                await self._js.delete_consumer(self._stream, self._consumer)

    async def _create(self) -> None:
        if self._consumer:
            with contextlib.suppress(nats.errors.Error, nats.js.errors.Error, asyncio.TimeoutError):
                await self._js.delete_consumer(self._stream, self._consumer)
        info = await self._js.add_consumer(
            self._stream,
            api.ConsumerConfig(
                ack_policy=api.AckPolicy.NONE,
                deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=self._next,
                filter_subject=self._subject,
                mem_storage=True,
                num_replicas=1,
                inactive_threshold=60.0,
            ),
        )
        self._consumer, self._consumer_seq = info.name, 0
        self._buffer.clear()
        self._open = None

    async def _on_msg(self, msg: Msg) -> None:
        headers = msg.headers
        if headers and not msg.data and api.Header.STATUS in headers:
            if headers[api.Header.STATUS] != "100" and msg.subject == self._open:
                self._open = None  # 404: nothing more; 408/409: the request ended
                self._wake.set()
            return
        self._buffer.append(msg)
        if self._open is not None:
            self._remaining -= 1
            if self._remaining <= 0:
                self._open = None
                self._wake.set()

    async def _ask(self, count: int) -> None:
        self._requests += 1
        reply = f"{self._inbox}.{self._requests}"
        self._open, self._remaining = reply, count
        body = json.dumps({"batch": count, "no_wait": True}).encode()
        await self._nc.publish(
            f"$JS.API.CONSUMER.MSG.NEXT.{self._stream}.{self._consumer}", body, reply=reply
        )

    async def _settled(self) -> bool:
        """Until the open request ends; False when it went unanswered (it is given up)."""
        deadline = time.monotonic() + IDLE_SECONDS
        while self._open is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._open = None
                return False
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), remaining)
        return True

    async def read(self, count: int) -> list[tuple[int, Msg]]:
        """Up to `count` (stream sequence, message) pairs in order; empty when the consumer has
        nothing more. The next batch is asked for before returning."""
        while True:
            if self._open is None and len(self._buffer) < count:
                await self._ask(count - len(self._buffer))
            answered = await self._settled()
            taken = self._buffer[:count]
            del self._buffer[:count]
            batch: list[tuple[int, Msg]] = []
            for msg in taken:
                consumer, consumer_seq, stream_seq = _positions(msg)
                if consumer != self._consumer:
                    continue  # late, from a consumer given up on
                if consumer_seq != self._consumer_seq + 1:
                    break  # a gap: messages were lost
                self._consumer_seq = consumer_seq
                self._next = stream_seq + 1
                batch.append((stream_seq, msg))
            if len(batch) < len(taken) or (not batch and not answered):
                # Messages lost (a reconnect), or a request unanswered: start again after the last
                # message read, keeping what was read in order.
                log.info("replay consumer recreated", extra={"stream": self._stream, "next": self._next})
                await self._create()
                if not batch:
                    continue
            if len(batch) == count and self._open is None:
                await self._ask(count)
            return batch


def _positions(msg: Msg) -> tuple[str, int, int]:
    """(consumer, consumer sequence, stream sequence) from a JetStream message's reply subject."""
    tokens = msg.reply.split(".")
    # $JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<time>.<pending>
    if len(tokens) == 9:
        return tokens[3], int(tokens[6]), int(tokens[5])
    meta = msg.metadata
    return meta.consumer, meta.sequence.consumer, meta.sequence.stream


async def _replay_stream(
    js: JetStreamContext,
    stream: str,
    subject: str,
    start: int,
    end: int,
    decode: Callable[[str, bytes], Any],
    store: AnalyticsStore,
    costing: Costing | None,
) -> tuple[int, int]:
    """Apply the events of `subject` with sequence in [start, end]; (applied, skipped). `decode`
    gives the event of a message, or None for one that carries nothing for the store."""
    try:
        last = await js.get_last_msg(stream, subject)
    except nats.js.errors.NotFoundError:
        return 0, 0  # nothing of this subject in the stream
    end = min(end, int(last.seq or 0))
    if end < start:
        return 0, 0
    reader = _Reader(js, stream, subject, start)
    await reader.start()
    handled = skipped = 0
    try:
        done = False
        while not done:
            batch = await reader.read(BATCH)
            if not batch:
                break  # nothing more of this subject in the stream
            events = []
            for seq, msg in batch:
                if seq > end:
                    done = True
                    break
                event = decode(msg.subject, msg.data)
                if event is None:
                    skipped += 1
                else:
                    events.append(event)
                if seq >= end:
                    done = True
                    break
            applied = apply_events(store, events, costing)
            if applied.failed:
                error = next(iter(applied.failed.values()))
                log.warning(
                    "events not applied in a replay",
                    extra={"stream": stream, "events": len(applied.failed), "first_error": repr(error)},
                )
                skipped += len(applied.failed)
            handled += len(events) - len(applied.failed)
            await asyncio.sleep(0)  # let live handlers and requests run between batches
    finally:
        await reader.close()
    return handled, skipped


def _run_event(subject: str, data: bytes) -> RunEvent | None:
    if subject.split(".")[2] not in _FOLDED_KINDS:
        return None  # progress, results, requests to cancel...: nothing for the store
    try:
        return _run_codec.decode(data)
    except EventDecodeError:
        return None  # the live consumer dead-lettered it; nothing to fold


def _usage_event(subject: str, data: bytes) -> LlmUsage | None:
    try:
        return _usage_codec.decode(data)
    except EventDecodeError:
        return None


async def replay_into(
    js: JetStreamContext,
    store: AnalyticsStore,
    costing: Costing | None,
    *,
    runs_from: int = 1,
    llm_from: int = 1,
    runs_end: int | None = None,
    llm_end: int | None = None,
) -> ReplayCounts:
    """Replay RUNS (run subjects) and LLM (usage) into `store` up to the given or current last sequences."""
    counts = ReplayCounts()
    counts.runs_end = runs_end if runs_end is not None else await last_sequence(js, RUNS.name)
    counts.llm_end = llm_end if llm_end is not None else await last_sequence(js, LLM.name)
    handled, skipped = await _replay_stream(
        js, RUNS.name, "fabrik.runs.>", runs_from, counts.runs_end, _run_event, store, costing
    )
    counts.run_events, counts.skipped = handled, skipped
    handled, skipped = await _replay_stream(
        js, LLM.name, "fabrik.llm.usage", llm_from, counts.llm_end, _usage_event, store, costing
    )
    counts.usage_events, counts.skipped = handled, counts.skipped + skipped
    return counts


def remove_database(path: Path) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(f"{path}{suffix}")


class RebuildBusyError(RuntimeError):
    """A rebuild is already running in this replica."""


class Rebuilder:
    """Rebuild a live store from the streams and swap it in (see the module doc)."""

    def __init__(
        self,
        js: JetStreamContext,
        get_store: Callable[[], AnalyticsStore],
        set_store: Callable[[AnalyticsStore], None],
        write_lock: asyncio.Lock,
        costing: Costing | None,
    ) -> None:
        self.js = js
        self._get = get_store
        self._set = set_store
        self.lock = write_lock
        self.costing = costing
        self._running = asyncio.Lock()

    async def rebuild(self) -> dict[str, Any]:
        if self._running.locked():
            raise RebuildBusyError("a rebuild is already running")
        async with self._running:
            started = time.monotonic()
            live = self._get()
            if live.postgres is not None:
                first, rest = await self._rebuild_postgres(live.postgres)
            else:
                first, rest = await self._rebuild_sqlite(live)
            runs, calls = self._get().counts()
            result = {
                "run_events": first.run_events + rest.run_events,
                "usage_events": first.usage_events + rest.usage_events,
                "runs": runs,
                "llm_calls": calls,
                "seconds": round(time.monotonic() - started, 3),
            }
            log.info("analytics store rebuilt from the streams", extra=result)
            return result

    async def _catch_up(self, fresh: AnalyticsStore, first: ReplayCounts) -> ReplayCounts:
        """Replay what arrived since `first` (called holding the write lock: nothing more arrives)."""
        return await replay_into(
            self.js, fresh, self.costing, runs_from=first.runs_end + 1, llm_from=first.llm_end + 1
        )

    async def _rebuild_sqlite(self, live: AnalyticsStore) -> tuple[ReplayCounts, ReplayCounts]:
        """Replay into `<file>.rebuild` (bulk), then swap the file in and reopen it."""
        in_memory = live.path == ":memory:"
        target = ":memory:" if in_memory else f"{live.path}.rebuild"
        if not in_memory:
            remove_database(Path(target))
        fresh = AnalyticsStore(target, bulk=not in_memory)
        try:
            first = await replay_into(self.js, fresh, self.costing)
            async with self.lock:
                rest = await self._catch_up(fresh, first)
                if in_memory:
                    self._set(fresh)
                    live.close()
                else:
                    fresh.finish()
                    live.close()
                    remove_database(Path(live.path))
                    os.replace(target, live.path)
                    self._set(AnalyticsStore(live.path))
        except BaseException:
            if not in_memory:
                with contextlib.suppress(Exception):
                    fresh.close()
                remove_database(Path(target))
            raise
        return first, rest

    async def _rebuild_postgres(self, location: PostgresLocation) -> tuple[ReplayCounts, ReplayCounts]:
        """Replay into a fresh schema `<schema>_rebuild_<ulid>` (bulk) while the live consumers go
        on writing the live schema; then, holding the write lock, catch up and swap the schemas
        with two renames in one transaction (readers see the old store or the new one, never a
        half-built one), drop the old schema and reopen the live one."""
        suffix = new_ulid().lower()
        old_schema = f"{location.schema}{OLD_INFIX}{suffix}"
        fresh = AnalyticsStore(location.with_schema(f"{location.schema}{REBUILD_INFIX}{suffix}"), bulk=True)
        swapped = False
        try:
            first = await replay_into(self.js, fresh, self.costing)
            async with self.lock:
                rest = await self._catch_up(fresh, first)
                live = self._get()
                fresh.swap_into(location, old_schema)
                swapped = True
                live.close()
                self._set(AnalyticsStore(location))
            # Off the event loop and outside the lock: the drop waits for queries still running
            # on the old tables; the new store serves meanwhile.
            await asyncio.to_thread(fresh.drop_schema, old_schema)
        except BaseException:
            if not swapped:
                try:
                    fresh.drop()
                except Exception as exc:  # noqa: BLE001 - the rebuild's own error is the one to raise
                    log.warning(
                        "dropping the rebuild's schema failed; it is dropped at the next start",
                        extra={"error": repr(exc)},
                    )
            raise
        return first, rest
