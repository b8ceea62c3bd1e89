"""SSE trackers: events forwarded whole and unchanged, usage learned on the way."""

from __future__ import annotations

import json

from fabrik_llm_proxy.providers.echo import EchoProvider
from fabrik_llm_proxy.streaming import ChatTracker, MessagesTracker, ResponsesTracker, tracker_for
from fabrik_llm_proxy.tokens import TokenCounter
from fabrik_llm_proxy.usage import usage_from_body
from fabrik_llm_proxy.wire import stream_error_event


def sse(data: object, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data)}\n\n".encode()


CHAT = [
    sse({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}], "usage": None}),
    sse({"choices": [{"index": 0, "delta": {"content": "Hello"}}], "usage": None}),
    sse({"choices": [{"index": 0, "delta": {"content": " world"}}], "usage": None}),
    sse(
        {
            "choices": [],
            "usage": {
                "prompt_tokens": 12,
                "completion_tokens": 2,
                "prompt_tokens_details": {"cached_tokens": 4},
            },
        }
    ),
    b"data: [DONE]\n\n",
]


def test_chat_events_pass_whole_whatever_the_chunking() -> None:
    raw = b"".join(CHAT)
    for size in (1, 3, 7, 64, len(raw)):
        tracker = ChatTracker(client_wants_usage=True)
        out = b"".join(tracker.feed(raw[i : i + size]) for i in range(0, len(raw), size))
        assert out == raw
        assert tracker.done and tracker.usage_final and tracker.pending == b""
        assert tracker.usage is not None
        assert (tracker.usage.input_tokens, tracker.usage.cache_read_tokens, tracker.usage.output_tokens) == (
            8,
            4,
            2,
        )
        assert tracker.output_text == "Hello world"


def test_the_usage_chunk_the_proxy_asked_for_is_dropped_for_clients_that_did_not() -> None:
    tracker = ChatTracker(client_wants_usage=False)
    out = tracker.feed(b"".join(CHAT))
    assert b'"usage": {' not in out and out.endswith(b"data: [DONE]\n\n")
    assert tracker.usage is not None and tracker.usage.output_tokens == 2


def test_crlf_streams_are_understood() -> None:
    tracker = ChatTracker(client_wants_usage=True)
    raw = b"".join(CHAT).replace(b"\n", b"\r\n")
    out = b"".join(tracker.feed(raw[i : i + 5]) for i in range(0, len(raw), 5))
    assert tracker.done and out == b"".join(CHAT)


def test_an_incomplete_event_is_held_back() -> None:
    tracker = ChatTracker(client_wants_usage=True)
    assert tracker.feed(CHAT[1][:-1]) == b""
    assert tracker.pending == CHAT[1][:-1]
    assert tracker.feed(b"\n") == CHAT[1]


def test_anthropic_usage_from_message_start_and_message_delta() -> None:
    tracker = MessagesTracker()
    start = {
        "type": "message_start",
        "message": {
            "usage": {
                "input_tokens": 30,
                "output_tokens": 1,
                "cache_read_input_tokens": 7,
                "cache_creation_input_tokens": 3,
            }
        },
    }
    tracker.feed(sse(start, "message_start"))
    assert tracker.usage is not None and not tracker.usage_final
    delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "hi"}}
    tracker.feed(sse(delta, "content_block_delta"))
    tracker.feed(sse({"type": "message_delta", "usage": {"output_tokens": 9}}, "message_delta"))
    tracker.feed(sse({"type": "message_stop"}, "message_stop"))
    u = tracker.usage
    assert (u.input_tokens, u.output_tokens, u.cache_read_tokens, u.cache_write_tokens) == (30, 9, 7, 3)
    assert tracker.done and tracker.usage_final and tracker.output_text == "hi"


def test_responses_usage_and_sequence_numbers() -> None:
    tracker = ResponsesTracker()
    tracker.feed(sse({"type": "response.output_text.delta", "sequence_number": 3, "delta": "a"}, "x"))
    assert not tracker.done and tracker.sequence_number == 3
    done = {
        "type": "response.completed",
        "sequence_number": 4,
        "response": {
            "usage": {"input_tokens": 10, "output_tokens": 5, "input_tokens_details": {"cached_tokens": 2}}
        },
    }
    tracker.feed(sse(done, "response.completed"))
    assert tracker.done and tracker.usage is not None and tracker.usage.input_tokens == 8


def test_error_events_in_each_format() -> None:
    chat = stream_error_event("chat.completions", "upstream", "broke")
    assert json.loads(chat[len(b"data: ") :])["error"]["message"] == "broke"
    resp = stream_error_event("responses", "upstream", "broke", 7)
    assert resp.startswith(b"event: error\n") and json.loads(resp.split(b"data: ")[1])["sequence_number"] == 7
    msg = stream_error_event("messages", "upstream", "broke")
    assert json.loads(msg.split(b"data: ")[1]) == {
        "type": "error",
        "error": {"type": "api_error", "message": "broke"},
    }


async def test_echo_streams_parse_back_to_their_own_usage() -> None:
    counter = TokenCounter()
    counter.load()
    echo = EchoProvider(counter=counter)
    payloads = {
        "chat.completions": {
            "model": "m",
            "stream": True,
            "messages": [{"role": "user", "content": "one two three"}],
        },
        "responses": {"model": "m", "stream": True, "input": "one two three"},
        "messages": {
            "model": "m",
            "stream": True,
            "max_tokens": 5,
            "messages": [{"role": "user", "content": "one two three"}],
        },
    }
    for endpoint, payload in payloads.items():
        resp = echo.respond(endpoint, payload, include_usage=True)  # type: ignore[arg-type]
        tracker = tracker_for(endpoint, client_wants_usage=False)  # type: ignore[arg-type]
        while chunk := await resp.next_chunk():
            tracker.feed(chunk)
        assert tracker.done and tracker.usage_final and tracker.usage is not None, endpoint
        assert tracker.usage.output_tokens == 3 and tracker.output_text.strip() == "one two three"
        body = await echo.respond(endpoint, {**payload, "stream": False}, include_usage=True).read()  # type: ignore[arg-type]
        usage = usage_from_body(endpoint, body)  # type: ignore[arg-type]
        assert usage is not None and usage.output_tokens == 3
