"""Wiring and start-up of the optimizer service."""

from __future__ import annotations

import logging

from fabrik_common.service import Service, run_service
from fabrik_optimizer.analytics.store import AnalyticsStore
from fabrik_optimizer.handlers import router
from fabrik_optimizer.settings import OptimizerSettings
from fabrik_optimizer.state import OptimizerState

NAME = "optimizer"

log = logging.getLogger(__name__)


def build(settings: OptimizerSettings) -> Service[OptimizerState]:
    async def on_start(service: Service[OptimizerState]) -> OptimizerState:
        path = settings.analytics_db_path()
        store = AnalyticsStore(path)
        log.info("analytics store open", extra={"path": str(path)})
        return OptimizerState(store)

    async def on_stop(state: OptimizerState) -> None:
        state.store.close()

    return Service(NAME, settings, routers=[router], on_start=on_start, on_stop=on_stop)


def main() -> None:
    run_service(OptimizerSettings, build, NAME)
