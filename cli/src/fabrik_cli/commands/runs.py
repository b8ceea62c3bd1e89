"""`fabrik run`, `fabrik runs list|show|events`, `fabrik logs`, `fabrik cancel`, `fabrik resume`,
`fabrik queue`, `fabrik projects`: click wiring over `fabrik_cli.client` (HTTP), `submit`
(request bodies), `watch` (waiting, following) and `output` (rendering)."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, get_args

import click

from fabrik_cli.client import ApiClient, ApiError
from fabrik_cli.commands.common import (
    api_option,
    emit,
    err,
    open_client,
    out,
    output_option,
    project_required,
    status_line,
)
from fabrik_cli.errors import EXIT_FAILURE, CliError
from fabrik_cli.output import (
    OutputFormat,
    dump,
    events_table,
    format_log_entry,
    iter_log_entries,
    projects_table,
    queue_table,
    run_detail,
    run_status_line,
    run_summary,
    runs_table,
)
from fabrik_cli.submit import RunOptions, build_run_request, flag_for
from fabrik_cli.userconfig import ENV_PROJECT, default_project
from fabrik_cli.watch import RunWatcher, is_terminal
from fabrik_common.events import RunState

EXIT_INTERRUPTED = 130
PRIORITIES = ("low", "normal", "high")
STATES: tuple[str, ...] = get_args(RunState)


def _run_id_of(run: Any) -> str:
    if isinstance(run, Mapping) and isinstance(run.get("run_id"), str):
        return str(run["run_id"])
    raise CliError(f"the API answered without a run id: {json.dumps(run)[:200]}")


def _attempt(run: Mapping[str, Any]) -> int:
    attempt = run.get("attempt")
    return attempt if isinstance(attempt, int) and not isinstance(attempt, bool) else 0


def _watch(
    client: ApiClient,
    run_id: str,
    *,
    follow: bool,
    output: str,
    timeout: float | None,
    after_attempt: int = 0,
) -> Mapping[str, Any]:
    """Wait (and follow the log) until the run is terminal; status lines go to stderr. With
    `-o json|yaml`, stdout holds only the final document, so log lines go to stderr too."""
    to_stderr = OutputFormat(output) is not OutputFormat.TABLE

    def on_line(entry: Mapping[str, Any] | str) -> None:
        click.echo(format_log_entry(entry), err=to_stderr)

    watcher = RunWatcher(
        client,
        run_id,
        # (after a resume, the old attempt's end is not news)
        on_status=lambda run: status_line(run_status_line(run)) if _attempt(run) > after_attempt else None,
        on_line=on_line,
        timeout=timeout,
        done=lambda run: is_terminal(run) and _attempt(run) > after_attempt,
        min_attempt=after_attempt + 1,
    )
    try:
        return watcher.follow() if follow else watcher.wait()
    except KeyboardInterrupt:
        err(
            f"\nstopped waiting; run {run_id} goes on: "
            f"`fabrik runs show {run_id}` shows it, `fabrik cancel {run_id}` stops it."
        )
        sys.exit(EXIT_INTERRUPTED)


def _finish(run: Mapping[str, Any], output: str) -> None:
    """Print the final run and exit 0 only if it succeeded."""
    if OutputFormat(output) is not OutputFormat.TABLE:
        out(dump(run, OutputFormat(output)))
    err(run_summary(run))
    sys.exit(0 if run.get("state") == "succeeded" else EXIT_FAILURE)


wait_timeout_option = click.option(
    "--wait-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    metavar="SECONDS",
    help="With --wait/--follow: give up waiting after this long (exit 1; the run goes on).",
)


# --------------------------------------------------------------------------------------------
# fabrik run


@click.command(context_settings={"show_default": True})
@click.option(
    "--project",
    "-p",
    callback=project_required,
    envvar=ENV_PROJECT,
    show_envvar=True,
    default=default_project,
    show_default="config.yaml's `project`",
    help="Project (a DNS-1123 label, e.g. `web-shop`).",
)
@click.option("--env", "-e", "env", default=None, help="Project environment. [default (API): dev]")
@click.option(
    "--spec",
    "spec_file",
    type=click.Path(dir_okay=False, path_type=Path, allow_dash=True),
    default=None,
    help="Spec file (JSON, or YAML by extension; `-` for stdin), validated here and sent inline.",
)
@click.option("--spec-path", default=None, metavar="PATH", help="Spec file inside the repository instead.")
@click.option(
    "--todo",
    "todo_file",
    type=click.Path(dir_okay=False, path_type=Path, allow_dash=True),
    default=None,
    help="Todo file (JSON or YAML), validated here and sent inline.",
)
@click.option("--repo", default=None, metavar="URL", help="Repository URL (or a local directory).")
@click.option("--ref", default=None, help="Branch, tag or commit of --repo. [default (API): HEAD]")
@click.option("--image", default=None, help="Container image (digest-pinned on Kubernetes; ignored locally).")
@click.option(
    "--command",
    "command_args",
    multiple=True,
    metavar="ARG",
    help="One word of the workload's command (repeatable); or put the command after `--`.",
)
@click.option(
    "--env-var",
    "env_vars",
    multiple=True,
    metavar="KEY=VAL",
    help="Environment variable of the workload (repeatable); a bare KEY passes on its value here.",
)
@click.option("--cpu", default=None, help="CPU request and limit, e.g. `500m` or `2`.")
@click.option("--memory", default=None, help="Memory request and limit, e.g. `1Gi`.")
@click.option("--template", default=None, help="Resource template instead: `default` or `high-cpu`.")
@click.option(
    "--timeout",
    "timeout_seconds",
    type=click.IntRange(min=1),
    default=None,
    metavar="SECONDS",
    help="Run timeout. [default (API): 86400, the maximum]",
)
@click.option("--priority", type=click.Choice(PRIORITIES), default=None, help="[default (API): normal]")
@click.option("--budget", "budget_usd", type=click.FloatRange(min=0), default=None, metavar="USD",
              help="LLM budget of the run in USD.")  # fmt: skip
@click.option("--label", "labels", multiple=True, metavar="K=V", help="Label (repeatable).")
@click.option(
    "--idempotency-key",
    default=None,
    metavar="KEY",
    help="Makes a retried submit return the same run instead of a second one.",
)
@click.option("--wait", "-w", is_flag=True, help="Wait until the run ends; exit 0 only if it succeeded.")
@click.option("--follow", "-f", is_flag=True, help="Stream the run's log while waiting (implies --wait).")
@wait_timeout_option
@api_option
@output_option
@click.argument("argv", nargs=-1, type=click.UNPROCESSED, metavar="[-- COMMAND...]")
def run(
    project: str,
    env: str | None,
    spec_file: Path | None,
    spec_path: str | None,
    todo_file: Path | None,
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
    idempotency_key: str | None,
    wait: bool,
    follow: bool,
    wait_timeout: float | None,
    api: str | None,
    output: str,
    argv: tuple[str, ...],
) -> None:
    """Submit a run; print its id (or the run with -o json|yaml).

    \b
    Examples:
      fabrik run -p demo --spec examples/hello/spec.json --repo examples/hello \\
          --wait -- python workload.py
      fabrik run -p demo --wait -- python -c "print('hi')"
      fabrik run -p web --repo https://github.com/acme/web --spec-path specs/login.json \\
          --template high-cpu --budget 5 --label team=auth
    """
    if command_args and argv:
        raise click.UsageError("give the command either with --command or after `--`, not both")
    body = build_run_request(
        RunOptions(
            project=project,
            env=env,
            spec_file=spec_file,
            spec_path=spec_path,
            todo_file=todo_file,
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
    )
    with open_client(api) as client:
        try:
            created = client.submit_run(body, idempotency_key=idempotency_key)
        except ApiError as exc:
            exc.name_flags(flag_for)
            raise
        run_id = _run_id_of(created)
        if not (wait or follow):
            emit(created, output, lambda data: run_id)
            return
        if OutputFormat(output) is OutputFormat.TABLE:
            out(run_id)
        final = _watch(client, run_id, follow=follow, output=output, timeout=wait_timeout)
    _finish(final, output)


# --------------------------------------------------------------------------------------------
# fabrik runs list | show | events


def _split_states(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> tuple[str, ...]:
    states = [s.strip() for value in values for s in value.split(",") if s.strip()]
    unknown = [s for s in states if s not in STATES]
    if unknown:
        raise click.BadParameter(f"{', '.join(unknown)}: not a run state; use one of: {', '.join(STATES)}")
    return tuple(dict.fromkeys(states))


HEALTHS = ("healthy", "stalled", "healing", "failed")


def _split_healths(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> tuple[str, ...]:
    healths = [h.strip() for value in values for h in value.split(",") if h.strip()]
    unknown = [h for h in healths if h not in HEALTHS]
    if unknown:
        raise click.BadParameter(f"{', '.join(unknown)}: not a run health; use one of: {', '.join(HEALTHS)}")
    return tuple(dict.fromkeys(healths))


@click.group()
def runs() -> None:
    """List and inspect runs."""


@runs.command("list")
@click.option("--project", "-p", default=None, help="Only this project's runs.")
@click.option(
    "--state",
    "states",
    multiple=True,
    metavar="STATE",
    callback=_split_states,
    help=f"Only runs in this state; repeatable or comma-separated: any of them. States: {', '.join(STATES)}.",
)
@click.option(
    "--label",
    "labels",
    multiple=True,
    metavar="K=V",
    help="Only runs with this label (repeatable: all of them).",
)
@click.option(
    "--health",
    "healths",
    multiple=True,
    metavar="HEALTH",
    callback=_split_healths,
    help=f"Only runs in this health; repeatable or comma-separated: any of them ({', '.join(HEALTHS)}).",
)
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Runs per page. [default (API): 50]")
@click.option("--cursor", default=None, help="Continue after a previous page (its `next_cursor`).")
@click.option("--all", "all_pages", is_flag=True, help="Follow the cursors: every matching run.")
@api_option
@output_option
def runs_list(
    project: str | None,
    states: tuple[str, ...],
    labels: tuple[str, ...],
    healths: tuple[str, ...],
    limit: int | None,
    cursor: str | None,
    all_pages: bool,
    api: str | None,
    output: str,
) -> None:
    """Runs, newest first.

    With --all and -o json the pages are merged into one `{"items": [...], "next_cursor": null}`.
    """
    for label in labels:
        if "=" not in label:
            raise click.BadParameter(f"{label!r} is not K=V", param_hint="--label")
    with open_client(api) as client:
        if all_pages:
            items: list[Any] = []
            for page in client.iter_run_pages(
                project=project, states=states, labels=labels, limit=limit, cursor=cursor, healths=healths
            ):
                items.extend(page.get("items") or [])
            data: Any = {"items": items, "next_cursor": None}
        else:
            data = client.list_runs(
                project=project, states=states, labels=labels, limit=limit, cursor=cursor, healths=healths
            )
    emit(data, output, lambda d: runs_table(d.get("items") or []))
    if OutputFormat(output) is OutputFormat.TABLE and isinstance(data, Mapping) and data.get("next_cursor"):
        err(f"(more runs: add --all, or --cursor {data['next_cursor']})")


@runs.command("show")
@click.argument("run_id")
@api_option
@output_option
def runs_show(run_id: str, api: str | None, output: str) -> None:
    """One run: state, reason, attempt, queue position, progress, timings, exit code, cost."""
    with open_client(api) as client:
        data = client.get_run(run_id)
    emit(data, output, run_detail)


@runs.command("events")
@click.argument("run_id")
@click.option(
    "--after", default=None, metavar="CURSOR", help="Continue after a previous page (its `next_cursor`)."
)
@click.option(
    "--limit", type=click.IntRange(min=1), default=None, help="Events per page. [default (API): 1000]"
)
@api_option
@output_option
def runs_events(run_id: str, after: str | None, limit: int | None, api: str | None, output: str) -> None:
    """A run's lifecycle events (requested, queued, dispatched, state changes, ...), in order."""
    with open_client(api) as client:
        data = client.run_events(run_id, after=after, limit=limit)
    emit(data, output, events_table)
    if OutputFormat(output) is OutputFormat.TABLE and isinstance(data, Mapping) and data.get("next_cursor"):
        err(f"(more events: --after {data['next_cursor']})")


