"""Every event Fabrik services exchange, as frozen msgspec Structs in one tagged union per stream.

Each event class names its wire tag (the `type` field) and its subject template; `subject()`
fills the template from the event's own fields, so producers never build subjects by hand and
the AsyncAPI document is generated from the same declarations. Unknown fields are ignored on
decode (forward compatible); changing the meaning of a field means bumping `schema_version`.
"""

from __future__ import annotations

import string
from datetime import datetime
from typing import Annotated, Any, ClassVar, Literal

import msgspec

from fabrik_common.ids import new_ulid, utcnow
from fabrik_common.portable import PortableRun

SCHEMA_VERSION = 1

RunId = Annotated[str, msgspec.Meta(min_length=26, max_length=26, description="Run ULID")]
ProjectName = Annotated[
    str,
    msgspec.Meta(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=63, description="DNS-1123 label"),
]
NonNegInt = Annotated[int, msgspec.Meta(ge=0)]
# Every timestamp on the wire carries its offset; a naive time is rejected on decode.
UtcDatetime = Annotated[datetime, msgspec.Meta(tz=True)]
NonNegFloat = Annotated[float, msgspec.Meta(ge=0)]

RunState = Literal[
    "queued",
    "starting",
    "running",
    "cancelling",
    "succeeded",
    "failed",
    "cancelled",
    "timed_out",
    "budget_exceeded",
]
TERMINAL_STATES: frozenset[str] = frozenset(
    {"succeeded", "failed", "cancelled", "timed_out", "budget_exceeded"}
)
Outcome = Literal["succeeded", "failed", "cancelled", "timed_out", "budget_exceeded"]
Priority = Literal["low", "normal", "high"]
Severity = Literal["info", "warning", "critical"]


class Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    """Fields every event carries. Subclasses set `SUBJECT` and a tag."""

    SUBJECT: ClassVar[str] = ""

    event_id: str = msgspec.field(default_factory=new_ulid)
    occurred_at: UtcDatetime = msgspec.field(default_factory=utcnow)
    schema_version: int = SCHEMA_VERSION

    def subject(self) -> str:
        return self.SUBJECT.format_map(_SubjectFields(self))

    @classmethod
    def event_type(cls) -> str:
        tag = cls.__struct_config__.tag
        assert isinstance(tag, str), f"{cls.__name__} has no string tag"
        return tag

    @classmethod
    def subject_parameters(cls) -> list[str]:
        return [name for _, name, _, _ in string.Formatter().parse(cls.SUBJECT) if name]

    @classmethod
    def subject_filter(cls) -> str:
        """The subject with every parameter replaced by the single-token wildcard."""
        return cls.SUBJECT.format_map({p: "*" for p in cls.subject_parameters()})


class _SubjectFields(dict[str, str]):
    def __init__(self, event: Event) -> None:
        super().__init__()
        self._event = event

    def __missing__(self, key: str) -> str:
        value = getattr(self._event, key)
        text = str(value)
        if not text or any(c in text for c in ". *>\t\r\n"):
            raise ValueError(f"field {key!r}={text!r} cannot be a subject token")
        return text


# --------------------------------------------------------------------------------------------
# Run requests: what a user asks for. Shared by RunRequested and RunDispatched.


class RepoRef(msgspec.Struct, frozen=True, kw_only=True):
    url: str
    ref: str = "HEAD"


class Workload(msgspec.Struct, frozen=True, kw_only=True):
    image: str | None = None
    command: tuple[str, ...] = ()
    args: tuple[str, ...] = ()
    env: dict[str, str] = msgspec.field(default_factory=dict)


class Resources(msgspec.Struct, frozen=True, kw_only=True):
    """Kubernetes quantities, e.g. cpu `500m` or `2`, memory `1Gi`."""

    cpu_request: str
    memory_request: str
    cpu_limit: str
    memory_limit: str


class RunParameters(msgspec.Struct, frozen=True, kw_only=True):
    spec: dict[str, Any] | None = None
    spec_path: str | None = None
    todo: dict[str, Any] | None = None
    repo: RepoRef | None = None
    workload: Workload = msgspec.field(default_factory=Workload)
    resources: Resources
    template: str | None = None
    timeout_seconds: Annotated[int, msgspec.Meta(ge=1, le=86400)] = 86400
    priority: Priority = "normal"
    budget_usd: NonNegFloat | None = None
    labels: dict[str, str] = msgspec.field(default_factory=dict)
    schedule_id: str | None = None
    schedule_slot: UtcDatetime | None = None


class ExperimentArmRef(msgspec.Struct, frozen=True, kw_only=True):
    """The arm of an experiment a run was assigned to at dispatch (sticky across resumes)."""

    id: str
    arm: str


