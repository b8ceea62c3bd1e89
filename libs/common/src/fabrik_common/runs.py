"""The run record (value of the `runs` KV bucket), the run state machine and resource templates.

The scheduler is the single writer of run records; the gateway reads them as its read model and
the executor receives what it needs in `RunDispatched`. Keeping the types and the transition table
here gives all three one vocabulary.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

import msgspec

from fabrik_common.events import (
    TERMINAL_STATES,
    ExperimentArmRef,
    HealthCategory,
    NonNegInt,
    Outcome,
    Resources,
    RunHealth,
    RunParameters,
    RunState,
)

# Allowed transitions (DESIGN §3). Terminal states only leave through resume (→ queued).
TRANSITIONS: dict[str, frozenset[str]] = {
    "queued": frozenset({"starting", "cancelled", "failed"}),
    "starting": frozenset(
        {"running", "cancelling", "succeeded", "failed", "cancelled", "timed_out", "budget_exceeded"}
    ),
    # running → queued: a stalled run healed with a new attempt (the scheduler's run health).
    "running": frozenset(
        {"queued", "cancelling", "succeeded", "failed", "cancelled", "timed_out", "budget_exceeded"}
    ),
    "cancelling": frozenset({"cancelled", "succeeded", "failed", "timed_out", "budget_exceeded"}),
    "succeeded": frozenset(),
    "failed": frozenset({"queued"}),
    "cancelled": frozenset({"queued"}),
    "timed_out": frozenset({"queued"}),
    "budget_exceeded": frozenset(),
}
RESUMABLE_STATES: frozenset[str] = frozenset({"failed", "timed_out", "cancelled"})
IMPORTED_BY_PREFIX = "import:"
"""`requested_by` of a run recorded from an import (`import:<system>:<who>`, docs/migration.md)."""
ACTIVE_STATES: frozenset[str] = frozenset({"starting", "running", "cancelling"})


class TransitionError(ValueError):
    pass


def check_transition(current: str, target: str) -> None:
    if target not in TRANSITIONS.get(current, frozenset()):
        raise TransitionError(f"a run cannot go from {current} to {target}")


def is_terminal(state: str) -> bool:
    return state in TERMINAL_STATES


def resume_refusal(record: RunRecord) -> str | None:
    """Why `record` cannot be resumed, naming the rule; None when it can. A resume continues the
    run's workload from its own workspace volume with the same image digest: an imported run
    never had either on this installation, whatever its state."""
    if record.requested_by.startswith(IMPORTED_BY_PREFIX):
        return (
            f"run {record.run_id} was imported ({record.requested_by}); an imported run has no "
            "workspace or image digest to resume from and cannot be resumed: submit a new run instead"
        )
    if record.state not in RESUMABLE_STATES:
        return (
            f"run {record.run_id} is {record.state}; only a failed, timed_out or cancelled run can be resumed"
        )
    return None


TEMPLATES: dict[str, Resources] = {
    "default": Resources(cpu_request="500m", memory_request="1Gi", cpu_limit="2", memory_limit="4Gi"),
    "high-cpu": Resources(cpu_request="8", memory_request="16Gi", cpu_limit="8", memory_limit="16Gi"),
}


class Progress(msgspec.Struct, kw_only=True, omit_defaults=False):
    phase: str | None = None
    task: str | None = None
    finished: NonNegInt | None = None
    total: NonNegInt | None = None
    message: str | None = None
    updated_at: datetime | None = None


class Tokens(msgspec.Struct, kw_only=True):
    input: NonNegInt = 0
    output: NonNegInt = 0
    cache_read: NonNegInt = 0
    cache_write: NonNegInt = 0


class AttemptRecord(msgspec.Struct, kw_only=True):
    attempt: int
    dispatched_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    outcome: Outcome | None = None
    reason: str | None = None
    exit_code: int | None = None
    workload_ref: str | None = None


class RunHealthRecord(msgspec.Struct, kw_only=True):
    """The run's liveness as the scheduler judges it (see docs/run-health.md)."""

    state: RunHealth = "healthy"
    since: datetime | None = None
    reason: str | None = None
    category: HealthCategory | None = None
    message: str = ""
    last_progress_at: datetime | None = None
    """When the scheduler last saw progress of the current attempt (its own clock)."""
    heals: NonNegInt = 0
    """Healing attempts in the current episode (reset when the run recovers)."""
    heals_total: NonNegInt = 0
    first_heal_at: datetime | None = None
    changes: NonNegInt = 0
    """Health changes so far: numbers the `run.health_changed` announcements (message ids)."""


