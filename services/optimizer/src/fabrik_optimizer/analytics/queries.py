"""Cost and insight queries over the analytics store: portable SQL plus a little Python.

Statistics done in Python (not SQL) because the portable subset lacks them: the Wilson score
interval and nearest-rank percentiles. Every insight row carries its sample size.
"""

from __future__ import annotations

import heapq
import json
import math
from datetime import datetime
from fractions import Fraction
from typing import Any, Literal

from fabrik_optimizer.analytics.store import AnalyticsStore, iso, nanos_to_usd
from fabrik_optimizer.prices import format_mebibytes, parse_quantity

CostGroup = Literal["project", "spec", "model", "day"]
InsightGroup = Literal["model", "spec", "project"]

# z for a two-sided 95% interval: the 0.975 quantile of the standard normal distribution.
Z95 = 1.959963984540054

# Runs whose outcome says something about the configuration. Cancelled runs are a user's decision
# and are left out of success rates.
DECIDED_STATES: tuple[str, ...] = ("succeeded", "failed", "timed_out", "budget_exceeded")
TERMINAL_STATE_LIST: tuple[str, ...] = (*DECIDED_STATES, "cancelled")

_COST_KEYS: dict[str, str] = {
    "project": "COALESCE(c.project, r.project)",
    "spec": "r.spec_id",
    "model": "c.model",
    "day": "c.occurred_day",
}


_RUN_COST_KEYS: dict[str, str | None] = {
    "project": "r.project",
    "spec": "r.spec_id",
    "model": None,  # a run's node time is not split between the models it called
    "day": "r.finished_day",
}


def _range(column: str, start: datetime | None, end: datetime | None) -> tuple[list[str], list[Any]]:
    where: list[str] = []
    params: list[Any] = []
    if start is not None:
        where.append(f"{column} >= ?")
        params.append(iso(start))
    if end is not None:
        where.append(f"{column} < ?")
        params.append(iso(end))
    return where, params


