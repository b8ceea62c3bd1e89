"""The offline `echo` provider: answers with the last user message, in the endpoint's wire format.

Used when no provider is configured, so a demo run completes without the internet. Streamed
and not, with usage counted by the offline tokenizer (echo's own figures, so not estimates)
and priced by the `echo` entry of the price file (0). A request whose last user message
starts with `tool:` (e.g. `tool: get_weather {"city": "Paris"}`) and that offers that tool is
answered with a tool call instead, so agent loops can be exercised offline.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, ClassVar

import msgspec

from fabrik_common.ids import new_ulid
from fabrik_llm_proxy.providers.base import Provider, UpstreamRequest
from fabrik_llm_proxy.tokens import TokenCounter, estimate_prompt_tokens, last_user_text
from fabrik_llm_proxy.wire import ALL_ENDPOINTS, Endpoint

_encode = msgspec.json.Encoder().encode
CHUNK_WORDS = 4


def _words(text: str) -> list[str]:
    """The text in pieces of a few words (whitespace kept, so the pieces join back exactly)."""
    if not text:
        return []
    pieces: list[str] = []
    current: list[str] = []
    count = 0
    for i, part in enumerate(text.split(" ")):
        current.append(part if i == 0 else " " + part)
        count += 1
        if count == CHUNK_WORDS:
            pieces.append("".join(current))
            current, count = [], 0
    if current:
        pieces.append("".join(current))
    return pieces


def _tool_call(payload: dict[str, Any], text: str) -> tuple[str, str] | None:
    if not text.startswith("tool:"):
        return None
    name, _, args = text[5:].strip().partition(" ")
    offered: set[str] = set()
    for tool in payload.get("tools") or ():
        if isinstance(tool, dict):
            fn = tool.get("function")
            offered.add(str(fn.get("name") if isinstance(fn, dict) else tool.get("name")))
    if name not in offered:
        return None
    return name, args.strip() or "{}"


class EchoResponse:
    """An in-process stand-in for an upstream HTTP response."""

    def __init__(self, body: bytes | None = None, chunks: list[bytes] | None = None) -> None:
        self.status = 200
        self._body = body or b""
        self._chunks = list(reversed(chunks or []))

    def header(self, name: str) -> str | None:
        return None

    def passthrough_headers(self) -> list[tuple[bytes, bytes]]:
        return []

    async def read(self) -> bytes:
        return self._body

    async def next_chunk(self) -> bytes:
        return self._chunks.pop() if self._chunks else b""

    def close(self) -> None:
        self._chunks.clear()


class EchoProvider(Provider):
    name: ClassVar[str] = "echo"
    endpoints: ClassVar[frozenset[Endpoint]] = ALL_ENDPOINTS
    in_process: ClassVar[bool] = True

    def __init__(
        self,
        base_url: str = "",
        headers: Mapping[str, str] | None = None,
        counter: TokenCounter | None = None,
    ) -> None:
        super().__init__(base_url, headers)
        self.counter = counter or TokenCounter()

    def prepare_payload(self, endpoint: Endpoint, payload: dict[str, Any], upstream_model: str) -> None:
        payload["model"] = upstream_model

    def build(
        self,
        endpoint: Endpoint,
        payload: dict[str, Any],
        key: str | None,
        client_headers: Mapping[str, str],
    ) -> UpstreamRequest:
        raise NotImplementedError("echo answers in-process")

    def respond(self, endpoint: Endpoint, payload: dict[str, Any], include_usage: bool) -> EchoResponse:
        text = last_user_text(payload)
        model = str(payload.get("model") or "echo")
        stream = payload.get("stream") is True
        tool = _tool_call(payload, text)
        answer = "" if tool else text
        input_tokens = estimate_prompt_tokens(self.counter, payload)
        output_tokens = self.counter.count(answer) + (self.counter.count(tool[0] + tool[1]) if tool else 0)
        if endpoint == "chat.completions":
            if stream:
                return EchoResponse(
                    chunks=_chat_stream(model, answer, tool, input_tokens, output_tokens, include_usage)
                )
            return EchoResponse(_chat_body(model, answer, tool, input_tokens, output_tokens))
        if endpoint == "responses":
            if stream:
                return EchoResponse(
                    chunks=_responses_stream(model, answer, tool, input_tokens, output_tokens)
                )
            return EchoResponse(_encode(_response_obj(model, answer, tool, input_tokens, output_tokens)))
        if stream:
            return EchoResponse(chunks=_messages_stream(model, answer, tool, input_tokens, output_tokens))
        return EchoResponse(_messages_body(model, answer, tool, input_tokens, output_tokens))


# --- chat completions ------------------------------------------------------------------------


def _chat_usage(input_tokens: int, output_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": input_tokens,
        "completion_tokens": output_tokens,
        "total_tokens": input_tokens + output_tokens,
        "prompt_tokens_details": {"cached_tokens": 0},
    }


def _chat_body(
    model: str, answer: str, tool: tuple[str, str] | None, input_tokens: int, output_tokens: int
) -> bytes:
    message: dict[str, Any] = {"role": "assistant", "content": answer if not tool else None, "refusal": None}
    if tool:
        message["tool_calls"] = [
            {
                "id": f"call_{new_ulid()}",
                "type": "function",
                "function": {"name": tool[0], "arguments": tool[1]},
            }
        ]
    return _encode(
        {
            "id": f"chatcmpl-{new_ulid()}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": "tool_calls" if tool else "stop",
                }
            ],
            "usage": _chat_usage(input_tokens, output_tokens),
        }
    )


def _sse(data: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + _encode(data) + b"\n\n"


def _chat_stream(
    model: str,
    answer: str,
    tool: tuple[str, str] | None,
    input_tokens: int,
    output_tokens: int,
    include_usage: bool,
) -> list[bytes]:
    base = {"id": f"chatcmpl-{new_ulid()}", "object": "chat.completion.chunk", "created": int(time.time())}
    base["model"] = model

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        body = {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        if include_usage:
            body["usage"] = None
        return _sse(body)

    chunks = [chunk({"role": "assistant", "content": ""})]
    if tool:
        call = {"index": 0, "id": f"call_{new_ulid()}", "type": "function"}
        chunks.append(chunk({"tool_calls": [{**call, "function": {"name": tool[0], "arguments": ""}}]}))
        chunks.append(chunk({"tool_calls": [{"index": 0, "function": {"arguments": tool[1]}}]}))
    chunks.extend(chunk({"content": piece}) for piece in _words(answer))
    chunks.append(chunk({}, "tool_calls" if tool else "stop"))
    if include_usage:
        chunks.append(_sse({**base, "choices": [], "usage": _chat_usage(input_tokens, output_tokens)}))
    chunks.append(b"data: [DONE]\n\n")
    return chunks


# --- Responses -------------------------------------------------------------------------------


def _output_items(answer: str, tool: tuple[str, str] | None, msg_id: str) -> list[dict[str, Any]]:
    if tool:
        return [
            {
                "type": "function_call",
                "id": f"fc_{msg_id}",
                "call_id": f"call_{msg_id}",
                "name": tool[0],
                "arguments": tool[1],
                "status": "completed",
            }
        ]
    return [
        {
            "type": "message",
            "id": f"msg_{msg_id}",
            "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": answer, "annotations": []}],
        }
    ]


def _response_obj(
    model: str,
    answer: str,
    tool: tuple[str, str] | None,
    input_tokens: int,
    output_tokens: int,
    *,
    resp_id: str | None = None,
    msg_id: str | None = None,
    status: str = "completed",
) -> dict[str, Any]:
    msg_id = msg_id or new_ulid()
    done = status == "completed"
    return {
        "id": resp_id or f"resp_{new_ulid()}",
        "object": "response",
        "created_at": int(time.time()),
        "status": status,
        "model": model,
        "output": _output_items(answer, tool, msg_id) if done else [],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": {
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "total_tokens": input_tokens + output_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": 0},
        }
        if done
        else None,
    }


def _responses_stream(
    model: str, answer: str, tool: tuple[str, str] | None, input_tokens: int, output_tokens: int
) -> list[bytes]:
    resp_id, msg_id = f"resp_{new_ulid()}", new_ulid()
    seq = 0
    events: list[bytes] = []

    def emit(kind: str, **fields: Any) -> None:
        nonlocal seq
        events.append(_sse({"type": kind, "sequence_number": seq, **fields}, kind))
        seq += 1

    pending = _response_obj(model, answer, tool, 0, 0, resp_id=resp_id, msg_id=msg_id, status="in_progress")
    emit("response.created", response=pending)
    emit("response.in_progress", response=pending)
    item = _output_items(answer, tool, msg_id)[0]
    if tool:
        emit(
            "response.output_item.added",
            output_index=0,
            item={**item, "arguments": "", "status": "in_progress"},
        )
        emit("response.function_call_arguments.delta", item_id=item["id"], output_index=0, delta=tool[1])
        emit("response.function_call_arguments.done", item_id=item["id"], output_index=0, arguments=tool[1])
        emit("response.output_item.done", output_index=0, item=item)
    else:
        emit(
            "response.output_item.added",
            output_index=0,
            item={**item, "status": "in_progress", "content": []},
        )
        part = {"type": "output_text", "text": "", "annotations": []}
        emit("response.content_part.added", item_id=item["id"], output_index=0, content_index=0, part=part)
        for piece in _words(answer):
            emit(
                "response.output_text.delta",
                item_id=item["id"],
                output_index=0,
                content_index=0,
                delta=piece,
                logprobs=[],
            )
        emit(
            "response.output_text.done",
            item_id=item["id"],
            output_index=0,
            content_index=0,
            text=answer,
            logprobs=[],
        )
        emit(
            "response.content_part.done",
            item_id=item["id"],
            output_index=0,
            content_index=0,
            part={**part, "text": answer},
        )
        emit("response.output_item.done", output_index=0, item=item)
    final = _response_obj(model, answer, tool, input_tokens, output_tokens, resp_id=resp_id, msg_id=msg_id)
    emit("response.completed", response=final)
    return events


# --- Anthropic messages ----------------------------------------------------------------------


def _messages_usage(input_tokens: int, output_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    }


def _content(answer: str, tool: tuple[str, str] | None) -> list[dict[str, Any]]:
    if tool:
        return [
            {
                "type": "tool_use",
                "id": f"toolu_{new_ulid()}",
                "name": tool[0],
                "input": msgspec.json.decode(tool[1]) if tool[1].startswith("{") else {},
            }
        ]
    return [{"type": "text", "text": answer}]


def _messages_body(
    model: str, answer: str, tool: tuple[str, str] | None, input_tokens: int, output_tokens: int
) -> bytes:
    return _encode(
        {
            "id": f"msg_{new_ulid()}",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": _content(answer, tool),
            "stop_reason": "tool_use" if tool else "end_turn",
            "stop_sequence": None,
            "usage": _messages_usage(input_tokens, output_tokens),
        }
    )


def _messages_stream(
    model: str, answer: str, tool: tuple[str, str] | None, input_tokens: int, output_tokens: int
) -> list[bytes]:
    message: dict[str, Any] = {
        "id": f"msg_{new_ulid()}",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": _messages_usage(input_tokens, 1),
    }
    events = [_sse({"type": "message_start", "message": message}, "message_start")]
    if tool:
        block = {**_content(answer, tool)[0], "input": {}}
        events.append(
            _sse({"type": "content_block_start", "index": 0, "content_block": block}, "content_block_start")
        )
        delta = {"type": "input_json_delta", "partial_json": tool[1]}
        events.append(
            _sse({"type": "content_block_delta", "index": 0, "delta": delta}, "content_block_delta")
        )
    else:
        block = {"type": "text", "text": ""}
        events.append(
            _sse({"type": "content_block_start", "index": 0, "content_block": block}, "content_block_start")
        )
        events.append(_sse({"type": "ping"}, "ping"))
        for piece in _words(answer):
            delta = {"type": "text_delta", "text": piece}
            events.append(
                _sse({"type": "content_block_delta", "index": 0, "delta": delta}, "content_block_delta")
            )
    events.append(_sse({"type": "content_block_stop", "index": 0}, "content_block_stop"))
    events.append(
        _sse(
            {
                "type": "message_delta",
                "delta": {"stop_reason": "tool_use" if tool else "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": output_tokens},
            },
            "message_delta",
        )
    )
    events.append(_sse({"type": "message_stop"}, "message_stop"))
    return events
