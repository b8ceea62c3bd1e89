"""Anthropic's Messages API (and compatible servers).

`base_url` follows the Anthropic SDK convention and excludes `/v1` (default
`https://api.anthropic.com`). The client's `anthropic-version` and `anthropic-beta` headers are
passed on; usage arrives in `message_start` and `message_delta` without asking.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from fabrik_llm_proxy.providers.base import Provider, UpstreamRequest
from fabrik_llm_proxy.wire import Endpoint

DEFAULT_VERSION = "2023-06-01"


class AnthropicProvider(Provider):
    name: ClassVar[str] = "anthropic"
    endpoints: ClassVar[frozenset[Endpoint]] = frozenset({"messages"})
    default_base_url: ClassVar[str] = "https://api.anthropic.com"

    def build(
        self,
        endpoint: Endpoint,
        payload: dict[str, Any],
        key: str | None,
        client_headers: Mapping[str, str],
    ) -> UpstreamRequest:
        headers = {
            "Content-Type": "application/json",
            "anthropic-version": client_headers.get("anthropic-version") or DEFAULT_VERSION,
            **self.extra_headers,
        }
        beta = client_headers.get("anthropic-beta")
        if beta:
            headers["anthropic-beta"] = beta
        if key:
            headers["x-api-key"] = key
        if payload.get("stream") is True:
            headers["Accept"] = "text/event-stream"
        return UpstreamRequest(self.base_url + "/v1/messages", headers, self.encode(payload))
