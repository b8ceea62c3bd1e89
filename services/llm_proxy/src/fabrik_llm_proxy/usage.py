"""Token usage as each wire format reports it, normalised.

`input_tokens` excludes cached input on both sides: OpenAI's `prompt_tokens` (chat) and
`input_tokens` (Responses) include `cached_tokens`, which are subtracted and reported as
`cache_read_tokens`; Anthropic reports `input_tokens`, `cache_read_input_tokens` and
`cache_creation_input_tokens` separately already. So the cost of a call is always
input x input price + output x output price + cache_read x cache-read price + cache_write x
cache-write price.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

from fabrik_llm_proxy.wire import Endpoint


@dataclass(slots=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    estimated: bool = False

    @property
    def total(self) -> int:
        return self.input_tokens + self.output_tokens + self.cache_read_tokens + self.cache_write_tokens


# --- OpenAI chat completions -----------------------------------------------------------------


class PromptDetails(msgspec.Struct):
    cached_tokens: int | None = None


class ChatUsage(msgspec.Struct):
    prompt_tokens: int | None = 0
    completion_tokens: int | None = 0
    prompt_tokens_details: PromptDetails | None = None

    def normalise(self) -> Usage:
        prompt = self.prompt_tokens or 0
        cached = (self.prompt_tokens_details.cached_tokens or 0) if self.prompt_tokens_details else 0
        return Usage(max(0, prompt - cached), self.completion_tokens or 0, cached, 0)


# --- OpenAI Responses ------------------------------------------------------------------------


class ResponsesUsage(msgspec.Struct):
    input_tokens: int | None = 0
    output_tokens: int | None = 0
    input_tokens_details: PromptDetails | None = None

    def normalise(self) -> Usage:
        prompt = self.input_tokens or 0
        cached = (self.input_tokens_details.cached_tokens or 0) if self.input_tokens_details else 0
        return Usage(max(0, prompt - cached), self.output_tokens or 0, cached, 0)


# --- Anthropic messages ----------------------------------------------------------------------


class MessagesUsage(msgspec.Struct):
    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_creation_input_tokens: int | None = None
    cache_read_input_tokens: int | None = None

    def apply(self, usage: Usage) -> None:
        """Fold into `usage` (stream events carry some fields, later ones update them)."""
        if self.input_tokens is not None:
            usage.input_tokens = self.input_tokens
        if self.output_tokens is not None:
            usage.output_tokens = self.output_tokens
        if self.cache_creation_input_tokens is not None:
            usage.cache_write_tokens = self.cache_creation_input_tokens
        if self.cache_read_input_tokens is not None:
            usage.cache_read_tokens = self.cache_read_input_tokens


class _ChatBody(msgspec.Struct):
    usage: ChatUsage | None = None


class _ResponsesBody(msgspec.Struct):
    usage: ResponsesUsage | None = None


class _MessagesBody(msgspec.Struct):
    usage: MessagesUsage | None = None


_chat_body = msgspec.json.Decoder(_ChatBody)
_responses_body = msgspec.json.Decoder(_ResponsesBody)
_messages_body = msgspec.json.Decoder(_MessagesBody)


def usage_from_body(endpoint: Endpoint, body: bytes) -> Usage | None:
    """The usage of a complete (non-streamed) response body, or None if it has none."""
    try:
        if endpoint == "chat.completions":
            chat = _chat_body.decode(body).usage
            return chat.normalise() if chat else None
        if endpoint == "responses":
            resp = _responses_body.decode(body).usage
            return resp.normalise() if resp else None
        msg = _messages_body.decode(body).usage
        if msg is None:
            return None
        usage = Usage()
        msg.apply(usage)
        return usage
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
