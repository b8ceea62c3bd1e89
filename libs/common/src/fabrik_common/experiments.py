"""Experiments on run configuration: the model shared by the optimizer, the scheduler and the gateway.

An experiment changes one *parameter* of how runs are configured (`resources.memory_limit`,
`model`, `template`, `harness.<key>`, ...) for a small share of the runs matching its *target*,
and compares those runs (the treatment arms) with the rest (the control arm).

Storage (the `config` KV bucket, written only by the optimizer):

- `experiments.<id>`: an `Experiment` (definition and state) as JSON;
- `defaults`: the run-configuration `Defaults` every dispatched run gets (rollouts change them);
- `optimizer.paused`: the global `OptimizerPause`.

Overrides are flat maps of a configuration path to a value (`{"resources.memory_limit": "6Gi"}`);
`apply_overrides` applies them to a run's parameters. Assignment is a stable hash of
(experiment id, run id), so a resumed run (same id) lands in the same arm.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Final, Literal

import msgspec

from fabrik_common.events import ExperimentArmRef, RunParameters, UtcDatetime

EXPERIMENT_PREFIX: Final = "experiments."
DEFAULTS_KEY: Final = "defaults"
PAUSE_KEY: Final = "optimizer.paused"
PROTECTED_ENVS: Final = frozenset({"prod", "production", "live"})
MAX_TREATMENT_SHARE: Final = 0.20
DEFAULT_TREATMENT_SHARE: Final = 0.10

Risk = Literal["low", "medium", "high"]
ExperimentState = Literal[
    "draft", "pending_approval", "active", "paused", "shipped", "rolled_back", "stopped", "invalid"
]
ACTIVE_STATES: Final = frozenset({"active"})
ENDED_STATES: Final = frozenset({"shipped", "rolled_back", "stopped", "invalid"})
PrimaryMetric = Literal["success_rate"]
Guardrail = Literal["failure_rate", "cost_per_run", "duration_p95", "oom_rate"]
ALL_GUARDRAILS: Final[tuple[Guardrail, ...]] = ("failure_rate", "cost_per_run", "duration_p95", "oom_rate")
ApprovalKind = Literal["start", "ship"]
OverrideValue = str | int | float | bool

ARM_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
HARNESS_KEY = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
RESOURCE_FIELDS: Final = ("cpu_request", "memory_request", "cpu_limit", "memory_limit")
QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti)?$")
MODEL_ENV: Final = "FABRIK_MODEL"
HARNESS_ENV_PREFIX: Final = "FABRIK_HARNESS_"

ExperimentId = Annotated[str, msgspec.Meta(pattern=r"^[0-9A-Za-z]{26}$", description="Experiment ULID")]


class _Struct(msgspec.Struct, frozen=True, kw_only=True):
    pass


class Target(_Struct, frozen=True, kw_only=True):
    """Which runs an experiment may take: all of the given conditions hold (none given: every run)."""

    project: str | None = None
    spec: str | None = None
    env: str | None = None
    labels: dict[str, str] = msgspec.field(default_factory=dict)


class Arm(_Struct, frozen=True, kw_only=True):
    name: str
    overrides: dict[str, OverrideValue] = msgspec.field(default_factory=dict)


class Approval(_Struct, frozen=True, kw_only=True):
    by: str
    at: UtcDatetime
    kind: ApprovalKind


class Experiment(_Struct, frozen=True, kw_only=True):
    id: str
    name: str
    target: Target = msgspec.field(default_factory=Target)
    parameter: str
    control: Arm
    treatments: list[Arm]
    treatment_share: float = DEFAULT_TREATMENT_SHARE
    """Share of the matching runs that go to the treatments together (split evenly)."""
    primary_metric: PrimaryMetric = "success_rate"
    guardrails: list[Guardrail] = msgspec.field(default_factory=lambda: list(ALL_GUARDRAILS))
    risk: Risk = "low"
    min_runs_per_arm: int = 30
    max_duration_seconds: int = 14 * 86400
    protected_env: bool = False
    """May take runs in protected environments (`prod`, `production`, `live`); needs an approval
    before it starts. Without it, runs there are never assigned."""
    approved_cost_ceiling: float = 3.0
    """Emergency rollback when the treatment's cost per run exceeds this multiple of the control's."""
    state: ExperimentState = "draft"
    created_at: UtcDatetime
    created_by: str
    started_at: UtcDatetime | None = None
    ended_at: UtcDatetime | None = None
    approvals: list[Approval] = msgspec.field(default_factory=list)
    decision: str | None = None
    reasons: list[str] = msgspec.field(default_factory=list)
    numbers: dict[str, Any] = msgspec.field(default_factory=dict)
    evaluated_at: UtcDatetime | None = None
    winner: str | None = None
    """The treatment arm a SHIP decision chose (waits for approval when the risk is not low)."""

    def arms(self) -> list[Arm]:
        return [self.control, *self.treatments]

    def arm(self, name: str) -> Arm | None:
        return next((a for a in self.arms() if a.name == name), None)

    def approved(self, kind: ApprovalKind) -> bool:
        return any(a.kind == kind for a in self.approvals)


class Defaults(_Struct, frozen=True, kw_only=True):
    """The run-configuration defaults every dispatched run gets before any arm's overrides."""

    overrides: dict[str, OverrideValue] = msgspec.field(default_factory=dict)
    updated_at: UtcDatetime | None = None
    updated_by: str | None = None
    experiment_id: str | None = None
    revision: int = 0


