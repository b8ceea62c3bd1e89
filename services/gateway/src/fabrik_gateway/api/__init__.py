"""The REST API under `/api/v1`: thin Litestar controllers over `Gateway`."""

from __future__ import annotations

from fabrik_gateway.api.envs import EnvsController
from fabrik_gateway.api.runs import RunsController
from fabrik_gateway.api.system import SystemController

__all__ = ["EnvsController", "RunsController", "SystemController"]
