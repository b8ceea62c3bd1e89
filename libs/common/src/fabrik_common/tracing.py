"""W3C trace context carried through NATS headers and HTTP, kept in a context variable."""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

TRACEPARENT = "traceparent"
_TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


@dataclass(frozen=True)
class SpanContext:
    trace_id: str
    span_id: str
    flags: str = "01"

    def traceparent(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{self.flags}"

    def child(self) -> SpanContext:
        return SpanContext(self.trace_id, secrets.token_hex(8), self.flags)


_current: ContextVar[SpanContext | None] = ContextVar("fabrik_span", default=None)


def current_span() -> SpanContext | None:
    return _current.get()


def new_root() -> SpanContext:
    return SpanContext(secrets.token_hex(16), secrets.token_hex(8))


def parse_traceparent(value: str | None) -> SpanContext | None:
    if not value:
        return None
    match = _TRACEPARENT.match(value.strip().lower())
    if not match or set(match.group(1)) == {"0"} or set(match.group(2)) == {"0"}:
        return None
    return SpanContext(match.group(1), match.group(2), match.group(3))


def outgoing_traceparent() -> str:
    """The header value for a message or request sent now: a child of the current span."""
    span = current_span()
    return (span.child() if span else new_root()).traceparent()


@contextmanager
def continue_trace(headers: Mapping[str, str] | None) -> Iterator[SpanContext]:
    """Run a block as a new span of the trace found in `headers` (or of a new trace)."""
    parent = parse_traceparent((headers or {}).get(TRACEPARENT))
    span = parent.child() if parent else new_root()
    token = _current.set(span)
    try:
        yield span
    finally:
        _current.reset(token)
