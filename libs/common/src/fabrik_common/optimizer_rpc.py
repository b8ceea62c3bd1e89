"""The optimizer's request/reply contract over NATS: subjects, typed requests and responses.

The gateway (and through it the CLI) asks the optimizer for costs, insights and budgets, and asks
it to set a budget or rebuild its analytics store, with core NATS request/reply on subjects
outside every stream (`fabrik.rpc.>` is captured by none; `fabrik.optimizer.>` is, by OPS, so it
is not used for requests). Replicas of the optimizer answer in the queue group `optimizer`, so each
request is answered once.

Every request and response is a msgspec Struct encoded as JSON. A response is either the
request's response type or `RpcError` (tagged by `kind`), so callers decode with
`decode_response(data, CostsResponse)` and get one or the other. Money is `Decimal` (exact; JSON
strings such as `"0.0151"`), except budget amounts, which are plain numbers as stored in the
`config` KV.
"""

from __future__ import annotations

import re
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, Literal, TypeVar

import msgspec

from fabrik_common.events import ProjectName, UtcDatetime
from fabrik_common.experiments import (
    ALL_GUARDRAILS,
    DEFAULT_TREATMENT_SHARE,
    Arm,
    Defaults,
    Experiment,
    ExperimentState,
    Guardrail,
    OptimizerPause,
    PrimaryMetric,
    Risk,
    Target,
)

PREFIX = "fabrik.rpc.optimizer"
COSTS = f"{PREFIX}.costs"
INSIGHTS = f"{PREFIX}.insights"
BUDGETS_GET = f"{PREFIX}.budgets.get"
BUDGETS_PUT = f"{PREFIX}.budgets.put"
REBUILD = f"{PREFIX}.rebuild"
RUN_LLM_CALLS = f"{PREFIX}.run_llm_calls"
EXPERIMENTS_CREATE = f"{PREFIX}.experiments.create"
EXPERIMENTS_LIST = f"{PREFIX}.experiments.list"
EXPERIMENTS_GET = f"{PREFIX}.experiments.get"
EXPERIMENTS_ACTION = f"{PREFIX}.experiments.action"
OPTIMIZER_PAUSE = f"{PREFIX}.pause"
OPTIMIZER_HISTORY = f"{PREFIX}.history"
CANDIDATES_LIST = f"{PREFIX}.candidates.list"
CANDIDATES_START = f"{PREFIX}.candidates.start"
SUBJECTS: tuple[str, ...] = (
    COSTS,
    INSIGHTS,
    BUDGETS_GET,
    BUDGETS_PUT,
    REBUILD,
    RUN_LLM_CALLS,
    EXPERIMENTS_CREATE,
    EXPERIMENTS_LIST,
    EXPERIMENTS_GET,
    EXPERIMENTS_ACTION,
    OPTIMIZER_PAUSE,
    OPTIMIZER_HISTORY,
    CANDIDATES_LIST,
    CANDIDATES_START,
)
QUEUE_GROUP = "optimizer"

CostGroup = Literal["project", "spec", "model", "day"]
BudgetScope = Literal["global", "project"]
BudgetKind = Literal["llm", "compute"]
Period = Annotated[str, msgspec.Meta(pattern=r"^[0-9]{4}-(0[1-9]|1[0-2])$", description="YYYY-MM (UTC)")]
Usd = Annotated[float, msgspec.Meta(ge=0)]
WarningRatio = Annotated[float, msgspec.Meta(gt=0, lt=1)]


class _Struct(msgspec.Struct, frozen=True, kw_only=True):
    pass


class RpcError(_Struct, frozen=True, kw_only=True, tag_field="kind", tag="error"):
    """A request the optimizer could not serve. `field` names the offending request field (dotted
    path) when there is one, `rule` the rule it broke; `status` is the HTTP status a gateway would
    answer with (400 invalid, 404 unknown, 409 conflict, 503 busy or unavailable, 500 a bug)."""

    status: int
    rule: str
    message: str
    field: str | None = None


# ------------------------------------------------------------------------------------------------
# costs


class CostsRequest(_Struct, frozen=True, kw_only=True):
    group_by: CostGroup = "project"
    from_: UtcDatetime | None = msgspec.field(default=None, name="from")
    to: UtcDatetime | None = None
    project: ProjectName | None = None


