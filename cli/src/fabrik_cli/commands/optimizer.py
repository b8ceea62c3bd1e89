"""`fabrik optimizer experiments list|show|create|approve|pause|resume|stop|rollback`,
`fabrik optimizer pause|resume|history`, `fabrik optimizer candidates|start-candidate`: the
optimizer's experiments on run configuration, the ones it proposes, its global pause and the
history of its changes, through the gateway (docs/optimizer.md#api-and-cli).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from fabrik_cli.commands.common import api_option, emit, open_client, output_option
from fabrik_cli.errors import UsageError


def _rate(value: Any) -> str:
    return "-" if value is None else f"{float(value):.3f}"


def experiments_table(data: Any) -> str:
    rows = data.get("experiments") or []
    pause = data.get("pause") or {}
    lines = []
    if pause.get("paused"):
        lines.append(f"optimizer PAUSED by {pause.get('by')}: {pause.get('reason')}")
    lines.append(f"{'ID':26}  {'STATE':16}  {'RISK':6}  {'PARAMETER':24}  {'SHARE':5}  NAME")
    for e in rows:
        lines.append(
            f"{e['id']:26}  {e['state']:16}  {e['risk']:6}  {e['parameter']:24}  "
            f"{float(e['treatment_share']):5.2f}  {e['name']}"
        )
    defaults = (data.get("defaults") or {}).get("overrides") or {}
    lines.append("defaults: " + (json.dumps(defaults, sort_keys=True) if defaults else "(none)"))
    return "\n".join(lines)


def experiment_report(data: Any) -> str:
    e = data["experiment"]
    lines = [
        f"{e['name']}  ({e['id']})",
        f"state: {e['state']}   risk: {e['risk']}   parameter: {e['parameter']}   "
        f"share: {e['treatment_share']}",
        f"target: {json.dumps(e.get('target') or {}, sort_keys=True)}",
        f"assigning now: {'yes' if data.get('active_assignment') else 'no'}",
        f"decision: {e.get('decision') or '-'}" + (f"   winner: {e['winner']}" if e.get("winner") else ""),
    ]
    lines.extend(f"  - {reason}" for reason in e.get("reasons") or [])
    lines.append(
        f"{'ARM':20}  {'RUNS':>6}  {'OK':>6}  {'FAIL':>6}  {'OOM':>5}  {'SUCCESS':>7}  "
        f"{'COST/RUN':>9}  {'P95 S':>8}  OVERRIDES"
    )
    for arm in data.get("arms") or []:
        cost = arm.get("cost_per_run_usd")
        p95 = arm.get("duration_p95_seconds")
        lines.append(
            f"{arm['name']:20}  {arm['runs']:>6}  {arm['successes']:>6}  {arm['failures']:>6}  "
            f"{arm['ooms']:>5}  "
            f"{_rate(arm.get('success_rate')):>7}  {'-' if cost is None else f'{cost:.4f}':>9}  "
            f"{'-' if p95 is None else f'{p95:.0f}':>8}  "
            f"{json.dumps(arm.get('overrides') or {}, sort_keys=True)}"
        )
    for approval in e.get("approvals") or []:
        lines.append(f"approved ({approval['kind']}) by {approval['by']} at {approval['at']}")
    return "\n".join(lines)


def candidates_table(data: Any) -> str:
    rows = data.get("candidates") or []
    lines = [f"auto mode: {'on (low-risk candidates start by themselves)' if data.get('auto') else 'off'}"]
    if not rows:
        lines.append("no candidates")
        return "\n".join(lines)
    lines.append(f"{'ID':20}  {'RISK':6}  {'PARAMETER':24}  {'RUNS':>6}  {'TARGET':28}  WHY")
    for c in rows:
        target = c.get("target") or {}
        where = "/".join(str(target[k]) for k in ("project", "spec", "env") if target.get(k)) or "(every run)"
        lines.append(
            f"{c['id']:20}  {c['risk']:6}  {c['parameter']:24}  {c['sample_size']:>6}  {where:28}  "
            f"{c['summary']}"
        )
    return "\n".join(lines)


def status_report(data: Any) -> str:
    pause = data.get("pause") or {}
    state = f"paused by {pause.get('by')}: {pause.get('reason')}" if pause.get("paused") else "running"
    return f"optimizer {state}; {data.get('active', 0)} active experiment(s)"


def history_table(data: Any) -> str:
    lines = [f"{'AT':27}  {'KIND':10}  {'EXPERIMENT':26}  {'WHAT':16}  {'BY':20}  DETAILS"]
    for row in data.get("entries") or []:
        what = row.get("status") or row.get("decision") or "-"
        details = row.get("message") or ""
        if row.get("type") == "config":
            details = (
                f"{row.get('key')}: {json.dumps(row.get('old'))} -> {json.dumps(row.get('new'))} {details}"
            )
        lines.append(
            f"{row['at']:27}  {row['type']:10}  {row.get('experiment_id') or '-':26}  {what:16}  "
            f"{row.get('by') or '-':20}  {details}".rstrip()
        )
    return "\n".join(lines)


@click.group("optimizer")
def optimizer_group() -> None:
    """Experiments on run configuration, rollouts and the optimizer's pause."""


