"""Finding the last N lines of a run's log without reading the whole log (no NATS in here).

A run's log is a sequence of chunks on `fabrik.logs.<run_id>`, each holding consecutive lines of
one attempt (`first_line` numbers them). Chunks are ordered by (attempt, first_line), so "the
chunk holding line X of attempt A" can be found by binary search over stream sequences with a
`probe(seq)` that returns the first chunk of the subject at or after `seq` (JetStream's
`next_by_subj` message get): O(log n) requests instead of a scan. When the last attempt has
fewer than N lines, the search continues into the previous attempt.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import NamedTuple

from fabrik_common.events import RunLogChunk


class ChunkAt(NamedTuple):
    seq: int
    chunk: RunLogChunk


Probe = Callable[[int], Awaitable[ChunkAt | None]]
"""The first chunk of the run stored at sequence >= seq, or None."""


def chunk_end(chunk: RunLogChunk) -> int:
    """The line number after the chunk's last line."""
    return chunk.first_line + len(chunk.lines)


async def find_tail_start(probe: Probe, first_seq: int, last: ChunkAt, lines: int) -> int:
    """The stream sequence of the earliest chunk holding one of the last `lines` lines.

    `first_seq` is the lowest sequence to search (the stream's first sequence), `last` the run's
    last chunk. Reading from the returned sequence to `last.seq` yields at least `lines` lines
    (or all there are); the caller drops the surplus at the front.
    """
    if lines <= 0:
        return last.seq + 1
    remaining = lines
    top = last
    while True:
        attempt = top.chunk.attempt
        end = chunk_end(top.chunk)
        target = end - remaining  # the first wanted line number within this attempt

        def wanted(chunk: RunLogChunk, attempt: int = attempt, target: int = target) -> bool:
            return chunk.attempt > attempt or (chunk.attempt == attempt and chunk_end(chunk) > target)

        lo, hi = first_seq, top.seq
        start = top
        # Invariant: probe(hi) is `start` and wanted; no chunk stored before `lo` is wanted.
        while lo < hi:
            mid = (lo + hi) // 2
            found = await probe(mid)
            if found is None:  # cannot happen below a stored chunk, but never loop on it
                lo = mid + 1
            elif wanted(found.chunk):
                hi, start = mid, found
            else:
                lo = found.seq + 1
        remaining -= end - max(target, start.chunk.first_line)
        if remaining <= 0 or lo <= first_seq:
            return start.seq
        # The chunk just before `start` (stored at lo - 1: not wanted, and nothing in between).
        previous = await probe(lo - 1)
        if previous is None or previous.seq >= start.seq:
            return start.seq
        top = previous
