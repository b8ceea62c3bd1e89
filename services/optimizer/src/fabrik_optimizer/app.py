"""Wiring and start-up of the optimizer service."""

from __future__ import annotations

from fabrik_common.service import Service, run_service
from fabrik_optimizer.handlers import router
from fabrik_optimizer.settings import OptimizerSettings

NAME = "optimizer"


def build(settings: OptimizerSettings) -> Service[None]:
    return Service(NAME, settings, routers=[router])


def main() -> None:
    run_service(OptimizerSettings, build, NAME)