class OptimizerPause(_Struct, frozen=True, kw_only=True):
    paused: bool
    reason: str = ""
    by: str = ""
    at: UtcDatetime | None = None


def experiment_key(experiment_id: str) -> str:
    return f"{EXPERIMENT_PREFIX}{experiment_id}"


def encode(value: msgspec.Struct) -> bytes:
    return msgspec.json.encode(value)


def decode_experiment(data: bytes) -> Experiment:
    return msgspec.json.decode(data, type=Experiment)


def decode_defaults(data: bytes | None) -> Defaults:
    return msgspec.json.decode(data, type=Defaults) if data else Defaults()


def decode_pause(data: bytes | None) -> OptimizerPause:
    return msgspec.json.decode(data, type=OptimizerPause) if data else OptimizerPause(paused=False)


# ------------------------------------------------------------------------------------------------
# validation


def parameter_rule(path: str) -> str | None:
    """Why `path` is not a configuration path an experiment can change (None when it is)."""
    if path in ("model", "template", "timeout_seconds", "budget_usd"):
        return None
    if path.startswith("resources."):
        return (
            None
            if path.removeprefix("resources.") in RESOURCE_FIELDS
            else ("must be one of resources." + ", resources.".join(RESOURCE_FIELDS))
        )
    if path.startswith("harness."):
        key = path.removeprefix("harness.")
        return None if HARNESS_KEY.match(key) else "harness key must match ^[a-z][a-z0-9_]{0,62}$"
    return "must be model, template, timeout_seconds, budget_usd, resources.<field> or harness.<key>"


def value_rule(path: str, value: OverrideValue) -> str | None:
    if path.startswith("resources."):
        if not isinstance(value, str) or not QUANTITY.match(value):
            return "must be a Kubernetes quantity such as 500m, 2, 512Mi or 4Gi"
        return None
    if path == "timeout_seconds":
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 86400:
            return "must be an integer from 1 to 86400"
        return None
    if path == "budget_usd":
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            return "must be a number >= 0"
        return None
    if path in ("model", "template"):
        return None if isinstance(value, str) and value else "must be a non-empty string"
    return None


def validate_overrides(overrides: Mapping[str, OverrideValue], field: str) -> list[tuple[str, str]]:
    errors: list[tuple[str, str]] = []
    for path, value in overrides.items():
        rule = parameter_rule(path) or value_rule(path, value)
        if rule is not None:
            errors.append((f"{field}.{path}", rule))
    return errors


