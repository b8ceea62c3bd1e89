"""A server-sent events parser (the WHATWG `text/event-stream` format), fed line by line.

Comment lines (`: keep-alive`) are skipped, `data:` lines of one event are joined with newlines, an
event is dispatched at a blank line, and the last `id:` seen is remembered so that a reconnect can
send it as `Last-Event-ID`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class ServerSentEvent:
    event: str
    data: str
    id: str | None = None
    retry_ms: int | None = None


class SseParser:
    """Turns lines (without their line terminators) into events."""

    def __init__(self) -> None:
        self.last_event_id: str | None = None
        self._event = ""
        self._data: list[str] = []
        self._retry: int | None = None

    def feed(self, line: str) -> ServerSentEvent | None:
        """One line; returns the event a blank line completes, if any."""
        line = line.rstrip("\r\n")
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self.last_event_id = value
        elif name == "retry" and value.isdigit():
            self._retry = int(value)
        return None

    def _dispatch(self) -> ServerSentEvent | None:
        # WHATWG drops an event without data lines; a named one (`event: end`) is kept here.
        if not self._data and not self._event:
            self._retry = None
            return None
        event = ServerSentEvent(
            event=self._event or "message",
            data="\n".join(self._data),
            id=self.last_event_id,
            retry_ms=self._retry,
        )
        self._event = ""
        self._data = []
        self._retry = None
        return event


def parse_events(lines: Iterable[str], parser: SseParser | None = None) -> Iterator[ServerSentEvent]:
    """Events of a stream of lines; an unterminated last event is not dispatched (as in browsers)."""
    parser = parser or SseParser()
    for line in lines:
        event = parser.feed(line)
        if event is not None:
            yield event
