"""Server-sent event streams: split into events, pass them on, and learn usage on the way.

A tracker per wire format reads every complete event the upstream sends, forwards it to the
client byte for byte (complete events only, so a client never sees half an event), and keeps:
the usage the upstream reported (OpenAI chat: the final chunk, which the proxy asks for with
`stream_options.include_usage` and drops again if the client did not ask for it; Responses:
`response.completed`; Anthropic: `message_start` + `message_delta`), the generated text (to
estimate usage when none came), whether the stream reached its proper end (`[DONE]`,
`response.completed`, `message_stop`), and the last sequence number (Responses).
"""

from __future__ import annotations

from typing import Any

import msgspec

from fabrik_llm_proxy.usage import ChatUsage, MessagesUsage, ResponsesUsage, Usage
from fabrik_llm_proxy.wire import Endpoint


class StreamTracker:
    """Base: event splitting. Subclasses implement `on_event` (return False to drop the event)."""

    def __init__(self) -> None:
        self._buf = b""
        self.usage: Usage | None = None
        # The usage is the upstream's final figure (not just message_start's input side).
        self.usage_final = False
        self.done = False
        self.upstream_error: str | None = None
        self.output_parts: list[str] = []
        self.events = 0

    def feed(self, chunk: bytes) -> bytes:
        """Bytes to forward for this chunk: the complete events in it (minus dropped ones)."""
        buf = self._buf + chunk if self._buf else chunk
        if b"\r" in buf:
            buf = buf.replace(b"\r\n", b"\n")
        end = buf.rfind(b"\n\n")
        if end < 0:
            self._buf = buf
            return b""
        complete = buf[: end + 2]
        self._buf = buf[end + 2 :]
        keep_all = True
        kept: list[bytes] = []
        for block in complete.split(b"\n\n"):
            if not block.strip(b"\n"):
                continue
            self.events += 1
            if self._parse(block):
                kept.append(block)
            else:
                keep_all = False
        if keep_all:
            return complete
        return b"".join(block + b"\n\n" for block in kept)

    @property
    def pending(self) -> bytes:
        """An incomplete event left over (the stream ended in the middle of it)."""
        return self._buf

    def _parse(self, block: bytes) -> bool:
        event: bytes | None = None
        data: list[bytes] = []
        for line in block.split(b"\n"):
            if line.startswith(b"data:"):
                data.append(line[6:] if line[5:6] == b" " else line[5:])
            elif line.startswith(b"event:"):
                event = line[6:].strip()
        if not data:
            return True
        return self.on_event(event, b"\n".join(data))

    def on_event(self, event: bytes | None, data: bytes) -> bool:
        raise NotImplementedError

    @property
    def output_text(self) -> str:
        return "".join(self.output_parts)


# --- OpenAI chat completions -----------------------------------------------------------------


class _Fn(msgspec.Struct):
    arguments: str | None = None


class _ToolCallDelta(msgspec.Struct):
    function: _Fn | None = None


class _Delta(msgspec.Struct):
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[_ToolCallDelta] | None = None


class _Choice(msgspec.Struct):
    delta: _Delta | None = None


class _ChatChunk(msgspec.Struct):
    choices: list[_Choice] | None = None
    usage: ChatUsage | None = None
    error: Any = None


_chat_chunk = msgspec.json.Decoder(_ChatChunk)


class ChatTracker(StreamTracker):
    def __init__(self, client_wants_usage: bool) -> None:
        super().__init__()
        self.client_wants_usage = client_wants_usage

    def on_event(self, event: bytes | None, data: bytes) -> bool:
        if data.startswith(b"[DONE]"):
            self.done = True
            return True
        try:
            chunk = _chat_chunk.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return True
        if chunk.error is not None:
            self.upstream_error = _error_message(chunk.error)
            return True
        for choice in chunk.choices or ():
            delta = choice.delta
            if delta is None:
                continue
            if delta.content:
                self.output_parts.append(delta.content)
            if delta.reasoning_content:
                self.output_parts.append(delta.reasoning_content)
            for call in delta.tool_calls or ():
                if call.function is not None and call.function.arguments:
                    self.output_parts.append(call.function.arguments)
        if chunk.usage is not None:
            self.usage = chunk.usage.normalise()
            self.usage_final = True
            # The proxy asked for this usage-only chunk; a client that did not ask never sees it.
            if not self.client_wants_usage and not chunk.choices:
                return False
        return True


# --- OpenAI Responses ------------------------------------------------------------------------


class _ResponseObj(msgspec.Struct):
    usage: ResponsesUsage | None = None


class _ResponsesEvent(msgspec.Struct):
    type: str = ""
    sequence_number: int | None = None
    delta: Any = None
    response: _ResponseObj | None = None
    message: str | None = None


_responses_event = msgspec.json.Decoder(_ResponsesEvent)
_RESPONSES_END = frozenset({"response.completed", "response.incomplete", "response.failed"})


class ResponsesTracker(StreamTracker):
    def __init__(self) -> None:
        super().__init__()
        self.sequence_number = -1

    def on_event(self, event: bytes | None, data: bytes) -> bool:
        try:
            ev = _responses_event.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return True
        if ev.sequence_number is not None:
            self.sequence_number = max(self.sequence_number, ev.sequence_number)
        kind = ev.type
        if kind.endswith(".delta") and isinstance(ev.delta, str):
            self.output_parts.append(ev.delta)
        elif kind in _RESPONSES_END:
            self.done = True
            if ev.response is not None and ev.response.usage is not None:
                self.usage = ev.response.usage.normalise()
                self.usage_final = True
        elif kind == "error":
            self.upstream_error = ev.message or "upstream error"
        return True


# --- Anthropic messages ----------------------------------------------------------------------


class _Message(msgspec.Struct):
    usage: MessagesUsage | None = None


class _BlockDelta(msgspec.Struct):
    text: str | None = None
    partial_json: str | None = None
    thinking: str | None = None


class _MessagesEvent(msgspec.Struct):
    type: str = ""
    message: _Message | None = None
    usage: MessagesUsage | None = None
    delta: _BlockDelta | None = None
    error: Any = None


_messages_event = msgspec.json.Decoder(_MessagesEvent)


class MessagesTracker(StreamTracker):
    def on_event(self, event: bytes | None, data: bytes) -> bool:
        try:
            ev = _messages_event.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return True
        kind = ev.type
        if kind == "content_block_delta" and ev.delta is not None:
            text = ev.delta.text or ev.delta.partial_json or ev.delta.thinking
            if text:
                self.output_parts.append(text)
        elif kind == "message_start" and ev.message is not None and ev.message.usage is not None:
            self.usage = self.usage or Usage()
            ev.message.usage.apply(self.usage)
        elif kind == "message_delta" and ev.usage is not None:
            self.usage = self.usage or Usage()
            ev.usage.apply(self.usage)
            self.usage_final = True
        elif kind == "message_stop":
            self.done = True
        elif kind == "error":
            self.upstream_error = _error_message(ev.error)
        return True


def _error_message(error: Any) -> str:
    if isinstance(error, dict):
        message = error.get("message")
        if isinstance(message, str):
            return message
    return "upstream error"


def tracker_for(endpoint: Endpoint, client_wants_usage: bool) -> StreamTracker:
    if endpoint == "chat.completions":
        return ChatTracker(client_wants_usage)
    if endpoint == "responses":
        return ResponsesTracker()
    return MessagesTracker()
