"""Rebuilding the analytics store from the streams: replay RUNS and LLM from their first message.

`replay_into(js, store, costing)` reads the run subjects of RUNS and `fabrik.llm.usage` of LLM
with ephemeral pull consumers (no acks, memory storage) up to each stream's last sequence at the
start — or a given one — and folds every event with the same functions as the live consumers,
committing in batches. Since folding is idempotent and order-tolerant, the result equals the
store built incrementally from the same events.

`Rebuilder` (used by the service) replays into a fresh file beside the live one while the live
consumers go on writing the old store, then, holding the write lock (live handlers wait), replays
what arrived meanwhile and swaps the new file in. Events the live consumers deliver again after
the swap change nothing (idempotent).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext, api

from fabrik_common.codec import EventCodec, EventDecodeError
from fabrik_common.events import LlmUsage, RunEvent
from fabrik_common.topology import LLM, RUNS
from fabrik_optimizer.analytics.ingest import RUN_SUBJECTS, Costing, apply_llm_usage, apply_run_event
from fabrik_optimizer.analytics.store import AnalyticsStore

log = logging.getLogger(__name__)

BATCH = 2000
IDLE_SECONDS = 1.0
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


async def _replay_stream(
    js: JetStreamContext,
    stream: str,
    subject: str,
    start: int,
    end: int,
    handle: Callable[[str, bytes], bool],
    store: AnalyticsStore,
) -> tuple[int, int]:
    """Feed messages of `subject` with sequence in [start, end] to `handle`; (handled, skipped).

    An ordered push consumer (flow-controlled, no acks, recreated by the client on a gap) is
    used: nats-py's pull `fetch` returned partial batches after waiting for its timeout here."""
    try:
        last = await js.get_last_msg(stream, subject)
    except nats.js.errors.NotFoundError:
        return 0, 0  # nothing of this subject in the stream
    end = min(end, int(last.seq or 0))
    if end < start:
        return 0, 0
    sub = await js.subscribe(
        subject,
        stream=stream,
        ordered_consumer=True,
        config=api.ConsumerConfig(
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=start,
            mem_storage=True,
        ),
    )
    handled = skipped = 0
    try:
        done = False
        while not done:
            with store.batch():
                for _ in range(BATCH):
                    try:
                        msg = await sub.next_msg(timeout=IDLE_SECONDS)
                    except (TimeoutError, nats.errors.TimeoutError):
                        done = True  # nothing more of this subject in the stream
                        break
                    seq = msg.metadata.sequence.stream
                    if seq > end:
                        done = True
                        break
                    if handle(msg.subject, msg.data):
                        handled += 1
                    else:
                        skipped += 1
                    if seq >= end:
                        done = True
                        break
            await asyncio.sleep(0)  # let live handlers and requests run between batches
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    return handled, skipped


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

    def on_run(subject: str, data: bytes) -> bool:
        if subject.split(".")[2] not in _FOLDED_KINDS:
            return False  # progress, results, requests to cancel...: nothing for the store
        try:
            event = _run_codec.decode(data)
        except EventDecodeError:
            return False  # the live consumer dead-lettered it; nothing to fold
        apply_run_event(store, event, costing)
        return True

    def on_usage(subject: str, data: bytes) -> bool:
        try:
            event = _usage_codec.decode(data)
        except EventDecodeError:
            return False
        apply_llm_usage(store, event)
        return True

    handled, skipped = await _replay_stream(
        js, RUNS.name, "fabrik.runs.>", runs_from, counts.runs_end, on_run, store
    )
    counts.run_events, counts.skipped = handled, skipped
    handled, skipped = await _replay_stream(
        js, LLM.name, "fabrik.llm.usage", llm_from, counts.llm_end, on_usage, store
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
            in_memory = live.path == ":memory:"
            target = ":memory:" if in_memory else f"{live.path}.rebuild"
            if not in_memory:
                remove_database(Path(target))
            fresh = AnalyticsStore(target)
            try:
                first = await replay_into(self.js, fresh, self.costing)
                async with self.lock:
                    rest = await replay_into(
                        self.js,
                        fresh,
                        self.costing,
                        runs_from=first.runs_end + 1,
                        llm_from=first.llm_end + 1,
                    )
                    if in_memory:
                        self._set(fresh)
                        live.close()
                    else:
                        fresh.checkpoint()
                        fresh.close()
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
