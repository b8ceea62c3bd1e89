"""Budgets: per run (from the run key) and per project per calendar month (from the `config` KV).

Spend is kept in the `limits` bucket by `SharedCounters.add` (lazy, compare-and-set):
`spend.run.<run_id>` and `spend.project.<project>.<YYYY-MM>` (UTC month), value
`{"start": 0, "value": <USD>}`. The project limit is read from the `config` bucket, key
`budgets.project.<project>`, value JSON `{"llm_usd_per_month": 250.0}` (a bare number is
accepted too; a missing key or `null` means no limit), kept in memory through a watch.

A call is refused with 402 when the spend before it is already at or over a budget (the cost
of a call is only known after it, so the call that crosses the budget completes and the next
one is refused). The refusal publishes `RunBudgetExceeded` (scope `run` or `project`) for the
run, once per run and scope per minute per replica, so the scheduler ends it `budget_exceeded`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

import msgspec
from nats.js.kv import KeyValue

from fabrik_common import kvwatch
from fabrik_common.events import RunBudgetExceeded
from fabrik_llm_proxy.limits import SharedCounters

log = logging.getLogger(__name__)

BUDGET_KEY_PREFIX = "budgets.project."
REPUBLISH_SECONDS = 60.0


class ProjectBudget(msgspec.Struct, frozen=True):
    llm_usd_per_month: float | None = None


def parse_budget(data: bytes) -> float | None:
    value = msgspec.json.decode(data)
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return msgspec.convert(value, ProjectBudget).llm_usd_per_month


def run_spend_key(run_id: str) -> str:
    return f"spend.run.{run_id}"


def project_spend_key(project: str, when: datetime) -> str:
    return f"spend.project.{project}.{when.year:04d}-{when.month:02d}"


@dataclass(frozen=True, slots=True)
class BudgetRefusal:
    scope: Literal["run", "project"]
    budget_usd: float
    spent_usd: float


class Budgets:
    def __init__(
        self,
        counters: SharedCounters,
        publish: Callable[[RunBudgetExceeded], None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.counters = counters
        self._publish = publish
        self._clock = clock
        self.project_limits: dict[str, float] = {}
        self._announced: dict[tuple[str, str], float] = {}

    def check(
        self, project: str | None, run_id: str | None, run_budget: float | None
    ) -> BudgetRefusal | None:
        refusal: BudgetRefusal | None = None
        if run_id is not None and run_budget is not None:
            spent, _ = self.counters.current(run_spend_key(run_id))
            if spent >= run_budget:
                refusal = BudgetRefusal("run", run_budget, spent)
        if refusal is None and project is not None:
            limit = self.project_limits.get(project)
            if limit is not None:
                now = datetime.fromtimestamp(self._clock(), UTC)
                spent, _ = self.counters.current(project_spend_key(project, now))
                if spent >= limit:
                    refusal = BudgetRefusal("project", limit, spent)
        if refusal is not None and run_id is not None and project is not None:
            self._announce(run_id, project, refusal)
        return refusal

    def _announce(self, run_id: str, project: str, refusal: BudgetRefusal) -> None:
        now = self._clock()
        key = (run_id, refusal.scope)
        if now - self._announced.get(key, -1e18) < REPUBLISH_SECONDS:
            return
        self._announced[key] = now
        if len(self._announced) > 100_000:
            self._announced.clear()
        try:
            event = RunBudgetExceeded(
                run_id=run_id,
                project=project,
                scope=refusal.scope,
                budget_usd=refusal.budget_usd,
                spent_usd=refusal.spent_usd,
            )
        except msgspec.ValidationError as exc:
            log.warning("cannot announce budget exceeded", extra={"run_id": run_id, "error": str(exc)})
            return
        self._publish(event)
        log.info(
            "budget exceeded; calls refused",
            extra={
                "run_id": run_id,
                "project": project,
                "scope": refusal.scope,
                "budget_usd": refusal.budget_usd,
            },
        )

    def record(self, project: str | None, run_id: str | None, run_budget: float | None, cost: float) -> None:
        if cost <= 0:
            return
        if run_id is not None and run_budget is not None:
            self.counters.add(run_spend_key(run_id), cost)
        if project is not None:
            self.counters.add(project_spend_key(project, datetime.fromtimestamp(self._clock(), UTC)), cost)

    def observe_config(self, key: str, data: bytes | None, revision: int = 0) -> None:
        if not key.startswith(BUDGET_KEY_PREFIX):
            return
        project = key[len(BUDGET_KEY_PREFIX) :]
        if data is None:
            self.project_limits.pop(project, None)
            return
        try:
            limit = parse_budget(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.warning("unreadable project budget; ignored", extra={"key": key, "error": str(exc)})
            return
        if limit is None:
            self.project_limits.pop(project, None)
        else:
            self.project_limits[project] = limit

    async def load_config(self, kv: KeyValue) -> None:
        await kvwatch.load(kv, BUDGET_KEY_PREFIX + ">", self.observe_config)

    async def watch_config(self, kv: KeyValue) -> None:
        await kvwatch.follow(kv, BUDGET_KEY_PREFIX + ">", self.observe_config)
