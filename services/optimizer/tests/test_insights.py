"""Insights on a generated history of 10,000 runs against values computed by hand from the
generator's own parameters (never from the store)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import msgspec
import pytest
from optimizer_stores import BACKENDS, Stores

from fabrik_common.events import (
    LlmUsage,
    Resources,
    RunDispatched,
    RunFinished,
    RunParameters,
    RunRequested,
    RunStarted,
    RunStateChanged,
)
from fabrik_common.ids import new_ulid
from fabrik_common.testing.postgres import PostgresTestServer
from fabrik_optimizer.analytics.ingest import Costing, apply_events, llm_call_row
from fabrik_optimizer.analytics.queries import (
    cost_per_success,
    duration_p95,
    failing_specs,
    insights,
    most_retried,
    oom_rates,
    population,
    success_rate,
)
from fabrik_optimizer.analytics.store import RUN_COLUMNS, AnalyticsStore, PostgresLocation
from fabrik_optimizer.prices import PriceBook

N_RUNS = 10_000
T0 = datetime(2026, 3, 1, tzinfo=UTC)
SPECS = [f"spec-{i}" for i in range(8)]
PROJECTS = ["alpha", "beta", "gamma"]
MODELS = ["gpt-x", "claude-y", "local-z"]
LIMITS = ["1Gi", "2Gi"]
# Node: 4 cores, 8 GiB, 0.36 USD/h; every run requests 1 CPU and 1 GiB → share 1/4 → 25,000 n$/s.
NANOS_PER_SECOND = 25_000
Z = 1.959963984540054


@dataclass
class Attempt:
    queue_s: int
    run_s: int
    peak: int


@dataclass
class Run:
    run_id: str
    spec: str
    project: str
    model: str
    memory_limit: str
    state: str
    reason: str | None
    attempts: list[Attempt] = field(default_factory=list)
    llm_nanos: int = 0


def generate(seed: int = 20260301) -> list[Run]:
    rng = random.Random(seed)
    runs = []
    for i in range(N_RUNS):
        spec = SPECS[i % len(SPECS)] if i >= 5 else "spec-rare"  # spec-rare: 5 runs, under min_runs
        project = rng.choice(PROJECTS)
        model = rng.choice(MODELS)
        limit = rng.choice(LIMITS)
        limit_bytes = 2**30 if limit == "1Gi" else 2**31
        roll = rng.random()
        p_success = 0.55 + 0.05 * (SPECS.index(spec) if spec in SPECS else 0)
        if roll < 0.03:
            state, reason = "cancelled", None
        elif roll < 0.03 + p_success * 0.97:
            state, reason = "succeeded", None
        else:
            state, reason = rng.choice(
                [("failed", "workload_error"), ("failed", "oom_killed"), ("timed_out", None)]
            )
        run = Run(new_ulid(), spec, project, model, limit, state, reason)
        if state != "cancelled":
            n_attempts = rng.choices([1, 2, 3, 4], weights=[80, 12, 6, 2])[0]
            for a in range(n_attempts):
                final = a == n_attempts - 1
                oom = final and reason == "oom_killed"
                peak = limit_bytes if oom else rng.randrange(100 * 2**20, limit_bytes)
                run.attempts.append(Attempt(rng.randrange(0, 300), rng.randrange(10, 3600), peak))
            run.llm_nanos = rng.randrange(1, 50_000) * 10_000  # whole hundred-thousandths of a dollar
        runs.append(run)
    return runs


def events_of(run: Run) -> list[Any]:
    resources = Resources(cpu_request="1", memory_request="1Gi", cpu_limit="2", memory_limit=run.memory_limit)
    params = RunParameters(spec={"id": run.spec}, resources=resources)
    t = T0
    out: list[Any] = [
        RunRequested(
            run_id=run.run_id, project=run.project, env="dev", params=params, requested_by="g", occurred_at=t
        )
    ]
    revision = 0

    def state(attempt: int, to: str, when: datetime, reason: str | None = None) -> RunStateChanged:
        nonlocal revision
        revision += 1
        return RunStateChanged(
            run_id=run.run_id,
            project=run.project,
            attempt=attempt,
            from_state=None,
            to_state=to,  # type: ignore[arg-type]
            revision=revision,
            reason=reason,
            occurred_at=when,
        )

    if not run.attempts:
        out += [state(1, "queued", t), state(1, "cancelled", t + timedelta(seconds=30))]
        return out
    for n, attempt in enumerate(run.attempts, start=1):
        final = n == len(run.attempts)
        outcome, reason = (run.state, run.reason) if final else ("failed", "workload_error")
        started = t + timedelta(seconds=attempt.queue_s)
        ended = started + timedelta(seconds=attempt.run_s)
        out += [
            state(n, "queued", t),
            RunDispatched(
                run_id=run.run_id,
                project=run.project,
                env="dev",
                attempt=n,
                params=params,
                deadline=ended + timedelta(hours=1),
                occurred_at=started,
            ),
            RunStarted(
                run_id=run.run_id, attempt=n, backend="kubernetes", workload_ref="w", occurred_at=started
            ),
            state(n, "running", started),
            RunFinished(
                run_id=run.run_id,
                attempt=n,
                outcome=outcome,  # type: ignore[arg-type]
                reason=reason,
                peak_memory_bytes=attempt.peak,
                occurred_at=ended,
            ),
            state(n, outcome, ended, reason),
        ]
        t = ended + timedelta(seconds=5)
    out.append(
        LlmUsage(
            call_id=new_ulid(),
            run_id=run.run_id,
            project=run.project,
            key_id="k",
            endpoint="chat.completions",
            model=run.model,
            provider="p",
            deployment="d",
            upstream_model=run.model,
            streamed=False,
            input_tokens=1,
            cost_usd=run.llm_nanos / 1e9,
            latency_ms=1.0,
            outcome="ok",
            occurred_at=T0,
        )
    )
    return out


# ------------------------------------------------------------------------------------------------
# hand computations


def wilson(k: int, n: int) -> tuple[float, float]:
    p = k / n
    centre = (p + Z * Z / (2 * n)) / (1 + Z * Z / n)
    half = Z / (1 + Z * Z / n) * math.sqrt(p * (1 - p) / n + Z * Z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def nearest_rank(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[math.ceil(q * len(ordered)) - 1]


DECIDED = {"succeeded", "failed", "timed_out", "budget_exceeded"}


def run_cost_nanos(run: Run) -> int:
    return run.llm_nanos + sum(a.run_s for a in run.attempts) * NANOS_PER_SECOND


@pytest.fixture(scope="module", params=BACKENDS)
def history_store(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The 10,000-run history folded once per backend (SQLite in memory; one PostgreSQL database
    for the module) and shared by the read-only tests."""
    runs = generate()
    path = Path(tmp_path_factory.mktemp("insights")) / "nodes.json"
    path.write_text(
        '{"nodes": {"n": {"cores": 4, "memory_gib": 8, '
        '"prices": [{"valid_from": "2020-01-01", "hourly": 0.36}]}}}'
    )
    costing = Costing(prices=PriceBook.load(path), node_type="n", workspace_bytes=0)
    location: str | PostgresLocation = ":memory:"
    server: PostgresTestServer | None = None
    database = ""
    if request.param == "postgres":
        server = request.getfixturevalue("postgres_server")
        database = server.create_database()
        location = PostgresLocation(server.url(database))
    store = AnalyticsStore(location)
    try:
        # One batch, as a rebuild applies events (its runs read in one query per 500).
        applied = apply_events(store, [event for run in runs for event in events_of(run)], costing)
        assert applied.failed == {}
        yield runs, store
    finally:
        store.close()
        if server is not None:
            server.drop_database(database)


