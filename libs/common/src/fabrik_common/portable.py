"""Portable run documents: a run's history in a form that moves between installations.

A document holds what a run was (project, env, spec, labels), how it went (times, terminal state
and reason, attempts, tasks with their attempts) and what it said (its events), plus where it
came from. NDJSON files hold one document per line (`fabrik export`, `fabrik import`,
`POST /api/v1/imports/runs`). This module depends on nothing but msgspec so that the event
definitions can carry a document (`run.imported`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import Annotated, Any, Final, Literal

import msgspec

FORMAT_VERSION: Final = 1

_Ulid = Annotated[
    str, msgspec.Meta(pattern=r"^[0-7][0-9A-HJKMNP-TV-Z]{25}$", description="Run ULID (upper case)")
]
_Label = Annotated[
    str,
    msgspec.Meta(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=63, description="DNS-1123 label"),
]
_Time = Annotated[datetime, msgspec.Meta(tz=True)]
_NonNeg = Annotated[int, msgspec.Meta(ge=0)]
TerminalState = Literal["succeeded", "failed", "cancelled", "timed_out", "budget_exceeded"]


class PortableOrigin(msgspec.Struct, frozen=True, kw_only=True):
    """Where the run was first recorded: `fabrik` (its own id) or `smithers` (the source run id)."""

    system: Literal["fabrik", "smithers"]
    source_run_id: str
    source: str | None = None
    """The file or installation it was read from, for the record."""


class PortableRunAttempt(msgspec.Struct, frozen=True, kw_only=True):
    attempt: Annotated[int, msgspec.Meta(ge=1)]
    started_at: _Time | None = None
    finished_at: _Time | None = None
    outcome: TerminalState | None = None
    reason: str | None = None
    exit_code: int | None = None


class PortableTaskAttempt(msgspec.Struct, frozen=True, kw_only=True):
    attempt: _NonNeg
    state: str
    started_at: _Time | None = None
    finished_at: _Time | None = None
    error: Any = None


class PortableTask(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    iteration: _NonNeg = 0
    state: str
    label: str | None = None
    updated_at: _Time | None = None
    attempts: list[PortableTaskAttempt] = msgspec.field(default_factory=list)


class PortableEvent(msgspec.Struct, frozen=True, kw_only=True):
    seq: _NonNeg
    time: _Time | None = None
    type: str
    payload: Any = None


class PortableRun(msgspec.Struct, frozen=True, kw_only=True):
    """One run, finished: the unit of export and import."""

    format_version: Literal[1] = FORMAT_VERSION
    run_id: _Ulid
    project: _Label
    env: _Label
    spec: str | None = None
    spec_path: str | None = None
    labels: dict[str, str] = msgspec.field(default_factory=dict)
    requested_at: _Time
    started_at: _Time | None = None
    finished_at: _Time | None = None
    state: TerminalState
    reason: str | None = None
    message: str = ""
    attempts: list[PortableRunAttempt] = msgspec.field(default_factory=list)
    tasks: list[PortableTask] = msgspec.field(default_factory=list)
    events: list[PortableEvent] = msgspec.field(default_factory=list)
    origin: PortableOrigin


class LineError(ValueError):
    """A line of an NDJSON document that is not a valid portable run."""

    def __init__(self, line: int, field: str, rule: str) -> None:
        super().__init__(f"line {line}: {field}: {rule}")
        self.line = line
        self.field = field
        self.rule = rule


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(PortableRun)


def encode_line(run: PortableRun) -> bytes:
    """One NDJSON line (with its newline)."""
    return _encoder.encode(run) + b"\n"


def encode_ndjson(runs: Iterable[PortableRun]) -> bytes:
    return b"".join(encode_line(run) for run in runs)


def decode_line(data: bytes | str, line: int) -> PortableRun:
    """A document from one line; a `LineError` naming the line and the field otherwise."""
    try:
        run = _decoder.decode(data)
    except msgspec.ValidationError as exc:
        rule, _, where = str(exc).partition(" - at `")
        field = where.rstrip("`").removeprefix("$").removeprefix(".") or "$"
        raise LineError(line, field, rule) from None
    except msgspec.DecodeError as exc:
        raise LineError(line, "$", f"not JSON: {exc}") from None
    check(run, line)
    return run


def check(run: PortableRun, line: int = 0) -> None:
    """What the types cannot say: times in order, attempts numbered from 1."""
    if run.started_at is not None and run.started_at < run.requested_at:
        raise LineError(line, "started_at", "must not be before requested_at")
    if run.finished_at is not None:
        first = run.started_at or run.requested_at
        if run.finished_at < first:
            raise LineError(line, "finished_at", "must not be before started_at (or requested_at)")
    for index, attempt in enumerate(run.attempts):
        if attempt.attempt != index + 1:
            raise LineError(line, f"attempts[{index}].attempt", f"must be {index + 1} (numbered from 1)")


def iter_ndjson(lines: Iterable[bytes | str]) -> Iterator[tuple[int, bytes | str]]:
    """(line number, content) of the non-blank lines, numbered from 1."""
    for number, content in enumerate(lines, start=1):
        if content.strip():
            yield number, content


def decode_ndjson(data: bytes) -> list[PortableRun]:
    return [decode_line(content, number) for number, content in iter_ndjson(data.splitlines())]
