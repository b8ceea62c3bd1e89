"""Request and response bodies of the REST API, as msgspec Structs (they make the OpenAPI document)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec

from fabrik_common.events import Priority, RunState
from fabrik_common.ids import DNS1123_LABEL, DNS1123_RULE
from fabrik_common.specs import Spec, Todo

DnsLabel = Annotated[
    str,
    msgspec.Meta(
        pattern=DNS1123_LABEL.pattern,
        max_length=63,
        description="DNS-1123 label",
        extra={"rule": DNS1123_RULE},
    ),
]

QUANTITY_RULE_CPU = "must be a CPU quantity: cores like '2' or '0.5', or millicores like '500m'"
QUANTITY_RULE_MEMORY = "must be a memory quantity: bytes, or a number with a unit like '512Mi', '4Gi', '1G'"

CpuQuantity = Annotated[
    str,
    msgspec.Meta(
        pattern=r"^([0-9]+(\.[0-9]+)?|\.[0-9]+)m?$",
        max_length=32,
        description="Kubernetes CPU quantity: `2`, `0.5`, `500m`",
        examples=["500m", "2"],
        extra={"rule": QUANTITY_RULE_CPU},
    ),
]
MemoryQuantity = Annotated[
    str,
    msgspec.Meta(
        pattern=r"^([0-9]+(\.[0-9]+)?|\.[0-9]+)(Ki|Mi|Gi|Ti|k|K|M|G|T)?$",
        max_length=32,
        description="Kubernetes memory quantity: `1Gi`, `512Mi`, `1G`, bytes",
        examples=["1Gi", "512Mi"],
        extra={"rule": QUANTITY_RULE_MEMORY},
    ),
]
EnvName = Annotated[
    str,
    msgspec.Meta(
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        max_length=256,
        extra={
            "rule": "must be an environment variable name: letters, digits and '_', not starting with a digit"
        },
    ),
]


# --------------------------------------------------------------------------------------------
# POST /api/v1/runs


class RepoIn(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The repository the run works in: a git URL (or, for the local backend, a local path)."""

    url: Annotated[str, msgspec.Meta(min_length=1, max_length=2048)]
    ref: Annotated[str, msgspec.Meta(min_length=1, max_length=255)] = "HEAD"


