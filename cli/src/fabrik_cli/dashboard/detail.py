"""One run in the dashboard: its header, its lifecycle events and its log lines.

Events come from `GET /runs/{id}/events` and then from the live stream; log lines from
`GET /runs/{id}/logs?tail=` and then from the stream's `log.chunk` messages. Both sources
overlap at the switch-over, so events are kept once by `event_id` and log lines once by
`(attempt, line)`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime
from typing import Any

from fabrik_cli.dashboard.runs import as_int, event_body
from fabrik_cli.output import (
    NONE,
    format_cost,
    format_log_entry,
    format_progress,
    format_queue,
    format_state,
    format_time,
    format_tokens,
    parse_time,
    run_duration,
    text,
)

_EVENT_SKIP = frozenset(
    {
        "type",
        "event_id",
        "occurred_at",
        "schema_version",
        "run_id",
        "attempt",
        "params",
        "revision",
        "project",
    }
)


def header_pairs(run: Mapping[str, Any], now: datetime) -> list[tuple[str, str]]:
    """The run screen's header: state, reason, attempt, timings, cost and tokens."""
    pairs: list[tuple[str, str]] = [
        ("run", text(run.get("run_id"))),
        ("project", f"{text(run.get('project'))} / env {text(run.get('env'))}"),
        ("spec", text(run.get("spec_id"))),
        ("state", format_state(run)),
    ]
    if run.get("message"):
        pairs.append(("message", text(run.get("message"))))
    pairs.append(("attempt", text(run.get("attempt"))))
    if run.get("state") == "queued" or run.get("queue"):
        pairs.append(("queue", format_queue(run.get("queue"), now)))
    pairs += [
        ("created", format_time(run.get("created_at"), now)),
        ("started", format_time(run.get("started_at"), now)),
        ("finished", format_time(run.get("finished_at"), now)),
        ("duration", run_duration(run, now)),
        ("exit code", text(run.get("exit_code"))),
        ("cost", format_cost(run.get("cost_usd"))),
        ("tokens", format_tokens(run.get("tokens"))),
    ]
    if run.get("image_digest"):
        pairs.append(("image", text(run.get("image_digest"))))
    return pairs


def progress_text(run: Mapping[str, Any]) -> str:
    """`13/20  implement · step-14` (the bar is drawn apart)."""
    return format_progress(run.get("progress"), bar=False)


def progress_fraction(run: Mapping[str, Any]) -> tuple[int, int] | None:
    """`(finished, total)` when the run reports counts."""
    progress = run.get("progress")
    if not isinstance(progress, Mapping):
        return None
    finished, total = as_int(progress.get("finished")), as_int(progress.get("total"))
    if finished is None or not total:
        return None
    return finished, total


# --------------------------------------------------------------------------------------------
# Events


EVENT_COLUMNS: tuple[str, ...] = ("TIME", "TYPE", "ATTEMPT", "DETAILS")


def event_details(event: Mapping[str, Any]) -> str:
    """`queued -> starting, reason=...`, or the event's other fields as `key=value`."""
    fields = {k: v for k, v in event.items() if k not in _EVENT_SKIP and v not in (None, "", {}, [])}
    parts = []
    if "to_state" in fields:
        parts.append(f"{fields.pop('from_state', None) or '(new)'} -> {fields.pop('to_state')}")
    for key, value in fields.items():
        shown = json.dumps(value, separators=(",", ":")) if isinstance(value, Mapping | list) else value
        parts.append(f"{key}={shown}")
    return ", ".join(parts)


def event_row(item: Mapping[str, Any]) -> tuple[str, str, str, str]:
    """An item of `GET /events` (`{seq, type, event}`) or a stream message (`{cursor, type, event}`)."""
    event = event_body(item) or item
    when = parse_time(event.get("occurred_at"))
    return (
        when.astimezone().strftime("%H:%M:%S") if when else NONE,
        text(item.get("type") or event.get("type")),
        text(event.get("attempt")),
        event_details(event),
    )


LIFECYCLE_SKIP = frozenset({"run.progress"})
"""Not listed as events: progress has its own line (and would crowd out the rest)."""


class EventLog:
    """A run's lifecycle events, each once (progress reports are not kept: see `LIFECYCLE_SKIP`)."""

    def __init__(self) -> None:
        self.items: list[Mapping[str, Any]] = []
        self._ids: set[str] = set()

    def add(self, item: Mapping[str, Any]) -> bool:
        event = event_body(item) or item
        if (item.get("type") or event.get("type")) in LIFECYCLE_SKIP:
            return False
        event_id = event.get("event_id")
        if isinstance(event_id, str):
            if event_id in self._ids:
                return False
            self._ids.add(event_id)
        self.items.append(item)
        return True


# --------------------------------------------------------------------------------------------
# Logs


def chunk_lines(message: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """The lines of a `log.chunk` stream message, numbered as `GET /logs` numbers them."""
    chunk = event_body(message)
    if chunk is None:
        return
    attempt = as_int(chunk.get("attempt"))
    first = as_int(chunk.get("first_line"))
    lines = chunk.get("lines")
    if not isinstance(lines, list):
        return
    for index, line in enumerate(lines):
        if isinstance(line, Mapping):
            yield {
                **line,
                "attempt": attempt,
                "line": first + index if first is not None else None,
            }


class LogBuffer:
    """A run's log lines, each once, at most `limit` of them (the last ones)."""

    def __init__(self, limit: int = 10_000) -> None:
        self.limit = limit
        self.lines: list[Mapping[str, Any]] = []
        self._keys: set[tuple[int, int]] = set()

    def add(self, line: Mapping[str, Any]) -> bool:
        attempt, number = as_int(line.get("attempt")), as_int(line.get("line"))
        if attempt is not None and number is not None:
            if (attempt, number) in self._keys:
                return False
            self._keys.add((attempt, number))
        self.lines.append(line)
        if len(self.lines) > self.limit:
            del self.lines[: len(self.lines) - self.limit]
        return True

    def add_all(self, lines: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
        """The lines that were new, in order."""
        return [line for line in lines if self.add(line)]


def log_text(line: Mapping[str, Any], *, timestamps: bool = False) -> str:
    return format_log_entry(line, timestamps=timestamps)