def costs(
    store: AnalyticsStore,
    group_by: CostGroup,
    start: datetime | None = None,
    end: datetime | None = None,
    project: str | None = None,
) -> list[dict[str, Any]]:
    """LLM, compute and storage cost and tokens per group in [start, end).

    LLM calls count by `occurred_at`; a run's compute and storage cost by its `finished_at` (the
    end of its latest attempt; the cost of earlier attempts is included). `runs` counts distinct
    runs with calls, `compute_runs` runs with compute or storage cost. Amounts are exact Decimals
    (summed as integer nano-dollars); compute and storage are None when grouped by model.
    """
    if group_by not in _COST_KEYS:
        raise ValueError(f"group_by must be one of {', '.join(_COST_KEYS)}")
    key = _COST_KEYS[group_by]
    where, params = _range("c.occurred_at", start, end)
    if project is not None:
        where.append("COALESCE(c.project, r.project) = ?")
        params.append(project)
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
        """,  # noqa: S608 - identifiers from the fixed _COST_KEYS table, values bound
        params,
    )
    token_kinds = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens")
    groups: dict[Any, dict[str, Any]] = {}
    for row in rows:
        tokens = {k: int(row[k] or 0) for k in token_kinds}
        groups[row["grp"]] = {
            group_by: row["grp"],
            "llm_nanos": int(row["cost_nanos"] or 0),
            **tokens,
            "tokens": sum(tokens.values()),
            "calls": int(row["calls"]),
            "runs": int(row["runs"]),
            "compute_nanos": 0,
            "storage_nanos": 0,
            "compute_runs": 0,
        }
    run_key = _RUN_COST_KEYS[group_by]
    if run_key is not None:
        where, params = _range("r.finished_at", start, end)
        where.append("(r.compute_cost_nanos IS NOT NULL OR r.storage_cost_nanos IS NOT NULL)")
        if project is not None:
            where.append("r.project = ?")
            params.append(project)
        for row in store.query(
            f"""
            SELECT {run_key} AS grp,
                   SUM(COALESCE(r.compute_cost_nanos, 0)) AS compute_nanos,
                   SUM(COALESCE(r.storage_cost_nanos, 0)) AS storage_nanos,
                   COUNT(*) AS runs
            FROM runs r
            WHERE {" AND ".join(where)}
            GROUP BY {run_key}
            """,  # noqa: S608 - identifiers from the fixed _RUN_COST_KEYS table, values bound
            params,
        ):
            group = groups.setdefault(
                row["grp"],
                {
                    group_by: row["grp"],
                    "llm_nanos": 0,
                    **dict.fromkeys(token_kinds, 0),
                    "tokens": 0,
                    "calls": 0,
                    "runs": 0,
                },
            )
            group["compute_nanos"] = int(row["compute_nanos"] or 0)
            group["storage_nanos"] = int(row["storage_nanos"] or 0)
            group["compute_runs"] = int(row["runs"])
    result = []
    for group in groups.values():
        llm = group.pop("llm_nanos")
        compute = group.pop("compute_nanos")
        storage = group.pop("storage_nanos")
        group["llm_cost_usd"] = nanos_to_usd(llm)
        group["compute_cost_usd"] = nanos_to_usd(compute) if run_key is not None else None
        group["storage_cost_usd"] = nanos_to_usd(storage) if run_key is not None else None
        group["total_cost_usd"] = nanos_to_usd(llm + compute + storage)
        if run_key is None:
            group["compute_runs"] = 0
        result.append(group)
    result.sort(key=lambda g: (-g["total_cost_usd"], "" if g[group_by] is None else str(g[group_by])))
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


def _project_filter(project: str | None) -> tuple[str, list[Any]]:
    return ("AND r.project = ?", [project]) if project is not None else ("", [])


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in (0, 1]): the smallest value with at least q of the sample at or below."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[rank - 1]


def _grouped_runs(by: str) -> tuple[str, str]:
    """FROM clause and group key: runs by model go through `run_models` (a run counts once per model)."""
    if by == "model":
        return "runs r JOIN run_models m ON m.run_id = r.run_id", "m.model"
    if by == "spec":
        return "runs r", "r.spec_id"
    if by == "project":
        return "runs r", "r.project"
    raise ValueError("by must be one of model, spec, project")


def _p95(
    store: AnalyticsStore, source: str, keys: str, value: str, where: str, params: list[Any]
) -> dict[tuple[Any, ...], tuple[int, float]]:
    """Per group (the tuple of `keys`): sample size and the nearest-rank p95 of `value` (the
    ceil(0.95 n)-th smallest). Values are fetched as tuples and ranked in Python: SQLite's window
    functions were slower than this by a factor of 4 on 100,000 runs."""
    n_keys = len(keys.split(","))
    groups: dict[tuple[Any, ...], list[float]] = {}
    for row in store.tuples(
        f"SELECT {keys}, {value} FROM {source} WHERE {value} IS NOT NULL {where}",  # noqa: S608 - fixed identifiers
        params,
    ):
        groups.setdefault(tuple(row[:n_keys]), []).append(row[n_keys])
    result = {}
    for key, values in groups.items():
        values.sort()
        result[key] = (len(values), float(values[(95 * len(values) + 99) // 100 - 1]))  # ceil(0.95 n)
    return result


def success_rate(
    store: AnalyticsStore, by: InsightGroup, min_runs: int = 20, project: str | None = None
) -> list[dict[str, Any]]:
    """Success rate of decided runs per group with a Wilson 95% interval; groups under `min_runs` omitted."""
    source, key = _grouped_runs(by)
    only, only_params = _project_filter(project)
    marks = ", ".join("?" for _ in DECIDED_STATES)
    rows = store.tuples(
        f"""
        SELECT {key}, COUNT(*), SUM(CASE WHEN r.state = 'succeeded' THEN 1 ELSE 0 END)
        FROM {source}
        WHERE r.state IN ({marks}) AND {key} IS NOT NULL {only}
        GROUP BY {key}
        HAVING COUNT(*) >= ?
        ORDER BY {key}
        """,  # noqa: S608 - identifiers from _grouped_runs, values bound
        [*DECIDED_STATES, *only_params, min_runs],
    )
    result = []
    for grp, n, successes in rows:
        low, high = wilson_interval(int(successes), int(n))
        result.append(
            {
                by: grp,
                "runs": int(n),
                "successes": int(successes),
                "success_rate": int(successes) / int(n),
                "ci95_low": low,
                "ci95_high": high,
            }
        )
    return result


def duration_p95(
    store: AnalyticsStore, by: InsightGroup, min_runs: int = 20, project: str | None = None
) -> list[dict[str, Any]]:
    """p95 run and queue durations (seconds, nearest rank) of finished runs per group, with sample sizes."""
    source, key = _grouped_runs(by)
    only, only_params = _project_filter(project)
    where = f"AND {key} IS NOT NULL AND r.run_seconds IS NOT NULL {only}"
    run = _p95(store, source, key, "r.run_seconds", where, only_params)
    queue = _p95(store, source, key, "r.queue_seconds", where, only_params)
    return [
        {
            by: grp[0],
            "runs": n,
            "run_seconds_p95": p95,
            "queue_runs": queue[grp][0] if grp in queue else 0,
            "queue_seconds_p95": queue[grp][1] if grp in queue else None,
        }
        for grp, (n, p95) in sorted(run.items())
        if n >= min_runs
    ]


OOM_REASON = "oom_killed"
MEMORY_STEP = 64 * 2**20  # suggested limits are rounded up to 64 MiB


def oom_rates(
    store: AnalyticsStore, min_runs: int = 20, project: str | None = None, headroom: float = 1.25
) -> list[dict[str, Any]]:
    """OOM kills per (spec, memory limit) of decided runs, with a Wilson interval, the p95 of the
    observed peaks and a suggested limit: ceil(p95 * headroom / 64 MiB) * 64 MiB. Groups with
    fewer than `min_runs` decided runs are omitted. An OOM kill is `failed` with reason `oom_killed`."""
    only, only_params = _project_filter(project)
    marks = ", ".join("?" for _ in DECIDED_STATES)
    where = f"AND r.state IN ({marks}) AND r.spec_id IS NOT NULL AND r.memory_limit IS NOT NULL {only}"
    params = [*DECIDED_STATES, *only_params]
    rows = store.tuples(
        f"""
        SELECT r.spec_id, r.memory_limit, COUNT(*),
               SUM(CASE WHEN r.state = 'failed' AND r.reason = ? THEN 1 ELSE 0 END)
        FROM runs r
        WHERE 1 = 1 {where}
        GROUP BY r.spec_id, r.memory_limit
        HAVING COUNT(*) >= ?
        ORDER BY r.spec_id, r.memory_limit
        """,  # noqa: S608 - fixed text, values bound
        [OOM_REASON, *params, min_runs],
    )
    peaks = _p95(store, "runs r", "r.spec_id, r.memory_limit", "r.peak_memory_bytes", where, params)
    result = []
    for spec, limit, n, kills in rows:
        n_peaks, p95_value = peaks.get((spec, limit), (0, None))
        result.append(_oom_row(spec, limit, int(n), int(kills), n_peaks, p95_value, headroom))
    return result


def _oom_row(
    spec: str, limit: str, n: int, kills: int, n_peaks: int, p95_value: float | None, headroom: float = 1.25
) -> dict[str, Any]:
    low, high = wilson_interval(kills, n)
    p95 = int(p95_value) if p95_value is not None else None
    factor = Fraction(str(headroom))
    suggested = math.ceil(Fraction(p95) * factor / MEMORY_STEP) * MEMORY_STEP if p95 is not None else None
    limit_bytes = parse_quantity(limit)
    return {
        "spec": spec,
        "memory_limit": limit,
        "memory_limit_bytes": int(limit_bytes) if limit_bytes is not None else None,
        "runs": n,
        "oom_kills": kills,
        "oom_rate": kills / n,
        "ci95_low": low,
        "ci95_high": high,
        "peaks": n_peaks,
        "peak_p95_bytes": p95,
        "headroom": headroom,
        "suggested_limit_bytes": suggested,
        "suggested_limit": format_mebibytes(suggested) if suggested is not None else None,
    }


def cost_per_success(
    store: AnalyticsStore, by: Literal["spec", "project"], min_runs: int = 20, project: str | None = None
) -> list[dict[str, Any]]:
    """Per group: what all its ended runs cost (LLM + compute + storage; failed and cancelled runs
    included, since they were paid for) / its successful runs. Groups under `min_runs` ended runs
    are omitted; `cost_per_success_usd` is None when nothing succeeded."""
    key = {"spec": "r.spec_id", "project": "r.project"}[by]
    only, only_params = _project_filter(project)
    marks = ", ".join("?" for _ in TERMINAL_STATE_LIST)
    rows = store.tuples(
        f"""
        SELECT {key}, COUNT(*), SUM(CASE WHEN r.state = 'succeeded' THEN 1 ELSE 0 END),
               SUM(COALESCE(r.compute_cost_nanos, 0) + COALESCE(r.storage_cost_nanos, 0)
                   + COALESCE(l.llm_cost_nanos, 0))
        FROM runs r LEFT JOIN run_llm l ON l.run_id = r.run_id
        WHERE r.state IN ({marks}) AND {key} IS NOT NULL {only}
        GROUP BY {key}
        HAVING COUNT(*) >= ?
        ORDER BY {key}
        """,  # noqa: S608 - identifiers from a fixed table, values bound
        [*TERMINAL_STATE_LIST, *only_params, min_runs],
    )
    result = []
    for grp, n, successes, total in rows:
        total_usd = nanos_to_usd(int(total or 0))
        result.append(
            {
                by: grp,
                "runs": int(n),
                "successes": int(successes),
                "total_cost_usd": total_usd,
                "cost_per_success_usd": total_usd / int(successes) if successes else None,
            }
        )
    return result


def most_retried(
    store: AnalyticsStore, top: int = 10, project: str | None = None
) -> tuple[list[dict[str, Any]], int]:
    """The `top` runs with the most attempts (more than one), and how many runs were retried at all."""
    only, only_params = _project_filter(project)
    rows = store.query(
        f"""
        SELECT r.run_id AS run_id, r.project AS project, r.spec_id AS spec, r.attempts AS attempts,
               r.state AS state, r.reason AS reason
        FROM runs r WHERE r.attempts > 1 {only}
        ORDER BY r.attempts DESC, r.run_id
        LIMIT ?
        """,  # noqa: S608 - fixed text, values bound
        [*only_params, top],
    )
    count = store.query(
        f"SELECT COUNT(*) AS n FROM runs r WHERE r.attempts > 1 {only}",  # noqa: S608
        only_params,
    )[0]["n"]
    return rows, int(count)


def failing_specs(
    store: AnalyticsStore, min_runs: int = 20, top: int = 10, project: str | None = None
) -> list[dict[str, Any]]:
    """Specs by failures (decided runs that did not succeed), then failure rate, with a Wilson
    interval and the failures by reason (the state when no reason was given). Specs under
    `min_runs` decided runs are omitted."""
    only, only_params = _project_filter(project)
    marks = ", ".join("?" for _ in DECIDED_STATES)
    rows = store.tuples(
        f"""
        SELECT r.spec_id, r.state, COALESCE(r.reason, r.state), COUNT(*)
        FROM runs r
        WHERE r.state IN ({marks}) AND r.spec_id IS NOT NULL {only}
        GROUP BY r.spec_id, r.state, COALESCE(r.reason, r.state)
        """,  # noqa: S608 - fixed text, values bound
        [*DECIDED_STATES, *only_params],
    )
    specs: dict[str, dict[str, Any]] = {}
    for spec_id, state, reason, count in rows:
        spec = specs.setdefault(spec_id, {"runs": 0, "failures": 0, "reasons": {}})
        n = int(count)
        spec["runs"] += n
        if state != "succeeded":
            spec["failures"] += n
            spec["reasons"][reason] = spec["reasons"].get(reason, 0) + n
    return _failing_rows(specs, min_runs, top)


def _failing_rows(specs: dict[str, dict[str, Any]], min_runs: int, top: int) -> list[dict[str, Any]]:
    """failing_specs' rows from {spec: {"runs", "failures", "reasons": {reason: count}}}."""
    result = []
    for name, spec in specs.items():
        if spec["runs"] < min_runs:
            continue
        low, high = wilson_interval(spec["failures"], spec["runs"])
        result.append(
            {
                "spec": name,
                "runs": spec["runs"],
                "failures": spec["failures"],
                "failure_rate": spec["failures"] / spec["runs"],
                "ci95_low": low,
                "ci95_high": high,
                "reasons": dict(sorted(spec["reasons"].items(), key=lambda kv: (-kv[1], kv[0]))),
            }
        )
    result.sort(key=lambda r: (-r["failures"], -r["failure_rate"], r["spec"]))
    return result[:top]


