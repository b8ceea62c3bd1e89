"""Providers: how a request in one wire format reaches an upstream that speaks it.

No translation between formats: OpenAI-format endpoints (chat completions, Responses) go to
`openai` deployments (OpenAI or any compatible server), `/v1/messages` goes to `anthropic`
deployments, and `echo` answers all three in-process.
"""

from __future__ import annotations

from fabrik_llm_proxy.providers.anthropic import AnthropicProvider
from fabrik_llm_proxy.providers.base import Provider
from fabrik_llm_proxy.providers.echo import EchoProvider
from fabrik_llm_proxy.providers.openai import OpenAIProvider

PROVIDERS: dict[str, type[Provider]] = {
    "openai": OpenAIProvider,
    "anthropic": AnthropicProvider,
    "echo": EchoProvider,
}

__all__ = ["PROVIDERS", "AnthropicProvider", "EchoProvider", "OpenAIProvider", "Provider"]