class WorkloadIn(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What to run. `image` must be digest-pinned on Kubernetes and is ignored by the local backend.
    Environment keys starting with `FABRIK_` or `SMITHERS_` are reserved."""

    image: Annotated[str, msgspec.Meta(min_length=1, max_length=512)] | None = None
    command: list[str] = msgspec.field(default_factory=list)
    args: list[str] = msgspec.field(default_factory=list)
    env: dict[EnvName, str] = msgspec.field(default_factory=dict)


class ResourcesIn(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """CPU and memory of the workload: both the request and the limit (Guaranteed QoS)."""

    cpu: CpuQuantity
    memory: MemoryQuantity


class SubmitRunRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A new run. At least one of `spec`, `spec_path` or `workload.command` is required; `spec` and
    `spec_path` exclude each other, and so do `resources` and `template`."""

    project: DnsLabel
    env: DnsLabel = "dev"
    spec: Spec | None = None
    spec_path: Annotated[str, msgspec.Meta(min_length=1, max_length=1024)] | None = None
    todo: Todo | None = None
    repo: RepoIn | None = None
    workload: WorkloadIn | None = None
    resources: ResourcesIn | None = None
    template: Annotated[str, msgspec.Meta(min_length=1, max_length=63)] | None = None
    timeout_seconds: Annotated[int, msgspec.Meta(ge=1, le=86400)] = 86400
    priority: Priority = "normal"
    budget_usd: Annotated[float, msgspec.Meta(ge=0)] | None = None
    labels: dict[str, str] = msgspec.field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Runs


class QueueInfo(msgspec.Struct, kw_only=True):
    """Where a queued run stands, from the scheduler's latest queue snapshot."""

    position: int | None = msgspec.field(default=None)
    """1 = dispatched next; null while the scheduler has not placed the run yet."""
    ahead_count: int | None = None
    ahead: list[str] = msgspec.field(default_factory=list)
    eta: datetime | None = None
    eta_seconds: float | None = None
    snapshot_at: datetime | None = None


class ProgressView(msgspec.Struct, kw_only=True):
    phase: str | None = None
    task: str | None = None
    finished: int | None = None
    total: int | None = None
    message: str | None = None
    updated_at: datetime | None = None


class TokensView(msgspec.Struct, kw_only=True):
    input: int = 0
    output: int = 0


class ResourcesView(msgspec.Struct, kw_only=True):
    cpu_request: str
    memory_request: str
    cpu_limit: str
    memory_limit: str


class HealthView(msgspec.Struct, kw_only=True):
    """The run's liveness as the scheduler judges it (docs/run-health.md)."""

    state: Literal["healthy", "stalled", "healing", "failed"] = "healthy"
    since: datetime | None = None
    reason: str | None = None
    category: Literal["workload_error", "infra_error", "transient_exhausted", "unknown"] | None = None
    """Why the scheduler gave up on the run (`failed`)."""
    message: str = ""
    last_progress_at: datetime | None = None
    heals: int = 0
    """Healing attempts in the current episode."""
    heals_total: int = 0


class RunView(msgspec.Struct, kw_only=True):
    """A run as the API shows it."""

    run_id: str
    project: str
    env: str
    spec_id: str | None
    state: RunState
    reason: str | None
    message: str
    attempt: int
    queue: QueueInfo | None
    progress: ProgressView
    created_at: datetime
    queued_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    exit_code: int | None
    cost_usd: float
    tokens: TokensView
    labels: dict[str, str]
    priority: Priority
    template: str | None
    resources: ResourcesView
    timeout_seconds: int
    budget_usd: float | None
    image_digest: str | None
    requested_by: str
    recorded: bool
    """false while only the gateway knows the run (submitted, not yet recorded by the scheduler)."""
    health: HealthView = msgspec.field(default_factory=HealthView)
    schedule_id: str | None = None
    """The schedule that started the run (docs/schedules.md); null for a run submitted directly."""
    schedule_slot: datetime | None = None
    """The cron slot of that schedule the run is for."""


class RunPage(msgspec.Struct, kw_only=True):
    items: list[RunView]
    next_cursor: str | None
    """Pass as `cursor` to get the next page; null on the last page."""


class CancelRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    reason: Annotated[str, msgspec.Meta(max_length=1024)] = ""


class ActionAccepted(msgspec.Struct, kw_only=True):
    """A cancel or resume request was published; the run's state follows asynchronously."""

    run_id: str
    action: Literal["cancel", "resume"]
    state: RunState
    event_id: str


# --------------------------------------------------------------------------------------------
# Logs and events


class LogLineView(msgspec.Struct, kw_only=True):
    ts: datetime
    stream: Literal["stdout", "stderr", "system"]
    text: str
    attempt: int
    line: int


class RunLogs(msgspec.Struct, kw_only=True):
    run_id: str
    lines: list[LogLineView]
    truncated: bool
    """true when earlier lines exist than those returned."""


class RunEventItem(msgspec.Struct, kw_only=True):
    seq: int
    """Sequence in the RUNS stream; pass the last one as `after` to continue."""
    subject: str
    type: str
    event: dict[str, Any]
    """The event as published (see contracts/events/run.*.schema.json)."""


class RunEvents(msgspec.Struct, kw_only=True):
    run_id: str
    items: list[RunEventItem]
    next_cursor: str | None


# --------------------------------------------------------------------------------------------
# Projects and queue


class ProjectSummary(msgspec.Struct, kw_only=True):
    project: str
    total: int
    states: dict[str, int]


class ProjectList(msgspec.Struct, kw_only=True):
    items: list[ProjectSummary]


class QueueItem(msgspec.Struct, kw_only=True):
    position: int
    run_id: str
    project: str
    priority: Priority
    eta_seconds: float | None
    eta: datetime | None


class QueueView(msgspec.Struct, kw_only=True):
    """The scheduler's queue in dispatch order (empty until the scheduler wrote a snapshot)."""

    taken_at: datetime | None
    total: int
    running: int
    items: list[QueueItem]
    usage: dict[str, dict[str, float]]
    limits: dict[str, dict[str, float]]


# ------------------------------------------------------------------------------------ access

RoleName = Literal["viewer", "developer", "maintainer", "admin"]


class CreateTokenRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=100, description="What the token is for")]
    role: RoleName
    projects: (
        Annotated[
            list[DnsLabel], msgspec.Meta(min_length=1, max_length=100, description="Only these projects")
        ]
        | None
    ) = None
    """None: the role holds in every project."""
    expires_in_days: Annotated[int, msgspec.Meta(ge=1, le=3650)] | None = None
    """None: the token does not expire (revoke it when it is no longer needed)."""