# --------------------------------------------------------------------------------------------
# fabrik logs


@click.command()
@click.argument("run_id")
@click.option("--follow", "-f", is_flag=True, help="Keep streaming until the run ends.")
@click.option("--tail", type=click.IntRange(min=0), default=None, metavar="N", help="Only the last N lines.")
@click.option("--timestamps", "-t", is_flag=True, help="Prefix each line with its time.")
@api_option
@output_option
def logs(run_id: str, follow: bool, tail: int | None, timestamps: bool, api: str | None, output: str) -> None:
    """A run's output (stdout, stderr and Fabrik's own `[fabrik]` lines).

    With -o json: the API's answer; with -f -o json: one JSON object per line, as they come.
    """
    fmt = OutputFormat(output)
    with open_client(api) as client:
        if not follow:
            data = client.run_logs(run_id, tail=tail)
            if fmt is OutputFormat.TABLE:
                for entry in iter_log_entries(data):
                    out(format_log_entry(entry, timestamps=timestamps))
            else:
                out(dump(data, fmt))
            return

        def on_line(entry: Mapping[str, Any] | str) -> None:
            if fmt is OutputFormat.TABLE:
                out(format_log_entry(entry, timestamps=timestamps))
            elif fmt is OutputFormat.JSON:
                out(json.dumps(entry, ensure_ascii=False))
            else:
                out("---\n" + dump(entry, fmt))

        watcher = RunWatcher(client, run_id, on_line=on_line)
        try:
            watcher.follow(tail=tail)
        except KeyboardInterrupt:
            sys.exit(EXIT_INTERRUPTED)


