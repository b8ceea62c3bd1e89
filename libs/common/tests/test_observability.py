from __future__ import annotations

import io
import json
import logging

from fabrik_common.log import JsonFormatter
from fabrik_common.tracing import continue_trace, current_span, outgoing_traceparent, parse_traceparent


def test_traceparent_is_parsed_and_continued() -> None:
    incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    with continue_trace({"traceparent": incoming}) as span:
        assert span.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"
        assert span.span_id != "00f067aa0ba902b7"
        outgoing = parse_traceparent(outgoing_traceparent())
        assert outgoing is not None
        assert outgoing.trace_id == span.trace_id
        assert outgoing.span_id != span.span_id
    assert current_span() is None


def test_invalid_traceparent_starts_a_new_trace() -> None:
    for bad in ("", "garbage", "00-" + "0" * 32 + "-00f067aa0ba902b7-01", "01-abc-def-01"):
        assert parse_traceparent(bad) is None
        with continue_trace({"traceparent": bad}) as span:
            assert len(span.trace_id) == 32


def test_json_log_lines_carry_service_trace_and_extra_fields() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter("scheduler"))
    logger = logging.getLogger("test.json")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    with continue_trace({"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}) as span:
        logger.info("run dispatched", extra={"run_id": "01ABC", "obj": object()})
    entry = json.loads(stream.getvalue())
    assert entry["service"] == "scheduler"
    assert entry["msg"] == "run dispatched"
    assert entry["run_id"] == "01ABC"
    assert entry["trace_id"] == span.trace_id
    assert entry["span_id"] == span.span_id
    assert entry["obj"].startswith("<object")
