"""Per-arm samples of an experiment, from the analytics store.

A run's arms are in the `experiment_arm` column (`<experiment id>/<arm>`, comma-separated when it
takes part in several experiments), written at dispatch by the scheduler and folded in by the
ingest, which also indexes them in `run_arms` (one row per experiment and run). Only decided
runs count (`succeeded`, `failed`, `timed_out`, `budget_exceeded`): a cancelled run is a user's
decision, and a run in progress has no outcome yet.
"""

from __future__ import annotations

import math

from fabrik_common.experiments import Experiment
from fabrik_optimizer.analytics.store import NANOS_PER_USD, AnalyticsStore
from fabrik_optimizer.experiments.stats import ArmSample

DECIDED = ("succeeded", "failed", "timed_out", "budget_exceeded")


def arm_samples(store: AnalyticsStore, experiment: Experiment) -> dict[str, ArmSample]:
    """Every arm's sample (arms without runs included, empty)."""
    rows = store.query(
        """
        SELECT r.run_id AS run_id, r.state AS state, r.reason AS reason, r.run_seconds AS run_seconds,
               a.arm AS arm, r.compute_cost_nanos AS compute_cost_nanos,
               r.storage_cost_nanos AS storage_cost_nanos, l.llm_cost_nanos AS llm_cost_nanos
        FROM run_arms a JOIN runs r ON r.run_id = a.run_id LEFT JOIN run_llm l ON l.run_id = r.run_id
        WHERE a.experiment_id = ? AND r.state IN (?, ?, ?, ?)
        """,
        [experiment.id, *DECIDED],
    )
    runs: dict[str, int] = {}
    successes: dict[str, int] = {}
    ooms: dict[str, int] = {}
    costs: dict[str, list[float]] = {}
    durations: dict[str, list[float]] = {}
    for row in rows:
        arm = row["arm"]
        runs[arm] = runs.get(arm, 0) + 1
        if row["state"] == "succeeded":
            successes[arm] = successes.get(arm, 0) + 1
        if row["reason"] == "oom_killed":
            ooms[arm] = ooms.get(arm, 0) + 1
        nanos = sum(int(row[c] or 0) for c in ("compute_cost_nanos", "storage_cost_nanos", "llm_cost_nanos"))
        costs.setdefault(arm, []).append(nanos / NANOS_PER_USD)
        if row["run_seconds"] is not None and math.isfinite(float(row["run_seconds"])):
            durations.setdefault(arm, []).append(float(row["run_seconds"]))
    samples: dict[str, ArmSample] = {}
    for each in experiment.arms():
        name = each.name
        n = runs.get(name, 0)
        s = successes.get(name, 0)
        samples[name] = ArmSample(
            name=name,
            runs=n,
            successes=s,
            failures=n - s,
            ooms=ooms.get(name, 0),
            costs=costs.get(name, []),
            durations=durations.get(name, []),
        )
    return samples


def p95(values: list[float] | tuple[float, ...]) -> float | None:
    """Nearest rank: the ceil(0.95 n)-th smallest."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]