class TokenView(msgspec.Struct, kw_only=True):
    token_id: str
    name: str
    role: RoleName
    projects: list[str] | None
    created_by: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    revoked_by: str | None
    last_used_at: datetime | None


class CreatedToken(TokenView, kw_only=True):
    token: str
    """The secret: shown this once, stored only hashed. Send it as `Authorization: Bearer <token>`."""


class TokenList(msgspec.Struct, kw_only=True):
    items: list[TokenView]


class WhoAmI(msgspec.Struct, kw_only=True):
    subject: str
    kind: Literal["anonymous", "jwt", "token", "integration"]
    authenticated: bool
    name: str
    role: RoleName | None
    """The role in every project (None: only the `project_roles`)."""
    project_roles: dict[str, RoleName]
    token_id: str | None


class AuditItem(msgspec.Struct, kw_only=True):
    seq: int
    event_id: str
    occurred_at: datetime
    actor: str
    role: str
    action: str
    target: str
    project: str | None
    result: Literal["ok", "denied", "failed"]
    details: dict[str, Any]


class AuditPage(msgspec.Struct, kw_only=True):
    items: list[AuditItem]
    next_cursor: str | None
    """Pass as `after` to continue (the scan stopped there; later pages may still be empty)."""


# ------------------------------------------------------------------- costs, budgets, analytics
# Answers of the optimizer (`fabrik_common.optimizer_rpc`) as the API shows them: money is an exact
# decimal string in USD (the optimizer sums integer nano-dollars), never a float.

Money = Annotated[
    str,
    msgspec.Meta(
        pattern=r"^-?[0-9]+(\.[0-9]+)?$",
        description="USD as an exact decimal string (no exponent), e.g. `0.0151`",
        examples=["0.0151"],
    ),
]
CostGroupBy = Literal["project", "spec", "model", "day"]
BudgetScopeName = Literal["global", "project"]
BudgetLevel = Literal["none", "ok", "warning", "limit"]
BudgetUsd = Annotated[float, msgspec.Meta(ge=0, le=1e12, description="USD per calendar month (UTC)")]
BudgetWarning = Annotated[
    float, msgspec.Meta(gt=0, lt=1, description="Warn at this share of the limit (0.8: at 80 %)")
]


class CostRow(msgspec.Struct, kw_only=True):
    group: str | None
    """The project, spec id, model or UTC day (`YYYY-MM-DD`); null: calls or runs without one."""
    llm_cost_usd: Money
    compute_cost_usd: Money | None
    """Null when grouped by model (a run's node time is not split between the models it called)."""
    storage_cost_usd: Money | None
    total_cost_usd: Money
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


class CostTotals(msgspec.Struct, kw_only=True):
    llm_cost_usd: Money
    compute_cost_usd: Money
    storage_cost_usd: Money
    total_cost_usd: Money


