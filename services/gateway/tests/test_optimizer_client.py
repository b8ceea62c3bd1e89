"""The gateway's side of the optimizer's request/reply contract: money, merging, error mapping."""

from __future__ import annotations

from decimal import Decimal

from fabrik_common import optimizer_rpc as rpc
from fabrik_gateway.models import CostReport
from fabrik_gateway.optimizer import merge_cost_rows, money, narrowed_costs, rpc_problem, view


def row(
    group: str | None, llm: str, compute: str | None = None, calls: int = 1, runs: int = 1
) -> rpc.CostRow:
    total = Decimal(llm) + Decimal(compute or 0)
    return rpc.CostRow(
        group=group,
        llm_cost_usd=Decimal(llm),
        compute_cost_usd=Decimal(compute) if compute is not None else None,
        storage_cost_usd=Decimal(0) if compute is not None else None,
        total_cost_usd=total,
        input_tokens=10,
        output_tokens=1,
        cache_read_tokens=0,
        cache_write_tokens=0,
        tokens=11,
        calls=calls,
        runs=runs,
        compute_runs=0,
    )


def test_money_is_exact_and_never_in_exponent_form() -> None:
    assert money(Decimal(5) / 10**9) == "0.000000005"
    assert money(Decimal("0E-9")) == "0"
    assert money(Decimal(100)) == "100"
    assert money(Decimal("0.0900")) == "0.09"
    assert money(Decimal(123456789012) / 10**9) == "123.456789012"


def test_per_project_answers_add_up_group_by_group() -> None:
    merged = merge_cost_rows([[row("m1", "0.25"), row("m2", "0.0151")], [row("m1", "1.5", calls=2)]])
    assert [(r.group, r.llm_cost_usd, r.calls, r.runs, r.tokens) for r in merged] == [
        ("m1", Decimal("1.75"), 3, 2, 22),
        ("m2", Decimal("0.0151"), 1, 1, 11),
    ]
    assert merged[0].compute_cost_usd is None  # by model: not attributable, also after merging


def test_narrowing_to_visible_projects_recomputes_the_totals() -> None:
    answer = rpc.CostsResponse(
        group_by="project",
        rows=[row("b", "2", "1"), row(None, "5"), row("a", "0.5", "0.25")],
        totals=rpc.CostTotals(
            llm_cost_usd=Decimal("7.5"),
            compute_cost_usd=Decimal("1.25"),
            storage_cost_usd=Decimal(0),
            total_cost_usd=Decimal("8.75"),
        ),
    )
    narrowed = narrowed_costs([answer], frozenset({"a"}))
    assert [r.group for r in narrowed.rows] == ["a"]
    assert narrowed.totals.total_cost_usd == Decimal("0.75")
    shown = view(narrowed, CostReport, projects=["a"])
    assert shown.totals.total_cost_usd == "0.75" and shown.rows[0].compute_cost_usd == "0.25"


def test_rpc_errors_become_problems() -> None:
    bad = rpc_problem(
        rpc.RpcError(status=400, field="group_by", rule="Expected ...", message="group_by: ...")
    )
    assert bad.status == 400 and bad.errors == [("group_by", "Expected ...")]
    body = rpc_problem(rpc.RpcError(status=400, field="warning", rule="r", message="m"), invalid_status=422)
    assert body.status == 422
    busy = rpc_problem(rpc.RpcError(status=409, rule="busy", message="a rebuild is already running"))
    assert busy.status == 409 and busy.slug == "optimizer-busy" and "Retry-After" not in busy.headers
    slow = rpc_problem(rpc.RpcError(status=503, rule="timeout", message="query took longer than 30 s"))
    assert slow.status == 503 and slow.headers["Retry-After"]
    bug = rpc_problem(rpc.RpcError(status=500, rule="internal", message="KeyError: 'x'"))
    assert bug.status == 502 and "KeyError" in bug.detail