# --------------------------------------------------------------------------------------------
# RUNS stream: fabrik.runs.<kind>.<run_id>


class RunEventBase(Event, frozen=True, kw_only=True):
    run_id: RunId


class RunRequested(RunEventBase, frozen=True, kw_only=True, tag="run.requested"):
    """A user (API, CLI, GitHub, Slack, a schedule) asked for a new run. Emitted by the gateway."""

    SUBJECT = "fabrik.runs.requested.{run_id}"
    project: ProjectName
    env: ProjectName
    params: RunParameters
    requested_by: str
    idempotency_key: str | None = None


class RunCancelRequested(RunEventBase, frozen=True, kw_only=True, tag="run.cancel_requested"):
    """A user or the platform (reaper, budget) asked to stop a run. Emitted by gateway and scheduler."""

    SUBJECT = "fabrik.runs.cancel_requested.{run_id}"
    requested_by: str
    reason: str = ""


class RunResumeRequested(RunEventBase, frozen=True, kw_only=True, tag="run.resume_requested"):
    """A user asked to continue a failed, timed-out or cancelled run with a new attempt."""

    SUBJECT = "fabrik.runs.resume_requested.{run_id}"
    requested_by: str


class RunQueued(RunEventBase, frozen=True, kw_only=True, tag="run.queued"):
    """The scheduler accepted the run into its queue. Emitted by the scheduler."""

    SUBJECT = "fabrik.runs.queued.{run_id}"
    project: ProjectName
    attempt: Annotated[int, msgspec.Meta(ge=1)]


class RunDispatched(RunEventBase, frozen=True, kw_only=True, tag="run.dispatched"):
    """The scheduler hands an attempt to the executor: everything needed to start the workload."""

    SUBJECT = "fabrik.runs.dispatched.{run_id}"
    project: ProjectName
    env: ProjectName
    attempt: Annotated[int, msgspec.Meta(ge=1)]
    params: RunParameters
    image_digest: str | None = None
    experiment_arm: str | None = None
    """`<experiment id>/<arm>` per experiment the run takes part in, comma-separated."""
    experiment: ExperimentArmRef | None = None
    """The first experiment the run takes part in and its arm (all of them: `experiments`)."""
    experiments: tuple[ExperimentArmRef, ...] = ()
    deadline: UtcDatetime


class RunStateChanged(RunEventBase, frozen=True, kw_only=True, tag="run.state_changed"):
    """A transition of the run state machine, written by its single writer, the scheduler."""

    SUBJECT = "fabrik.runs.state_changed.{run_id}"
    project: ProjectName
    attempt: Annotated[int, msgspec.Meta(ge=1)]
    from_state: RunState | None
    to_state: RunState
    reason: str | None = None
    message: str = ""
    revision: NonNegInt = 0


class RunStarted(RunEventBase, frozen=True, kw_only=True, tag="run.started"):
    """The executor's workload for an attempt is running."""

    SUBJECT = "fabrik.runs.started.{run_id}"
    attempt: Annotated[int, msgspec.Meta(ge=1)]
    backend: Literal["local", "kubernetes"]
    workload_ref: str
    image_digest: str | None = None


class RunProgress(RunEventBase, frozen=True, kw_only=True, tag="run.progress"):
    """Coalesced `::fabrik::progress` lines of a workload."""

    SUBJECT = "fabrik.runs.progress.{run_id}"
    attempt: Annotated[int, msgspec.Meta(ge=1)]
    phase: str | None = None
    task: str | None = None
    finished: NonNegInt | None = None
    total: NonNegInt | None = None
    message: str | None = None


class RunResultReported(RunEventBase, frozen=True, kw_only=True, tag="run.result"):
    """A `::fabrik::result` line of a workload: its own account of what it achieved."""

    SUBJECT = "fabrik.runs.result.{run_id}"
    attempt: Annotated[int, msgspec.Meta(ge=1)]
    result: dict[str, Any]


class RunFinished(RunEventBase, frozen=True, kw_only=True, tag="run.finished"):
    """The executor observed the end of an attempt's workload."""

    SUBJECT = "fabrik.runs.finished.{run_id}"
    attempt: Annotated[int, msgspec.Meta(ge=1)]
    outcome: Outcome
    reason: str | None = None
    exit_code: int | None = None
    message: str = ""
    peak_memory_bytes: NonNegInt | None = None


class RunBudgetExceeded(RunEventBase, frozen=True, kw_only=True, tag="run.budget_exceeded"):
    """The llm-proxy refused a call because the run or its project is out of budget."""

    SUBJECT = "fabrik.runs.budget_exceeded.{run_id}"
    project: ProjectName
    scope: Literal["run", "project"]
    budget_usd: NonNegFloat
    spent_usd: NonNegFloat


