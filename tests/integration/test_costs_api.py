"""Costs, budgets and run insights through the gateway's REST API, answered by the REAL optimizer
over a real NATS server (request/reply, `fabrik_common.optimizer_rpc`).

The optimizer and the gateway run in this process against one NATS server; usage and run events
are published on the streams as the llm-proxy and the executor publish them; requests carry HS256
JWTs minted for the roles each case needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import msgspec
import nats
import pytest
from prometheus_client import CollectorRegistry

from fabrik_common import optimizer_rpc as rpc
from fabrik_common.bus import Bus, BusOptions
from fabrik_common.events import (
    Event,
    LlmUsage,
    RunDispatched,
    RunFinished,
    RunParameters,
    RunRequested,
    RunStarted,
    RunStateChanged,
)
from fabrik_common.ids import new_ulid
from fabrik_common.metrics import BusMetrics
from fabrik_common.runs import TEMPLATES
from fabrik_common.service import Service
from fabrik_common.testing import running_service
from fabrik_gateway.app import build as build_gateway
from fabrik_gateway.auth.jwt import mint_hs256
from fabrik_gateway.gateway import Gateway
from fabrik_gateway.settings import GatewaySettings
from fabrik_optimizer.app import build as build_optimizer
from fabrik_optimizer.settings import OptimizerSettings

SECRET = "costs-api-test-hs256-secret-0123456789"
NOW = datetime.now(UTC).replace(microsecond=0)
OLD = datetime(2025, 1, 10, 12, tzinfo=UTC)


def bearer(roles: object, subject: str = "someone") -> dict[str, str]:
    return {"Authorization": f"Bearer {mint_hs256(SECRET, subject, roles)}"}


ADMIN = bearer("admin", "root@example.com")


def usage(
    project: str | None, model: str, cost: float, tokens: tuple[int, int, int, int], *, run_id: str | None
) -> LlmUsage:
    return LlmUsage(
        call_id=new_ulid(),
        run_id=run_id,
        project=project,
        key_id="k",
        endpoint="chat.completions",
        model=model,
        provider="openai",
        deployment="d",
        upstream_model=model,
        streamed=False,
        input_tokens=tokens[0],
        output_tokens=tokens[1],
        cache_read_tokens=tokens[2],
        cache_write_tokens=tokens[3],
        cost_usd=cost,
        latency_ms=5.0,
        outcome="ok",
        occurred_at=NOW - timedelta(minutes=1),
    )


def run_events(run_id: str, project: str, outcome: str) -> list[Event]:
    """One attempt on the local backend (no compute cost: no local node type is configured)."""
    params = RunParameters(spec={"id": "hello"}, resources=TEMPLATES["default"])
    start = NOW - timedelta(minutes=10)
    started, ended = start + timedelta(seconds=5), start + timedelta(seconds=65)
    common: dict[str, Any] = {"run_id": run_id, "project": project}
    return [
        RunRequested(**common, env="dev", params=params, requested_by="u", occurred_at=start),
        RunStateChanged(
            **common, attempt=1, from_state=None, to_state="queued", revision=1, occurred_at=start
        ),
        RunDispatched(**common, env="dev", attempt=1, params=params, deadline=ended, occurred_at=started),
        RunStarted(run_id=run_id, attempt=1, backend="local", workload_ref="pid", occurred_at=started),
        RunStateChanged(
            **common, attempt=1, from_state="starting", to_state="running", revision=2, occurred_at=started
        ),
        RunFinished(run_id=run_id, attempt=1, outcome=outcome, occurred_at=ended),  # type: ignore[arg-type]
        RunStateChanged(
            **common,
            attempt=1,
            from_state="running",
            to_state=outcome,  # type: ignore[arg-type]
            revision=3,
            reason=None if outcome == "succeeded" else "workload_error",
            occurred_at=ended,
        ),
    ]


async def until(predicate: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} not reached in time"
        await asyncio.sleep(0.05)


def problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    return body


def fields(body: dict[str, Any]) -> set[str]:
    return {e["field"] for e in body.get("errors") or []}


def gateway_settings(nats_url: str, **extra: Any) -> GatewaySettings:
    return GatewaySettings(
        nats_url=nats_url,
        http_port=0,
        log_format="text",
        anonymous_role="none",
        jwt_hs256_secret=SECRET,
        rate_limit_per_minute=100000,
        rate_limit_burst=100000,
        **extra,
    )


@contextlib.asynccontextmanager
async def serving(settings: GatewaySettings) -> AsyncIterator[tuple[Service[Gateway], httpx.AsyncClient]]:
    service = build_gateway(settings)
    async with (
        running_service(service),
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{service.http.port}", timeout=30) as http,
    ):
        deadline = time.monotonic() + 15
        while (await http.get("/readyz")).status_code != 200:
            assert time.monotonic() < deadline, "gateway not ready"
            await asyncio.sleep(0.05)
        yield service, http


@dataclass
class Stack:
    http: httpx.AsyncClient
    optimizer: Service[Any]


RUN_A, RUN_B = new_ulid(), new_ulid()
EVENTS: list[Event] = [
    usage("alpha", "m1", 0.25, (1000, 200, 0, 0), run_id=RUN_A),
    usage("alpha", "m2", 0.0151, (100, 10, 50, 5), run_id=RUN_A),
    usage("alpha", "m1", 5e-9, (1, 0, 0, 0), run_id=None),  # 5 nano-dollars: "0.000000005", not "5E-9"
    usage("beta", "m1", 1.5, (3000, 300, 0, 0), run_id=RUN_B),
    msgspec.structs.replace(usage("beta", "m2", 0.75, (10, 10, 0, 0), run_id=RUN_B), occurred_at=OLD),
    usage(None, "m2", 2.0, (7, 7, 0, 0), run_id=None),  # a call without a project
    *run_events(RUN_A, "alpha", "succeeded"),
    *run_events(RUN_B, "beta", "failed"),
]


@pytest.fixture
async def stack(nats_url: str, tmp_path: Path) -> AsyncIterator[Stack]:
    optimizer_settings = OptimizerSettings(
        nats_url=nats_url,
        http_port=0,
        log_format="text",
        analytics_db=str(tmp_path / "analytics.db"),
        budget_eval_seconds=0.05,
    )
    bus = Bus(BusOptions(url=nats_url), BusMetrics(CollectorRegistry()))
    async with (
        running_service(build_optimizer(optimizer_settings)) as optimizer,
        serving(gateway_settings(nats_url)) as (_, http),
    ):
        await bus.connect()
        try:
            for event in EVENTS:
                await bus.publish(event)
        finally:
            await bus.close()
        store = optimizer.state.store
        await until(
            lambda: (
                len(store.llm_calls()) == 6
                and sorted(r["state"] for r in store.runs()) == ["failed", "succeeded"]
            ),
            "events ingested",
        )
        yield Stack(http=http, optimizer=optimizer)


def by_group(report: dict[str, Any]) -> dict[str | None, dict[str, Any]]:
    return {row["group"]: row for row in report["rows"]}


# ------------------------------------------------------------------------------------------------


async def test_costs_match_the_published_usage(stack: Stack) -> None:
    http = stack.http
    response = await http.get("/api/v1/costs", headers=bearer("viewer"))
    assert response.status_code == 200, response.text
    report = response.json()
    assert report["group_by"] == "project" and report["currency"] == "USD" and report["projects"] is None
    assert [r["group"] for r in report["rows"]] == ["beta", None, "alpha"]  # most expensive first
    rows = by_group(report)
    assert rows["alpha"]["llm_cost_usd"] == "0.265100005"
    assert rows["alpha"]["calls"] == 3 and rows["alpha"]["runs"] == 1
    assert rows["alpha"]["input_tokens"] == 1101 and rows["alpha"]["cache_read_tokens"] == 50
    assert rows["alpha"]["tokens"] == 1101 + 210 + 50 + 5
    assert rows["beta"]["llm_cost_usd"] == "2.25" and rows["beta"]["total_cost_usd"] == "2.25"
    assert rows[None]["llm_cost_usd"] == "2"
    assert report["totals"]["llm_cost_usd"] == "4.515100005"
    assert report["totals"]["total_cost_usd"] == "4.515100005"

    by_model = (await http.get("/api/v1/costs?group_by=model", headers=ADMIN)).json()
    models = by_group(by_model)
    assert models["m1"]["llm_cost_usd"] == "1.750000005" and models["m1"]["calls"] == 3
    assert models["m2"]["llm_cost_usd"] == "2.7651" and models["m2"]["compute_cost_usd"] is None
    assert by_model["totals"]["llm_cost_usd"] == "4.515100005"

    # A range: the old call is left out; `to` is exclusive.
    since = (NOW - timedelta(days=1)).isoformat().replace("+00:00", "Z")
    recent = (await http.get("/api/v1/costs", params={"from": since}, headers=ADMIN)).json()
    assert by_group(recent)["beta"]["llm_cost_usd"] == "1.5"
    assert recent["from"] == since
    old = (
        await http.get(
            "/api/v1/costs",
            params={"from": "2025-01-01T00:00:00+01:00", "to": "2025-02-01T00:00:00Z", "group_by": "day"},
            headers=ADMIN,
        )
    ).json()
    assert [(r["group"], r["llm_cost_usd"]) for r in old["rows"]] == [("2025-01-10", "0.75")]

    one = (await http.get("/api/v1/costs?project=alpha&group_by=model", headers=ADMIN)).json()
    assert one["projects"] == ["alpha"]
    assert {g: r["llm_cost_usd"] for g, r in by_group(one).items()} == {"m1": "0.250000005", "m2": "0.0151"}

    # The same numbers as the optimizer answers over NATS, exactly.
    nc = await nats.connect(stack.optimizer.settings.nats_url)
    try:
        reply = await nc.request(rpc.COSTS, rpc.encode(rpc.CostsRequest(group_by="spec")), timeout=10)
    finally:
        await nc.close()
    direct = rpc.decode_response(reply.data, rpc.CostsResponse)
    assert not isinstance(direct, rpc.RpcError)
    via_api = (await http.get("/api/v1/costs?group_by=spec", headers=ADMIN)).json()
    assert {r["group"]: Decimal(r["total_cost_usd"]) for r in via_api["rows"]} == {
        r.group: r.total_cost_usd for r in direct.rows
    }

    # Invalid parameters are all named in one 400.
    bad = problem(
        await http.get(
            "/api/v1/costs",
            params={"group_by": "colour", "from": "yesterday", "project": "Not_A_Label"},
            headers=ADMIN,
        ),
        400,
    )
    assert fields(bad) == {"group_by", "from", "project"}
    reversed_range = problem(
        await http.get(
            "/api/v1/costs",
            params={"from": "2026-03-02T00:00:00Z", "to": "2026-03-01T00:00:00Z"},
            headers=ADMIN,
        ),
        400,
    )
    assert fields(reversed_range) == {"to"}


async def test_a_project_scoped_principal_sees_only_its_projects(stack: Stack) -> None:
    http = stack.http
    alpha = bearer(["alpha:viewer"], "alpha-viewer")
    report = (await http.get("/api/v1/costs", headers=alpha)).json()
    assert report["projects"] == ["alpha"]
    assert [r["group"] for r in report["rows"]] == ["alpha"]
    assert report["totals"]["llm_cost_usd"] == "0.265100005"

    # Grouped otherwise: only its projects' calls, added up (the call without a project is left out).
    models = (await http.get("/api/v1/costs?group_by=model", headers=alpha)).json()
    assert {g: r["llm_cost_usd"] for g, r in by_group(models).items()} == {
        "m1": "0.250000005",
        "m2": "0.0151",
    }
    assert models["totals"]["total_cost_usd"] == "0.265100005"
    both = bearer({"alpha": "viewer", "beta": "developer"}, "two-projects")
    merged = (await http.get("/api/v1/costs?group_by=model", headers=both)).json()
    assert merged["projects"] == ["alpha", "beta"]
    rows = by_group(merged)
    assert (
        rows["m1"]["llm_cost_usd"] == "1.750000005" and rows["m1"]["calls"] == 3 and rows["m1"]["runs"] == 2
    )
    assert rows["m2"]["llm_cost_usd"] == "0.7651"
    assert merged["totals"]["llm_cost_usd"] == "2.515100005"

    # Another project is refused, wherever it is named.
    for path in ("/api/v1/costs", "/api/v1/budgets", "/api/v1/analytics/insights"):
        detail = problem(await http.get(path, params={"project": "beta"}, headers=alpha), 403)["detail"]
        assert "in project beta" in detail
    # A caller without any role sees nothing.
    problem(await http.get("/api/v1/costs", headers=bearer([], "nobody")), 403)
    # Insights cannot be added up across projects: a scoped caller names one.
    unnamed = problem(await http.get("/api/v1/analytics/insights", headers=alpha), 400)
    assert fields(unnamed) == {"project"} and "alpha" in unnamed["errors"][0]["rule"]
    insights = (await http.get("/api/v1/analytics/insights?project=alpha&min_runs=1", headers=alpha)).json()
    assert insights["project"] == "alpha" and insights["runs"] == 1
    assert [r["group"] for r in insights["success_rate"]["project"]] == ["alpha"]


async def test_budgets_need_the_maintainer_role_and_show_their_spend(stack: Stack) -> None:
    http = stack.http
    body = {"scope": "project", "project": "alpha", "llm_usd_per_month": 10, "warning": 0.5}
    developer = bearer({"alpha": "developer"}, "dev@example.com")
    detail = problem(await http.put("/api/v1/budgets", json=body, headers=developer), 403)["detail"]
    assert "maintainer role in project alpha" in detail
    maintainer = bearer({"alpha": "maintainer"}, "lead@example.com")
    response = await http.put("/api/v1/budgets", json=body, headers=maintainer)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["definition"]["llm_usd_per_month"] == 10
    assert result["definition"]["warning"] == 0.5
    assert result["definition"]["updated_by"] == "lead@example.com"
    assert result["status"]["llm"]["spent_usd"] == "0.265100005"
    assert result["status"]["llm"]["level"] == "ok"

    # The global budget is an admin's; a maintainer of one project may not set it.
    global_budget = {"scope": "global", "compute_usd_per_month": 100}
    problem(await http.put("/api/v1/budgets", json=global_budget, headers=maintainer), 403)
    assert (await http.put("/api/v1/budgets", json=global_budget, headers=ADMIN)).status_code == 200

    listed = (await http.get("/api/v1/budgets", headers=ADMIN)).json()
    assert {(b["scope"], b["project"]) for b in listed["budgets"]} == {("global", None), ("project", "alpha")}
    (alpha,) = [b for b in listed["budgets"] if b["project"] == "alpha"]
    assert alpha["llm"]["limit_usd"] == 10 and alpha["llm"]["warning_usd"] == 5
    assert alpha["llm"]["spent_usd"] == "0.265100005" and not alpha["blocked"]
    assert Decimal(alpha["llm"]["projected_usd"]) >= Decimal("0.265100005")
    assert alpha["compute"]["level"] == "none"
    (glob,) = [b for b in listed["budgets"] if b["scope"] == "global"]
    assert glob["llm"]["spent_usd"] == "3.765100005"  # every project this month, and calls without one
    # A scoped viewer sees its project's budget, never the global one (it counts every project).
    scoped = (await http.get("/api/v1/budgets", headers=bearer(["alpha:viewer"]))).json()
    assert [b["project"] for b in scoped["budgets"]] == ["alpha"]
    # A project without a budget: its spend, against no limit.
    beta = (await http.get("/api/v1/budgets?project=beta", headers=bearer("viewer"))).json()
    (beta_status,) = [b for b in beta["budgets"] if b["project"] == "beta"]
    assert beta_status["llm"]["level"] == "none" and beta_status["llm"]["spent_usd"] == "1.5"
    old = (await http.get("/api/v1/budgets?project=beta&period=2025-01", headers=ADMIN)).json()
    assert old["period"] == "2025-01"
    assert [b["llm"]["spent_usd"] for b in old["budgets"] if b["project"] == "beta"] == ["0.75"]

    # Invalid bodies and parameters name the field.
    for invalid_body, field in (
        ({"scope": "project", "llm_usd_per_month": 1}, "project"),
        ({"scope": "global", "project": "alpha", "llm_usd_per_month": 1}, "project"),
        ({"scope": "global", "warning": 1.5}, "warning"),
        ({"scope": "global", "actor": "someone-else"}, "actor"),
        ({"scope": "project", "project": "alpha", "llm_usd_per_month": -1}, "llm_usd_per_month"),
    ):
        assert fields(problem(await http.put("/api/v1/budgets", json=invalid_body, headers=ADMIN), 422)) == {
            field
        }, invalid_body
    assert fields(problem(await http.get("/api/v1/budgets?period=2026-13", headers=ADMIN), 400)) == {"period"}

    # Neither limit removes the budget.
    removed = await http.put(
        "/api/v1/budgets", json={"scope": "project", "project": "alpha"}, headers=maintainer
    )
    assert removed.status_code == 200 and removed.json()["definition"]["llm_usd_per_month"] is None
    listed = (await http.get("/api/v1/budgets", headers=ADMIN)).json()
    assert [b["scope"] for b in listed["budgets"]] == ["global"]

    # Both the refusal and the change are in the audit trail.
    async def audited() -> list[dict[str, Any]]:
        page = await http.get("/api/v1/audit", params={"action": "budget.set"}, headers=ADMIN)
        items: list[dict[str, Any]] = page.json()["items"]
        return items

    deadline = time.monotonic() + 10
    while len(items := await audited()) < 5:
        assert time.monotonic() < deadline, items
        await asyncio.sleep(0.1)
    denied = next(i for i in items if i["actor"] == "dev@example.com")
    assert (
        denied["result"] == "denied" and denied["target"] == "budget:alpha" and denied["project"] == "alpha"
    )
    ok = next(i for i in items if i["actor"] == "lead@example.com")
    assert ok["result"] == "ok" and ok["details"]["llm_usd_per_month"] == 10


async def test_insights_and_rebuild(stack: Stack) -> None:
    http = stack.http
    response = await http.get("/api/v1/analytics/insights?min_runs=1&top=5", headers=bearer("viewer"))
    assert response.status_code == 200, response.text
    insights = response.json()
    assert insights["project"] is None and insights["min_runs"] == 1
    assert insights["runs"] == 2 and insights["decided_runs"] == 2
    assert set(insights["success_rate"]) == {"model", "spec", "project"}
    rates = {r["group"]: r for r in insights["success_rate"]["project"]}
    assert rates["alpha"]["successes"] == 1 and rates["beta"]["successes"] == 0
    assert (
        0 <= rates["alpha"]["ci95_low"] <= rates["alpha"]["success_rate"] <= rates["alpha"]["ci95_high"] <= 1
    )
    assert set(insights["durations_p95"]) == {"model", "spec", "project"}
    assert set(insights["cost_per_success"]) == {"spec", "project"}
    per_project = {r["group"]: r for r in insights["cost_per_success"]["project"]}
    assert per_project["beta"]["cost_per_success_usd"] is None
    assert isinstance(insights["oom"], list) and isinstance(insights["most_retried"], list)
    assert insights["retried_runs"] == 0
    assert [s["spec"] for s in insights["failing_specs"]] == ["hello"]
    # Defaults leave small groups out.
    assert (await http.get("/api/v1/analytics/insights", headers=ADMIN)).json()["success_rate"][
        "project"
    ] == []
    bad = problem(await http.get("/api/v1/analytics/insights?min_runs=0&top=x", headers=ADMIN), 400)
    assert fields(bad) == {"min_runs", "top"}

    # Rebuild: admins only; the figures are the same afterwards.
    before = (await http.get("/api/v1/costs?group_by=model", headers=ADMIN)).json()
    problem(await http.post("/api/v1/analytics/rebuild", headers=bearer({"alpha": "maintainer"})), 403)
    response = await http.post("/api/v1/analytics/rebuild", headers=ADMIN)
    assert response.status_code == 200, response.text
    rebuilt = response.json()
    assert (rebuilt["runs"], rebuilt["llm_calls"], rebuilt["usage_events"]) == (2, 6, 6)
    assert rebuilt["run_events"] == 14 and rebuilt["seconds"] >= 0
    assert (await http.get("/api/v1/costs?group_by=model", headers=ADMIN)).json() == before


async def test_without_an_optimizer_the_api_answers_503_with_retry_after(nats_url: str) -> None:
    async with serving(gateway_settings(nats_url, optimizer_timeout_seconds=0.5)) as (_, http):
        requests = [
            ("GET", "/api/v1/costs", None),
            ("GET", "/api/v1/budgets", None),
            ("PUT", "/api/v1/budgets", {"scope": "global", "llm_usd_per_month": 5}),
            ("GET", "/api/v1/analytics/insights", None),
            ("POST", "/api/v1/analytics/rebuild", None),
        ]
        for method, path, body in requests:
            response = await http.request(method, path, json=body, headers=ADMIN)
            detail = problem(response, 503)["detail"]
            assert "optimizer is not answering" in detail and "running" in detail, detail
            assert int(response.headers["retry-after"]) >= 1
        # Parameters are checked before the optimizer is asked.
        bad = problem(await http.get("/api/v1/costs?group_by=colour", headers=ADMIN), 400)
        assert bad["errors"] == [{"field": "group_by", "rule": "must be one of project, spec, model, day"}]

        # Something subscribed that never answers: a timeout, also a 503.
        nc = await nats.connect(nats_url)
        try:

            async def silent(msg: Any) -> None:
                pass

            async def busy(msg: Any) -> None:
                error = rpc.RpcError(status=503, rule="timeout", message="query took longer than 30 s")
                await msg.respond(rpc.encode(error))

            async def broken(msg: Any) -> None:
                error = rpc.RpcError(status=500, rule="internal", message="KeyError: 'x'")
                await msg.respond(rpc.encode(error))

            await nc.subscribe(rpc.COSTS, cb=silent)
            await nc.subscribe(rpc.INSIGHTS, cb=busy)
            await nc.subscribe(rpc.BUDGETS_GET, cb=broken)
            await nc.flush()
            response = await http.get("/api/v1/costs", headers=ADMIN)
            assert "no answer within 0.5 s" in problem(response, 503)["detail"]
            assert response.headers["retry-after"]
            # The optimizer's own errors: a 503 passes through, a 500 (a bug) is a 502.
            response = await http.get("/api/v1/analytics/insights", headers=ADMIN)
            assert problem(response, 503)["detail"] == "query took longer than 30 s"
            assert response.headers["retry-after"]
            assert "KeyError" in problem(await http.get("/api/v1/budgets", headers=ADMIN), 502)["detail"]
        finally:
            await nc.close()