def validate(experiment: Experiment) -> list[tuple[str, str]]:
    """Every broken rule as (field, rule); empty when the experiment is valid."""
    errors: list[tuple[str, str]] = []
    if not experiment.name.strip() or len(experiment.name) > 200:
        errors.append(("name", "must be 1 to 200 characters"))
    if (rule := parameter_rule(experiment.parameter)) is not None:
        errors.append(("parameter", rule))
    if not experiment.treatments:
        errors.append(("treatments", "at least one treatment arm is required"))
    names: set[str] = set()
    for i, arm in enumerate(experiment.arms()):
        field = "control" if i == 0 else f"treatments[{i - 1}]"
        if not ARM_NAME.match(arm.name) or len(arm.name) > 63:
            errors.append((f"{field}.name", "must be a DNS-1123 label"))
        if arm.name in names:
            errors.append((f"{field}.name", "arm names must be unique"))
        names.add(arm.name)
        errors.extend(validate_overrides(arm.overrides, f"{field}.overrides"))
        for path in arm.overrides:
            if path != experiment.parameter:
                errors.append(
                    (
                        f"{field}.overrides.{path}",
                        f"an arm may only change the parameter {experiment.parameter}",
                    )
                )
        if i > 0 and experiment.parameter not in arm.overrides:
            errors.append(
                (f"{field}.overrides", f"a treatment must set the parameter {experiment.parameter}")
            )
    if not 0 < experiment.treatment_share <= MAX_TREATMENT_SHARE:
        errors.append(("treatment_share", f"must be > 0 and <= {MAX_TREATMENT_SHARE}"))
    if not 1 <= experiment.min_runs_per_arm <= 1_000_000:
        errors.append(("min_runs_per_arm", "must be from 1 to 1000000"))
    if not 3600 <= experiment.max_duration_seconds <= 90 * 86400:
        errors.append(("max_duration_seconds", "must be from 3600 (1 h) to 7776000 (90 days)"))
    if len(set(experiment.guardrails)) != len(experiment.guardrails):
        errors.append(("guardrails", "must not repeat a metric"))
    if experiment.approved_cost_ceiling < 1:
        errors.append(("approved_cost_ceiling", "must be >= 1"))
    target = experiment.target
    if target.env is not None and target.env in PROTECTED_ENVS and not experiment.protected_env:
        errors.append(
            ("target.env", "is protected: set protected_env (the experiment then needs an approval)")
        )
    return errors


def needs_start_approval(experiment: Experiment) -> bool:
    """Protected environments and medium/high risk need a maintainer's approval before starting."""
    return experiment.protected_env or experiment.risk != "low"


# ------------------------------------------------------------------------------------------------
# assignment


@dataclass(frozen=True)
class RunFacts:
    """What matching looks at."""

    run_id: str
    project: str
    env: str
    spec_id: str | None
    labels: Mapping[str, str]
    pinned: frozenset[str] = frozenset()
    """Parameters the run's request set itself (`pinned_parameters`): no experiment takes them."""


def pinned_parameters(params: RunParameters) -> frozenset[str]:
    """The parameters a run's request chose explicitly, which neither the defaults nor an
    experiment change: `resources.*` when it gave resources instead of a template (the gateway
    then records no template), `budget_usd` when it set one. The others cannot be told from
    their defaults (`timeout_seconds`, the template `default`) or are never requested
    (`model`, `harness.*`: `FABRIK_*` keys are refused in a request's `workload.env`)."""
    pinned: set[str] = set()
    if params.template is None:
        pinned.update(f"resources.{field}" for field in RESOURCE_FIELDS)
    if params.budget_usd is not None:
        pinned.add("budget_usd")
    return frozenset(pinned)


def matches(experiment: Experiment, run: RunFacts) -> bool:
    target = experiment.target
    if target.project is not None and target.project != run.project:
        return False
    if target.spec is not None and target.spec != run.spec_id:
        return False
    if target.env is not None and target.env != run.env:
        return False
    if run.env in PROTECTED_ENVS and not (experiment.protected_env and experiment.approved("start")):
        return False
    return all(run.labels.get(k) == v for k, v in target.labels.items())


