"""`/api/v1/costs`, `/api/v1/budgets`, `/api/v1/analytics/*`: costs, budgets and run insights,
answered by the optimizer over NATS request/reply (`fabrik_gateway.optimizer`).

Visibility (docs/costs-and-analytics.md#api-and-cli): a caller that sees only some projects gets
only their figures. Naming a project it has no role in is a 403 (as for environments). Without
`project`, costs are narrowed to its projects (totals recomputed over them), budgets to its
projects' budgets (the global budget, which counts every project, is left out), and insights —
which cannot be added up across projects — need `project`.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any, Final, cast, get_args

import msgspec
from litestar import Controller, Request, get, post, put
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody, Parameter, QueryParameter

from fabrik_common import optimizer_rpc as rpc
from fabrik_common.ids import is_dns1123_label
from fabrik_gateway.api.params import QueryErrors, int_param, project_param
from fabrik_gateway.api.runs import BAD_QUERY, problem_spec
from fabrik_gateway.audit import DETAILS_KEY, PROJECT_KEY, TARGET_KEY
from fabrik_gateway.auth import Principal, require_role
from fabrik_gateway.auth.guard import api_guard
from fabrik_gateway.gateway import Gateway
from fabrik_gateway.models import (
    BudgetList,
    BudgetSet,
    CostGroupBy,
    CostReport,
    Insights,
    PutBudgetRequest,
    RebuildResult,
)
from fabrik_gateway.optimizer import ask, ask_each, narrowed_costs, totals_of, view
from fabrik_gateway.problems import invalid

GROUPS: Final = get_args(CostGroupBy)
LLM_CALLS_MAX: Final = 10_000
_PERIOD = re.compile(r"^([0-9]{4})-(0[1-9]|1[0-2])$")

UNAVAILABLE = {
    503: problem_spec(
        "The optimizer is not answering (none running, no answer in time, or busy), or the gateway is "
        "not connected to NATS; see `Retry-After`"
    )
}
BAD_GATEWAY = {502: problem_spec("The optimizer failed, or answered something the gateway cannot read")}
OPTIMIZER = {**UNAVAILABLE, **BAD_GATEWAY}


class LlmCallView(msgspec.Struct, kw_only=True):
    """One LLM call a run made through the llm-proxy."""

    call_id: str
    model: str
    provider: str
    input_tokens: int
    output_tokens: int
    cache_read_tokens: int
    cache_write_tokens: int
    cost_usd: str
    """Exact decimal string (USD)."""
    latency_ms: float | None
    outcome: str
    occurred_at: datetime


class RunLlmCalls(msgspec.Struct, kw_only=True):
    run_id: str
    calls: list[LlmCallView]
    """Earliest first, at most `limit`."""
    total: int
    """All calls of the run the optimizer has recorded."""
    cost_usd: str
    """Cost of all `total` calls (exact decimal string, USD)."""


def _utc_param(errors: QueryErrors, name: str, value: str | None) -> datetime | None:
    if value is None or value == "":
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        errors.add(name, "must be an RFC 3339 time with a UTC offset, e.g. 2026-01-31T12:00:00Z")
        return None
    if parsed.tzinfo is None:
        errors.add(name, "must carry a UTC offset (`Z` or `+hh:mm`)")
        return None
    try:
        return parsed.astimezone(UTC)
    except OverflowError:
        errors.add(name, "is out of range")
        return None


def _period_param(errors: QueryErrors, value: str | None) -> str | None:
    if value is None or value == "":
        return None
    match = _PERIOD.match(value)
    if match is None or not 1 <= int(match.group(1)) <= 9998:
        errors.add("period", "must be a month as YYYY-MM (UTC), e.g. 2026-03")
        return None
    return value


def _require_viewer(principal: Principal, project: str | None, action: str) -> None:
    """401/403 unless the caller may read `project` (or, without one, some project)."""
    if project is not None or principal.all_projects or not principal.visible_projects:
        require_role(principal, "viewer", action, project)


class AnalyticsController(Controller):
    path = "/api/v1"
    tags = ["costs and analytics"]
    guards = [api_guard]

    @get(
        "/costs",
        summary="Costs",
        description=(
            "LLM, compute and storage cost and tokens per project, spec, model or UTC day in [`from`, `to`) "
            "(LLM calls by their time, a run's compute and storage by the end of its latest attempt). "
            "Money is an exact decimal string in USD. A caller that sees only some projects gets only "
            "theirs (`projects`), with totals over them; naming another project is a 403."
        ),
        responses={**BAD_QUERY, **OPTIMIZER},
    )
    async def costs(
        self,
        gateway: NamedDependency[Gateway],
        principal: NamedDependency[Principal],
        group_by: Annotated[
            str | None,
            Parameter(
                description="`project` (default), `spec`, `model` or `day`",
                schema_extra={"enum": list(GROUPS)},
            ),
        ] = None,
        from_: Annotated[
            str | None,
            QueryParameter(
                name="from",
                description="RFC 3339 time: from this time on (inclusive)",
                schema_extra={"format": "date-time"},
            ),
        ] = None,
        to: Annotated[
            str | None,
            Parameter(
                description="RFC 3339 time: before this time (exclusive)",
                schema_extra={"format": "date-time"},
            ),
        ] = None,
        project: Annotated[str | None, Parameter(description="Only this project")] = None,
    ) -> CostReport:
        errors = QueryErrors()
        group = group_by or "project"
        if group not in GROUPS:
            errors.add("group_by", "must be one of " + ", ".join(GROUPS))
        start = _utc_param(errors, "from", from_)
        end = _utc_param(errors, "to", to)
        if start is not None and end is not None and end <= start:
            errors.add("to", "must be after from")
        project_name = project_param(errors, project)
        errors.raise_if_any()
        _require_viewer(principal, project_name, "read costs")
        nc = gateway.bus.nc
        timeout = gateway.settings.optimizer_timeout_seconds
        group_by_ = cast(rpc.CostGroup, group)
        request = rpc.CostsRequest(group_by=group_by_, from_=start, to=end, project=project_name)
        visible = principal.visible_projects
        projects: list[str] | None = [project_name] if project_name is not None else None
        if project_name is not None or visible is None:
            answer = await ask(nc, rpc.COSTS, request, rpc.CostsResponse, seconds=timeout)
        elif group == "project":  # one answer, only the visible projects' rows
            projects = sorted(visible)
            whole = await ask(nc, rpc.COSTS, request, rpc.CostsResponse, seconds=timeout)
            answer = narrowed_costs([whole], visible)
        else:  # one answer per visible project (a name that is no label has no runs), added up
            projects = sorted(visible)
            labels = [p for p in projects if is_dns1123_label(p)]
            answers = await ask_each(
                nc,
                rpc.COSTS,
                [rpc.CostsRequest(group_by=group_by_, from_=start, to=end, project=p) for p in labels],
                rpc.CostsResponse,
                seconds=timeout,
            )
            empty = rpc.CostsResponse(group_by=group_by_, from_=start, to=end, rows=[], totals=totals_of([]))
            answer = narrowed_costs([empty, *answers])
        return view(answer, CostReport, projects=projects)

    @get(
        "/budgets",
        summary="Budgets and their status",
        description=(
            "Every budget (global and per project) with this month's spend (or `period`'s), projection to "
            "the month's end and level. With `project`: that project's (its spend against no limit, level "
            "`none`, when it has no budget) and the global one. A caller that sees only some projects gets "
            "only their budgets, never the global one."
        ),
        responses={**BAD_QUERY, **OPTIMIZER},
    )
    async def budgets(
        self,
        gateway: NamedDependency[Gateway],
        principal: NamedDependency[Principal],
        project: Annotated[
            str | None, Parameter(description="Only this project (and the global budget)")
        ] = None,
        period: Annotated[
            str | None,
            Parameter(
                description="Month `YYYY-MM` (UTC); default: the current one",
                schema_extra={"pattern": r"^[0-9]{4}-(0[1-9]|1[0-2])$"},
            ),
        ] = None,
    ) -> BudgetList:
        errors = QueryErrors()
        project_name = project_param(errors, project)
        month = _period_param(errors, period)
        errors.raise_if_any()
        _require_viewer(principal, project_name, "read budgets")
        answer = await ask(
            gateway.bus.nc,
            rpc.BUDGETS_GET,
            rpc.BudgetsGetRequest(project=project_name, period=month),
            rpc.BudgetsGetResponse,
            seconds=gateway.settings.optimizer_timeout_seconds,
        )
        visible = principal.visible_projects
        budgets = [
            b
            for b in answer.budgets
            if visible is None or (b.scope == "project" and b.project is not None and b.project in visible)
        ]
        return view(msgspec.structs.replace(answer, budgets=budgets), BudgetList)

    @put(
        "/budgets",
        status_code=200,
        summary="Set a budget",
        description=(
            "A monthly budget (UTC calendar month) in USD: `llm_usd_per_month` (the llm-proxy refuses a "
            "project's calls once it is spent) and `compute_usd_per_month` (compute and storage; alerts "
            "only); alerts at `warning` x limit and at the limit. Neither limit removes the budget. A "
            "project's budget needs the maintainer role in it, the global budget an admin."
        ),
        opt={"audit_action": "budget.set"},
        responses=OPTIMIZER,
    )
    async def put_budget(
        self,
        request: Request[Any, Any, Any],
        gateway: NamedDependency[Gateway],
        principal: NamedDependency[Principal],
        data: JSONBody[PutBudgetRequest],
    ) -> BudgetSet:
        if data.scope == "project" and data.project is None:
            raise invalid([("project", "required when scope is project")])
        if data.scope == "global" and data.project is not None:
            raise invalid([("project", "not allowed when scope is global")])
        request.state[TARGET_KEY] = "budget:global" if data.project is None else f"budget:{data.project}"
        request.state[PROJECT_KEY] = data.project
        request.state[DETAILS_KEY] = {
            "scope": data.scope,
            "llm_usd_per_month": data.llm_usd_per_month,
            "compute_usd_per_month": data.compute_usd_per_month,
            "warning": data.warning,
        }
        if data.scope == "project":
            require_role(principal, "maintainer", "set a project's budget", data.project)
        else:
            require_role(principal, "admin", "set the global budget")
        answer = await ask(
            gateway.bus.nc,
            rpc.BUDGETS_PUT,
            rpc.BudgetsPutRequest(
                scope=data.scope,
                project=data.project,
                llm_usd_per_month=data.llm_usd_per_month,
                compute_usd_per_month=data.compute_usd_per_month,
                warning=data.warning,
                actor=principal.subject,
            ),
            rpc.BudgetsPutResponse,
            seconds=gateway.settings.optimizer_timeout_seconds,
            invalid_status=422,
        )
        return view(answer, BudgetSet)

    @get(
        "/analytics/insights",
        summary="Run insights",
        description=(
            "Success rates (with 95 % Wilson intervals) by model, spec and project; p95 run and queue "
            "durations; OOM kills per spec and memory limit with a suggested limit; cost per successful "
            "run; the runs retried most; the specs failing most. Groups with fewer than `min_runs` decided "
            "runs are left out. A caller that sees only some projects must name one with `project`."
        ),
        responses={**BAD_QUERY, **OPTIMIZER},
    )
    async def insights(
        self,
        gateway: NamedDependency[Gateway],
        principal: NamedDependency[Principal],
        project: Annotated[str | None, Parameter(description="Only this project's runs")] = None,
        min_runs: Annotated[
            str | None,
            Parameter(
                description="Smallest group shown (decided runs); default 20",
                schema_extra={"oneOf": None, "type": "integer", "minimum": 1, "maximum": 1_000_000},
            ),
        ] = None,
        top: Annotated[
            str | None,
            Parameter(
                description="How many of the most retried runs; default 10",
                schema_extra={"oneOf": None, "type": "integer", "minimum": 1, "maximum": 1000},
            ),
        ] = None,
    ) -> Insights:
        errors = QueryErrors()
        project_name = project_param(errors, project)
        smallest = int_param(errors, "min_runs", min_runs, default=20, minimum=1, maximum=1_000_000)
        count = int_param(errors, "top", top, default=10, minimum=1, maximum=1000)
        visible = principal.visible_projects
        if project_name is None and visible:
            errors.add(
                "project",
                "is required for a caller who sees only some projects (" + ", ".join(sorted(visible)) + ")",
            )
        errors.raise_if_any()
        assert smallest is not None and count is not None
        _require_viewer(principal, project_name, "read run insights")
        answer = await ask(
            gateway.bus.nc,
            rpc.INSIGHTS,
            rpc.InsightsRequest(min_runs=smallest, top=count, project=project_name),
            rpc.InsightsResponse,
            seconds=gateway.settings.optimizer_timeout_seconds,
        )
        return view(answer, Insights, project=project_name)

    @get(
        "/runs/{run_id:str}/llm-calls",
        summary="A run's LLM calls",
        description=(
            "The LLM calls the run made through the llm-proxy (model, tokens, exact cost, latency, outcome), "
            "earliest first, as the optimizer recorded them; `total` and `cost_usd` count all of them even "
            "when `limit` cuts the list."
        ),
        responses={
            **BAD_QUERY,
            404: problem_spec("No such run"),
            **OPTIMIZER,
        },
    )
    async def run_llm_calls(
        self,
        gateway: NamedDependency[Gateway],
        principal: NamedDependency[Principal],
        run_id: FromPath[str],
        limit: Annotated[
            str | None,
            Parameter(
                description=f"At most this many calls (default 1000, at most {LLM_CALLS_MAX})",
                schema_extra={"oneOf": None, "type": "integer", "minimum": 1, "maximum": LLM_CALLS_MAX},
            ),
        ] = None,
    ) -> RunLlmCalls:
        errors = QueryErrors()
        size = int_param(errors, "limit", limit, default=1000, minimum=1, maximum=LLM_CALLS_MAX)
        errors.raise_if_any()
        assert size is not None
        record = gateway.find(run_id, principal)
        answer = await ask(
            gateway.bus.nc,
            rpc.RUN_LLM_CALLS,
            rpc.RunLlmCallsRequest(run_id=record.run_id, limit=size),
            rpc.RunLlmCallsResponse,
            seconds=gateway.settings.optimizer_timeout_seconds,
        )
        return view(answer, RunLlmCalls, run_id=record.run_id)

    @post(
        "/analytics/rebuild",
        status_code=200,
        summary="Rebuild the analytics store",
        description=(
            "Admins only. The optimizer replays the RUNS and LLM streams into a fresh store and swaps it "
            "in (live events keep flowing meanwhile); the answer comes when it is done (up to "
            "`FABRIK_OPTIMIZER_REBUILD_TIMEOUT_SECONDS`, 15 min by default: give this request a long "
            "client timeout). 409 while another rebuild runs."
        ),
        opt={"audit_action": "analytics.rebuild"},
        responses={409: problem_spec("A rebuild is already running"), **OPTIMIZER},
    )
    async def rebuild(
        self,
        request: Request[Any, Any, Any],
        gateway: NamedDependency[Gateway],
        principal: NamedDependency[Principal],
    ) -> RebuildResult:
        request.state[TARGET_KEY] = "analytics"
        require_role(principal, "admin", "rebuild the analytics store")
        timeout = gateway.settings.optimizer_rebuild_timeout_seconds
        answer = await ask(
            gateway.bus.nc,
            rpc.REBUILD,
            rpc.RebuildRequest(actor=principal.subject),
            rpc.RebuildResponse,
            seconds=timeout,
            on_timeout=(
                f"no answer within {timeout:g} s; the rebuild may still be running (a new request answers "
                "409 while it is)"
            ),
        )
        return view(answer, RebuildResult)
