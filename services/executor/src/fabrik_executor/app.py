"""Wiring and start-up of the executor service."""

from __future__ import annotations

from fabrik_common.service import Service, run_service

from fabrik_executor.handlers import router
from fabrik_executor.settings import ExecutorSettings

NAME = "executor"


def build(settings: ExecutorSettings) -> Service[None]:
    return Service(NAME, settings, routers=[router])


def main() -> None:
    run_service(ExecutorSettings, build, NAME)
