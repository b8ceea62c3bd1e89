"""From a workload's output file to events: log chunks, coalesced progress, results. No NATS here.

`OutputReader` reads the complete JSON lines the shim appended to `output.jsonl` from a byte offset.
`LogTailer` turns them into what the executor publishes, in order:

- `RunLogChunk`: consecutive lines, numbered from 0 per attempt (`first_line`), cut when 200 lines
  (or 512 KiB) are waiting or the oldest waiting line is 100 ms old. Each chunk carries the
  `Checkpoint` (byte offset, next line number) to persist once it is published, so a restarted
  executor resumes exactly after the last published line.
- `RunProgress`: `::fabrik::progress` lines of stdout, merged field by field into the run's current
  progress and coalesced by `ProgressCoalescer`: at most one event per `min_interval` (0.5 s, so
  at most 2 per second); an update inside the interval is kept and sent when the interval ends,
  and `flush()` sends the latest state before the attempt's end is reported.
- `RunResultReported`: each `::fabrik::result` line, at once.

A malformed `::fabrik::` line never fails the attempt: it stays in the log and a `system` line
after it says why it was ignored.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import msgspec

from fabrik_common.events import Event, LogLine, RunLogChunk, RunProgress, RunResultReported
from fabrik_common.ids import utcnow
from fabrik_runtime.protocol import ProtocolError, parse_line

PROGRESS_FIELDS = ("phase", "task", "finished", "total", "message")


@dataclass(frozen=True)
class Checkpoint:
    """Where the executor is in output.jsonl: the byte offset after the last published line."""

    offset: int
    next_line: int


@dataclass(frozen=True)
class Emission:
    """An event to publish; once published, persist `checkpoint` (if any)."""

    event: Event
    checkpoint: Checkpoint | None = None


class _Record(msgspec.Struct):
    ts: datetime
    stream: str
    text: str


_record_decoder = msgspec.json.Decoder(_Record)


class OutputReader:
    """Complete lines of output.jsonl from a byte offset; a partial last line waits for its newline."""

    def __init__(self, path: Path, offset: int = 0) -> None:
        self.path = path
        self.offset = offset
        self._file: IO[bytes] | None = None

    def read(self, max_bytes: int = 1 << 20) -> list[tuple[int, LogLine]]:
        """Lines not read yet, each with the byte offset just after it."""
        if self._file is None:
            try:
                self._file = self.path.open("rb")
            except FileNotFoundError:
                return []
        self._file.seek(self.offset)
        data = self._file.read(max_bytes)
        end = data.rfind(b"\n")
        if end < 0:
            if len(data) >= max_bytes:  # one record larger than max_bytes: take it whole
                data += self._file.readline()
                end = data.rfind(b"\n")
            if end < 0:
                return []
        lines: list[tuple[int, LogLine]] = []
        position = self.offset
        for raw in data[: end + 1].splitlines(keepends=True):
            position += len(raw)
            lines.append((position, _decode_record(raw)))
        self.offset = position
        return lines

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _decode_record(raw: bytes) -> LogLine:
    try:
        record = _record_decoder.decode(raw)
    except msgspec.DecodeError:
        text = raw.decode("utf-8", errors="replace").rstrip("\n")
        return LogLine(ts=utcnow(), stream="system", text=f"unreadable output record: {text[:200]}")
    stream = record.stream if record.stream in ("stdout", "stderr", "system") else "system"
    return LogLine(ts=record.ts, stream=stream, text=record.text)  # type: ignore[arg-type]


class ProgressCoalescer:
    """Keeps the latest progress and lets out at most one update per `min_interval` seconds."""

    def __init__(
        self,
        min_interval: float = 0.5,
        *,
        state: dict[str, Any] | None = None,
        pending: bool = False,
    ) -> None:
        self.min_interval = min_interval
        self.state: dict[str, Any] = dict(state or {})
        self.pending = pending
        self._last_emit: float | None = None

    def update(self, data: dict[str, Any], now: float) -> dict[str, Any] | None:
        """Merge an update; the state to publish now, or None when it has to wait."""
        for key in PROGRESS_FIELDS:
            if key in data and data[key] is not None:
                self.state[key] = data[key]
        self.pending = True
        return self.due(now)

    def due(self, now: float) -> dict[str, Any] | None:
        if not self.pending:
            return None
        if self._last_emit is not None and now - self._last_emit < self.min_interval:
            return None
        self._last_emit = now
        self.pending = False
        return dict(self.state)

    def flush(self) -> dict[str, Any] | None:
        """The latest state if it has not been let out yet (before the attempt's end is reported)."""
        if not self.pending:
            return None
        self.pending = False
        return dict(self.state)


@dataclass
class _Pending:
    line: LogLine
    end_offset: int
    size: int
    arrived: float


@dataclass
class LogTailer:
    run_id: str
    attempt: int
    next_line: int = 0
    flush_interval: float = 0.1
    max_lines: int = 200
    max_bytes: int = 512 * 1024
    progress: ProgressCoalescer = field(default_factory=ProgressCoalescer)
    clock: Callable[[], float] = time.monotonic
    _pending: list[_Pending] = field(default_factory=list)
    _pending_since: float | None = None
    _pending_bytes: int = 0

    def feed(self, line: LogLine, end_offset: int) -> list[Emission]:
        """Take one line of output; what must be published at once (results, progress)."""
        now = self.clock()
        self._append(line, end_offset, now)
        if line.stream != "stdout":
            return []
        try:
            parsed = parse_line(line.text)
        except ProtocolError as exc:
            self._append(
                LogLine(ts=line.ts, stream="system", text=f"malformed ::fabrik:: line ignored: {exc}"),
                end_offset,
                now,
            )
            return []
        if parsed is None:
            return []
        if parsed.kind == "result":
            return [Emission(RunResultReported(run_id=self.run_id, attempt=self.attempt, result=parsed.data))]
        state = self.progress.update(parsed.data, now)
        return [Emission(self._progress_event(state))] if state is not None else []

    def poll(self) -> list[Emission]:
        """Chunks and progress whose time has come."""
        now = self.clock()
        out: list[Emission] = []
        while self._pending and (
            len(self._pending) >= self.max_lines
            or self._pending_bytes >= self.max_bytes
            or (self._pending_since is not None and now - self._pending_since >= self.flush_interval)
        ):
            out.append(self._cut())
        state = self.progress.due(now)
        if state is not None:
            out.append(Emission(self._progress_event(state)))
        return out

    def flush(self) -> list[Emission]:
        """Everything still waiting: all lines, then the latest progress."""
        out: list[Emission] = []
        while self._pending:
            out.append(self._cut())
        state = self.progress.flush()
        if state is not None:
            out.append(Emission(self._progress_event(state)))
        return out

    @property
    def has_pending_lines(self) -> bool:
        return bool(self._pending)

    def _append(self, line: LogLine, end_offset: int, now: float) -> None:
        size = len(line.text) + 64
        if not self._pending:
            self._pending_since = now
        self._pending.append(_Pending(line, end_offset, size, now))
        self._pending_bytes += size

    def _cut(self) -> Emission:
        count = 0
        size = 0
        while count < len(self._pending) and (
            count == 0 or (count < self.max_lines and size < self.max_bytes)
        ):
            size += self._pending[count].size
            count += 1
        # Never split the lines of one output record (a line and the system note about it):
        # the checkpoint is a byte offset, and both belong to the same one.
        while (
            count < len(self._pending)
            and self._pending[count].end_offset == self._pending[count - 1].end_offset
        ):
            size += self._pending[count].size
            count += 1
        taken, self._pending = self._pending[:count], self._pending[count:]
        self._pending_bytes -= size
        self._pending_since = self._pending[0].arrived if self._pending else None
        chunk = RunLogChunk(
            run_id=self.run_id,
            attempt=self.attempt,
            first_line=self.next_line,
            lines=tuple(p.line for p in taken),
        )
        self.next_line += len(taken)
        return Emission(chunk, Checkpoint(offset=taken[-1].end_offset, next_line=self.next_line))

    def _progress_event(self, state: dict[str, Any]) -> RunProgress:
        return RunProgress(
            run_id=self.run_id,
            attempt=self.attempt,
            phase=state.get("phase"),
            task=state.get("task"),
            finished=state.get("finished"),
            total=state.get("total"),
            message=state.get("message"),
        )
