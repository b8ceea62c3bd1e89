"""OpenAI and every OpenAI-compatible server (Ollama, vLLM, OpenRouter, LiteLLM, ...).

`base_url` follows the OpenAI SDK convention and includes `/v1` (e.g.
`http://127.0.0.1:11434/v1` for Ollama). A deployment without a key pool sends no
Authorization header. Streaming chat requests get `stream_options.include_usage` so the
upstream reports usage in its last chunk.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from fabrik_llm_proxy.providers.base import Provider, UpstreamRequest
from fabrik_llm_proxy.wire import Endpoint

_PATHS: dict[Endpoint, str] = {"chat.completions": "/chat/completions", "responses": "/responses"}
# Client headers worth passing on (organisation/project scoping is the proxy's business, not the run's).
_PASS = ("openai-beta",)


class OpenAIProvider(Provider):
    name: ClassVar[str] = "openai"
    endpoints: ClassVar[frozenset[Endpoint]] = frozenset({"chat.completions", "responses"})
    default_base_url: ClassVar[str] = "https://api.openai.com/v1"

    def prepare_payload(self, endpoint: Endpoint, payload: dict[str, Any], upstream_model: str) -> None:
        payload["model"] = upstream_model
        if endpoint == "chat.completions" and payload.get("stream") is True:
            options = payload.get("stream_options")
            if not isinstance(options, dict):
                options = payload["stream_options"] = {}
            options["include_usage"] = True

    def build(
        self,
        endpoint: Endpoint,
        payload: dict[str, Any],
        key: str | None,
        client_headers: Mapping[str, str],
    ) -> UpstreamRequest:
        headers = {"Content-Type": "application/json", **self.extra_headers}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        for name in _PASS:
            value = client_headers.get(name)
            if value:
                headers[name] = value
        if payload.get("stream") is True:
            headers["Accept"] = "text/event-stream"
        return UpstreamRequest(self.base_url + _PATHS[endpoint], headers, self.encode(payload))
