"""Rendering of costs, budgets and insights, and `fabrik budget set`'s merge with the current budget."""

from __future__ import annotations

import csv
import io
from typing import Any

import click
import pytest

from fabrik_cli.commands.analytics import LimitType, _merge_current
from fabrik_cli.errors import UsageError
from fabrik_cli.output import budgets_table, costs_csv, costs_table, format_money, format_number

REPORT: dict[str, Any] = {
    "group_by": "model",
    "projects": None,
    "rows": [
        {
            "group": "m1",
            "llm_cost_usd": "0.000000005",
            "compute_cost_usd": None,
            "storage_cost_usd": None,
            "total_cost_usd": "0.000000005",
            "input_tokens": 1,
            "output_tokens": 0,
            "cache_read_tokens": 0,
            "cache_write_tokens": 0,
            "tokens": 1,
            "calls": 1,
            "runs": 0,
            "compute_runs": 0,
        },
        {"group": None, "llm_cost_usd": "2", "total_cost_usd": "2", "tokens": 7, "calls": 1, "runs": 1},
    ],
    "totals": {
        "llm_cost_usd": "2.000000005",
        "compute_cost_usd": "0",
        "storage_cost_usd": "0",
        "total_cost_usd": "2.000000005",
    },
}


def test_money_is_shown_exactly() -> None:
    assert format_money("0.000000005") == "$0.000000005"
    assert format_money(10.0) == "$10" and format_money(0.1) == "$0.1" and format_money(None) == "-"
    assert format_number(1e12) == "1000000000000"


def test_costs_table_and_csv() -> None:
    lines = costs_table(REPORT).splitlines()
    assert lines[0].split()[0] == "MODEL"
    assert lines[1].split()[:3] == ["m1", "$0.000000005", "-"]
    assert lines[2].split()[0] == "(none)"
    assert lines[3].split()[:2] == ["TOTAL", "$2.000000005"]
    rows = list(csv.reader(io.StringIO(costs_csv(REPORT))))
    assert rows[0][:3] == ["model", "llm_cost_usd", "compute_cost_usd"]
    assert rows[1][:3] == ["m1", "0.000000005", ""]
    assert rows[2][0] == "" and len(rows) == 3
    assert costs_table({"rows": [], "totals": {}}) == "no costs recorded for these filters"


def test_budgets_table_marks_blocked_projects() -> None:
    line = {"kind": "llm", "limit_usd": 10.0, "spent_usd": "12", "projected_usd": "20", "used": 1.2}
    data = {
        "period": "2026-03",
        "budgets": [
            {
                "scope": "project",
                "project": "demo",
                "elapsed_fraction": 0.5,
                "blocked": True,
                "llm": {**line, "level": "limit"},
                "compute": {**line, "kind": "compute", "limit_usd": None, "used": None, "level": "none"},
            }
        ],
    }
    lines = budgets_table(data).splitlines()
    assert lines[0] == "period 2026-03 (50.0% elapsed)"
    assert lines[3].split() == ["demo", "llm", "$12", "$10", "120.0%", "$20", "limit", "(blocked)"]
    assert lines[4].split()[-1] == "none"


def current(llm: float | None, compute: float | None, warning: float = 0.5) -> dict[str, Any]:
    return {"warning": warning, "llm": {"limit_usd": llm}, "compute": {"limit_usd": compute}}


def test_budget_set_keeps_what_is_not_given() -> None:
    body: dict[str, Any] = {"scope": "project", "project": "demo"}
    _merge_current(body, current(100.0, None), llm=None, compute=5.0, warning=None)
    assert body == {
        "scope": "project",
        "project": "demo",
        "llm_usd_per_month": 100.0,
        "compute_usd_per_month": 5.0,
        "warning": 0.5,
    }
    body = {"scope": "global"}
    _merge_current(body, current(0.0, 7.0), llm="none", compute=None, warning=0.9)
    assert body == {"scope": "global", "compute_usd_per_month": 7.0, "warning": 0.9}
    body = {"scope": "global"}
    _merge_current(body, {}, llm=1.0, compute=None, warning=None)  # no budget yet: the API's default warning
    assert body == {"scope": "global", "llm_usd_per_month": 1.0}
    with pytest.raises(UsageError):
        _merge_current({"scope": "global"}, current(3.0, None), llm="none", compute=None, warning=None)


def test_limits_are_amounts_or_none() -> None:
    limit = LimitType()
    assert limit.convert("12.5", None, None) == 12.5 and limit.convert("$3", None, None) == 3.0
    assert limit.convert("None", None, None) == "none"
    for bad in ("-1", "lots", "inf", "nan"):
        with pytest.raises(click.BadParameter):
            limit.convert(bad, None, None)
