"""What the executor's handlers receive as `ctx.state`."""

from __future__ import annotations

from dataclasses import dataclass

from fabrik_executor.backend import Backend
from fabrik_executor.metrics import ExecutorMetrics


@dataclass
class ExecutorState:
    backend: Backend
    metrics: ExecutorMetrics