# --------------------------------------------------------------------------------------------
# fabrik cancel | resume


def _action_line(action: str, data: Any, run_id: str) -> str:
    state = data.get("state") if isinstance(data, Mapping) else None
    return f"{action} requested for run {run_id}" + (f" (state: {state})" if state else "")


@click.command()
@click.argument("run_id")
@click.option("--reason", default=None, help="Why (recorded with the request).")
@click.option("--wait", "-w", is_flag=True, help="Wait until the run has ended.")
@wait_timeout_option
@api_option
@output_option
def cancel(
    run_id: str, reason: str | None, wait: bool, wait_timeout: float | None, api: str | None, output: str
) -> None:
    """Stop a run: a queued one ends at once, a running one gets SIGTERM, then SIGKILL.

    Cancelling twice is harmless; cancelling a run that has already ended is an error (409).
    """
    with open_client(api) as client:
        data = client.cancel_run(run_id, reason=reason)
        if not wait:
            emit(data, output, lambda d: _action_line("cancel", d, run_id))
            return
        if OutputFormat(output) is OutputFormat.TABLE:
            out(_action_line("cancel", data, run_id))
        final = _watch(client, run_id, follow=False, output=output, timeout=wait_timeout)
    if OutputFormat(output) is not OutputFormat.TABLE:
        out(dump(final, OutputFormat(output)))
    err(run_summary(final))


