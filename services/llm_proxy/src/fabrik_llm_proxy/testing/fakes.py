"""Fake upstream providers for tests and benchmarks, speaking OpenAI's and Anthropic's real wire formats.

`FakeUpstream` serves `/v1/chat/completions`, `/v1/responses` and `/v1/messages` on 127.0.0.1
(a free port), written from the providers' API references independently of the proxy's own
`echo` provider. Every answer bills usage (recorded in `ledger`), streamed answers in the real
event sequences (usage in the last chat chunk only when `stream_options.include_usage` is set,
`response.completed`, `message_start` + `message_delta`). A request offering tools gets a
tool call. Faults are scripted per request with `script(...)`: a status with an optional
`Retry-After`, a delay, or a stream that breaks after some events. Keys not in `valid_keys`
get a 401 in the provider's format. `Blackhole` is an address whose TCP connect never
completes (a listening socket whose accept queue is full), for connect timeouts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

TOOL_ARGUMENTS = '{"city": "Paris", "unit": "celsius"}'
OPENAI_CACHED_TOKENS = 2


@dataclass
class Fault:
    status: int | None = None
    retry_after: str | None = None
    delay: float = 0.0
    break_after_events: int | None = None
    no_usage: bool = False
    event_delay: float = 0.0


@dataclass
class Billed:
    path: str
    key: str
    model: str
    stream: bool
    input_tokens: int
    output_tokens: int
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    complete: bool = True


@dataclass
class Seen:
    path: str
    key: str
    model: str
    status: int
    body: dict[str, Any] = field(repr=False)


def _words(text: str) -> int:
    return len(text.split())


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def _last_user(body: dict[str, Any]) -> str:
    for message in reversed(body.get("messages") or []):
        if message.get("role") == "user":
            return _text(message.get("content"))
    inp = body.get("input")
    if isinstance(inp, str):
        return inp
    if isinstance(inp, list) and inp:
        return _text(inp[-1].get("content"))
    return ""


def _prompt_words(body: dict[str, Any]) -> int:
    total = _words(_text(body.get("system"))) + _words(str(body.get("instructions") or ""))
    for message in body.get("messages") or []:
        total += _words(_text(message.get("content")))
    inp = body.get("input")
    if isinstance(inp, str):
        total += _words(inp)
    elif isinstance(inp, list):
        total += sum(_words(_text(i.get("content"))) for i in inp if isinstance(i, dict))
    return total


def _sse(data: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data)}\n\n".encode()


class FakeUpstream:
    def __init__(self, *, valid_keys: set[str] | None = None, name: str = "fake", delay: float = 0.0) -> None:
        self.valid_keys = valid_keys  # None: any key (or none) is accepted
        self.name = name
        self.delay = delay
        self.faults: deque[Fault] = deque()
        self.ledger: list[Billed] = []
        self.seen: list[Seen] = []
        self.no_usage = False
        self._runner: web.AppRunner | None = None
        self.port = 0
        self.record = True

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> FakeUpstream:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/responses", self._responses)
        app.router.add_post("/v1/messages", self._messages)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def openai_base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def anthropic_base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def script(self, *faults: Fault) -> None:
        self.faults.extend(faults)

    def billed(self, path: str | None = None) -> list[Billed]:
        return [b for b in self.ledger if path is None or b.path == path]

    # -- common -----------------------------------------------------------------------------

    async def _begin(
        self, request: web.Request, anthropic: bool
    ) -> tuple[dict[str, Any], str, Fault] | web.Response:
        body = await request.json()
        if anthropic:
            key = request.headers.get("x-api-key", "")
        else:
            auth = request.headers.get("Authorization", "")
            key = auth.removeprefix("Bearer ").strip()
        fault = self.faults.popleft() if self.faults else Fault()
        delay = fault.delay or self.delay
        if delay:
            await asyncio.sleep(delay)
        status = 200
        response: web.Response | None = None
        if self.valid_keys is not None and key not in self.valid_keys:
            status = 401
            response = self._error(anthropic, 401, "authentication_error", "invalid x-api-key")
        elif fault.status is not None:
            status = fault.status
            kind = {429: "rate_limit_error", 529: "overloaded_error"}.get(status, "api_error")
            if status == 400:
                kind = "invalid_request_error"
            response = self._error(anthropic, status, kind, f"fake upstream says {status}")
            if fault.retry_after is not None:
                response.headers["Retry-After"] = fault.retry_after
        if self.record:
            self.seen.append(Seen(request.path, key, str(body.get("model")), status, body))
        if response is not None:
            return response
        return body, key, fault

    def _error(self, anthropic: bool, status: int, kind: str, message: str) -> web.Response:
        if anthropic:
            data: dict[str, Any] = {"type": "error", "error": {"type": kind, "message": message}}
        else:
            data = {"error": {"message": message, "type": kind, "param": None, "code": None}}
        return web.json_response(data, status=status)

    def _bill(self, request: web.Request, key: str, body: dict[str, Any], billed: Billed) -> None:
        if self.record:
            self.ledger.append(billed)

    async def _stream(self, request: web.Request, events: list[bytes], fault: Fault) -> web.StreamResponse:
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "x-request-id": f"req_{self.name}"}
        )
        await resp.prepare(request)
        try:
            for i, event in enumerate(events):
                if fault.break_after_events is not None and i >= fault.break_after_events:
                    # Cut the connection without finishing the chunked body: a mid-stream disconnect.
                    assert request.transport is not None
                    request.transport.abort()
                    return resp
                await resp.write(event)
                if fault.event_delay:
                    await asyncio.sleep(fault.event_delay)
            await resp.write_eof()
        except ConnectionResetError:
            pass  # the proxy went away (its client disconnected): nothing more to send
        return resp

    # -- OpenAI chat completions --------------------------------------------------------------

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        begun = await self._begin(request, anthropic=False)
        if isinstance(begun, web.Response):
            return begun
        body, key, fault = begun
        model = str(body.get("model"))
        tools = body.get("tools") or []
        answer = f"fake answer: {_last_user(body)}"
        prompt = _prompt_words(body) + 10
        output = 7 if tools else _words(answer)
        stream = body.get("stream") is True
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        no_usage = fault.no_usage or self.no_usage
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": output,
            "total_tokens": prompt + output,
            "prompt_tokens_details": {"cached_tokens": OPENAI_CACHED_TOKENS},
        }
        complete = fault.break_after_events is None
        bills_usage = not stream or (include_usage and not no_usage)
        self._bill(
            request,
            key,
            body,
            Billed(
                request.path,
                key,
                model,
                stream,
                prompt - OPENAI_CACHED_TOKENS,
                output,
                OPENAI_CACHED_TOKENS,
                0,
                complete and bills_usage,
            ),
        )
        created = int(time.time())
        if not stream:
            message: dict[str, Any] = {"role": "assistant", "content": None if tools else answer}
            if tools:
                message["tool_calls"] = [
                    {
                        "id": "call_fake1",
                        "type": "function",
                        "function": {"name": tools[0]["function"]["name"], "arguments": TOOL_ARGUMENTS},
                    }
                ]
            return web.json_response(
                {
                    "id": "chatcmpl-fake",
                    "object": "chat.completion",
                    "created": created,
                    "model": model,
                    "choices": [
                        {"index": 0, "message": message, "finish_reason": "tool_calls" if tools else "stop"}
                    ],
                    "usage": usage,
                },
                headers={"x-request-id": f"req_{self.name}"},
            )
        base = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": created, "model": model}

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            data: dict[str, Any] = {
                **base,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
            if include_usage and not no_usage:
                data["usage"] = None
            return _sse(data)

        events = [chunk({"role": "assistant", "content": ""})]
        if tools:
            name = tools[0]["function"]["name"]
            events.append(
                chunk(
                    {
                        "tool_calls": [
                            {
                                "index": 0,
                                "id": "call_fake1",
                                "type": "function",
                                "function": {"name": name, "arguments": ""},
                            }
                        ]
                    }
                )
            )
            half = len(TOOL_ARGUMENTS) // 2
            for part in (TOOL_ARGUMENTS[:half], TOOL_ARGUMENTS[half:]):
                events.append(chunk({"tool_calls": [{"index": 0, "function": {"arguments": part}}]}))
            events.append(chunk({}, "tool_calls"))
        else:
            for word in answer.split(" "):
                events.append(chunk({"content": word + " "}))
            events.append(chunk({}, "stop"))
        if include_usage and not no_usage:
            events.append(_sse({**base, "choices": [], "usage": usage}))
        events.append(b"data: [DONE]\n\n")
        return await self._stream(request, events, fault)

    # -- OpenAI Responses ---------------------------------------------------------------------

    async def _responses(self, request: web.Request) -> web.StreamResponse:
        begun = await self._begin(request, anthropic=False)
        if isinstance(begun, web.Response):
            return begun
        body, key, fault = begun
        model = str(body.get("model"))
        tools = body.get("tools") or []
        answer = f"fake answer: {_last_user(body)}"
        prompt = _prompt_words(body) + 10
        output = 7 if tools else _words(answer)
        stream = body.get("stream") is True
        usage = {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": OPENAI_CACHED_TOKENS},
            "output_tokens": output,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + output,
        }
        complete = fault.break_after_events is None
        self._bill(
            request,
            key,
            body,
            Billed(
                request.path,
                key,
                model,
                stream,
                prompt - OPENAI_CACHED_TOKENS,
                output,
                OPENAI_CACHED_TOKENS,
                0,
                complete,
            ),
        )
        if tools:
            item: dict[str, Any] = {
                "type": "function_call",
                "id": "fc_fake1",
                "call_id": "call_fake1",
                "name": tools[0]["name"],
                "arguments": TOOL_ARGUMENTS,
                "status": "completed",
            }
        else:
            item = {
                "type": "message",
                "id": "msg_fake1",
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": answer, "annotations": []}],
            }
        response = {
            "id": "resp_fake1",
            "object": "response",
            "created_at": int(time.time()),
            "status": "completed",
            "model": model,
            "output": [item],
            "usage": usage,
        }
        if not stream:
            return web.json_response(response)
        seq = iter(range(1_000_000))
        in_progress = {**response, "status": "in_progress", "output": [], "usage": None}
        events = [
            _sse(
                {"type": "response.created", "sequence_number": next(seq), "response": in_progress},
                "response.created",
            ),
            _sse(
                {
                    "type": "response.output_item.added",
                    "sequence_number": next(seq),
                    "output_index": 0,
                    "item": {**item, "status": "in_progress"},
                },
                "response.output_item.added",
            ),
        ]
        if tools:
            events.append(
                _sse(
                    {
                        "type": "response.function_call_arguments.delta",
                        "sequence_number": next(seq),
                        "item_id": "fc_fake1",
                        "output_index": 0,
                        "delta": TOOL_ARGUMENTS,
                    },
                    "response.function_call_arguments.delta",
                )
            )
        else:
            for word in answer.split(" "):
                events.append(
                    _sse(
                        {
                            "type": "response.output_text.delta",
                            "sequence_number": next(seq),
                            "item_id": "msg_fake1",
                            "output_index": 0,
                            "content_index": 0,
                            "delta": word + " ",
                        },
                        "response.output_text.delta",
                    )
                )
        events.append(
            _sse(
                {
                    "type": "response.output_item.done",
                    "sequence_number": next(seq),
                    "output_index": 0,
                    "item": item,
                },
                "response.output_item.done",
            )
        )
        events.append(
            _sse(
                {"type": "response.completed", "sequence_number": next(seq), "response": response},
                "response.completed",
            )
        )
        return await self._stream(request, events, fault)

    # -- Anthropic messages -------------------------------------------------------------------

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        begun = await self._begin(request, anthropic=True)
        if isinstance(begun, web.Response):
            return begun
        body, key, fault = begun
        model = str(body.get("model"))
        tools = body.get("tools") or []
        answer = f"fake answer: {_last_user(body)}"
        prompt = _prompt_words(body) + 10
        output = 7 if tools else _words(answer)
        cache_read, cache_write = 5, 3
        stream = body.get("stream") is True
        complete = fault.break_after_events is None
        self._bill(
            request,
            key,
            body,
            Billed(request.path, key, model, stream, prompt, output, cache_read, cache_write, complete),
        )
        if tools:
            content: dict[str, Any] = {
                "type": "tool_use",
                "id": "toolu_fake1",
                "name": tools[0]["name"],
                "input": json.loads(TOOL_ARGUMENTS),
            }
        else:
            content = {"type": "text", "text": answer}
        usage = {
            "input_tokens": prompt,
            "output_tokens": output,
            "cache_creation_input_tokens": cache_write,
            "cache_read_input_tokens": cache_read,
        }
        message = {
            "id": "msg_fake1",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [content],
            "stop_reason": "tool_use" if tools else "end_turn",
            "stop_sequence": None,
            "usage": usage,
        }
        if not stream:
            return web.json_response(message, headers={"request-id": f"req_{self.name}"})
        start = {**message, "content": [], "stop_reason": None, "usage": {**usage, "output_tokens": 1}}
        events = [_sse({"type": "message_start", "message": start}, "message_start")]
        if tools:
            events.append(
                _sse(
                    {"type": "content_block_start", "index": 0, "content_block": {**content, "input": {}}},
                    "content_block_start",
                )
            )
            events.append(
                _sse(
                    {
                        "type": "content_block_delta",
                        "index": 0,
                        "delta": {"type": "input_json_delta", "partial_json": TOOL_ARGUMENTS},
                    },
                    "content_block_delta",
                )
            )
        else:
            events.append(
                _sse(
                    {
                        "type": "content_block_start",
                        "index": 0,
                        "content_block": {"type": "text", "text": ""},
                    },
                    "content_block_start",
                )
            )
            events.append(_sse({"type": "ping"}, "ping"))
            for word in answer.split(" "):
                events.append(
                    _sse(
                        {
                            "type": "content_block_delta",
                            "index": 0,
                            "delta": {"type": "text_delta", "text": word + " "},
                        },
                        "content_block_delta",
                    )
                )
        events.append(_sse({"type": "content_block_stop", "index": 0}, "content_block_stop"))
        events.append(
            _sse(
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": message["stop_reason"], "stop_sequence": None},
                    "usage": {"output_tokens": output},
                },
                "message_delta",
            )
        )
        events.append(_sse({"type": "message_stop"}, "message_stop"))
        return await self._stream(request, events, fault)


class Blackhole:
    """A TCP address where connect() hangs: its listen queue is full and nothing accepts."""

    def __init__(self) -> None:
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(0)
        self.port = self._sock.getsockname()[1]
        self._fillers: list[socket.socket] = []
        for _ in range(3):
            filler = socket.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", self.port))
            self._fillers.append(filler)

    @property
    def openai_base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def close(self) -> None:
        for s in [*self._fillers, self._sock]:
            s.close()