RunHealth = Literal["healthy", "stalled", "healing", "failed"]
HealthCategory = Literal["workload_error", "infra_error", "transient_exhausted", "unknown"]


class RunHealthChanged(RunEventBase, frozen=True, kw_only=True, tag="run.health_changed"):
    """The scheduler's view of a run's liveness changed, or it decided how to heal it.

    `decision` says what the scheduler did: `stall` (no progress for the threshold), `heal` (a new
    attempt, `attempt` being that new attempt, `heal_attempt` its number in the healing episode),
    `recover` (progress again), `fail` (given up: `category` and `message` say why)."""

    SUBJECT = "fabrik.runs.health_changed.{run_id}"
    project: ProjectName
    attempt: Annotated[int, msgspec.Meta(ge=1)]
    from_health: RunHealth
    to_health: RunHealth
    decision: Literal["stall", "heal", "recover", "fail"]
    reason: str = ""
    heal_attempt: NonNegInt = 0
    category: HealthCategory | None = None
    message: str = ""
    last_progress_at: UtcDatetime | None = None


class RunImported(RunEventBase, frozen=True, kw_only=True, tag="run.imported"):
    """A finished run brought over from another installation or from Smithers (docs/migration.md).

    Published by the gateway with `Nats-Msg-Id` `import-<run_id>`; the scheduler records the run
    in its terminal state only if no record of that id exists, so importing twice changes nothing."""

    SUBJECT = "fabrik.runs.imported.{run_id}"
    project: ProjectName
    run: PortableRun
    imported_by: str


RunEvent = (
    RunRequested
    | RunCancelRequested
    | RunResumeRequested
    | RunQueued
    | RunDispatched
    | RunStateChanged
    | RunStarted
    | RunProgress
    | RunResultReported
    | RunFinished
    | RunBudgetExceeded
    | RunHealthChanged
    | RunImported
)

# --------------------------------------------------------------------------------------------
# LOGS stream: fabrik.logs.<run_id>


class LogLine(msgspec.Struct, frozen=True, kw_only=True):
    ts: UtcDatetime
    stream: Literal["stdout", "stderr", "system"]
    text: str


class RunLogChunk(RunEventBase, frozen=True, kw_only=True, tag="log.chunk"):
    """Consecutive lines of one attempt's output, in order; `first_line` numbers them."""

    SUBJECT = "fabrik.logs.{run_id}"
    attempt: Annotated[int, msgspec.Meta(ge=1)]
    first_line: NonNegInt
    lines: tuple[LogLine, ...]


LogEvent = RunLogChunk

# --------------------------------------------------------------------------------------------
# LLM stream: fabrik.llm.usage


class LlmUsage(Event, frozen=True, kw_only=True, tag="llm.usage"):
    """One LLM call through the llm-proxy, streamed or not, successful or not."""

    SUBJECT = "fabrik.llm.usage"
    call_id: str
    run_id: str | None = None
    project: str | None = None
    key_id: str
    endpoint: Literal["chat.completions", "responses", "messages"]
    model: str
    provider: str
    deployment: str
    upstream_model: str
    streamed: bool
    input_tokens: NonNegInt = 0
    output_tokens: NonNegInt = 0
    cache_read_tokens: NonNegInt = 0
    cache_write_tokens: NonNegInt = 0
    estimated: bool = False
    cost_usd: NonNegFloat = 0.0
    latency_ms: NonNegFloat
    ttfb_ms: NonNegFloat | None = None
    retries: NonNegInt = 0
    outcome: Literal["ok", "error", "refused", "client_disconnected"]
    error: str | None = None


LlmEvent = LlmUsage

# --------------------------------------------------------------------------------------------
# INGEST stream: verified webhooks exactly as received


class GithubDeliveryReceived(Event, frozen=True, kw_only=True, tag="ingest.github"):
    """A GitHub webhook delivery whose signature was verified; `body` is the payload as received."""

    SUBJECT = "fabrik.ingest.github.{github_event}"
    delivery_id: str
    github_event: Annotated[str, msgspec.Meta(pattern=r"^[a-z_]+$")]
    body: str
    received_at: UtcDatetime


class SlackCommandReceived(Event, frozen=True, kw_only=True, tag="ingest.slack.command"):
    """A Slack slash command whose signature and timestamp were verified."""

    SUBJECT = "fabrik.ingest.slack.command"
    request_id: str
    command: str
    text: str
    user_id: str
    user_name: str = ""
    team_id: str = ""
    channel_id: str = ""
    response_url: str = ""
    received_at: UtcDatetime


IngestEvent = GithubDeliveryReceived | SlackCommandReceived

# --------------------------------------------------------------------------------------------
# OPS stream: alerts, audit, backup, optimizer


