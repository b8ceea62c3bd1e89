"""Finding the last N lines of a log by binary search over stream sequences (no NATS)."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import pytest

from fabrik_common.events import LogLine, RunLogChunk
from fabrik_gateway.logtail import ChunkAt, find_tail_start

RUN = "01J00000000000000000000000"
TS = datetime(2025, 1, 1, tzinfo=UTC)


class FakeStream:
    """A run's chunks at scattered sequences (other runs' messages in between)."""

    def __init__(self, seed: int, attempts: int, chunks_per_attempt: int, first_line: int = 0) -> None:
        rng = random.Random(seed)
        self.chunks: list[ChunkAt] = []
        self.lines: list[tuple[int, int]] = []  # (attempt, line) in order
        seq = rng.randint(1, 50)
        self.first_seq = 1
        for attempt in range(1, attempts + 1):
            line = first_line
            for _ in range(chunks_per_attempt):
                n = rng.randint(1, 40)
                chunk = RunLogChunk(
                    run_id=RUN,
                    attempt=attempt,
                    first_line=line,
                    lines=tuple(
                        LogLine(ts=TS, stream="stdout", text=f"{attempt}:{line + i}") for i in range(n)
                    ),
                )
                self.chunks.append(ChunkAt(seq, chunk))
                self.lines.extend((attempt, line + i) for i in range(n))
                line += n
                seq += rng.randint(1, 1000)
        self.probes = 0

    async def probe(self, seq: int) -> ChunkAt | None:
        self.probes += 1
        for at in self.chunks:
            if at.seq >= seq:
                return at
        return None

    def read_from(self, seq: int) -> list[tuple[int, int]]:
        return [
            (at.chunk.attempt, at.chunk.first_line + i)
            for at in self.chunks
            if at.seq >= seq
            for i in range(len(at.chunk.lines))
        ]


@pytest.mark.parametrize(("seed", "attempts", "chunks"), [(1, 1, 1), (2, 1, 50), (3, 3, 20), (4, 5, 3)])
async def test_reading_from_the_start_found_covers_exactly_the_tail(
    seed: int, attempts: int, chunks: int
) -> None:
    stream = FakeStream(seed, attempts, chunks)
    total = len(stream.lines)
    for n in sorted({1, 2, 5, 39, 40, 41, 100, total // 2, total - 1, total, total + 10}):
        if n <= 0:
            continue
        start = await find_tail_start(stream.probe, stream.first_seq, stream.chunks[-1], n)
        read = stream.read_from(start)
        assert read[-n:] == stream.lines[-n:], n
        # minimal: starting one chunk later would miss lines
        later = [at.seq for at in stream.chunks if at.seq > start]
        if n <= total and later:
            assert len(stream.read_from(later[0])) < n


async def test_the_search_is_logarithmic() -> None:
    stream = FakeStream(9, attempts=1, chunks_per_attempt=2000)
    stream.probes = 0
    await find_tail_start(stream.probe, stream.first_seq, stream.chunks[-1], 100)
    assert stream.probes <= 40  # ~log2 of the sequence range, not the 2000 chunks


async def test_line_numbers_may_start_anywhere_and_zero_lines() -> None:
    stream = FakeStream(5, attempts=2, chunks_per_attempt=5, first_line=1)
    last = stream.chunks[-1]
    assert await find_tail_start(stream.probe, stream.first_seq, last, 0) == last.seq + 1
    start = await find_tail_start(stream.probe, stream.first_seq, last, 10_000)
    assert start == stream.chunks[0].seq
