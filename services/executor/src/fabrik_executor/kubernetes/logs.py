"""Following the workload container's log through the API server, resumable from a cursor.

The log is read with `follow=true&timestamps=true`: every line starts with the kubelet's
RFC 3339 timestamp (nanoseconds). A `LogCursor` says what was consumed: the timestamp of the
last line and how many lines carried exactly that timestamp (one write of several lines gives
them all the same one). A reconnect — the connection dropped, or the executor restarted and
resumes from the cursor saved in the Job's `fabrik.sh/status` annotation — asks for the log
from a little before the cursor (`sinceSeconds`; the API has no `sinceTime` in this client) and
drops every line at or before it, so no line is lost and none is fed twice.

The logs API does not tell stdout from stderr: every line is reported as `stdout` (so
`::fabrik::` protocol lines are parsed from it, as the local backend does).
"""

from __future__ import annotations

import math
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import msgspec

_TS = re.compile(r"^(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})(?:\.(\d{1,9}))?(Z|[+-]\d{2}:\d{2})$")
MAX_LINE_BYTES = 64 * 1024
SINCE_MARGIN_SECONDS = 300


class LogCursor(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Where the log stands: `line` = the next line number to publish; `ts` (ns since the epoch)
    and `skip` = the timestamp of the last consumed log line and how many lines had it."""

    line: int = 0
    ts: int = 0
    skip: int = 0


def parse_timestamp_ns(text: str) -> int | None:
    """RFC 3339 with up to 9 fractional digits → nanoseconds since the epoch."""
    match = _TS.match(text)
    if match is None:
        return None
    whole, fraction, zone = match.groups()
    base = datetime.fromisoformat(whole + ("+00:00" if zone == "Z" else zone))
    nanos = int((fraction or "").ljust(9, "0")) if fraction else 0
    return int(base.timestamp()) * 1_000_000_000 + nanos


def format_timestamp_ns(ns: int) -> str:
    """Nanoseconds → RFC 3339 the way the kubelet writes it (trailing zeros of the fraction trimmed)."""
    seconds, nanos = divmod(ns, 1_000_000_000)
    base = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    fraction = f"{nanos:09d}".rstrip("0")
    return f"{base}.{fraction}Z" if fraction else f"{base}Z"


def ns_to_datetime(ns: int) -> datetime:
    return datetime.fromtimestamp(ns / 1_000_000_000, UTC)


def split_line(raw: str) -> tuple[int | None, str]:
    """`<timestamp> <text>` → (ns, text); a line without a timestamp → (None, line)."""
    stamp, sep, text = raw.partition(" ")
    ts = parse_timestamp_ns(stamp)
    if ts is None:
        return None, raw
    return ts, text if sep else ""


def since_seconds(cursor_ts: int, now: datetime) -> int | None:
    """The `sinceSeconds` that surely covers everything after `cursor_ts` (None: from the start)."""
    if cursor_ts <= 0:
        return None
    age = now.timestamp() - cursor_ts / 1_000_000_000
    return max(1, math.ceil(age) + SINCE_MARGIN_SECONDS)


class Deduper:
    """Drops lines at or before the cursor; tracks the cursor of what it let through."""

    def __init__(self, ts: int = 0, skip: int = 0) -> None:
        self.ts = ts
        self.skip = skip
        self._seen_at_ts = 0

    def reset_connection(self) -> None:
        self._seen_at_ts = 0

    def accept(self, ts: int | None) -> bool:
        if ts is None:
            return True
        if ts < self.ts:
            return False
        if ts == self.ts:
            self._seen_at_ts += 1
            if self._seen_at_ts <= self.skip:
                return False
            self.skip += 1
            return True
        self.ts = ts
        self.skip = 1
        self._seen_at_ts = 1
        return True


async def iter_lines(content: Any) -> AsyncIterator[str]:
    """Lines of an aiohttp response body, of any length (a line longer than 64 KiB is cut)."""
    buffer = b""
    async for chunk in content.iter_any():
        buffer += chunk
        while True:
            end = buffer.find(b"\n")
            if end < 0:
                if len(buffer) > MAX_LINE_BYTES:
                    yield buffer[:MAX_LINE_BYTES].decode("utf-8", errors="replace") + " [line cut]"
                    buffer = b""
                break
            line, buffer = buffer[:end], buffer[end + 1 :]
            if len(line) > MAX_LINE_BYTES:
                line = line[:MAX_LINE_BYTES] + b" [line cut]"
            yield line.rstrip(b"\r").decode("utf-8", errors="replace")
    if buffer:
        yield buffer.decode("utf-8", errors="replace")
