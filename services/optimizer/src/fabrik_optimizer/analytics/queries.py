"""Cost and insight queries over the analytics store: portable SQL plus a little Python.

Statistics done in Python (not SQL) because the portable subset lacks them: the Wilson score
interval and nearest-rank percentiles. Every insight row carries its sample size.
"""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any, Literal

from fabrik_optimizer.analytics.store import AnalyticsStore, iso, nanos_to_usd

CostGroup = Literal["project", "spec", "model", "day"]
InsightGroup = Literal["model", "spec", "project"]

# z for a two-sided 95% interval: the 0.975 quantile of the standard normal distribution.
Z95 = 1.959963984540054

# Runs whose outcome says something about the configuration. Cancelled runs are a user's decision
# and are left out of success rates.
DECIDED_STATES: tuple[str, ...] = ("succeeded", "failed", "timed_out", "budget_exceeded")

_COST_KEYS: dict[str, str] = {
    "project": "COALESCE(c.project, r.project)",
    "spec": "r.spec_id",
    "model": "c.model",
    "day": "c.occurred_day",
}


def costs(
    store: AnalyticsStore,
    group_by: CostGroup,
    start: datetime | None = None,
    end: datetime | None = None,
) -> list[dict[str, Any]]:
    """LLM cost and tokens per group for calls in [start, end); `runs` counts distinct runs with calls.

    `llm_cost_usd` is an exact Decimal (costs are summed as integer nano-dollars).
    """
    if group_by not in _COST_KEYS:
        raise ValueError(f"group_by must be one of {', '.join(_COST_KEYS)}")
    key = _COST_KEYS[group_by]
    where: list[str] = []
    params: list[Any] = []
    if start is not None:
        where.append("c.occurred_at >= ?")
        params.append(iso(start))
    if end is not None:
        where.append("c.occurred_at < ?")
        params.append(iso(end))
    rows = store.query(
        f"""
        SELECT {key} AS grp,
               SUM(c.cost_nanos) AS cost_nanos,
               SUM(c.input_tokens) AS input_tokens,
               SUM(c.output_tokens) AS output_tokens,
               SUM(c.cache_read_tokens) AS cache_read_tokens,
               SUM(c.cache_write_tokens) AS cache_write_tokens,
               COUNT(*) AS calls,
               COUNT(DISTINCT c.run_id) AS runs
        FROM llm_calls c LEFT JOIN runs r ON r.run_id = c.run_id
        {"WHERE " + " AND ".join(where) if where else ""}
        GROUP BY {key}
        ORDER BY SUM(c.cost_nanos) DESC, {key}
        """,  # noqa: S608 - identifiers from the fixed _COST_KEYS table, values bound
        params,
    )
    result = []
    for row in rows:
        tokens = {
            k: int(row[k] or 0)
            for k in ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens")
        }
        result.append(
            {
                group_by: row["grp"],
                "llm_cost_usd": nanos_to_usd(int(row["cost_nanos"] or 0)),
                **tokens,
                "tokens": sum(tokens.values()),
                "calls": int(row["calls"]),
                "runs": int(row["runs"]),
            }
        )
    return result


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval for a binomial proportion (95% by default)."""
    if n <= 0:
        raise ValueError("the interval needs at least one observation")
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def _grouped_runs(by: InsightGroup) -> tuple[str, str]:
    """FROM clause and group key: runs by model go through their LLM calls (a run counts once per model)."""
    if by == "model":
        source = "runs r JOIN (SELECT DISTINCT run_id, model FROM llm_calls) m ON m.run_id = r.run_id"
        return source, "m.model"
    if by == "spec":
        return "runs r", "r.spec_id"
    if by == "project":
        return "runs r", "r.project"
    raise ValueError("by must be one of model, spec, project")


def success_rate(store: AnalyticsStore, by: InsightGroup, min_runs: int = 20) -> list[dict[str, Any]]:
    """Success rate of decided runs per group with a Wilson 95% interval; groups under `min_runs` omitted."""
    source, key = _grouped_runs(by)
    marks = ", ".join("?" for _ in DECIDED_STATES)
    rows = store.query(
        f"""
        SELECT {key} AS grp,
               COUNT(*) AS n,
               SUM(CASE WHEN r.state = 'succeeded' THEN 1 ELSE 0 END) AS successes
        FROM {source}
        WHERE r.state IN ({marks}) AND {key} IS NOT NULL
        GROUP BY {key}
        HAVING COUNT(*) >= ?
        ORDER BY {key}
        """,  # noqa: S608 - identifiers from _grouped_runs, values bound
        [*DECIDED_STATES, min_runs],
    )
    result = []
    for row in rows:
        n, successes = int(row["n"]), int(row["successes"])
        low, high = wilson_interval(successes, n)
        result.append(
            {
                by: row["grp"],
                "runs": n,
                "successes": successes,
                "success_rate": successes / n,
                "ci95_low": low,
                "ci95_high": high,
            }
        )
    return result


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in (0, 1]): the smallest value with at least q of the sample at or below."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[rank - 1]


def duration_p95(store: AnalyticsStore, by: InsightGroup, min_runs: int = 20) -> list[dict[str, Any]]:
    """p95 run and queue durations (seconds, nearest rank) of finished runs per group, with sample sizes."""
    source, key = _grouped_runs(by)
    rows = store.query(
        f"""
        SELECT {key} AS grp, r.run_seconds AS run_seconds, r.queue_seconds AS queue_seconds
        FROM {source}
        WHERE r.run_seconds IS NOT NULL AND {key} IS NOT NULL
        ORDER BY {key}
        """  # noqa: S608 - identifiers from _grouped_runs
    )
    groups: dict[str, tuple[list[float], list[float]]] = {}
    for row in rows:
        run, queue = groups.setdefault(row["grp"], ([], []))
        run.append(float(row["run_seconds"]))
        if row["queue_seconds"] is not None:
            queue.append(float(row["queue_seconds"]))
    return [
        {
            by: grp,
            "runs": len(run),
            "run_seconds_p95": percentile(run, 0.95),
            "queue_seconds_p95": percentile(queue, 0.95) if queue else None,
        }
        for grp, (run, queue) in groups.items()
        if len(run) >= min_runs
    ]
