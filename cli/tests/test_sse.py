from __future__ import annotations

from fabrik_cli.sse import ServerSentEvent, SseParser, parse_events


def test_events_comments_multiline_data_and_ids() -> None:
    lines = [
        ": keep-alive",
        "",
        "event: line",
        "id: 1-0",
        "data: first",
        "data:  second",  # one leading space is removed, the other kept
        "",
        "data: no name\r",
        "",
        "retry: 3000",
        "event: end",
        "",
        "data: unterminated",
    ]
    parser = SseParser()
    events = list(parse_events(lines, parser))
    assert events == [
        ServerSentEvent(event="line", data="first\n second", id="1-0"),
        ServerSentEvent(event="message", data="no name", id="1-0"),
        ServerSentEvent(event="end", data="", id="1-0", retry_ms=3000),
    ]
    assert parser.last_event_id == "1-0"


def test_blank_lines_alone_dispatch_nothing() -> None:
    assert list(parse_events(["", "", ": x", ""])) == []


def test_unknown_fields_are_ignored() -> None:
    assert list(parse_events(["foo: bar", "data: x", ""])) == [ServerSentEvent(event="message", data="x")]
