"""Log timestamps, the cursor and de-duplication across reconnects."""

from __future__ import annotations

from datetime import UTC, datetime

from fabrik_executor.kubernetes.logs import (
    Deduper,
    format_timestamp_ns,
    parse_timestamp_ns,
    since_seconds,
    split_line,
)


def test_timestamps_round_trip_with_trimmed_fractions() -> None:
    for text in ("2025-06-01T12:00:00.123456789Z", "2025-06-01T12:00:00.1Z", "2025-06-01T12:00:00Z"):
        ns = parse_timestamp_ns(text)
        assert ns is not None
        assert format_timestamp_ns(ns) == text
    assert parse_timestamp_ns("2025-06-01T12:00:00.5Z") == parse_timestamp_ns(
        "2025-06-01T12:00:00.500000000Z"
    )
    assert parse_timestamp_ns("2025-06-01T14:00:00+02:00") == parse_timestamp_ns("2025-06-01T12:00:00Z")
    assert parse_timestamp_ns("not a time") is None


def test_split_line() -> None:
    ts, text = split_line("2025-06-01T12:00:00.1Z hello world ")
    assert ts is not None and text == "hello world "
    assert split_line("no timestamp here") == (None, "no timestamp here")
    assert split_line("2025-06-01T12:00:00Z")[1] == ""


def test_deduper_skips_what_was_consumed_even_with_equal_timestamps() -> None:
    d = Deduper()
    stream = [1, 2, 2, 2, 3]
    assert [d.accept(t) for t in stream] == [True] * 5
    assert (d.ts, d.skip) == (3, 1)
    # a reconnect re-reads from before the cursor: only what is new gets through
    again = Deduper(ts=2, skip=2)
    again.reset_connection()
    assert [again.accept(t) for t in [1, 2, 2, 2, 3, 3]] == [False, False, False, True, True, True]
    assert (again.ts, again.skip) == (3, 2)


def test_since_seconds_covers_the_cursor_with_a_margin() -> None:
    now = datetime(2025, 6, 1, 12, 0, 10, tzinfo=UTC)
    cursor = parse_timestamp_ns("2025-06-01T12:00:00Z")
    assert cursor is not None
    assert since_seconds(0, now) is None
    assert since_seconds(cursor, now) == 10 + 300