class CostRow(_Struct, frozen=True, kw_only=True):
    """One group. `compute_cost_usd` and `storage_cost_usd` are None when the grouping cannot
    attribute them (by model: a run's node time is not split between the models it called)."""

    group: str | None
    llm_cost_usd: Decimal
    compute_cost_usd: Decimal | None
    storage_cost_usd: Decimal | None
    total_cost_usd: Decimal
    input_tokens: int
    output_tokens: int
    cache_read_tokens: int
    cache_write_tokens: int
    tokens: int
    calls: int
    runs: int
    """Distinct runs with LLM calls in the group."""
    compute_runs: int
    """Runs whose compute and storage cost is counted in the group (finished in the range)."""


class CostTotals(_Struct, frozen=True, kw_only=True):
    llm_cost_usd: Decimal
    compute_cost_usd: Decimal
    storage_cost_usd: Decimal
    total_cost_usd: Decimal


class CostsResponse(_Struct, frozen=True, kw_only=True, tag_field="kind", tag="costs"):
    group_by: CostGroup
    from_: UtcDatetime | None = msgspec.field(default=None, name="from")
    to: UtcDatetime | None = None
    currency: Literal["USD"] = "USD"
    rows: list[CostRow]
    totals: CostTotals


# ------------------------------------------------------------------------------------------------
# insights


class InsightsRequest(_Struct, frozen=True, kw_only=True):
    min_runs: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 20
    top: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 10
    project: ProjectName | None = None


class SuccessRateRow(_Struct, frozen=True, kw_only=True):
    group: str
    runs: int
    successes: int
    success_rate: float
    ci95_low: float
    ci95_high: float


class DurationRow(_Struct, frozen=True, kw_only=True):
    group: str
    runs: int
    run_seconds_p95: float
    queue_runs: int
    queue_seconds_p95: float | None


class OomRow(_Struct, frozen=True, kw_only=True):
    """OOM kills of one spec at one memory limit, and a limit suggested from observed peaks:
    `suggested_limit_bytes` = p95 of the peaks * `headroom`, rounded up to 64 MiB. OOM-killed
    attempts report a peak at about the old limit, so frequent kills push the suggestion up."""

    spec: str
    memory_limit: str
    memory_limit_bytes: int | None
    runs: int
    oom_kills: int
    oom_rate: float
    ci95_low: float
    ci95_high: float
    peaks: int
    peak_p95_bytes: int | None
    headroom: float
    suggested_limit_bytes: int | None
    suggested_limit: str | None


class CostPerSuccessRow(_Struct, frozen=True, kw_only=True):
    """Everything the group's runs cost (LLM + compute + storage, failures included) divided by
    its successful runs; None when nothing succeeded."""

    group: str
    runs: int
    successes: int
    total_cost_usd: Decimal
    cost_per_success_usd: Decimal | None


class RetriedRun(_Struct, frozen=True, kw_only=True):
    run_id: str
    project: str | None
    spec: str | None
    attempts: int
    state: str | None
    reason: str | None


class FailingSpecRow(_Struct, frozen=True, kw_only=True):
    spec: str
    runs: int
    failures: int
    failure_rate: float
    ci95_low: float
    ci95_high: float
    reasons: dict[str, int]


class InsightsResponse(_Struct, frozen=True, kw_only=True, tag_field="kind", tag="insights"):
    min_runs: int
    runs: int
    """Runs in the store (of the project, when asked for one): the population of every insight."""
    decided_runs: int
    success_rate: dict[str, list[SuccessRateRow]]
    """By `model`, `spec`, `project`; groups with fewer than `min_runs` decided runs are left out."""
    durations_p95: dict[str, list[DurationRow]]
    oom: list[OomRow]
    cost_per_success: dict[str, list[CostPerSuccessRow]]
    """By `spec` and `project`."""
    most_retried: list[RetriedRun]
    retried_runs: int
    """Runs with more than one attempt (the population `most_retried` is the top of)."""
    failing_specs: list[FailingSpecRow]


# ------------------------------------------------------------------------------------------------
# budgets


class BudgetDefinition(_Struct, frozen=True, kw_only=True):
    """One budget as stored in the `config` KV (`budgets.global`, `budgets.project.<project>`).

    The llm-proxy reads `llm_usd_per_month` of project budgets and ignores the other fields."""

    llm_usd_per_month: Usd | None = None
    compute_usd_per_month: Usd | None = None
    warning: WarningRatio = 0.8
    updated_by: str | None = None
    updated_at: UtcDatetime | None = None


class BudgetLine(_Struct, frozen=True, kw_only=True):
    kind: BudgetKind
    limit_usd: float | None
    warning_usd: float | None
    spent_usd: Decimal
    projected_usd: Decimal
    """Linear projection to the end of the period: spent / elapsed fraction of the month."""
    used: float | None
    """spent / limit."""
    level: Literal["none", "ok", "warning", "limit"]


