"""The two wire formats the proxy speaks: endpoints, error bodies and in-stream error events.

OpenAI (`/v1/chat/completions`, `/v1/responses`) errors are `{"error": {"message", "type",
"param", "code"}}`; Anthropic (`/v1/messages`) errors are `{"type": "error", "error": {"type",
"message"}}`. A failure after the first streamed byte cannot change the status any more, so the
stream ends with an error event in the client's format instead: an `error` data chunk for chat
completions, an `error` event for the Responses API and `event: error` for Anthropic.
"""

from __future__ import annotations

from typing import Final, Literal

import msgspec

Endpoint = Literal["chat.completions", "responses", "messages"]
WireFormat = Literal["openai", "anthropic"]

ENDPOINT_PATHS: Final[dict[str, Endpoint]] = {
    "/v1/chat/completions": "chat.completions",
    "/v1/responses": "responses",
    "/v1/messages": "messages",
}
ALL_ENDPOINTS: Final[frozenset[Endpoint]] = frozenset({"chat.completions", "responses", "messages"})


def wire_format(endpoint: Endpoint) -> WireFormat:
    return "anthropic" if endpoint == "messages" else "openai"


# Error kinds used inside the proxy, mapped to each format's type names.
ErrorKind = Literal[
    "invalid_request",
    "authentication",
    "permission",
    "budget",
    "not_found",
    "too_large",
    "rate_limit",
    "upstream",
    "unavailable",
    "timeout",
]

_OPENAI_TYPES: Final[dict[ErrorKind, tuple[str, str]]] = {
    "invalid_request": ("invalid_request_error", "invalid_request"),
    "authentication": ("authentication_error", "invalid_api_key"),
    "permission": ("permission_error", "permission_denied"),
    "budget": ("insufficient_quota", "budget_exceeded"),
    "not_found": ("invalid_request_error", "model_not_found"),
    "too_large": ("invalid_request_error", "request_too_large"),
    "rate_limit": ("rate_limit_error", "rate_limit_exceeded"),
    "upstream": ("api_error", "upstream_error"),
    "unavailable": ("api_error", "upstream_unavailable"),
    "timeout": ("api_error", "upstream_timeout"),
}
_ANTHROPIC_TYPES: Final[dict[ErrorKind, str]] = {
    "invalid_request": "invalid_request_error",
    "authentication": "authentication_error",
    "permission": "permission_error",
    "budget": "billing_error",
    "not_found": "not_found_error",
    "too_large": "request_too_large",
    "rate_limit": "rate_limit_error",
    "upstream": "api_error",
    "unavailable": "overloaded_error",
    "timeout": "api_error",
}
STATUS: Final[dict[ErrorKind, int]] = {
    "invalid_request": 400,
    "authentication": 401,
    "permission": 403,
    "budget": 402,
    "not_found": 404,
    "too_large": 413,
    "rate_limit": 429,
    "upstream": 502,
    "unavailable": 503,
    "timeout": 504,
}

_encode = msgspec.json.Encoder().encode


def error_body(fmt: WireFormat, kind: ErrorKind, message: str, *, param: str | None = None) -> bytes:
    if fmt == "anthropic":
        return _encode({"type": "error", "error": {"type": _ANTHROPIC_TYPES[kind], "message": message}})
    err_type, code = _OPENAI_TYPES[kind]
    return _encode({"error": {"message": message, "type": err_type, "param": param, "code": code}})


def stream_error_event(endpoint: Endpoint, kind: ErrorKind, message: str, sequence_number: int = 0) -> bytes:
    """The SSE event that ends a stream which failed after its first byte."""
    if endpoint == "messages":
        data = _encode({"type": "error", "error": {"type": _ANTHROPIC_TYPES[kind], "message": message}})
        return b"event: error\ndata: " + data + b"\n\n"
    err_type, code = _OPENAI_TYPES[kind]
    if endpoint == "responses":
        data = _encode(
            {
                "type": "error",
                "code": code,
                "message": message,
                "param": None,
                "sequence_number": sequence_number,
            }
        )
        return b"event: error\ndata: " + data + b"\n\n"
    data = _encode({"error": {"message": message, "type": err_type, "param": None, "code": code}})
    return b"data: " + data + b"\n\n"