def population(store: AnalyticsStore, project: str | None = None) -> tuple[int, int]:
    """Runs in the store, and decided runs (of one project when given)."""
    only, only_params = _project_filter(project)
    marks = ", ".join("?" for _ in DECIDED_STATES)
    n, decided = store.tuples(
        f"SELECT COUNT(*), SUM(CASE WHEN r.state IN ({marks}) THEN 1 ELSE 0 END) "  # noqa: S608
        f"FROM runs r WHERE 1 = 1 {only}",
        [*DECIDED_STATES, *only_params],
    )[0]
    return int(n), int(decided or 0)


_INSIGHT_SCAN = """
    SELECT r.project, r.spec_id, r.state, r.reason, r.memory_limit, l.models,
           r.attempts, CASE WHEN r.attempts > 1 THEN r.run_id END,
           r.run_seconds, r.queue_seconds, r.peak_memory_bytes,
           COALESCE(r.compute_cost_nanos, 0) + COALESCE(r.storage_cost_nanos, 0)
               + COALESCE(l.llm_cost_nanos, 0)
    FROM runs r LEFT JOIN run_llm l ON l.run_id = r.run_id
"""


class _Cell:
    """The runs of one (project, spec, state, reason, memory limit, models): how many, what they
    cost, and their durations and peaks (for percentiles)."""

    __slots__ = ("cost", "peaks", "queue_seconds", "run_seconds", "runs")

    def __init__(self) -> None:
        self.runs = 0
        self.cost = 0
        self.run_seconds: list[float] = []
        self.queue_seconds: list[float] = []
        self.peaks: list[int] = []