class BudgetStatus(_Struct, frozen=True, kw_only=True):
    scope: BudgetScope
    project: str | None
    period: str
    elapsed_fraction: float
    warning: float
    llm: BudgetLine
    compute: BudgetLine
    blocked: bool
    """LLM calls of this project are refused by the llm-proxy (spent ≥ LLM limit)."""


class BudgetsGetRequest(_Struct, frozen=True, kw_only=True):
    project: ProjectName | None = None
    """Only this project (and the global budget); all budgets when absent."""
    period: Period | None = None
    """Default: the current month (UTC)."""


class BudgetsGetResponse(_Struct, frozen=True, kw_only=True, tag_field="kind", tag="budgets"):
    period: str
    budgets: list[BudgetStatus]


class BudgetsPutRequest(_Struct, frozen=True, kw_only=True):
    scope: BudgetScope
    project: ProjectName | None = None
    llm_usd_per_month: Usd | None = None
    compute_usd_per_month: Usd | None = None
    warning: WarningRatio = 0.8
    actor: str = ""


class BudgetsPutResponse(_Struct, frozen=True, kw_only=True, tag_field="kind", tag="budget_set"):
    definition: BudgetDefinition
    status: BudgetStatus


# ------------------------------------------------------------------------------------------------
# rebuild


class RebuildRequest(_Struct, frozen=True, kw_only=True):
    actor: str = ""


class RebuildResponse(_Struct, frozen=True, kw_only=True, tag_field="kind", tag="rebuilt"):
    run_events: int
    usage_events: int
    runs: int
    llm_calls: int
    seconds: float


# ------------------------------------------------------------------------------------------------
# the LLM calls of one run


class RunLlmCallsRequest(_Struct, frozen=True, kw_only=True):
    run_id: Annotated[str, msgspec.Meta(pattern=r"^[0-9A-HJKMNP-TV-Za-hjkmnp-tv-z]{26}$")]
    limit: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 1000
    """At most this many calls, the earliest first."""


class LlmCall(_Struct, frozen=True, kw_only=True):
    call_id: str
    model: str
    provider: str
    input_tokens: int
    output_tokens: int
    cache_read_tokens: int
    cache_write_tokens: int
    cost_usd: Decimal
    latency_ms: float | None
    outcome: str
    occurred_at: UtcDatetime


class RunLlmCallsResponse(_Struct, frozen=True, kw_only=True, tag_field="kind", tag="run_llm_calls"):
    run_id: str
    calls: list[LlmCall]
    """In the order they were made (by `occurred_at`), at most `limit` of them."""
    total: int
    """Calls of the run in the store (more than `len(calls)` when `limit` cut the list)."""
    cost_usd: Decimal
    """Cost of all `total` calls."""


# ------------------------------------------------------------------------------------------------
# experiments (docs/optimizer.md#api-and-cli)

ExperimentAction = Literal["approve", "pause", "resume", "stop", "rollback"]


class ExperimentCreateRequest(_Struct, frozen=True, kw_only=True):
    name: str
    target: Target = msgspec.field(default_factory=Target)
    parameter: str
    control: Arm
    treatments: list[Arm]
    treatment_share: float = DEFAULT_TREATMENT_SHARE
    primary_metric: PrimaryMetric = "success_rate"
    guardrails: list[Guardrail] = msgspec.field(default_factory=lambda: list(ALL_GUARDRAILS))
    risk: Risk = "low"
    min_runs_per_arm: int = 30
    max_duration_seconds: int = 14 * 86400
    protected_env: bool = False
    approved_cost_ceiling: float = 3.0
    start: bool = True
    """Start at once when nothing needs an approval (else the experiment stays a draft)."""
    actor: str = ""


class ExperimentsListRequest(_Struct, frozen=True, kw_only=True):
    state: ExperimentState | None = None


class ExperimentGetRequest(_Struct, frozen=True, kw_only=True):
    id: str


class ExperimentActionRequest(_Struct, frozen=True, kw_only=True):
    id: str
    action: ExperimentAction
    actor: str = ""
    reason: str = ""


class ArmStatus(_Struct, frozen=True, kw_only=True):
    """One arm's sample so far (decided runs: cancelled runs are left out)."""

    name: str
    overrides: dict[str, Any]
    runs: int
    successes: int
    failures: int
    ooms: int
    success_rate: float | None
    cost_per_run_usd: float | None
    duration_p95_seconds: float | None