@pytest.fixture(scope="module")
def history(history_store: Any) -> Any:
    runs, store = history_store
    return runs, insights(store, min_runs=20, top=10)


def test_population(history: Any) -> None:
    runs, found = history
    assert found["runs"] == N_RUNS == len(runs)
    assert found["decided_runs"] == sum(r.state in DECIDED for r in runs)


@pytest.mark.parametrize("by", ["spec", "project", "model"])
def test_success_rate_matches_hand_computation(history: Any, by: str) -> None:
    runs, found = history
    groups: dict[str, list[Run]] = {}
    for run in runs:
        # By model: only runs that called a model (cancelled runs made no call).
        if run.state in DECIDED and (by != "model" or run.attempts):
            groups.setdefault(getattr(run, by), []).append(run)
    expected = []
    for name in sorted(groups):
        members = groups[name]
        if len(members) < 20:
            continue
        k = sum(r.state == "succeeded" for r in members)
        low, high = wilson(k, len(members))
        expected.append((name, len(members), k, k / len(members), low, high))
    got = [
        (r[by], r["runs"], r["successes"], r["success_rate"], r["ci95_low"], r["ci95_high"])
        for r in found["success_rate"][by]
    ]
    assert [g[:3] for g in got] == [e[:3] for e in expected]
    for g, e in zip(got, expected, strict=True):
        assert g[3:] == pytest.approx(e[3:], abs=1e-12)
    if by == "spec":
        assert "spec-rare" not in [g[0] for g in got]  # 5 runs: below the minimum sample


