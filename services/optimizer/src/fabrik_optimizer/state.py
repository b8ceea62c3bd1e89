"""What the optimizer's handlers share: the analytics store."""

from __future__ import annotations

from dataclasses import dataclass

from fabrik_optimizer.analytics.store import AnalyticsStore


@dataclass
class OptimizerState:
    store: AnalyticsStore
