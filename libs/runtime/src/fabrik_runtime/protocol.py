"""The `::fabrik::` line protocol a workload writes to stdout and the executor parses.

    ::fabrik::progress {"phase":"implement","task":"16:impl","finished":150,"total":192}
    ::fabrik::result {"status":"ok","summary":"..."}

One line, the kind, one space, a JSON object. Anything else on stdout is ordinary log output.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any, TextIO

PREFIX = "::fabrik::"
KINDS = frozenset({"progress", "result"})


@dataclass(frozen=True)
class ProtocolLine:
    kind: str
    data: dict[str, Any]


class ProtocolError(ValueError):
    """A line that starts with the prefix but is not a valid protocol line."""


def format_line(kind: str, data: dict[str, Any]) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown protocol line kind {kind!r}; expected one of {sorted(KINDS)}")
    return f"{PREFIX}{kind} {json.dumps(data, separators=(',', ':'), ensure_ascii=False)}"


def parse_line(line: str) -> ProtocolLine | None:
    """The protocol line in `line`, None for ordinary output; ProtocolError if it is malformed."""
    text = line.strip()
    if not text.startswith(PREFIX):
        return None
    kind, _, payload = text[len(PREFIX) :].partition(" ")
    if kind not in KINDS:
        raise ProtocolError(f"unknown protocol line kind {kind!r}")
    try:
        data = json.loads(payload)
    except json.JSONDecodeError as exc:
        raise ProtocolError(f"{kind} line is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ProtocolError(f"{kind} line must carry a JSON object")
    if kind == "progress":
        _check_progress(data)
    return ProtocolLine(kind, data)


def _check_progress(data: dict[str, Any]) -> None:
    for key in ("phase", "task", "message"):
        if key in data and data[key] is not None and not isinstance(data[key], str):
            raise ProtocolError(f"progress.{key} must be a string")
    for key in ("finished", "total"):
        value = data.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise ProtocolError(f"progress.{key} must be a non-negative integer")


def report_progress(
    *,
    phase: str | None = None,
    task: str | None = None,
    finished: int | None = None,
    total: int | None = None,
    message: str | None = None,
    out: TextIO | None = None,
) -> None:
    data = {
        k: v
        for k, v in {
            "phase": phase,
            "task": task,
            "finished": finished,
            "total": total,
            "message": message,
        }.items()
        if v is not None
    }
    _check_progress(data)
    _write(format_line("progress", data), out)


def report_result(result: dict[str, Any], out: TextIO | None = None) -> None:
    _write(format_line("result", result), out)


def _write(line: str, out: TextIO | None) -> None:
    stream = out or sys.stdout
    stream.write(line + "\n")
    stream.flush()
