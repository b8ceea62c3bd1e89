"""`fabrik cost show|export`, `fabrik budget set|status`, `fabrik analytics insights|rebuild`:
costs, budgets and run insights, which the gateway asks the optimizer for
(docs/costs-and-analytics.md), over `fabrik_cli.client` (HTTP) and `output` (rendering).

Money is shown exactly as the API sends it (decimal strings in USD), in tables and in CSV alike.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click

from fabrik_cli.client import ApiClient, ApiError
from fabrik_cli.commands.access import parse_when
from fabrik_cli.commands.common import api_option, emit, err, open_client, output_option
from fabrik_cli.errors import CliError, UsageError
from fabrik_cli.output import (
    budget_set_summary,
    budgets_table,
    costs_csv,
    costs_table,
    insights_report,
    rebuild_summary,
)

GROUPS = ("project", "spec", "model", "day")
_PERIOD = re.compile(r"^[0-9]{4}-(0[1-9]|1[0-2])$")
BUDGET_FIELD_FLAGS = {
    "scope": "--global/--project",
    "project": "--project",
    "llm_usd_per_month": "--llm",
    "compute_usd_per_month": "--compute",
    "warning": "--warning",
}
NO_LIMIT = "none"


def _time_option(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    return parse_when(value) if value else None


def cost_filters(func: Any) -> Any:
    """--group-by, --from, --to, --project: the filters of `cost show` and `cost export`."""
    options = [
        click.option(
            "--group-by",
            "-g",
            type=click.Choice(GROUPS),
            default=None,
            help="One row per project, spec, model or UTC day. [default (API): project]",
        ),
        click.option(
            "--from",
            "since",
            default=None,
            metavar="WHEN",
            callback=_time_option,
            help="From this time on: 2026-03-01T00:00:00Z, a local time (2026-03-01, 2026-03-01 12:00), or "
            "an age (7d, 12h). [default: the beginning]",
        ),
        click.option(
            "--to",
            "until",
            default=None,
            metavar="WHEN",
            callback=_time_option,
            help="Before this time (exclusive), as --from. [default: now]",
        ),
        click.option("--project", "-p", default=None, help="Only this project."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _costs(
    client: ApiClient, group_by: str | None, since: str | None, until: str | None, project: str | None
) -> Any:
    return client.costs(group_by=group_by, since=since, until=until, project=project)


# --------------------------------------------------------------------------------------------
# fabrik cost show | export


@click.group("cost")
def cost_group() -> None:
    """Costs of runs and LLM calls (LLM, compute, storage), in USD."""


@cost_group.command("show")
@cost_filters
@api_option
@output_option
def cost_show(
    group_by: str | None,
    since: str | None,
    until: str | None,
    project: str | None,
    api: str | None,
    output: str,
) -> None:
    """Costs per project, spec, model or day, most expensive first, with the totals.

    LLM calls count by their time, a run's compute and storage by the end of its latest attempt.
    Amounts are exact (the API's decimal strings). Callers who see only some projects get only
    theirs.

    \b
    Examples:
      fabrik cost show --group-by model --from 30d
      fabrik cost show -p demo --group-by day --from 2026-03-01 --to 2026-04-01
    """
    with open_client(api) as client:
        data = _costs(client, group_by, since, until, project)
    emit(data, output, costs_table)


@cost_group.command("export")
@click.option(
    "--csv", "as_csv", is_flag=True, default=True, help="As CSV (the default, and for now the only format)."
)
@cost_filters
@click.option(
    "--output",
    "output_file",
    type=click.Path(dir_okay=False, writable=True),
    default=None,
    metavar="FILE",
    help="Write to FILE (replaced atomically). [default: stdout]",
)
@api_option
def cost_export(
    as_csv: bool,
    group_by: str | None,
    since: str | None,
    until: str | None,
    project: str | None,
    output_file: str | None,
    api: str | None,
) -> None:
    """Costs as CSV: a header row, then one row per group with exact amounts in USD.

    Columns: the grouping (project, spec, model or day), llm_cost_usd, compute_cost_usd,
    storage_cost_usd, total_cost_usd, input_tokens, output_tokens, cache_read_tokens,
    cache_write_tokens, tokens, calls, runs, compute_runs. An empty group is a call or run without
    one; compute and storage are empty by model. No totals row (sum the columns).

    \b
    Examples:
      fabrik cost export --csv --group-by day --from 2026-03-01 --to 2026-04-01 --output march.csv
    """
    with open_client(api) as client:
        data = _costs(client, group_by, since, until, project)
    text = costs_csv(data)
    rows = len(data.get("rows") or []) if isinstance(data, Mapping) else 0
    if output_file is None:
        click.echo(text, nl=False)
        return
    _write_atomically(Path(output_file), text)
    err(f"wrote {rows} row(s) to {output_file}")


def _write_atomically(path: Path, text: str) -> None:
    directory = path.expanduser().absolute().parent
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=directory)
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except OSError as exc:
        raise CliError(f"cannot write {path}: {exc.strerror or exc}") from None


# --------------------------------------------------------------------------------------------
# fabrik budget set | status


class LimitType(click.ParamType[float | str]):
    """A monthly limit in USD (≥ 0), or `none` for no limit of that kind."""

    name = "USD"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float | str:
        if isinstance(value, float):
            return value
        text = str(value).strip().lower()
        if text == NO_LIMIT:
            return NO_LIMIT
        try:
            amount = float(text.removeprefix("$"))
        except ValueError:
            self.fail(f"{value!r} is neither an amount in USD (e.g. 100 or 12.5) nor `none`", param, ctx)
        if not amount >= 0 or amount == float("inf"):
            self.fail(f"{value!r} must be an amount of at least 0", param, ctx)
        return amount


def _period_option(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None and not _PERIOD.match(value):
        raise click.BadParameter(f"{value!r} is not a month as YYYY-MM, e.g. 2026-03")
    return value


@click.group("budget")
def budget_group() -> None:
    """Monthly budgets (UTC calendar months) in USD: set them, and see where they stand."""


def _current(client: ApiClient, project: str | None) -> Mapping[str, Any]:
    """The budget's current status (its limits and warning), or {} when it has none."""
    data = client.budgets(project=project)
    budgets = data.get("budgets") if isinstance(data, Mapping) else None
    for budget in budgets if isinstance(budgets, list) else []:
        if not isinstance(budget, Mapping):
            continue
        if (project is None and budget.get("scope") == "global") or (
            project is not None and budget.get("scope") == "project" and budget.get("project") == project
        ):
            return budget
    return {}


def _limit_of(status: Mapping[str, Any], kind: str) -> float | None:
    line = status.get(kind)
    limit = line.get("limit_usd") if isinstance(line, Mapping) else None
    return limit if isinstance(limit, int | float) and not isinstance(limit, bool) else None


def _merge_current(
    body: dict[str, Any],
    current: Mapping[str, Any],
    *,
    llm: float | str | None,
    compute: float | str | None,
    warning: float | None,
) -> None:
    """Fill `body` with the limits and warning given, else the budget's current ones."""
    for key, kind, given in (
        ("llm_usd_per_month", "llm", llm),
        ("compute_usd_per_month", "compute", compute),
    ):
        value = _limit_of(current, kind) if given is None else given
        if value is not None and value != NO_LIMIT:
            body[key] = value
    has_budget = _limit_of(current, "llm") is not None or _limit_of(current, "compute") is not None
    kept = current.get("warning") if has_budget else None
    if warning is not None:
        body["warning"] = warning
    elif isinstance(kept, int | float) and not isinstance(kept, bool):
        body["warning"] = kept
    if "llm_usd_per_month" not in body and "compute_usd_per_month" not in body:
        raise UsageError("that leaves no limit: give --llm or --compute (or --clear to remove the budget)")


@budget_group.command("set")
@click.option(
    "--global", "is_global", is_flag=True, help="The global budget (every project together; admins)."
)
@click.option("--project", "-p", default=None, help="This project's budget (maintainers of the project).")
@click.option(
    "--llm",
    type=LimitType(),
    default=None,
    help="LLM spend per month; the llm-proxy refuses the project's calls once it is spent. `none`: no "
    "LLM limit. [default: unchanged]",
)
@click.option(
    "--compute",
    type=LimitType(),
    default=None,
    help="Compute and storage per month (alerts only). `none`: no compute limit. [default: unchanged]",
)
@click.option(
    "--warning",
    type=click.FloatRange(0, 1, min_open=True, max_open=True),
    default=None,
    help="Warn at this share of a limit, e.g. 0.8 for 80 %. [default: unchanged, else 0.8]",
)
@click.option("--clear", is_flag=True, help="Remove the budget (both limits).")
@api_option
@output_option
def budget_set(
    is_global: bool,
    project: str | None,
    llm: float | str | None,
    compute: float | str | None,
    warning: float | None,
    clear: bool,
    api: str | None,
    output: str,
) -> None:
    """Set (or change, or --clear) the global budget or a project's.

    Options not given keep their current values (the budget is read first), so `--compute 50`
    adds a compute limit to an LLM limit already set. A budget with neither limit is removed.

    \b
    Examples:
      fabrik budget set --project demo --llm 200 --warning 0.75
      fabrik budget set --global --compute 1000
      fabrik budget set --project demo --llm none      # keep only the compute limit
      fabrik budget set --project demo --clear
    """
    if is_global == (project is not None):
        raise UsageError("give one of --global or --project P")
    if clear and (llm is not None or compute is not None or warning is not None):
        raise UsageError("--clear removes the budget: it takes no --llm, --compute or --warning")
    if not clear and llm is None and compute is None and warning is None:
        raise UsageError(
            "nothing to set: give --llm, --compute or --warning (or --clear to remove the budget)"
        )
    body: dict[str, Any] = {"scope": "global" if is_global else "project"}
    if project is not None:
        body["project"] = project
    with open_client(api) as client:
        try:
            if not clear:
                _merge_current(body, _current(client, project), llm=llm, compute=compute, warning=warning)
            data = client.set_budget(body)
        except ApiError as exc:
            exc.name_flags(lambda f: BUDGET_FIELD_FLAGS.get(f.removeprefix("$.").removeprefix("body.")))
            raise
    emit(data, output, budget_set_summary)


@budget_group.command("status")
@click.option("--project", "-p", default=None, help="Only this project (and the global budget).")
@click.option(
    "--period",
    default=None,
    metavar="YYYY-MM",
    callback=_period_option,
    help="This month (UTC). [default: the current month]",
)
@api_option
@output_option
def budget_status(project: str | None, period: str | None, api: str | None, output: str) -> None:
    """Budgets and where they stand: spent, limit, share used, projection to the month's end, level.

    Levels: `ok`, `warning` (spent ≥ warning share of the limit), `limit` (spent ≥ limit); `none`
    without a limit of that kind. `(blocked)`: the llm-proxy refuses the project's LLM calls.
    """
    with open_client(api) as client:
        data = client.budgets(project=project, period=period)
    emit(data, output, budgets_table)


# --------------------------------------------------------------------------------------------
# fabrik analytics insights | rebuild


@click.group("analytics")
def analytics_group() -> None:
    """Run insights from the optimizer's analytics store, and rebuilding that store."""


@analytics_group.command("insights")
@click.option(
    "--project",
    "-p",
    default=None,
    help="Only this project's runs (required when you see only some projects). [default: every project]",
)
@click.option(
    "--min-runs",
    type=click.IntRange(1, 1_000_000),
    default=None,
    help="Leave out groups with fewer decided runs. [default (API): 20]",
)
@click.option(
    "--top",
    type=click.IntRange(1, 1000),
    default=None,
    help="How many most-retried runs. [default (API): 10]",
)
@api_option
@output_option
def analytics_insights(
    project: str | None, min_runs: int | None, top: int | None, api: str | None, output: str
) -> None:
    """Success rates (95 % intervals), p95 durations, OOM kills with a suggested memory limit,
    cost per successful run, the runs retried most and the specs failing most."""
    with open_client(api) as client:
        data = client.insights(project=project, min_runs=min_runs, top=top)
    emit(data, output, insights_report)


@analytics_group.command("rebuild")
@api_option
@output_option
def analytics_rebuild(api: str | None, output: str) -> None:
    """Rebuild the analytics store from the streams (admins); waits until it is done.

    Live events keep being counted meanwhile. A rebuild already running: exit 1 (409).
    """
    err("rebuilding the analytics store from the RUNS and LLM streams (this can take minutes)...")
    with open_client(api) as client:
        data = client.rebuild_analytics()
    emit(data, output, rebuild_summary)