class AlertRaised(Event, frozen=True, kw_only=True, tag="alert.raised"):
    """An alert episode opened (or re-alerted). `key` identifies the episode for de-duplication."""

    SUBJECT = "fabrik.alerts.raised.{severity}"
    alert_id: str
    key: str
    severity: Severity
    source: str
    title: str
    message: str = ""
    entity_kind: str | None = None
    entity_id: str | None = None
    project: str | None = None
    labels: dict[str, str] = msgspec.field(default_factory=dict)
    link: str | None = None


class AlertResolved(Event, frozen=True, kw_only=True, tag="alert.resolved"):
    """The alert episode `key` is over: the condition is healthy again."""

    SUBJECT = "fabrik.alerts.resolved"
    alert_id: str
    key: str
    source: str
    message: str = ""


class AuditRecorded(Event, frozen=True, kw_only=True, tag="audit.recorded"):
    """A state-changing request: who did what to which target, and with what result."""

    SUBJECT = "fabrik.audit.recorded"
    actor: str
    role: str
    action: str
    target: str
    project: str | None = None
    result: Literal["ok", "denied", "failed"]
    details: dict[str, Any] = msgspec.field(default_factory=dict)


BackupOperation = Literal["backup", "verify", "restore"]
BackupState = Literal["requested", "running", "succeeded", "failed", "cancelling", "cancelled"]


class BackupRequested(Event, frozen=True, kw_only=True, tag="backup.requested"):
    """A backup, verify or restore operation was asked for (by a user or a backup schedule)."""

    SUBJECT = "fabrik.backup.requested.{operation_id}"
    operation_id: str
    operation: BackupOperation
    target: str
    backup_id: str | None = None
    options: dict[str, Any] = msgspec.field(default_factory=dict)
    requested_by: str


class BackupCancelRequested(Event, frozen=True, kw_only=True, tag="backup.cancel_requested"):
    """A user asked to cancel a running backup operation."""

    SUBJECT = "fabrik.backup.cancel_requested.{operation_id}"
    operation_id: str
    requested_by: str


class BackupStateChanged(Event, frozen=True, kw_only=True, tag="backup.state_changed"):
    """A backup operation moved through its state machine, with its progress."""

    SUBJECT = "fabrik.backup.state_changed.{operation_id}"
    operation_id: str
    operation: BackupOperation
    state: BackupState
    backup_id: str | None = None
    message: str = ""
    bytes_done: NonNegInt = 0
    parts_done: NonNegInt = 0


class ExperimentChanged(Event, frozen=True, kw_only=True, tag="optimizer.experiment_changed"):
    """An experiment was proposed, started, paused or ended."""

    SUBJECT = "fabrik.optimizer.experiment_changed.{experiment_id}"
    experiment_id: str
    status: Literal[
        "proposed",
        "running",
        "paused",
        "shipped",
        "rolled_back",
        "stopped",
        "invalid",
        "created",
        "pending_approval",
        "approved",
        "resumed",
    ]
    by: str
    message: str = ""
    numbers: dict[str, Any] = msgspec.field(default_factory=dict)


class ExperimentDecision(Event, frozen=True, kw_only=True, tag="optimizer.decision"):
    """The optimizer's statistical decision on an experiment, with the numbers behind it."""

    SUBJECT = "fabrik.optimizer.decision.{experiment_id}"
    experiment_id: str
    decision: Literal["invalid", "rollback", "ship", "continue", "stop"]
    numbers: dict[str, Any]
    approved_by: str | None = None


class ConfigChanged(Event, frozen=True, kw_only=True, tag="optimizer.config_changed"):
    """A run-configuration default in the `config` KV changed (rollout, rollback or by hand)."""

    SUBJECT = "fabrik.optimizer.config_changed"
    key: str
    old: Any
    new: Any
    experiment_id: str | None = None
    decision: str | None = None
    approved_by: str | None = None
    by: str | None = None
    """Who made the change (a user, or `optimizer` for its own decisions)."""


class BudgetLevelCrossed(Event, frozen=True, kw_only=True, tag="optimizer.budget_level_crossed"):
    """Spend crossed a budget's warning or limit level in a period (once per level per period)."""

    SUBJECT = "fabrik.optimizer.budget_level_crossed"
    scope: Literal["global", "project"]
    project: str | None = None
    kind: Literal["llm", "compute"]
    level: Literal["warning", "limit"]
    period: str
    spent_usd: NonNegFloat
    limit_usd: NonNegFloat


OpsEvent = (
    AlertRaised
    | AlertResolved
    | AuditRecorded
    | BackupRequested
    | BackupCancelRequested
    | BackupStateChanged
    | ExperimentChanged
    | ExperimentDecision
    | ConfigChanged
    | BudgetLevelCrossed
)

AnyEvent = RunEvent | LogEvent | LlmEvent | IngestEvent | OpsEvent
