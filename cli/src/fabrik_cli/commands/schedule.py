"""`fabrik schedule create|list|show|pause|resume|delete|history`: cron schedules of runs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from fabrik_cli.client import ApiClient, ApiError
from fabrik_cli.commands.common import api_option, emit, open_client, output_option
from fabrik_cli.errors import UsageError
from fabrik_cli.output import format_time, render_fields, render_table, text
from fabrik_cli.submit import RunOptions, build_run_request, flag_for, read_document

PATH = "/schedules"
CONCURRENCY = ("allow", "forbid", "replace")
CATCH_UP = ("skip", "latest", "all")
PRIORITIES = ("low", "normal", "high")

# The option of `fabrik schedule create` behind each field of the request body.
SCHEDULE_FLAGS: dict[str, str] = {
    "name": "--name",
    "project": "--project",
    "cron": "--cron",
    "timezone": "--timezone",
    "concurrency": "--concurrency",
    "catch_up": "--catch-up",
    "catch_up_limit": "--catch-up-limit",
    "expectations.start_grace_seconds": "--start-grace",
    "expectations.expected_duration_seconds": "--expected-duration",
    "expectations.max_runtime_seconds": "--max-runtime",
    "expectations.min_runtime_seconds": "--min-runtime",
    "expectations.failure_tolerance": "--failure-tolerance",
    "expectations.realert_interval_seconds": "--realert-interval",
    "expectations.alert_channels": "--alert-channel",
    "paused": "--paused",
}


def schedule_flag_for(field_path: str) -> str | None:
    """`cron` → `--cron`, `run.workload.env.FOO` → `--env-var`, ...; None if unknown."""
    if field_path.startswith("run."):
        return flag_for(field_path.removeprefix("run."))
    path = field_path
    while path:
        if path in SCHEDULE_FLAGS:
            return SCHEDULE_FLAGS[path]
        cut = max(path.rfind("."), path.rfind("["))
        path = path[:cut] if cut > 0 else ""
    return None


def json_option(func: Any) -> Any:
    return click.option("--json", "as_json", is_flag=True, help="Print the API's JSON (same as -o json).")(
        func
    )


def _format(output: str, as_json: bool) -> str:
    return "json" if as_json else output


# --------------------------------------------------------------------------------------------
# Rendering


def _when(value: Any, now: datetime) -> str:
    return format_time(value, now) if value else "-"


def _health(item: Mapping[str, Any]) -> str:
    health = text(item.get("health"))
    return f"{health} (paused)" if item.get("paused") else health


def schedules_table(data: Any, now: datetime | None = None) -> str:
    now = now or datetime.now(UTC)
    items: Sequence[Mapping[str, Any]] = data.get("items", []) if isinstance(data, Mapping) else []
    if not items:
        return "no schedules"
    rows = [
        [
            text(i.get("id")),
            text(i.get("name")),
            text(i.get("project")),
            f"{text(i.get('cron'))} {text(i.get('timezone'))}",
            _health(i),
            text(i.get("consecutive_failures")),
            _when(i.get("next_fire_at"), now),
            _when(i.get("last_fired_at"), now),
        ]
        for i in items
    ]
    return render_table(["ID", "NAME", "PROJECT", "CRON", "HEALTH", "FAILURES", "NEXT", "LAST FIRED"], rows)


def schedule_detail(item: Mapping[str, Any], now: datetime | None = None) -> str:
    now = now or datetime.now(UTC)
    expectations = item.get("expectations") or {}
    channels = expectations.get("alert_channels") or []
    pairs = [
        ("id", text(item.get("id"))),
        ("name", text(item.get("name"))),
        ("project", f"{text(item.get('project'))} (env {text(item.get('env'))})"),
        ("cron", f"{text(item.get('cron'))} in {text(item.get('timezone'))}"),
        ("paused", "yes" if item.get("paused") else "no"),
        ("health", _health(item) + (f": {item['health_message']}" if item.get("health_message") else "")),
        ("next fire", _when(item.get("next_fire_at"), now)),
        ("last fired", _when(item.get("last_fired_at"), now)),
        ("last success", _when(item.get("last_success_at"), now)),
        ("failures in a row", text(item.get("consecutive_failures"))),
        ("active runs", ", ".join(item.get("active_runs") or []) or "-"),
        ("concurrency", text(item.get("concurrency"))),
        ("catch-up", f"{text(item.get('catch_up'))} (at most {text(item.get('catch_up_limit'))})"),
        (
            "expectations",
            ", ".join(
                f"{k.removesuffix('_seconds').replace('_', ' ')} {v}{'s' if k.endswith('_seconds') else ''}"
                for k, v in expectations.items()
                if k != "alert_channels" and v is not None
            )
            or "-",
        ),
        ("alert channels", ", ".join(channels) or "-"),
        ("revision", text(item.get("revision"))),
        ("updated", f"{_when(item.get('updated_at'), now)} by {text(item.get('updated_by'))}"),
    ]
    return render_fields(pairs)


def history_table(data: Any, now: datetime | None = None) -> str:
    now = now or datetime.now(UTC)
    items: Sequence[Mapping[str, Any]] = data.get("items", []) if isinstance(data, Mapping) else []
    if not items:
        return "no slots yet"
    rows = [
        [
            format_time(i.get("slot"), now, relative=False),
            text(i.get("status")),
            text(i.get("run_id")) if i.get("run_id") else "-",
            text(i.get("outcome")) if i.get("outcome") else "-",
            text(i.get("reason")) if i.get("reason") else "",
        ]
        for i in items
    ]
    return render_table(["SLOT", "STATUS", "RUN", "OUTCOME", "REASON"], rows)


# --------------------------------------------------------------------------------------------
# Commands


@click.group("schedule")
def schedule_group() -> None:
    """Cron schedules: runs fired at every slot of a cron expression, and watched."""


def _set(body: dict[str, Any], key: str, value: Any) -> None:
    if value is not None and value != ():
        body[key] = list(value) if isinstance(value, tuple) else value


@schedule_group.command("create", context_settings={"show_default": True})
@click.option(
    "--file",
    "-f",
    "file",
    type=click.Path(dir_okay=False, path_type=Path, allow_dash=True),
    default=None,
    help="The schedule as YAML or JSON (the body of POST /api/v1/schedules); flags override it.",
)
@click.option("--name", "-n", default=None, help="Name of the schedule.")
@click.option("--project", "-p", default=None, help="Project of the schedule and its runs.")
@click.option("--cron", default=None, help="5-field cron expression or @hourly, @daily, ...")
@click.option("--timezone", "--tz", "timezone", default=None, help="IANA time zone. [default (API): UTC]")
@click.option("--concurrency", type=click.Choice(CONCURRENCY), default=None, help="[default (API): allow]")
@click.option("--catch-up", type=click.Choice(CATCH_UP), default=None, help="[default (API): skip]")
@click.option("--catch-up-limit", type=click.IntRange(min=1), default=None, help="[default (API): 10]")
@click.option("--start-grace", type=click.IntRange(min=0), default=None, metavar="SECONDS")
@click.option("--expected-duration", type=click.IntRange(min=1), default=None, metavar="SECONDS")
@click.option("--max-runtime", type=click.IntRange(min=1), default=None, metavar="SECONDS")
@click.option("--min-runtime", type=click.IntRange(min=1), default=None, metavar="SECONDS")
@click.option("--failure-tolerance", type=click.IntRange(min=1), default=None, metavar="N")
@click.option("--realert-interval", type=click.IntRange(min=60), default=None, metavar="SECONDS")
@click.option("--alert-channel", "alert_channels", multiple=True, help="Alert channel name (repeatable).")
@click.option("--paused", is_flag=True, default=False, help="Create it paused.")
@click.option("--env", "-e", "env", default=None, help="Project environment of the runs.")
@click.option("--spec", "spec_file", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--spec-path", default=None, metavar="PATH", help="Spec file inside the repository.")
@click.option("--repo", default=None, metavar="URL")
@click.option("--ref", default=None)
@click.option("--image", default=None)
@click.option("--command", "command_args", multiple=True, metavar="ARG", help="One word (repeatable).")
@click.option("--env-var", "env_vars", multiple=True, metavar="KEY=VAL")
@click.option("--cpu", default=None)
@click.option("--memory", default=None)
@click.option("--template", default=None)
@click.option("--timeout", "timeout_seconds", type=click.IntRange(min=1), default=None, metavar="SECONDS")
@click.option("--priority", type=click.Choice(PRIORITIES), default=None)
@click.option("--budget", "budget_usd", type=click.FloatRange(min=0), default=None, metavar="USD")
@click.option("--label", "labels", multiple=True, metavar="K=V")
@api_option
@output_option
@json_option
@click.argument("argv", nargs=-1, type=click.UNPROCESSED, metavar="[-- COMMAND...]")
def create(
    file: Path | None,
    name: str | None,
    project: str | None,
    cron: str | None,
    timezone: str | None,
    concurrency: str | None,
    catch_up: str | None,
    catch_up_limit: int | None,
    start_grace: int | None,
    expected_duration: int | None,
    max_runtime: int | None,
    min_runtime: int | None,
    failure_tolerance: int | None,
    realert_interval: int | None,
    alert_channels: tuple[str, ...],
    paused: bool,
    env: str | None,
    spec_file: Path | None,
    spec_path: str | None,
    repo: str | None,
    ref: str | None,
    image: str | None,
    command_args: tuple[str, ...],
    env_vars: tuple[str, ...],
    cpu: str | None,
    memory: str | None,
    template: str | None,
    timeout_seconds: int | None,
    priority: str | None,
    budget_usd: float | None,
    labels: tuple[str, ...],
    api: str | None,
    output: str,
    as_json: bool,
    argv: tuple[str, ...],
) -> None:
    """Create a schedule; print its id (or the schedule with --json).

    \b
    Examples:
      fabrik schedule create -n nightly -p demo --cron '30 2 * * *' --tz Europe/Berlin \\
          --concurrency forbid --min-runtime 60 --alert-channel ops -- python nightly.py
      fabrik schedule create -f nightly.yaml --paused
    """
    if command_args and argv:
        raise click.UsageError("give the command either with --command or after `--`, not both")
    body: dict[str, Any] = {}
    if file is not None:
        document = read_document(file, "schedule")
        if not isinstance(document, dict):
            raise UsageError(f"{file}: a schedule document must be a mapping")
        body.update(document)
    _set(body, "name", name)
    _set(body, "project", project)
    _set(body, "cron", cron)
    _set(body, "timezone", timezone)
    _set(body, "concurrency", concurrency)
    _set(body, "catch_up", catch_up)
    _set(body, "catch_up_limit", catch_up_limit)
    if paused:
        body["paused"] = True
    expectations: dict[str, Any] = dict(body.get("expectations") or {})
    _set(expectations, "start_grace_seconds", start_grace)
    _set(expectations, "expected_duration_seconds", expected_duration)
    _set(expectations, "max_runtime_seconds", max_runtime)
    _set(expectations, "min_runtime_seconds", min_runtime)
    _set(expectations, "failure_tolerance", failure_tolerance)
    _set(expectations, "realert_interval_seconds", realert_interval)
    _set(expectations, "alert_channels", alert_channels)
    if expectations:
        body["expectations"] = expectations

    run_flags = RunOptions(
        project=str(body.get("project") or ""),
        env=env,
        spec_file=spec_file,
        spec_path=spec_path,
        repo=repo,
        ref=ref,
        image=image,
        command=list(command_args or argv),
        env_vars=list(env_vars),
        cpu=cpu,
        memory=memory,
        template=template,
        timeout_seconds=timeout_seconds,
        priority=priority,
        budget_usd=budget_usd,
        labels=list(labels),
    )
    from_flags = build_run_request(run_flags)
    from_flags.pop("project", None)
    run_body: dict[str, Any] = dict(body.get("run") or {})
    if "workload" in from_flags and isinstance(run_body.get("workload"), dict):
        from_flags["workload"] = {**run_body["workload"], **from_flags["workload"]}
    run_body.update(from_flags)
    body["run"] = run_body
    for required, flag in (("name", "--name"), ("project", "--project"), ("cron", "--cron")):
        if not body.get(required):
            raise click.UsageError(f"{flag} is required (or `{required}` in --file)")

    with open_client(api) as client:
        try:
            created = client.request("POST", PATH, json_body=body)
        except ApiError as exc:
            exc.name_flags(schedule_flag_for)
            raise
    emit(created, _format(output, as_json), lambda data: text(data.get("id")))


@schedule_group.command("list")
@click.option("--project", "-p", default=None, help="Only this project.")
@api_option
@output_option
@json_option
def list_schedules(project: str | None, api: str | None, output: str, as_json: bool) -> None:
    """List schedules with their health, next and last slots."""
    params = [("project", project)] if project else None
    with open_client(api) as client:
        data = client.request("GET", PATH, params=params)
    emit(data, _format(output, as_json), schedules_table)


@schedule_group.command("show")
@click.argument("schedule_id")
@api_option
@output_option
@json_option
def show(schedule_id: str, api: str | None, output: str, as_json: bool) -> None:
    """Show a schedule: definition, health, next and last slots."""
    with open_client(api) as client:
        data = client.request("GET", f"{PATH}/{schedule_id}")
    emit(data, _format(output, as_json), schedule_detail)


def _action(client: ApiClient, schedule_id: str, action: str) -> Any:
    return client.request("POST", f"{PATH}/{schedule_id}/{action}")


@schedule_group.command("pause")
@click.argument("schedule_id")
@api_option
@output_option
@json_option
def pause(schedule_id: str, api: str | None, output: str, as_json: bool) -> None:
    """Pause a schedule: no slot fires until it is resumed."""
    with open_client(api) as client:
        data = _action(client, schedule_id, "pause")
    emit(data, _format(output, as_json), lambda d: f"schedule {d.get('id')} paused")


@schedule_group.command("resume")
@click.argument("schedule_id")
@api_option
@output_option
@json_option
def resume(schedule_id: str, api: str | None, output: str, as_json: bool) -> None:
    """Resume a schedule; slots that passed while paused are not caught up."""
    with open_client(api) as client:
        data = _action(client, schedule_id, "resume")

    def line(d: Mapping[str, Any]) -> str:
        return f"schedule {d.get('id')} resumed; next fire {_when(d.get('next_fire_at'), datetime.now(UTC))}"

    emit(data, _format(output, as_json), line)


@schedule_group.command("delete")
@click.argument("schedule_id")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@api_option
@output_option
@json_option
def delete(schedule_id: str, yes: bool, api: str | None, output: str, as_json: bool) -> None:
    """Delete a schedule (the runs it started stay)."""
    if not yes:
        click.confirm(f"delete schedule {schedule_id}?", abort=True, err=True)
    with open_client(api) as client:
        data = client.request("DELETE", f"{PATH}/{schedule_id}")
    emit(data, _format(output, as_json), lambda d: f"schedule {d.get('id')} deleted")


@schedule_group.command("history")
@click.argument("schedule_id")
@click.option("--limit", type=click.IntRange(min=1, max=100), default=None, help="At most this many slots.")
@api_option
@output_option
@json_option
def history(schedule_id: str, limit: int | None, api: str | None, output: str, as_json: bool) -> None:
    """A schedule's slots, newest first: fired (with run and outcome), skipped, missed."""
    params = [("limit", str(limit))] if limit else None
    with open_client(api) as client:
        data = client.request("GET", f"{PATH}/{schedule_id}/history", params=params)
    emit(data, _format(output, as_json), history_table)