def test_p95_durations_match_hand_computation(history: Any) -> None:
    runs, found = history
    for by in ("spec", "project"):
        groups: dict[str, list[Run]] = {}
        for run in runs:
            if run.attempts:
                groups.setdefault(getattr(run, by), []).append(run)
        expected = {
            name: (
                len(m),
                nearest_rank([float(r.attempts[-1].run_s) for r in m], 0.95),
                nearest_rank([float(r.attempts[-1].queue_s) for r in m], 0.95),
            )
            for name, m in groups.items()
            if len(m) >= 20
        }
        got = {
            r[by]: (r["runs"], r["run_seconds_p95"], r["queue_seconds_p95"])
            for r in found["durations_p95"][by]
        }
        assert got == expected


def test_oom_rates_and_suggested_limits(history: Any) -> None:
    runs, found = history
    groups: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        if run.state in DECIDED:
            groups.setdefault((run.spec, run.memory_limit), []).append(run)
    expected = []
    for (spec, limit), members in sorted(groups.items()):
        if len(members) < 20:
            continue
        kills = sum(r.reason == "oom_killed" for r in members)
        peaks = [r.attempts[-1].peak for r in members]
        p95 = int(nearest_rank([float(p) for p in peaks], 0.95))
        step = 64 * 2**20
        suggested = -(-(p95 * 5) // (4 * step)) * step  # ceil(p95 * 1.25 / 64 MiB) * 64 MiB
        expected.append((spec, limit, len(members), kills, kills / len(members), p95, suggested))
    got = [
        (
            r["spec"],
            r["memory_limit"],
            r["runs"],
            r["oom_kills"],
            r["oom_rate"],
            r["peak_p95_bytes"],
            r["suggested_limit_bytes"],
        )
        for r in found["oom"]
    ]
    assert got == expected
    assert all(r["suggested_limit"] == f"{r['suggested_limit_bytes'] // 2**20}Mi" for r in found["oom"])
    assert any(r["oom_kills"] > 0 for r in found["oom"])
    # OOM-killed runs peak at their limit, so the 1Gi groups are told to go above 1Gi.
    for r in found["oom"]:
        low, high = wilson(r["oom_kills"], r["runs"])
        assert (r["ci95_low"], r["ci95_high"]) == pytest.approx((low, high), abs=1e-12)


def test_cost_per_successful_run(history: Any) -> None:
    runs, found = history
    for by in ("spec", "project"):
        groups: dict[str, list[Run]] = {}
        for run in runs:  # every ended run, cancelled included: they were paid for
            groups.setdefault(getattr(run, by), []).append(run)
        expected = {}
        for name, members in groups.items():
            if len(members) < 20:
                continue
            total = sum(run_cost_nanos(r) for r in members)
            wins = sum(r.state == "succeeded" for r in members)
            per = Decimal(total) / 10**9 / wins if wins else None
            expected[name] = (len(members), wins, Decimal(total) / 10**9, per)
        got = {
            r[by]: (r["runs"], r["successes"], r["total_cost_usd"], r["cost_per_success_usd"])
            for r in found["cost_per_success"][by]
        }
        assert got == expected


def test_most_retried_and_failing_specs(history: Any) -> None:
    runs, found = history
    retried = sorted((r for r in runs if len(r.attempts) > 1), key=lambda r: (-len(r.attempts), r.run_id))
    assert found["retried_runs"] == len(retried)
    assert [(r["run_id"], r["attempts"], r["state"]) for r in found["most_retried"]] == [
        (r.run_id, len(r.attempts), r.state) for r in retried[:10]
    ]

    specs: dict[str, list[Run]] = {}
    for run in runs:
        if run.state in DECIDED:
            specs.setdefault(run.spec, []).append(run)
    expected = []
    for spec, members in specs.items():
        if len(members) < 20:
            continue
        failed = [r for r in members if r.state != "succeeded"]
        reasons: dict[str, int] = {}
        for r in failed:
            reasons[r.reason or r.state] = reasons.get(r.reason or r.state, 0) + 1
        expected.append((spec, len(members), len(failed), len(failed) / len(members), reasons))
    expected.sort(key=lambda e: (-e[2], -e[3], e[0]))
    got = [
        (r["spec"], r["runs"], r["failures"], r["failure_rate"], r["reasons"]) for r in found["failing_specs"]
    ]
    assert got == expected[:10]
    assert got[0][0] == "spec-0"  # the spec built to fail most


# ------------------------------------------------------------------------------------------------
# insights() in one scan = the insights one by one


def insights_one_by_one(
    store: AnalyticsStore, min_runs: int = 20, top: int = 10, project: str | None = None
) -> dict[str, Any]:
    """What `insights()` answered before it scanned once: every insight's own query."""
    runs, decided = population(store, project)
    retried, retried_count = most_retried(store, top, project)
    groups = ("model", "spec", "project")
    return {
        "min_runs": min_runs,
        "runs": runs,
        "decided_runs": decided,
        "success_rate": {by: success_rate(store, by, min_runs, project) for by in groups},  # type: ignore[arg-type]
        "durations_p95": {by: duration_p95(store, by, min_runs, project) for by in groups},  # type: ignore[arg-type]
        "oom": oom_rates(store, min_runs, project),
        "cost_per_success": {
            "spec": cost_per_success(store, "spec", min_runs, project),
            "project": cost_per_success(store, "project", min_runs, project),
        },
        "most_retried": retried,
        "retried_runs": retried_count,
        "failing_specs": failing_specs(store, min_runs, top, project),
    }


@pytest.mark.parametrize(
    ("min_runs", "top", "project"),
    [(20, 10, None), (1, 3, None), (400, 1, None), (20, 10, "beta"), (1, 50, "gamma")],
)
def test_insights_in_one_scan_equal_the_queries_one_by_one(
    history_store: Any, min_runs: int, top: int, project: str | None
) -> None:
    _, store = history_store
    found = insights(store, min_runs, top, project)
    assert found == insights_one_by_one(store, min_runs, top, project)
    assert msgspec.json.encode(found) == msgspec.json.encode(
        insights_one_by_one(store, min_runs, top, project)
    )


def test_insights_in_one_scan_on_the_odd_cases(stores: Stores) -> None:
    """Runs without spec, project or memory limit, with several models or none, still running,
    cancelled, of unknown states, retried; calls of runs the store does not know."""
    rng = random.Random(7)
    store = stores.open("odd")
    try:
        with store.batch():
            for _ in range(400):
                rid = new_ulid()
                spec = rng.choice(["s1", "s2", None])
                project = rng.choice(["p1", "p2", None])
                limit = rng.choice(["1Gi", "512Mi", None])
                state = rng.choice(
                    ["succeeded", "failed", "timed_out", "budget_exceeded", "cancelled", "running"]
                )
                reason = rng.choice([None, "oom_killed", "exit 1"]) if state != "succeeded" else None
                attempts = rng.choice([1, 1, 2, 3])
                row: dict[str, Any] = dict.fromkeys(RUN_COLUMNS)
                finished = state != "running"
                row.update(
                    run_id=rid,
                    project=project,
                    spec_id=spec,
                    memory_limit=limit,
                    state=state,
                    reason=reason,
                    attempts=attempts,
                    run_seconds=float(rng.randrange(1, 500)) if finished else None,
                    queue_seconds=float(rng.randrange(0, 50)) if finished and rng.random() < 0.9 else None,
                    peak_memory_bytes=rng.randrange(2**20, 2**31)
                    if finished and rng.random() < 0.9
                    else None,
                    compute_cost_nanos=rng.randrange(0, 10**6) if finished else None,
                    storage_cost_nanos=rng.choice([None, 5000]),
                )
                store.put_run(row)
                for model in rng.sample(["m1", "m2", "m3"], rng.choice([0, 1, 1, 2, 3])):
                    store.put_llm_call(
                        llm_call_row(
                            LlmUsage(
                                call_id=new_ulid(),
                                run_id=rid,
                                project=project,
                                key_id="k",
                                endpoint="chat.completions",
                                model=model,
                                provider="p",
                                deployment="d",
                                upstream_model=model,
                                streamed=False,
                                cost_usd=rng.randrange(1, 1000) / 1e6,
                                latency_ms=1.0,
                                outcome="ok",
                            )
                        )
                    )
            for _ in range(5):  # calls of runs the store does not know
                store.put_llm_call(
                    llm_call_row(
                        LlmUsage(
                            call_id=new_ulid(),
                            run_id=new_ulid(),
                            key_id="k",
                            endpoint="chat.completions",
                            model="m1",
                            provider="p",
                            deployment="d",
                            upstream_model="m1",
                            streamed=False,
                            latency_ms=1.0,
                            outcome="ok",
                        )
                    )
                )
        for min_runs, top, project in [
            (1, 10, None),
            (10, 5, None),
            (30, 2, None),
            (1, 100, "p1"),
            (5, 0, "p2"),
        ]:
            assert insights(store, min_runs, top, project) == insights_one_by_one(
                store, min_runs, top, project
            )
        found = insights(store, 1, 10)
        assert {r["model"] for r in found["success_rate"]["model"]} == {"m1", "m2", "m3"}
    finally:
        store.close()
