"""What the optimizer's handlers, background tasks and request handlers share."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from fabrik_optimizer.analytics.ingest import Costing
from fabrik_optimizer.analytics.store import AnalyticsStore
from fabrik_optimizer.budgets import BudgetBook, BudgetMonitor


@dataclass
class OptimizerState:
    store: AnalyticsStore
    costing: Costing | None = None
    book: BudgetBook = field(default_factory=BudgetBook)
    monitor: BudgetMonitor | None = None
    write_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    """Held while a batch of events is applied to the store, and by a rebuild while it swaps stores."""
    dirty: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when the store changed since the last budget evaluation."""
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def set_store(self, store: AnalyticsStore) -> None:
        self.store = store
        self.dirty.set()