def bucket(experiment_id: str, run_id: str) -> float:
    """A stable number in [0, 1) for (experiment, run): the run id is kept across resumes."""
    digest = hashlib.sha256(f"{experiment_id}:{run_id.upper()}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def arm_for(experiment: Experiment, run_id: str) -> Arm:
    u = bucket(experiment.id, run_id)
    share = experiment.treatment_share
    if u < share and experiment.treatments:
        index = min(int(u / share * len(experiment.treatments)), len(experiment.treatments) - 1)
        return experiment.treatments[index]
    return experiment.control


def assign(experiments: Iterable[Experiment], run: RunFacts) -> list[tuple[Experiment, Arm]]:
    """The arms of the active experiments `run` takes part in: at most one per parameter, the
    first by creation order (then id)."""
    chosen: list[tuple[Experiment, Arm]] = []
    taken: set[str] = set()
    for experiment in sorted(experiments, key=lambda e: (e.created_at, e.id)):
        if experiment.state not in ACTIVE_STATES or experiment.parameter in taken | run.pinned:
            continue
        if matches(experiment, run):
            taken.add(experiment.parameter)
            chosen.append((experiment, arm_for(experiment, run.run_id)))
    return chosen


# ------------------------------------------------------------------------------------------------
# applying overrides


def _env_name(path: str) -> str | None:
    if path == "model":
        return MODEL_ENV
    if path.startswith("harness."):
        return HARNESS_ENV_PREFIX + path.removeprefix("harness.").upper()
    return None


def _text(value: OverrideValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def is_configuration_variable(name: str) -> bool:
    """`FABRIK_MODEL` or `FABRIK_HARNESS_<KEY>`: the workload variables the run configuration
    (defaults and experiment arms) sets. The gateway refuses every `FABRIK_*` key in a request's
    `workload.env`, so in a dispatched run's `workload.env` these come from the scheduler; the
    executors pass them through while keeping every other `FABRIK_*` name their own."""
    if name == MODEL_ENV:
        return True
    key = name.removeprefix(HARNESS_ENV_PREFIX)
    return key != name and key.isupper() and HARNESS_KEY.match(key.lower()) is not None


def harness_file_for(spec_path: str) -> str:
    """Where a spec's harness settings live, next to it in the repository: `specs/x.json` ->
    `specs/x.harness.json` (what a winning harness experiment's pull request changes; the workload
    reads it through `fabrik_runtime.harness_settings`)."""
    head, sep, name = spec_path.rpartition("/")
    stem = name.removesuffix(".json")
    return f"{head}{sep}{stem}.harness.json"


def apply_overrides(params: RunParameters, overrides: Mapping[str, OverrideValue]) -> RunParameters:
    """`params` with the overrides applied (unknown paths are refused by validation, ignored here).

    `model` becomes the workload variable `FABRIK_MODEL`, `harness.<key>` `FABRIK_HARNESS_<KEY>`;
    `template` names the template (the resources stay as dispatched)."""
    if not overrides:
        return params
    resources = params.resources
    env = dict(params.workload.env)
    changes: dict[str, Any] = {}
    for path, value in overrides.items():
        if path.startswith("resources.") and path.removeprefix("resources.") in RESOURCE_FIELDS:
            resources = msgspec.structs.replace(resources, **{path.removeprefix("resources."): _text(value)})
        elif (name := _env_name(path)) is not None:
            env[name] = _text(value)
        elif path == "template":
            changes["template"] = _text(value)
        elif path == "timeout_seconds" and isinstance(value, int) and not isinstance(value, bool):
            changes["timeout_seconds"] = value
        elif path == "budget_usd" and isinstance(value, int | float) and not isinstance(value, bool):
            changes["budget_usd"] = float(value)
    if env != params.workload.env:
        changes["workload"] = msgspec.structs.replace(params.workload, env=env)
    if resources is not params.resources:
        changes["resources"] = resources
    return msgspec.structs.replace(params, **changes) if changes else params


def configure(
    params: RunParameters,
    defaults: Defaults,
    assignments: Sequence[tuple[Experiment, Arm]],
) -> tuple[RunParameters, list[ExperimentArmRef]]:
    """Defaults first (except for what the request pinned), then each assigned arm's overrides;
    the arm stamps to record."""
    pinned = pinned_parameters(params)
    configured = apply_overrides(params, {p: v for p, v in defaults.overrides.items() if p not in pinned})
    stamps: list[ExperimentArmRef] = []
    for experiment, arm in assignments:
        configured = apply_overrides(configured, arm.overrides)
        stamps.append(ExperimentArmRef(id=experiment.id, arm=arm.name))
    return configured, stamps


def stamp_text(stamps: Sequence[ExperimentArmRef]) -> str | None:
    """The `experiment_arm` text of a run: `<id>/<arm>` per experiment, comma-separated."""
    return ",".join(f"{s.id}/{s.arm}" for s in stamps) or None


def parse_stamp_text(text: str | None) -> dict[str, str]:
    """Experiment id → arm from an `experiment_arm` text (plain arm names without an id are skipped)."""
    found: dict[str, str] = {}
    for part in (text or "").split(","):
        experiment_id, sep, arm = part.partition("/")
        if sep and experiment_id and arm:
            found[experiment_id] = arm
    return found