@optimizer_group.group("experiments")
def experiments_group() -> None:
    """Create, list, inspect, approve and stop experiments."""


@experiments_group.command("list")
@click.option("--state", default=None, help="Only experiments in this state.")
@api_option
@output_option
def experiments_list(state: str | None, api: str | None, output: str) -> None:
    """Every experiment you see, oldest first, with the global pause and the current defaults."""
    params = [("state", state)] if state else None
    with open_client(api) as client:
        data = client.request("GET", "/experiments", params=params)
    emit(data, output, experiments_table)


@experiments_group.command("show")
@click.argument("experiment_id")
@api_option
@output_option
def experiments_show(experiment_id: str, api: str | None, output: str) -> None:
    """An experiment: its arms' samples, the latest decision and the numbers behind it."""
    with open_client(api) as client:
        data = client.request("GET", f"/experiments/{experiment_id}")
    emit(data, output, experiment_report)


@experiments_group.command("create")
@click.option(
    "--file",
    "-f",
    "file",
    type=click.Path(exists=True, dir_okay=False),
    required=True,
    help="The experiment as JSON (the body of POST /api/v1/experiments).",
)
@api_option
@output_option
def experiments_create(file: str, api: str | None, output: str) -> None:
    """Create an experiment from a JSON file.

    \b
    Example file:
      {"name": "more memory", "target": {"project": "demo"},
       "parameter": "resources.memory_limit",
       "control": {"name": "control"},
       "treatments": [{"name": "6gi", "overrides": {"resources.memory_limit": "6Gi"}}],
       "treatment_share": 0.1, "risk": "low"}
    """
    try:
        body = json.loads(Path(file).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"--file {file}: {exc}") from None
    with open_client(api) as client:
        data = client.request("POST", "/experiments", json_body=body)
    emit(data, output, experiment_report)


def _action(name: str, help_text: str) -> None:
    @experiments_group.command(name, help=help_text)
    @click.argument("experiment_id")
    @click.option("--reason", default="", help="Why (recorded in the history).")
    @api_option
    @output_option
    def command(experiment_id: str, reason: str, api: str | None, output: str) -> None:
        body = {"reason": reason} if name != "approve" else None
        with open_client(api) as client:
            data = client.request("POST", f"/experiments/{experiment_id}/{name}", json_body=body)
        emit(data, output, experiment_report)


_action("approve", "Approve what an experiment waits for: its start, or the rollout of its winner (admins).")
_action("pause", "Stop assigning runs to an experiment until it is resumed.")
_action("resume", "Resume a paused experiment, or start a draft.")
_action("stop", "End an experiment without a rollout.")
_action("rollback", "Put back the defaults a shipped experiment's rollout replaced (admins).")


@optimizer_group.command("candidates")
@click.option("--project", default=None, help="Only candidates targeting this project.")
@api_option
@output_option
def optimizer_candidates(project: str | None, api: str | None, output: str) -> None:
    """Experiments the optimizer proposes from its insights, with the numbers behind each."""
    params = [("project", project)] if project else None
    with open_client(api) as client:
        data = client.request("GET", "/experiments/candidates", params=params)
    emit(data, output, candidates_table)


@optimizer_group.command("start-candidate")
@click.argument("candidate_id")
@api_option
@output_option
def optimizer_start_candidate(candidate_id: str, api: str | None, output: str) -> None:
    """Create a candidate's experiment (as you; a maintainer of its project)."""
    with open_client(api) as client:
        data = client.request("POST", f"/experiments/candidates/{candidate_id}/start")
    emit(data, output, experiment_report)


@optimizer_group.command("pause")
@click.option("--reason", required=True, help="Why (recorded in the history).")
@api_option
@output_option
def optimizer_pause(reason: str, api: str | None, output: str) -> None:
    """Pause the optimizer: no run is assigned to any experiment until it is resumed (admins)."""
    with open_client(api) as client:
        data = client.request("POST", "/optimizer/pause", json_body={"reason": reason})
    emit(data, output, status_report)


@optimizer_group.command("resume")
@api_option
@output_option
def optimizer_resume(api: str | None, output: str) -> None:
    """Resume the optimizer after a pause (admins)."""
    with open_client(api) as client:
        data = client.request("POST", "/optimizer/resume")
    emit(data, output, status_report)


@optimizer_group.command("history")
@click.option("--experiment", "experiment_id", default=None, help="Only this experiment's entries.")
@click.option("--limit", type=click.IntRange(1, 10_000), default=None, help="The last this many entries.")
@api_option
@output_option
def optimizer_history(experiment_id: str | None, limit: int | None, api: str | None, output: str) -> None:
    """Every change the optimizer made, oldest first: experiments, decisions, defaults, pauses."""
    params: list[tuple[str, str]] = []
    if experiment_id:
        params.append(("experiment_id", experiment_id))
    if limit is not None:
        params.append(("limit", str(limit)))
    with open_client(api) as client:
        data = client.request("GET", "/optimizer/history", params=params or None)
    emit(data, output, history_table)
