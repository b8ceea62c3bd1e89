"""Candidate experiments proposed from the analytics insights (docs/optimizer.md#candidates).

The proposals are plain functions of the store's insights: more memory where runs of a spec are
OOM-killed at their limit (`queries.oom_rates`), and a better model where a project's runs with
one model succeed clearly less often than with another (`queries.success_rate` by model, Wilson
intervals that do not overlap). `CandidateService` lists them for a maintainer, starts one through
the ordinary create path, and in auto mode starts the low-risk ones itself.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from fabrik_common import experiments as ex
from fabrik_common.optimizer_rpc import Candidate, ExperimentCreateRequest
from fabrik_optimizer.analytics import queries
from fabrik_optimizer.analytics.store import AnalyticsStore
from fabrik_optimizer.experiments.service import ExperimentError, Experiments

log = logging.getLogger(__name__)

T = TypeVar("T")

AUTO_ACTOR: Final = "optimizer (auto)"
MEMORY_PARAMETER: Final = "resources.memory_limit"
MODEL_PARAMETER: Final = "model"
GI: Final = 2**30
MI: Final = 2**20
HALF_GI: Final = 512 * MI


@dataclass(frozen=True)
class CandidatePolicy:
    """When the evidence is strong enough to propose an experiment."""

    min_runs: int = 30
    """Decided runs a group needs (a spec at a memory limit; a model in a project)."""
    oom_rate: float = 0.05
    """OOM rate at a memory limit from which more memory is proposed."""
    headroom: float = 1.25
    """Suggested memory limit = p95 of the observed peaks times headroom (then rounded up)."""
    treatment_share: float = ex.DEFAULT_TREATMENT_SHARE


# ------------------------------------------------------------------------------------------------
# quantities


def round_memory(size: int) -> int:
    """Up to a quantity people pick: 512Mi steps up to 4Gi, whole Gi above (a 6.4Gi suggestion
    is tried as 7Gi, not as 6592Mi)."""
    step = HALF_GI if size <= 4 * GI else GI
    return max(step, math.ceil(size / step) * step)


def format_memory(size: int) -> str:
    """A Kubernetes quantity: whole Gi when it is one, else Mi."""
    return f"{size // GI}Gi" if size % GI == 0 else f"{math.ceil(size / MI)}Mi"


def human_memory(size: float) -> str:
    """For sentences: 5.1Gi, 640Mi."""
    return f"{size / GI:.1f}Gi" if size >= GI else f"{size / MI:.0f}Mi"


def percent(rate: float) -> str:
    return f"{rate * 100:.0f}%"


def candidate_id(target: ex.Target, parameter: str, value: ex.OverrideValue) -> str:
    """Stable across rounds: the same (target, parameter, value) is the same candidate."""
    key = json.dumps(
        {
            "target": {
                "project": target.project,
                "spec": target.spec,
                "env": target.env,
                "labels": dict(sorted(target.labels.items())),
            },
            "parameter": parameter,
            "value": value,
        },
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(key.encode()).hexdigest()[:20]


def _treatment_value(candidate: Candidate) -> ex.OverrideValue:
    return candidate.treatments[0].overrides[candidate.parameter]


# ------------------------------------------------------------------------------------------------
# proposals


def memory_candidates(
    rows: Iterable[dict[str, Any]], project: str, policy: CandidatePolicy, default_limit: str | None = None
) -> list[Candidate]:
    """More memory for the specs of `project` whose runs are OOM-killed at their limit.

    `rows` are `queries.oom_rates` rows of the project. When the defaults already set a memory
    limit, every new run gets it, so only the runs at that limit say anything about today."""
    found = []
    for row in rows:
        limit, limit_bytes, runs = row["memory_limit"], row["memory_limit_bytes"], int(row["runs"])
        peak, suggested = row["peak_p95_bytes"], row["suggested_limit_bytes"]
        if default_limit is not None and limit != default_limit:
            continue
        if runs < policy.min_runs or row["oom_rate"] < policy.oom_rate:
            continue
        if peak is None or suggested is None or limit_bytes is None:
            continue
        value = round_memory(int(suggested))
        if value <= limit_bytes:
            continue  # the peaks do not call for more than the runs already have
        quantity = format_memory(value)
        target = ex.Target(project=project, spec=row["spec"])
        found.append(
            Candidate(
                id=candidate_id(target, MEMORY_PARAMETER, quantity),
                kind="memory_limit",
                name=f"memory limit {quantity} for {row['spec']} in {project}",
                summary=(
                    f"OOM rate {percent(row['oom_rate'])} at {limit} ({row['oom_kills']} of {runs} runs), "
                    f"p95 peak {human_memory(peak)} → try {quantity}"
                ),
                target=target,
                parameter=MEMORY_PARAMETER,
                control=ex.Arm(name="control"),
                treatments=[ex.Arm(name="more-memory", overrides={MEMORY_PARAMETER: quantity})],
                risk="low",
                # More memory changes no request (cost) and should remove OOM kills; the p95 of
                # durations needs thousands of runs to be shown non-inferior, so it is left out.
                guardrails=["failure_rate", "cost_per_run", "oom_rate"],
                evidence={
                    "spec": row["spec"],
                    "memory_limit": limit,
                    "memory_limit_bytes": limit_bytes,
                    "runs": runs,
                    "oom_kills": row["oom_kills"],
                    "oom_rate": row["oom_rate"],
                    "oom_rate_ci95": [row["ci95_low"], row["ci95_high"]],
                    "peaks": row["peaks"],
                    "peak_p95_bytes": peak,
                    "headroom": row["headroom"],
                    "suggested_limit_bytes": suggested,
                    "proposed_limit": quantity,
                    "proposed_limit_bytes": value,
                },
                sample_size=runs,
            )
        )
    return found


def model_candidates(
    rows: Sequence[dict[str, Any]], project: str, policy: CandidatePolicy, default_model: str | None = None
) -> list[Candidate]:
    """A better model for `project`: the model with the highest lower bound of its success rate,
    when another model's whole interval lies below that bound (`rows`: `queries.success_rate` by
    model of the project)."""
    usable = [r for r in rows if int(r["runs"]) >= policy.min_runs]
    if len(usable) < 2:
        return []
    best = max(usable, key=lambda r: (r["ci95_low"], r["runs"], r["model"]))
    worse = sorted(
        (r for r in usable if r is not best and r["ci95_high"] < best["ci95_low"]),
        key=lambda r: (-r["runs"], r["model"]),
    )
    if not worse or best["model"] == default_model:
        return []
    model = str(best["model"])
    main = worse[0]
    target = ex.Target(project=project)

    def described(row: dict[str, Any]) -> dict[str, Any]:
        return {
            "model": row["model"],
            "runs": row["runs"],
            "successes": row["successes"],
            "success_rate": row["success_rate"],
            "ci95": [row["ci95_low"], row["ci95_high"]],
        }

    return [
        Candidate(
            id=candidate_id(target, MODEL_PARAMETER, model),
            kind="model",
            name=f"model {model} in {project}",
            summary=(
                f"success {percent(main['success_rate'])} with {main['model']} ({main['runs']} runs, "
                f"95% CI {percent(main['ci95_low'])}-{percent(main['ci95_high'])}) vs "
                f"{percent(best['success_rate'])} with {model} ({best['runs']} runs, "
                f"{percent(best['ci95_low'])}-{percent(best['ci95_high'])}) in {project} → try {model}"
            ),
            target=target,
            parameter=MODEL_PARAMETER,
            control=ex.Arm(name="control"),
            treatments=[ex.Arm(name="better-model", overrides={MODEL_PARAMETER: model})],
            risk="medium",
            guardrails=["failure_rate", "cost_per_run"],
            evidence={"better": described(best), "worse": [described(r) for r in worse]},
            sample_size=int(best["runs"]) + sum(int(r["runs"]) for r in worse),
        )
    ]


def _projects(store: AnalyticsStore) -> list[str]:
    rows = store.tuples("SELECT DISTINCT project FROM runs WHERE project IS NOT NULL ORDER BY project", [])
    return [str(r[0]) for r in rows]


def generate(store: AnalyticsStore, policy: CandidatePolicy, defaults: ex.Defaults) -> list[Candidate]:
    """Every candidate the store's runs support, at most one per (target, parameter): the one
    with the largest sample."""
    default_limit = defaults.overrides.get(MEMORY_PARAMETER)
    default_model = defaults.overrides.get(MODEL_PARAMETER)
    found: list[Candidate] = []
    for project in _projects(store):
        found += memory_candidates(
            queries.oom_rates(store, policy.min_runs, project, policy.headroom),
            project,
            policy,
            str(default_limit) if default_limit is not None else None,
        )
        found += model_candidates(
            queries.success_rate(store, "model", policy.min_runs, project),
            project,
            policy,
            str(default_model) if default_model is not None else None,
        )
    best: dict[tuple[bytes, str], Candidate] = {}
    for candidate in found:
        key = (ex.encode(candidate.target), candidate.parameter)
        if key not in best or candidate.sample_size > best[key].sample_size:
            best[key] = candidate
    return sorted(best.values(), key=lambda c: (c.risk != "low", -c.sample_size, c.id))


def hidden_by(candidate: Candidate, experiment: ex.Experiment) -> bool:
    """An experiment that hides `candidate`: one on the same target and parameter that has not
    ended, or one that already tried the same value (whatever came of it)."""
    if experiment.target != candidate.target or experiment.parameter != candidate.parameter:
        return False
    if experiment.state not in ex.ENDED_STATES:
        return True
    value = _treatment_value(candidate)
    return any(arm.overrides.get(candidate.parameter) == value for arm in experiment.treatments)


def open_candidates(candidates: Iterable[Candidate], experiments: Sequence[ex.Experiment]) -> list[Candidate]:
    return [c for c in candidates if not any(hidden_by(c, e) for e in experiments)]


def create_request(candidate: Candidate, actor: str, policy: CandidatePolicy) -> ExperimentCreateRequest:
    return ExperimentCreateRequest(
        name=candidate.name,
        target=candidate.target,
        parameter=candidate.parameter,
        control=candidate.control,
        treatments=list(candidate.treatments),
        treatment_share=policy.treatment_share,
        guardrails=list(candidate.guardrails),
        risk=candidate.risk,
        actor=actor,
    )


# ------------------------------------------------------------------------------------------------
# listing, starting, auto mode


class CandidateService:
    """Candidates over the live store and experiments."""

    def __init__(
        self,
        experiments: Experiments,
        store: Callable[[], AnalyticsStore],
        policy: CandidatePolicy | None = None,
        *,
        auto: bool = False,
    ) -> None:
        self.experiments = experiments
        self.store = store
        self.policy = policy or CandidatePolicy()
        self.auto = auto

    async def _read(self, fn: Callable[[AnalyticsStore], T]) -> T:
        """In a worker thread on its own connection (the in-memory store: on the loop)."""
        store = self.store()
        if store.path == ":memory:":
            return fn(store)

        def work() -> T:
            reader = store.reader()
            try:
                return fn(reader)
            finally:
                reader.close()

        return await asyncio.to_thread(work)

    async def available(self, project: str | None = None) -> list[Candidate]:
        defaults = await self.experiments.defaults()
        found = await self._read(lambda store: generate(store, self.policy, defaults))
        listed = open_candidates(found, await self.experiments.all())
        return [c for c in listed if project is None or c.target.project == project]

    async def start(self, candidate_id: str, actor: str) -> ex.Experiment:
        candidate = next((c for c in await self.available() if c.id == candidate_id), None)
        if candidate is None:
            raise ExperimentError(
                404, "not_found", f"no candidate {candidate_id} (unknown, or already tried)", "id"
            )
        return await self._create(candidate, actor or "unknown")

    async def _create(self, candidate: Candidate, actor: str) -> ex.Experiment:
        request = create_request(candidate, actor, self.policy)
        if candidate.risk == "low":
            # `create` stores the experiment before it checks the limit; checked first, a refusal
            # leaves no draft behind that would hide the candidate.
            active = sum(1 for e in await self.experiments.all() if e.state == "active")
            limit = self.experiments.limits.max_active
            if active >= limit:
                raise ExperimentError(
                    409,
                    "too_many_active",
                    f"{active} experiments are active (at most {limit}); stop one first",
                )
        return await self.experiments.create(request)

    async def auto_start(self) -> list[ex.Experiment]:
        """Start the low-risk candidates (auto mode), never while the optimizer is paused, never
        beyond the active limit. Returns the experiments started."""
        if not self.auto or (await self.experiments.pause_state()).paused:
            return []
        started: list[ex.Experiment] = []
        for candidate in await self.available():
            if candidate.risk != "low":
                continue
            try:
                experiment = await self._create(candidate, AUTO_ACTOR)
            except ExperimentError as exc:
                if exc.error.status == 409:
                    break
                log.warning("a candidate could not be started", extra={"id": candidate.id, "why": str(exc)})
                continue
            log.info(
                "candidate started",
                extra={"candidate": candidate.id, "experiment": experiment.id, "summary": candidate.summary},
            )
            started.append(experiment)
        return started


async def auto_loop(service: CandidateService, interval: float) -> None:
    """Auto mode: look for low-risk candidates every `interval` seconds."""
    while True:
        try:
            await service.auto_start()
        except Exception:
            log.exception("starting candidates failed; tried again next round")
        await asyncio.sleep(interval)