class ExperimentResponse(_Struct, frozen=True, kw_only=True, tag_field="kind", tag="experiment"):
    experiment: Experiment
    arms: list[ArmStatus]
    active_assignment: bool
    """Runs are being assigned now (active and no global pause)."""


class ExperimentsListResponse(_Struct, frozen=True, kw_only=True, tag_field="kind", tag="experiments"):
    experiments: list[Experiment]
    pause: OptimizerPause
    defaults: Defaults


class OptimizerPauseRequest(_Struct, frozen=True, kw_only=True):
    paused: bool
    reason: str = ""
    actor: str = ""


class OptimizerStatusResponse(_Struct, frozen=True, kw_only=True, tag_field="kind", tag="optimizer_status"):
    pause: OptimizerPause
    defaults: Defaults
    active: int


class HistoryRequest(_Struct, frozen=True, kw_only=True):
    experiment_id: str | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=10_000)] = 200


class HistoryEntry(_Struct, frozen=True, kw_only=True):
    """One `optimizer.*` event of the OPS stream: an experiment's change, a decision, a change of
    the defaults or of the global pause."""

    at: UtcDatetime
    type: str
    experiment_id: str | None = None
    status: str | None = None
    decision: str | None = None
    by: str | None = None
    message: str = ""
    numbers: dict[str, Any] = msgspec.field(default_factory=dict)
    key: str | None = None
    old: Any = None
    new: Any = None


class HistoryResponse(_Struct, frozen=True, kw_only=True, tag_field="kind", tag="history"):
    entries: list[HistoryEntry]
    """Oldest first, the last `limit` of them."""


# ------------------------------------------------------------------------------------------------
# candidate experiments, proposed from the analytics insights (docs/optimizer.md#candidates)

CandidateKind = Literal["memory_limit", "model"]
CandidateId = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{20}$", description="Candidate id")]


class Candidate(_Struct, frozen=True, kw_only=True):
    """An experiment the optimizer proposes. `id` is a hash of (target, parameter, treatment
    value): the same proposal keeps its id from one round to the next. `evidence` holds the
    numbers behind it, `sample_size` the decided runs they come from."""

    id: str
    kind: CandidateKind
    name: str
    summary: str
    """One sentence: what was seen and what to try."""
    target: Target
    parameter: str
    control: Arm
    treatments: list[Arm]
    risk: Risk
    guardrails: list[Guardrail]
    evidence: dict[str, Any]
    sample_size: int


class CandidatesListRequest(_Struct, frozen=True, kw_only=True):
    project: ProjectName | None = None
    """Only candidates targeting this project."""


class CandidatesListResponse(_Struct, frozen=True, kw_only=True, tag_field="kind", tag="candidates"):
    candidates: list[Candidate]
    auto: bool
    """Low-risk candidates are started by the optimizer itself (`FABRIK_OPTIMIZER_AUTO`)."""


class CandidateStartRequest(_Struct, frozen=True, kw_only=True):
    id: CandidateId
    actor: str = ""


# ------------------------------------------------------------------------------------------------
# helpers for both sides

R = TypeVar("R")

_PATH = re.compile(r" - at `\$\.?([^`]*)`$")


def encode(message: msgspec.Struct) -> bytes:
    return msgspec.json.encode(message)


def validation_error(exc: msgspec.ValidationError | msgspec.DecodeError) -> RpcError:
    """A decode failure as an RpcError naming the field (`$.project` → `project`) and the rule."""
    text = str(exc)
    match = _PATH.search(text)
    field = match.group(1) or None if match else None
    rule = _PATH.sub("", text)
    return RpcError(status=400, rule=rule, message=f"{field}: {rule}" if field else rule, field=field)


def decode_request(data: bytes, request_type: type[R]) -> R | RpcError:
    """A request body (empty means all defaults) as `request_type`, or the RpcError saying why not."""
    try:
        return msgspec.json.decode(data or b"{}", type=request_type)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        return validation_error(exc)


def decode_response(data: bytes, response_type: type[R]) -> R | RpcError:
    """A reply as `response_type` or `RpcError` (raises msgspec errors on anything else)."""
    result: R | RpcError = msgspec.json.decode(data, type=response_type | RpcError)
    return result


def month_of(ts: datetime) -> str:
    return f"{ts.year:04d}-{ts.month:02d}"


def to_builtins(message: msgspec.Struct) -> Any:
    """JSON-ready builtins (Decimals as strings), e.g. for a gateway response body."""
    return msgspec.to_builtins(message)