class RunRecord(msgspec.Struct, kw_only=True):
    """A run as the scheduler keeps it in the `runs` KV bucket (key = run id)."""

    run_id: str
    project: str
    env: str
    spec_id: str | None = None
    params: RunParameters
    state: RunState
    reason: str | None = None
    message: str = ""
    attempt: int = 1
    attempts: list[AttemptRecord] = msgspec.field(default_factory=list)
    progress: Progress = msgspec.field(default_factory=Progress)
    result: dict[str, Any] | None = None
    requested_by: str = ""
    idempotency_key: str | None = None
    created_at: datetime
    queued_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    state_entered_at: datetime
    deadline: datetime | None = None
    exit_code: int | None = None
    image_digest: str | None = None
    experiment_arm: str | None = None
    experiments: list[ExperimentArmRef] = msgspec.field(default_factory=list)
    """The experiments and arms the run was assigned to at its first dispatch (kept on resume)."""
    cost_usd: float = 0.0
    tokens: Tokens = msgspec.field(default_factory=Tokens)
    peak_memory_bytes: int | None = None
    # Stream sequence of the last `llm.usage` event added to cost_usd/tokens (exactly-once).
    usage_seq: int = 0
    llm_calls: int = 0
    health: RunHealthRecord = msgspec.field(default_factory=RunHealthRecord)
    revision: int = 0

    @property
    def labels(self) -> dict[str, str]:
        return self.params.labels


class QueueEntry(msgspec.Struct, kw_only=True, array_like=True):
    run_id: str
    project: str
    priority: Literal["low", "normal", "high"]
    eta_seconds: float | None


class QueueSnapshot(msgspec.Struct, kw_only=True):
    """The scheduler's queue in dispatch order (KV `queue`, key `snapshot`), refreshed on change."""

    taken_at: datetime
    entries: list[QueueEntry]
    total: int
    running: int
    usage: dict[str, dict[str, float]] = msgspec.field(default_factory=dict)
    limits: dict[str, dict[str, float]] = msgspec.field(default_factory=dict)


def parse_cpu(quantity: str) -> float:
    """A Kubernetes CPU quantity in cores: `500m` → 0.5, `2` → 2.0."""
    text = quantity.strip()
    try:
        if text.endswith("m"):
            return float(text[:-1]) / 1000
        return float(text)
    except ValueError:
        raise ValueError(
            f"invalid CPU quantity {quantity!r}: use cores like '2' or millicores like '500m'"
        ) from None


_MEMORY_UNITS = {
    "Ki": 1024,
    "Mi": 1024**2,
    "Gi": 1024**3,
    "Ti": 1024**4,
    "K": 1000,
    "M": 1000**2,
    "G": 1000**3,
    "T": 1000**4,
    "k": 1000,
}


def parse_memory(quantity: str) -> int:
    """A Kubernetes memory quantity in bytes: `1Gi` → 1073741824, `512Mi`, `1G`, `1000`."""
    text = quantity.strip()
    for unit in sorted(_MEMORY_UNITS, key=len, reverse=True):
        if text.endswith(unit):
            number = text[: -len(unit)]
            try:
                return int(float(number) * _MEMORY_UNITS[unit])
            except ValueError:
                break
    else:
        try:
            return int(float(text))
        except ValueError:
            pass
    raise ValueError(f"invalid memory quantity {quantity!r}: use bytes or a unit like '512Mi', '4Gi', '1G'")