def _nearest_rank_p95(values: list[Any]) -> Any:
    values.sort()
    return values[(95 * len(values) + 99) // 100 - 1]  # the ceil(0.95 n)-th smallest


def _add(counts: dict[Any, list[int]], key: Any, *amounts: int) -> None:
    found = counts.get(key)
    if found is None:
        counts[key] = list(amounts)
    else:
        for i, amount in enumerate(amounts):
            found[i] += amount


def insights(
    store: AnalyticsStore, min_runs: int = 20, top: int = 10, project: str | None = None
) -> dict[str, Any]:
    """Every insight at once (the RPC's answer), each with its sample sizes.

    The same results as `population`, `success_rate`, `duration_p95`, `oom_rates`,
    `cost_per_success`, `most_retried` and `failing_specs` one by one (a test checks it), from one
    scan of `runs` joined with `run_llm` (whose `models` column stands for `run_models`) instead
    of about fifteen queries. Each run is added to its cell (project, spec, state, reason, memory
    limit, models); the insights are then added up from the few hundred cells, and percentiles
    ranked as in `_p95`.
    """
    only = "WHERE r.project = ?" if project is not None else ""
    cells: dict[tuple[Any, ...], _Cell] = {}
    retried: list[tuple[int, str, Any, Any, Any, Any]] = []
    rows = store.tuples(_INSIGHT_SCAN + only, [project] if project is not None else [])
    for (
        proj,
        spec,
        state,
        reason,
        limit,
        models_text,
        attempts,
        retried_id,
        run_s,
        queue_s,
        peak,
        cost,
    ) in rows:
        cell_key = (proj, spec, state, reason, limit, models_text)
        cell = cells.get(cell_key)
        if cell is None:
            cell = cells[cell_key] = _Cell()
        cell.runs += 1
        cell.cost += cost
        if run_s is not None:
            cell.run_seconds.append(run_s)
            if queue_s is not None:
                cell.queue_seconds.append(queue_s)
        if peak is not None:
            cell.peaks.append(peak)
        if retried_id is not None:
            retried.append((-attempts, retried_id, proj, spec, state, reason))

    decided_states = frozenset(DECIDED_STATES)
    terminal_states = frozenset(TERMINAL_STATE_LIST)
    n_runs = n_decided = 0
    rates: dict[str, dict[Any, list[int]]] = {"model": {}, "spec": {}, "project": {}}  # [runs, wins]
    spending: dict[str, dict[Any, list[int]]] = {"spec": {}, "project": {}}  # [runs, wins, cost]
    durations: dict[str, dict[Any, tuple[list[float], list[float]]]] = {
        "model": {},
        "spec": {},
        "project": {},
    }
    ooms: dict[tuple[str, str], list[int]] = {}  # [decided runs, OOM kills]
    peaks: dict[tuple[str, str], list[int]] = {}
    failing: dict[str, dict[str, Any]] = {}
    for (proj, spec, state, reason, limit, models_text), cell in cells.items():
        n = cell.runs
        n_runs += n
        models: tuple[str, ...] = tuple(json.loads(models_text)) if models_text is not None else ()
        wins = n if state == "succeeded" else 0
        if state in decided_states:
            n_decided += n
            for by, key in (("spec", spec), ("project", proj)):
                if key is not None:
                    _add(rates[by], key, n, wins)
            for model in models:
                _add(rates["model"], model, n, wins)
            if spec is not None:
                failures = failing.setdefault(spec, {"runs": 0, "failures": 0, "reasons": {}})
                failures["runs"] += n
                if not wins:
                    failures["failures"] += n
                    why = reason if reason is not None else state
                    failures["reasons"][why] = failures["reasons"].get(why, 0) + n
                if limit is not None:
                    _add(ooms, (spec, limit), n, n if state == "failed" and reason == OOM_REASON else 0)
                    peaks.setdefault((spec, limit), []).extend(cell.peaks)
        if state in terminal_states:
            for by, key in (("spec", spec), ("project", proj)):
                if key is not None:
                    _add(spending[by], key, n, wins, cell.cost)
        if cell.run_seconds:
            for by, keys in (("spec", (spec,)), ("project", (proj,)), ("model", models)):
                for key in keys:
                    if key is not None:
                        run_values, queue_values = durations[by].setdefault(key, ([], []))
                        run_values.extend(cell.run_seconds)
                        queue_values.extend(cell.queue_seconds)

    groups: tuple[InsightGroup, ...] = ("model", "spec", "project")
    success: dict[str, list[dict[str, Any]]] = {}
    for by in groups:
        success[by] = []
        for key in sorted(rates[by]):
            n, wins = rates[by][key]
            if n < min_runs:
                continue
            low, high = wilson_interval(wins, n)
            success[by].append(
                {
                    by: key,
                    "runs": n,
                    "successes": wins,
                    "success_rate": wins / n,
                    "ci95_low": low,
                    "ci95_high": high,
                }
            )
    p95s: dict[str, list[dict[str, Any]]] = {}
    for by in groups:
        p95s[by] = []
        for key in sorted(durations[by]):
            run_values, queue_values = durations[by][key]
            if len(run_values) < min_runs:
                continue
            p95s[by].append(
                {
                    by: key,
                    "runs": len(run_values),
                    "run_seconds_p95": float(_nearest_rank_p95(run_values)),
                    "queue_runs": len(queue_values),
                    "queue_seconds_p95": float(_nearest_rank_p95(queue_values)) if queue_values else None,
                }
            )
    oom_rows = []
    for spec, limit in sorted(ooms):
        n, kills = ooms[(spec, limit)]
        if n < min_runs:
            continue
        observed = peaks[(spec, limit)]
        p95_peak = float(_nearest_rank_p95(observed)) if observed else None
        oom_rows.append(_oom_row(spec, limit, n, kills, len(observed), p95_peak))
    per_success: dict[str, list[dict[str, Any]]] = {}
    for by in ("spec", "project"):
        per_success[by] = []
        for key in sorted(spending[by]):
            n, wins, total = spending[by][key]
            if n < min_runs:
                continue
            total_usd = nanos_to_usd(int(total))
            per_success[by].append(
                {
                    by: key,
                    "runs": n,
                    "successes": wins,
                    "total_cost_usd": total_usd,
                    "cost_per_success_usd": total_usd / wins if wins else None,
                }
            )
    most = [
        {"run_id": rid, "project": proj, "spec": spec, "attempts": -minus, "state": state, "reason": reason}
        for minus, rid, proj, spec, state, reason in heapq.nsmallest(max(top, 0), retried)
    ]
    return {
        "min_runs": min_runs,
        "runs": n_runs,
        "decided_runs": n_decided,
        "success_rate": success,
        "durations_p95": p95s,
        "oom": oom_rows,
        "cost_per_success": per_success,
        "most_retried": most,
        "retried_runs": len(retried),
        "failing_specs": _failing_rows(failing, min_runs, top),
    }


def spend(store: AnalyticsStore, start: datetime, end: datetime) -> dict[str | None, tuple[int, int]]:
    """Per project (None: calls without a project) the LLM and the compute + storage spend in
    nano-dollars over [start, end): LLM by call time, compute and storage by the run's end."""
    result: dict[str | None, tuple[int, int]] = {}
    for row in store.query(
        """
        SELECT COALESCE(c.project, r.project) AS project, SUM(c.cost_nanos) AS nanos
        FROM llm_calls c LEFT JOIN runs r ON r.run_id = c.run_id
        WHERE c.occurred_at >= ? AND c.occurred_at < ?
        GROUP BY COALESCE(c.project, r.project)
        """,
        [iso(start), iso(end)],
    ):
        result[row["project"]] = (int(row["nanos"] or 0), 0)
    for row in store.query(
        """
        SELECT r.project AS project,
               SUM(COALESCE(r.compute_cost_nanos, 0) + COALESCE(r.storage_cost_nanos, 0)) AS nanos
        FROM runs r
        WHERE r.finished_at >= ? AND r.finished_at < ?
        GROUP BY r.project
        """,
        [iso(start), iso(end)],
    ):
        llm, _ = result.get(row["project"], (0, 0))
        result[row["project"]] = (llm, int(row["nanos"] or 0))
    return result
