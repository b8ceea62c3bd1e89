"""Wiring and start-up of the scheduler service."""

from __future__ import annotations

from fabrik_common.service import Service, run_service

from fabrik_scheduler.handlers import router
from fabrik_scheduler.settings import SchedulerSettings

NAME = "scheduler"


def build(settings: SchedulerSettings) -> Service[None]:
    return Service(NAME, settings, routers=[router])


def main() -> None:
    run_service(SchedulerSettings, build, NAME)
