"""Configuration of the scheduler service, from `FABRIK_*` environment variables."""

from __future__ import annotations

from fabrik_common.settings import CommonSettings, Port


class SchedulerSettings(CommonSettings, frozen=True, kw_only=True):
    http_port: Port = 9101
