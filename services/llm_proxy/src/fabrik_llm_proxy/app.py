"""Wiring and start-up of the llm-proxy service."""

from __future__ import annotations

from fabrik_common.service import Service, run_service
from fabrik_llm_proxy.handlers import router
from fabrik_llm_proxy.settings import LlmProxySettings

NAME = "llm-proxy"


def build(settings: LlmProxySettings) -> Service[None]:
    return Service(NAME, settings, routers=[router])


def main() -> None:
    run_service(LlmProxySettings, build, NAME)
