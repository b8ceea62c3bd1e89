"""Configuration of the gateway service, from `FABRIK_*` environment variables."""

from __future__ import annotations

from fabrik_common.settings import CommonSettings, Port


class GatewaySettings(CommonSettings, frozen=True, kw_only=True):
    http_port: Port = 8080