class CostReport(msgspec.Struct, kw_only=True):
    group_by: CostGroupBy
    from_: datetime | None = msgspec.field(name="from")
    to: datetime | None
    projects: list[str] | None
    """The projects counted: `[project]` when asked for one, the caller's projects when it sees only
    some; null: every project (and calls without a project)."""
    currency: Literal["USD"]
    rows: list[CostRow]
    """Most expensive first."""
    totals: CostTotals
    """Sums of `rows`."""


class BudgetLine(msgspec.Struct, kw_only=True):
    kind: Literal["llm", "compute"]
    """`compute` counts compute and storage."""
    limit_usd: float | None
    warning_usd: float | None
    spent_usd: Money
    projected_usd: Money
    """Linear projection to the end of the month: spent / elapsed fraction of the month."""
    used: float | None
    """spent / limit."""
    level: BudgetLevel


class BudgetStatus(msgspec.Struct, kw_only=True):
    scope: BudgetScopeName
    project: str | None
    period: str
    """`YYYY-MM` (UTC)."""
    elapsed_fraction: float
    warning: float
    llm: BudgetLine
    compute: BudgetLine
    blocked: bool
    """LLM calls of this project are refused by the llm-proxy (spent ≥ LLM limit)."""


class BudgetList(msgspec.Struct, kw_only=True):
    period: str
    budgets: list[BudgetStatus]


class PutBudgetRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    scope: BudgetScopeName
    project: DnsLabel | None = None
    """Required for `scope: project`, not allowed for `scope: global`."""
    llm_usd_per_month: BudgetUsd | None = None
    compute_usd_per_month: BudgetUsd | None = None
    """Compute and storage together. Neither limit: the budget is removed."""
    warning: BudgetWarning = 0.8


class BudgetDefinition(msgspec.Struct, kw_only=True):
    llm_usd_per_month: float | None
    compute_usd_per_month: float | None
    warning: float
    updated_by: str | None
    updated_at: datetime | None


class BudgetSet(msgspec.Struct, kw_only=True):
    definition: BudgetDefinition
    """As stored (`llm_usd_per_month` and `compute_usd_per_month` both null: removed)."""
    status: BudgetStatus
    """Against the current month."""


class SuccessRateRow(msgspec.Struct, kw_only=True):
    group: str
    runs: int
    successes: int
    success_rate: float
    ci95_low: float
    ci95_high: float
    """Wilson score interval, 95 %."""


class DurationRow(msgspec.Struct, kw_only=True):
    group: str
    runs: int
    run_seconds_p95: float
    queue_runs: int
    queue_seconds_p95: float | None


class OomRow(msgspec.Struct, kw_only=True):
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
    """p95 of the observed peaks * `headroom`, rounded up to 64 MiB."""
    suggested_limit: str | None


class CostPerSuccessRow(msgspec.Struct, kw_only=True):
    group: str
    runs: int
    successes: int
    total_cost_usd: Money
    cost_per_success_usd: Money | None
    """Null when nothing succeeded."""


class RetriedRun(msgspec.Struct, kw_only=True):
    run_id: str
    project: str | None
    spec: str | None
    attempts: int
    state: str | None
    reason: str | None


class FailingSpecRow(msgspec.Struct, kw_only=True):
    spec: str
    runs: int
    failures: int
    failure_rate: float
    ci95_low: float
    ci95_high: float
    reasons: dict[str, int]


class Insights(msgspec.Struct, kw_only=True):
    project: str | None
    """The project the insights are about; null: every project."""
    min_runs: int
    """Groups with fewer decided runs are left out."""
    runs: int
    decided_runs: int
    success_rate: dict[str, list[SuccessRateRow]]
    """By `model`, `spec` and `project`."""
    durations_p95: dict[str, list[DurationRow]]
    oom: list[OomRow]
    cost_per_success: dict[str, list[CostPerSuccessRow]]
    """By `spec` and `project`."""
    most_retried: list[RetriedRun]
    retried_runs: int
    failing_specs: list[FailingSpecRow]


class RebuildResult(msgspec.Struct, kw_only=True):
    run_events: int
    usage_events: int
    runs: int
    llm_calls: int
    seconds: float
