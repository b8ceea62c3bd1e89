"""The optimizer's request/reply endpoints (contract: `fabrik_common.optimizer_rpc`).

Each subject is subscribed in the queue group `optimizer`, so every request is answered by one
replica. Queries run in a worker thread on their own read connection to the store (WAL lets them
read beside the writer), so a slow query never stalls the consumers. Invalid requests are answered
with an `RpcError` naming the field and the rule; unexpected failures with a 500 `RpcError`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, TypeVar

import msgspec
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.client import JetStreamContext
from nats.js.kv import KeyValue

from fabrik_common import optimizer_rpc as rpc
from fabrik_common.experiments import Experiment
from fabrik_common.optimizer_rpc import (
    BudgetDefinition,
    BudgetsGetRequest,
    BudgetsGetResponse,
    BudgetsPutRequest,
    BudgetsPutResponse,
    BudgetStatus,
    CostPerSuccessRow,
    CostRow,
    CostsRequest,
    CostsResponse,
    CostTotals,
    DurationRow,
    FailingSpecRow,
    InsightsRequest,
    InsightsResponse,
    LlmCall,
    OomRow,
    RebuildRequest,
    RebuildResponse,
    RetriedRun,
    RpcError,
    RunLlmCallsRequest,
    RunLlmCallsResponse,
    SuccessRateRow,
    month_of,
)
from fabrik_common.rpcserver import request_handler, subscribe_all, unsubscribe_all
from fabrik_optimizer.analytics import queries
from fabrik_optimizer.analytics.rebuild import RebuildBusyError, Rebuilder
from fabrik_optimizer.analytics.store import AnalyticsStore
from fabrik_optimizer.budgets import budget_key, budget_status, month_bounds, spend_of
from fabrik_optimizer.experiments.candidates import CandidateService
from fabrik_optimizer.experiments.service import ExperimentError, Experiments, read_history
from fabrik_optimizer.state import OptimizerState

log = logging.getLogger(__name__)

Req = TypeVar("Req")
T = TypeVar("T")


class RequestError(Exception):
    def __init__(self, error: RpcError) -> None:
        super().__init__(error.message)
        self.error = error


def _rows(cls: type[T], rows: list[dict[str, Any]], group: str | None = None) -> list[T]:
    out = []
    for row in rows:
        data = dict(row)
        if group is not None:
            data["group"] = data.pop(group)
        out.append(msgspec.convert(data, cls, from_attributes=False, strict=False))
    return out


def costs_response(store: AnalyticsStore, request: CostsRequest) -> CostsResponse:
    rows = queries.costs(store, request.group_by, request.from_, request.to, request.project)
    converted = []
    for row in rows:
        data = dict(row)
        group = data.pop(request.group_by)
        converted.append(CostRow(group=None if group is None else str(group), **data))
    llm = sum((r.llm_cost_usd for r in converted), Decimal(0))
    compute = sum((r.compute_cost_usd or Decimal(0) for r in converted), Decimal(0))
    storage = sum((r.storage_cost_usd or Decimal(0) for r in converted), Decimal(0))
    return CostsResponse(
        group_by=request.group_by,
        from_=request.from_,
        to=request.to,
        rows=converted,
        totals=CostTotals(
            llm_cost_usd=llm,
            compute_cost_usd=compute,
            storage_cost_usd=storage,
            total_cost_usd=llm + compute + storage,
        ),
    )


def insights_response(store: AnalyticsStore, request: InsightsRequest) -> InsightsResponse:
    found = queries.insights(store, request.min_runs, request.top, request.project)
    return InsightsResponse(
        min_runs=found["min_runs"],
        runs=found["runs"],
        decided_runs=found["decided_runs"],
        success_rate={by: _rows(SuccessRateRow, rows, by) for by, rows in found["success_rate"].items()},
        durations_p95={by: _rows(DurationRow, rows, by) for by, rows in found["durations_p95"].items()},
        oom=_rows(OomRow, found["oom"]),
        cost_per_success={
            by: _rows(CostPerSuccessRow, rows, by) for by, rows in found["cost_per_success"].items()
        },
        most_retried=_rows(RetriedRun, found["most_retried"]),
        retried_runs=found["retried_runs"],
        failing_specs=_rows(FailingSpecRow, found["failing_specs"]),
    )


def run_llm_calls_response(store: AnalyticsStore, request: RunLlmCallsRequest) -> RunLlmCallsResponse:
    """The LLM calls of one run, earliest first (run ids match in either case: Kubernetes names
    carry them in lower case)."""
    ids = sorted({request.run_id.upper(), request.run_id.lower()})
    marks = ", ".join("?" for _ in ids)
    summary = store.query(
        f"SELECT COUNT(*) AS calls, SUM(cost_nanos) AS cost_nanos FROM llm_calls WHERE run_id IN ({marks})",  # noqa: S608 - placeholders only
        ids,
    )
    rows = store.query(
        f"""
        SELECT call_id, model, provider, input_tokens, output_tokens, cache_read_tokens,
               cache_write_tokens, cost_nanos, latency_ms, outcome, occurred_at
        FROM llm_calls WHERE run_id IN ({marks})
        ORDER BY occurred_at, call_id
        LIMIT ?
        """,  # noqa: S608 - placeholders only
        [*ids, request.limit],
    )
    calls = [
        LlmCall(
            call_id=row["call_id"],
            model=row["model"],
            provider=row["provider"],
            input_tokens=int(row["input_tokens"]),
            output_tokens=int(row["output_tokens"]),
            cache_read_tokens=int(row["cache_read_tokens"]),
            cache_write_tokens=int(row["cache_write_tokens"]),
            cost_usd=Decimal(int(row["cost_nanos"])).scaleb(-9),
            latency_ms=None if row["latency_ms"] is None else float(row["latency_ms"]),
            outcome=row["outcome"],
            occurred_at=datetime.fromisoformat(row["occurred_at"]),
        )
        for row in rows
    ]
    total = int(summary[0]["calls"]) if summary else 0
    cost = int(summary[0]["cost_nanos"] or 0) if summary else 0
    return RunLlmCallsResponse(
        run_id=request.run_id, calls=calls, total=total, cost_usd=Decimal(cost).scaleb(-9)
    )


class RpcServer:
    """Subscribes the request subjects and answers them from the service's state."""

    def __init__(
        self,
        nc: NatsClient,
        state: OptimizerState,
        config: KeyValue,
        rebuilder: Rebuilder,
        *,
        timeout: float = 30.0,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        experiments: Experiments | None = None,
        js: JetStreamContext | None = None,
        candidates: CandidateService | None = None,
    ) -> None:
        self.experiments = experiments
        self.candidates = candidates
        self.js = js
        self.nc = nc
        self.state = state
        self.config = config
        self.rebuilder = rebuilder
        self.timeout = timeout
        self.clock = clock
        self._subs: list[Subscription] = []

    async def start(self) -> None:
        routes: list[tuple[str, Callable[[Msg], Awaitable[None]]]] = [
            (rpc.COSTS, self._handler(CostsRequest, self.costs)),
            (rpc.INSIGHTS, self._handler(InsightsRequest, self.insights)),
            (rpc.BUDGETS_GET, self._handler(BudgetsGetRequest, self.budgets_get)),
            (rpc.BUDGETS_PUT, self._handler(BudgetsPutRequest, self.budgets_put)),
            (rpc.REBUILD, self._handler(RebuildRequest, self.rebuild)),
            (rpc.RUN_LLM_CALLS, self._handler(RunLlmCallsRequest, self.run_llm_calls)),
        ]
        if self.experiments is not None:
            routes += [
                (rpc.EXPERIMENTS_CREATE, self._handler(rpc.ExperimentCreateRequest, self.experiment_create)),
                (rpc.EXPERIMENTS_LIST, self._handler(rpc.ExperimentsListRequest, self.experiments_list)),
                (rpc.EXPERIMENTS_GET, self._handler(rpc.ExperimentGetRequest, self.experiment_get)),
                (rpc.EXPERIMENTS_ACTION, self._handler(rpc.ExperimentActionRequest, self.experiment_action)),
                (rpc.OPTIMIZER_PAUSE, self._handler(rpc.OptimizerPauseRequest, self.optimizer_pause)),
                (rpc.OPTIMIZER_HISTORY, self._handler(rpc.HistoryRequest, self.optimizer_history)),
            ]
        if self.candidates is not None:
            routes += [
                (rpc.CANDIDATES_LIST, self._handler(rpc.CandidatesListRequest, self.candidates_list)),
                (rpc.CANDIDATES_START, self._handler(rpc.CandidateStartRequest, self.candidate_start)),
            ]
        self._subs += await subscribe_all(self.nc, routes, rpc.QUEUE_GROUP)

    async def stop(self) -> None:
        subs, self._subs = self._subs, []
        await unsubscribe_all(subs)

    def _handler(
        self, request_type: type[Req], serve: Callable[[Req], Awaitable[msgspec.Struct]]
    ) -> Callable[[Msg], Awaitable[None]]:
        return request_handler(rpc, request_type, serve, expected=(RequestError, ExperimentError))

    async def _query(self, fn: Callable[[AnalyticsStore], T]) -> T:
        """Run a read in a worker thread on its own connection (the in-memory store: on the loop)."""
        store = self.state.store
        if store.path == ":memory:":
            return fn(store)

        def work() -> T:
            reader = store.reader()
            try:
                return fn(reader)
            finally:
                reader.close()

        try:
            return await asyncio.wait_for(asyncio.to_thread(work), self.timeout)
        except TimeoutError as exc:
            raise RequestError(
                RpcError(status=503, rule="timeout", message=f"query took longer than {self.timeout} s")
            ) from exc

    # -- endpoints --------------------------------------------------------------------------

    async def costs(self, request: CostsRequest) -> CostsResponse:
        if request.from_ is not None and request.to is not None and request.to <= request.from_:
            raise RequestError(
                RpcError(status=400, field="to", rule="must be after from", message="to: must be after from")
            )
        return await self._query(lambda store: costs_response(store, request))

    async def insights(self, request: InsightsRequest) -> InsightsResponse:
        return await self._query(lambda store: insights_response(store, request))

    async def budgets_get(self, request: BudgetsGetRequest) -> BudgetsGetResponse:
        now = self.clock()
        period = request.period or month_of(now)
        start, end = month_bounds(period)
        spend = await self._query(lambda store: queries.spend(store, start, end))
        monitor = self.state.monitor
        assert monitor is not None
        statuses = monitor.statuses(spend, period, now, request.project)
        if request.project is not None and not any(s.project == request.project for s in statuses):
            # No budget of its own: its spend all the same, against no limit.
            statuses.append(
                budget_status(
                    "project",
                    request.project,
                    BudgetDefinition(),
                    period,
                    spend_of(spend, "project", request.project),
                    now,
                )
            )
        return BudgetsGetResponse(period=period, budgets=statuses)

    async def budgets_put(self, request: BudgetsPutRequest) -> BudgetsPutResponse:
        if request.scope == "project" and request.project is None:
            raise RequestError(
                RpcError(
                    status=400,
                    field="project",
                    rule="required when scope is project",
                    message="project: required when scope is project",
                )
            )
        if request.scope == "global" and request.project is not None:
            raise RequestError(
                RpcError(
                    status=400,
                    field="project",
                    rule="not allowed when scope is global",
                    message="project: not allowed when scope is global",
                )
            )
        now = self.clock()
        definition = BudgetDefinition(
            llm_usd_per_month=request.llm_usd_per_month,
            compute_usd_per_month=request.compute_usd_per_month,
            warning=request.warning,
            updated_by=request.actor or None,
            updated_at=now,
        )
        key = budget_key(request.scope, request.project)
        if definition.llm_usd_per_month is None and definition.compute_usd_per_month is None:
            await self.config.delete(key)  # neither limit: no budget
            self.state.book.observe(key, None)
        else:
            data = msgspec.json.encode(definition)
            await self.config.put(key, data)
            self.state.book.observe(key, data)
        log.info(
            "budget set",
            extra={
                "key": key,
                "llm_usd_per_month": definition.llm_usd_per_month,
                "compute_usd_per_month": definition.compute_usd_per_month,
                "warning": definition.warning,
                "by": request.actor,
            },
        )
        self.state.dirty.set()  # evaluate against the new limits soon
        period = month_of(now)
        start, end = month_bounds(period)
        spend = await self._query(lambda store: queries.spend(store, start, end))
        status: BudgetStatus = budget_status(
            request.scope,
            request.project,
            definition,
            period,
            spend_of(spend, request.scope, request.project),
            now,
        )
        return BudgetsPutResponse(definition=definition, status=status)

    async def run_llm_calls(self, request: RunLlmCallsRequest) -> RunLlmCallsResponse:
        return await self._query(lambda store: run_llm_calls_response(store, request))

    async def rebuild(self, request: RebuildRequest) -> RebuildResponse:
        try:
            result = await self.rebuilder.rebuild()
        except RebuildBusyError as exc:
            raise RequestError(RpcError(status=409, rule="busy", message=str(exc))) from exc
        log.info("rebuild requested", extra={"by": request.actor})
        return RebuildResponse(**result)

    # -- experiments (docs/optimizer.md#api-and-cli) ------------------------------------------

    def _experiments(self) -> Experiments:
        assert self.experiments is not None
        return self.experiments

    async def _experiment_response(self, experiment: Experiment) -> rpc.ExperimentResponse:
        service = self._experiments()
        pause = await service.pause_state()
        return rpc.ExperimentResponse(
            experiment=experiment,
            arms=await service.status(experiment),
            active_assignment=experiment.state == "active" and not pause.paused,
        )

    async def experiment_create(self, request: rpc.ExperimentCreateRequest) -> rpc.ExperimentResponse:
        return await self._experiment_response(await self._experiments().create(request))

    async def experiments_list(self, request: rpc.ExperimentsListRequest) -> rpc.ExperimentsListResponse:
        service = self._experiments()
        found = [e for e in await service.all() if request.state is None or e.state == request.state]
        return rpc.ExperimentsListResponse(
            experiments=found, pause=await service.pause_state(), defaults=await service.defaults()
        )

    async def experiment_get(self, request: rpc.ExperimentGetRequest) -> rpc.ExperimentResponse:
        return await self._experiment_response(await self._experiments().get(request.id))

    async def experiment_action(self, request: rpc.ExperimentActionRequest) -> rpc.ExperimentResponse:
        experiment = await self._experiments().action(
            request.id, request.action, request.actor, request.reason
        )
        return await self._experiment_response(experiment)

    async def optimizer_pause(self, request: rpc.OptimizerPauseRequest) -> rpc.OptimizerStatusResponse:
        service = self._experiments()
        pause = await service.set_pause(request.paused, request.reason, request.actor)
        active = sum(1 for e in await service.all() if e.state == "active")
        return rpc.OptimizerStatusResponse(pause=pause, defaults=await service.defaults(), active=active)

    async def optimizer_history(self, request: rpc.HistoryRequest) -> rpc.HistoryResponse:
        assert self.js is not None
        rows = await read_history(self.js, request.experiment_id, request.limit)
        return rpc.HistoryResponse(entries=[msgspec.convert(r, rpc.HistoryEntry) for r in rows])

    # -- candidates (docs/optimizer.md#candidates) ---------------------------------------------

    def _candidates(self) -> CandidateService:
        assert self.candidates is not None
        return self.candidates

    async def candidates_list(self, request: rpc.CandidatesListRequest) -> rpc.CandidatesListResponse:
        service = self._candidates()
        return rpc.CandidatesListResponse(
            candidates=await service.available(request.project), auto=service.auto
        )

    async def candidate_start(self, request: rpc.CandidateStartRequest) -> rpc.ExperimentResponse:
        return await self._experiment_response(await self._candidates().start(request.id, request.actor))
