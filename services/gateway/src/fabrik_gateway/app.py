"""Wiring and start-up of the gateway service."""

from __future__ import annotations

from fabrik_common.service import Service, run_service

from fabrik_gateway.handlers import router
from fabrik_gateway.settings import GatewaySettings

NAME = "gateway"


def build(settings: GatewaySettings) -> Service[None]:
    return Service(NAME, settings, routers=[router])


def main() -> None:
    run_service(GatewaySettings, build, NAME)