@click.command()
@click.argument("run_id")
@click.option(
    "--wait", "-w", is_flag=True, help="Wait for the new attempt's end; exit 0 only if it succeeded."
)
@click.option("--follow", "-f", is_flag=True, help="Stream the log while waiting (implies --wait).")
@wait_timeout_option
@api_option
@output_option
def resume(
    run_id: str, wait: bool, follow: bool, wait_timeout: float | None, api: str | None, output: str
) -> None:
    """Continue a failed, timed-out or cancelled run: same id, next attempt, same workspace."""
    with open_client(api) as client:
        before = client.get_run(run_id) if (wait or follow) else None
        data = client.resume_run(run_id)
        if not (wait or follow):
            emit(data, output, lambda d: _action_line("resume", d, run_id))
            return
        if OutputFormat(output) is OutputFormat.TABLE:
            out(_action_line("resume", data, run_id))
        # Until the scheduler has taken the resume, the run still shows its old attempt's end.
        previous = _attempt(before) if isinstance(before, Mapping) else 0
        final = _watch(
            client, run_id, follow=follow, output=output, timeout=wait_timeout, after_attempt=previous
        )
    _finish(final, output)


# --------------------------------------------------------------------------------------------
# fabrik queue | projects


@click.command()
@click.option("--project", "-p", default=None, help="Only this project's runs (positions stay global).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="At most this many entries.")
@api_option
@output_option
def queue(project: str | None, limit: int | None, api: str | None, output: str) -> None:
    """What is queued, in dispatch order, with positions and estimated starts, and each
    project's usage against its limits."""
    with open_client(api) as client:
        data = client.queue(project=project, limit=limit)
    emit(data, output, queue_table)


@click.command()
@api_option
@output_option
def projects(api: str | None, output: str) -> None:
    """Projects that have runs, with their runs per state."""
    with open_client(api) as client:
        data = client.projects()
    emit(data, output, projects_table)
