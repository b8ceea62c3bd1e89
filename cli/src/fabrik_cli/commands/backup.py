"""`fabrik backup create|list|show|verify|restore|cancel|delete|prune|operations` and
`fabrik backup schedule show`: backups of everything Fabrik stores in NATS, which the gateway asks
the backup service for (`/api/v1/backups`; docs/backup.md, docs/disaster-recovery.md).

Backup, verify and restore are operations: the command prints the operation at once; with `--wait`
it polls the operation until it ends, printing its progress on stderr, and exits 1 unless it
succeeded.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Final

import click

from fabrik_cli.client import ApiClient, ApiError
from fabrik_cli.commands.access import parse_when
from fabrik_cli.commands.common import api_option, emit, open_client, output_option, status_line
from fabrik_cli.errors import EXIT_FAILURE, CliError, UsageError
from fabrik_cli.output import (
    NONE,
    format_bytes,
    format_count,
    format_time,
    render_fields,
    render_table,
    text,
)

TERMINAL: Final = frozenset({"succeeded", "failed", "cancelled"})
POLL_SECONDS: Final = 1.0
FIELD_FLAGS: Final = {
    "backup_id": "BACKUP_ID",
    "at": "--at",
    "replace": "--replace",
    "streams": "--stream",
    "deadline_seconds": "--deadline",
}


def _json_option(func: Any) -> Any:
    return click.option("--json", "as_json", is_flag=True, help="The API's JSON (same as -o json).")(func)


def _format(output: str, as_json: bool) -> str:
    return "json" if as_json else output


def _names(value: str | None) -> list[str] | None:
    if value is None:
        return None
    names = [n.strip() for n in value.split(",") if n.strip()]
    if not names:
        raise UsageError("give at least one stream name (comma-separated)")
    return names


def _flags(exc: ApiError) -> None:
    exc.name_flags(lambda f: FIELD_FLAGS.get(f.removeprefix("$.").removeprefix("body.")))


# --------------------------------------------------------------------------------------------
# rendering


def _size(value: Any) -> str:
    return (
        format_bytes(float(value)) if isinstance(value, int | float) and not isinstance(value, bool) else NONE
    )


def _when(value: Any, now: datetime) -> str:
    return format_time(value, now) if value else NONE


VOLUME_STATES: Final = ("ready", "failed", "timed_out", "skipped")


def volumes_text(value: Any) -> str:
    """A backup's volume snapshots in a few words: `2 ready, 1 skipped`, `not on Kubernetes`."""
    if not isinstance(value, Mapping):
        return NONE
    status = value.get("status")
    if status != "taken":
        return text(value.get("message")) if value.get("message") else text(status)
    volumes = [v for v in value.get("volumes") or [] if isinstance(v, Mapping)]
    if not volumes:
        return "no workspaces"
    counts = [(state, sum(1 for v in volumes if v.get("state") == state)) for state in VOLUME_STATES]
    return ", ".join(f"{n} {state.replace('_', ' ')}" for state, n in counts if n)


def volumes_table(value: Any) -> str:
    """One row per workspace PVC: its snapshot, class, state, size and reason."""
    if not isinstance(value, Mapping):
        return ""
    volumes = [v for v in value.get("volumes") or [] if isinstance(v, Mapping)]
    if not volumes:
        return ""
    rows = [
        [
            text(v.get("pvc")),
            text(v.get("snapshot")) if v.get("snapshot") else NONE,
            text(v.get("snapshot_class")) if v.get("snapshot_class") else NONE,
            text(v.get("state")),
            text(v.get("restore_size")) if v.get("restore_size") else NONE,
            text(v.get("reason")) if v.get("reason") else NONE,
        ]
        for v in volumes
    ]
    columns = ("PVC", "SNAPSHOT", "CLASS", "STATE", "SIZE", "REASON")
    return f"volume snapshots in namespace {text(value.get('namespace'))}\n" + render_table(columns, rows)


def backups_table(data: Any) -> str:
    now = datetime.now(UTC)
    found: Mapping[str, Any] = data if isinstance(data, Mapping) else {}
    items = [b for b in found.get("backups") or [] if isinstance(b, Mapping)]
    head = f"target {text(found.get('target'))}"
    latest = [b.get("volume_snapshots") for b in items if isinstance(b.get("volume_snapshots"), Mapping)]
    if latest:
        # said once for the newest backup: on a laptop every backup would say the same
        head += f"\nvolume snapshots: {volumes_text(latest[-1])}"
    if not items:
        return f"{head}\n\nno backups"
    rows = [
        [
            text(b.get("backup_id")),
            text(b.get("state")),
            _when(b.get("created_at"), now),
            format_count(b.get("streams")) if b.get("streams") is not None else NONE,
            format_count(b.get("messages")) if b.get("messages") is not None else NONE,
            _size(b.get("data_bytes")),
            _size(b.get("stored_bytes")),
            _when(b.get("verified_at"), now) if b.get("verified_at") else "never",
            _volumes_cell(b.get("volume_snapshots")),
        ]
        for b in items
    ]
    columns = ("BACKUP", "STATE", "CAPTURED", "STREAMS", "MESSAGES", "DATA", "STORED", "VERIFIED", "VOLUMES")
    return f"{head}\n\n" + render_table(columns, rows)


def _volumes_cell(value: Any) -> str:
    if isinstance(value, Mapping) and value.get("status") in ("off", "unavailable"):
        return NONE  # the head line says why
    return volumes_text(value)


def operations_table(data: Any) -> str:
    now = datetime.now(UTC)
    found: Mapping[str, Any] = data if isinstance(data, Mapping) else {}
    items = [o for o in found.get("operations") or [] if isinstance(o, Mapping)]
    if not items:
        return "no backup operations"
    rows = [
        [
            text(o.get("operation_id")),
            text(o.get("operation")),
            text(o.get("state")),
            text(o.get("backup_id")),
            _when(o.get("requested_at"), now),
            _size(o.get("bytes_done")),
            text(o.get("requested_by")),
            text(o.get("message")) if o.get("message") else NONE,
        ]
        for o in items
    ]
    columns = ("OPERATION", "KIND", "STATE", "BACKUP", "REQUESTED", "DONE", "BY", "MESSAGE")
    return render_table(columns, rows)


def operation_summary(data: Any) -> str:
    now = datetime.now(UTC)
    op: Mapping[str, Any] = data if isinstance(data, Mapping) else {}
    pairs = [
        ("operation", text(op.get("operation_id"))),
        ("kind", text(op.get("operation"))),
        ("state", text(op.get("state"))),
        ("backup", text(op.get("backup_id"))),
        ("target", text(op.get("target"))),
        ("requested", f"{_when(op.get('requested_at'), now)} by {text(op.get('requested_by'))}"),
        ("finished", _when(op.get("finished_at"), now)),
        ("deadline", _when(op.get("deadline"), now)),
        ("progress", f"{_size(op.get('bytes_done'))}, {format_count(op.get('parts_done'))} part(s)"),
    ]
    options = op.get("options")
    if isinstance(options, Mapping) and options:
        pairs.append(("options", ", ".join(f"{k}={v}" for k, v in options.items())))
    if op.get("message"):
        pairs.append(("message", text(op.get("message"))))
    result = op.get("result")
    if isinstance(result, Mapping) and result:
        pairs.append(("result", _result_text(result)))
    return render_fields(pairs)


def _result_text(result: Mapping[str, Any]) -> str:
    streams = result.get("streams")
    if isinstance(streams, list):  # a restore: per stream
        parts = []
        for s in streams:
            if isinstance(s, Mapping):
                how = "skipped" if s.get("skipped") else f"{format_count(s.get('messages'))} msgs"
                parts.append(f"{s.get('name')} ({how})")
        return ", ".join(parts) or NONE
    return ", ".join(f"{k}={v}" for k, v in result.items())


def backup_detail(data: Any) -> str:
    now = datetime.now(UTC)
    b: Mapping[str, Any] = data if isinstance(data, Mapping) else {}
    pairs = [
        ("backup", text(b.get("backup_id"))),
        ("state", text(b.get("state"))),
        ("captured", _when(b.get("created_at"), now)),
        ("completed", _when(b.get("completed_at"), now)),
        ("streams", format_count(b.get("streams")) if b.get("streams") is not None else NONE),
        ("messages", format_count(b.get("messages")) if b.get("messages") is not None else NONE),
        ("data", _size(b.get("data_bytes"))),
        ("stored", _size(b.get("stored_bytes"))),
        ("parts", format_count(b.get("parts")) if b.get("parts") is not None else NONE),
        ("verified", _when(b.get("verified_at"), now) if b.get("verified_at") else "never"),
    ]
    if b.get("complete"):
        pairs.append(("volume snapshots", volumes_text(b.get("volume_snapshots"))))
    if b.get("message"):
        pairs.append(("message", text(b.get("message"))))
    history = b.get("history")
    tables = [volumes_table(b.get("volume_snapshots"))]
    tables.append(operations_table({"operations": history}) if isinstance(history, list) and history else "")
    return render_fields(pairs) + "".join(f"\n\n{t}" for t in tables if t)


def schedule_summary(data: Any) -> str:
    s: Mapping[str, Any] = data if isinstance(data, Mapping) else {}
    retention = s.get("retention") if isinstance(s.get("retention"), Mapping) else {}
    assert isinstance(retention, Mapping)
    rules = [f"{k}={v:g}" for k, v in retention.items() if isinstance(v, int | float) and v]
    slots = [str(x) for x in s.get("next_slots") or []]
    pairs = [
        ("target", text(s.get("target"))),
        ("schedule", f"{s.get('schedule')} ({s.get('timezone')})" if s.get("schedule") else "none"),
        ("next", ", ".join(slots) if slots else NONE),
        ("retention", ", ".join(rules) if rules else "off (every backup is kept)"),
    ]
    hint = (
        "The schedule and retention are settings of the backup service: set FABRIK_BACKUP_SCHEDULE "
        "(cron, e.g. '0 3 * * *'), FABRIK_BACKUP_SCHEDULE_TIMEZONE and FABRIK_BACKUP_KEEP_* in its "
        "environment (Helm values of the backup chart, compose.yaml, or the environment of `fabrik up`) "
        "and restart it."
    )
    return render_fields(pairs) + "\n\n" + hint


def prune_summary(data: Any) -> str:
    p: Mapping[str, Any] = data if isinstance(data, Mapping) else {}
    keep = p.get("keep") if isinstance(p.get("keep"), Mapping) else {}
    assert isinstance(keep, Mapping)
    delete = [str(x) for x in p.get("delete") or []]
    lines = [f"keep {k} ({', '.join(str(r) for r in v)})" for k, v in keep.items() if isinstance(v, list)]
    verb = "deleted" if p.get("deleted") else "would delete"
    lines += [f"{verb} {d}" for d in delete] or [f"{verb} nothing"]
    return "\n".join(lines)


def deleted_summary(data: Any) -> str:
    d: Mapping[str, Any] = data if isinstance(data, Mapping) else {}
    line = f"deleted backup {d.get('backup_id')} ({format_count(d.get('parts_deleted'))} part(s))"
    snapshots = d.get("snapshots_deleted")
    if isinstance(snapshots, list) and snapshots:
        line += f" and {len(snapshots)} volume snapshot(s): {', '.join(str(s) for s in snapshots)}"
    return line


# --------------------------------------------------------------------------------------------
# waiting


def wait_for(
    client: ApiClient,
    operation: Mapping[str, Any],
    *,
    timeout: float | None,
    poll: float = POLL_SECONDS,
    sleep: Callable[[float], None] = time.sleep,
) -> Mapping[str, Any]:
    """Poll the operation until it is terminal, printing each change of state or progress."""
    op_id = str(operation.get("operation_id"))
    started = time.monotonic()
    shown = ""
    current: Mapping[str, Any] = operation
    while True:
        line = (
            f"{current.get('operation')} {op_id} {current.get('state')}: {_size(current.get('bytes_done'))}"
        )
        line += f", {format_count(current.get('parts_done'))} part(s)"
        if current.get("message"):
            line += f" ({current.get('message')})"
        if line != shown:
            status_line(line)
            shown = line
        if current.get("state") in TERMINAL:
            return current
        if timeout is not None and time.monotonic() - started > timeout:
            raise CliError(
                f"operation {op_id} is still {current.get('state')} after {timeout:g} s",
                [
                    f"it goes on; follow it with `fabrik backup operations` or cancel it with "
                    f"`fabrik backup cancel {op_id}`"
                ],
            )
        sleep(poll)
        answer = client.backup_operation(op_id)
        current = answer if isinstance(answer, Mapping) else {}


def _finish(data: Mapping[str, Any], output: str) -> None:
    emit(data, output, operation_summary)
    if data.get("state") != "succeeded":
        raise CliError(
            f"{data.get('operation')} {data.get('operation_id')} {data.get('state')}: "
            f"{data.get('message') or 'no message'}",
            exit_code=EXIT_FAILURE,
        )


def _run_operation(client: ApiClient, answer: Any, wait: bool, timeout: float | None, output: str) -> None:
    op: Mapping[str, Any] = answer if isinstance(answer, Mapping) else {}
    if not wait:
        emit(op, output, operation_summary)
        return
    _finish(wait_for(client, op, timeout=timeout), output)


def _wait_options(func: Any) -> Any:
    func = click.option(
        "--timeout",
        type=click.FloatRange(min=0, min_open=True),
        default=None,
        metavar="SECONDS",
        help="With --wait: give up waiting after this long (the operation goes on). [default: none]",
    )(func)
    return click.option(
        "--wait",
        is_flag=True,
        help="Poll the operation until it ends, showing progress; exit 1 unless it succeeded.",
    )(func)


def _deadline_option(func: Any) -> Any:
    return click.option(
        "--deadline",
        type=click.FloatRange(min=0, min_open=True, max=7 * 24 * 3600),
        default=None,
        metavar="SECONDS",
        help="Fail the operation when it takes longer. [default: the backup service's setting]",
    )(func)


# --------------------------------------------------------------------------------------------
# commands


@click.group("backup")
def backup_group() -> None:
    """Backups of every stream, KV bucket and object store: create, verify, restore, retention."""


@backup_group.command("create")
@click.option(
    "--id", "backup_id", default=None, help="Name the backup (naming an incomplete one resumes it)."
)
@click.option("--stream", "streams", default=None, metavar="S,...", help="Only these streams. [default: all]")
@_deadline_option
@_wait_options
@api_option
@output_option
@_json_option
def backup_create(
    backup_id: str | None,
    streams: str | None,
    deadline: float | None,
    wait: bool,
    timeout: float | None,
    api: str | None,
    output: str,
    as_json: bool,
) -> None:
    """Start a backup to the backup service's target (admins).

    \b
    Examples:
      fabrik backup create --wait
      fabrik backup create --id before-upgrade --wait
    """
    body: dict[str, Any] = {}
    if backup_id is not None:
        body["backup_id"] = backup_id
    names = _names(streams)
    if names is not None:
        body["streams"] = names
    if deadline is not None:
        body["deadline_seconds"] = deadline
    with open_client(api) as client:
        try:
            answer = client.create_backup(body)
        except ApiError as exc:
            _flags(exc)
            raise
        _run_operation(client, answer, wait, timeout, _format(output, as_json))


@backup_group.command("list")
@api_option
@output_option
@_json_option
def backup_list(api: str | None, output: str, as_json: bool) -> None:
    """Backups on the target: capture time, sizes, last verification, the run workspaces' volume
    snapshots; incomplete ones with their state."""
    with open_client(api) as client:
        data = client.list_backups()
    emit(data, _format(output, as_json), backups_table)


@backup_group.command("show")
@click.argument("backup_id")
@api_option
@output_option
@_json_option
def backup_show(backup_id: str, api: str | None, output: str, as_json: bool) -> None:
    """One backup, its run workspaces' volume snapshots, and the latest operations on it."""
    with open_client(api) as client:
        data = client.get_backup(backup_id)
    emit(data, _format(output, as_json), backup_detail)


@backup_group.command("operations")
@click.argument("operation_id", required=False)
@click.option(
    "--limit", type=click.IntRange(1, 1000), default=None, help="How many of the latest. [default: 50]"
)
@api_option
@output_option
@_json_option
def backup_operations(
    operation_id: str | None, limit: int | None, api: str | None, output: str, as_json: bool
) -> None:
    """The latest backup, verify and restore operations, or one of them."""
    with open_client(api) as client:
        if operation_id is not None:
            emit(client.backup_operation(operation_id), _format(output, as_json), operation_summary)
            return
        data = client.backup_operations(limit=limit)
    emit(data, _format(output, as_json), operations_table)


@backup_group.command("verify")
@click.argument("backup_id")
@click.option(
    "--deep", is_flag=True, help="Also restore into a scratch NATS server and compare every message."
)
@_deadline_option
@_wait_options
@api_option
@output_option
@_json_option
def backup_verify(
    backup_id: str,
    deep: bool,
    deadline: float | None,
    wait: bool,
    timeout: float | None,
    api: str | None,
    output: str,
    as_json: bool,
) -> None:
    """Read the backup back and check every part's checksum (maintainers)."""
    body: dict[str, Any] = {"deep": deep}
    if deadline is not None:
        body["deadline_seconds"] = deadline
    with open_client(api) as client:
        try:
            answer = client.verify_backup(backup_id, body)
        except ApiError as exc:
            _flags(exc)
            raise
        _run_operation(client, answer, wait, timeout, _format(output, as_json))


@backup_group.command("restore")
@click.argument("backup_id", required=False)
@click.option(
    "--at",
    default=None,
    metavar="WHEN",
    help="Instead of BACKUP_ID: the latest backup captured at or before this time (2026-11-29T20:00:00Z, "
    "a local time, or an age such as 2h).",
)
@click.option(
    "--replace",
    default=None,
    metavar="S,...",
    help="Streams that hold messages and may be replaced (`*`: all). [default: none; such a stream fails "
    "the restore]",
)
@click.option("--stream", "streams", default=None, metavar="S,...", help="Only these streams. [default: all]")
@_deadline_option
@_wait_options
@api_option
@output_option
@_json_option
def backup_restore(
    backup_id: str | None,
    at: str | None,
    replace: str | None,
    streams: str | None,
    deadline: float | None,
    wait: bool,
    timeout: float | None,
    api: str | None,
    output: str,
    as_json: bool,
) -> None:
    """Restore a backup into the NATS the platform uses (admins).

    \b
    Examples:
      fabrik backup restore 20261129T201500Z-1a2b3c4d --wait
      fabrik backup restore --at 2026-11-29T20:00:00Z --wait
      fabrik backup restore before-upgrade --replace RUNS,KV_runs --wait
    """
    if (backup_id is None) == (at is None):
        raise UsageError("give a BACKUP_ID or --at WHEN (one of them)")
    body: dict[str, Any] = {}
    if backup_id is not None:
        body["backup_id"] = backup_id
    if at is not None:
        body["at"] = parse_when(at)
    names = _names(replace)
    if names is not None:
        body["replace"] = names
    only = _names(streams)
    if only is not None:
        body["streams"] = only
    if deadline is not None:
        body["deadline_seconds"] = deadline
    with open_client(api) as client:
        try:
            answer = client.restore_backup(body)
        except ApiError as exc:
            _flags(exc)
            raise
        _run_operation(client, answer, wait, timeout, _format(output, as_json))


@backup_group.command("cancel")
@click.argument("operation_id")
@api_option
@output_option
@_json_option
def backup_cancel(operation_id: str, api: str | None, output: str, as_json: bool) -> None:
    """Cancel a backup, verify or restore operation (admins); see `fabrik backup operations`."""
    with open_client(api) as client:
        data = client.cancel_backup_operation(operation_id)
    emit(data, _format(output, as_json), operation_summary)


@backup_group.command("delete")
@click.argument("backup_id")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@api_option
@output_option
@_json_option
def backup_delete(backup_id: str, yes: bool, api: str | None, output: str, as_json: bool) -> None:
    """Delete a backup from the target (admins)."""
    if not yes:
        click.confirm(f"Delete backup {backup_id} for good?", abort=True, err=True)
    with open_client(api) as client:
        data = client.delete_backup(backup_id)
    emit(data, _format(output, as_json), deleted_summary)


@backup_group.command("prune")
@click.option(
    "--apply", is_flag=True, help="Delete what the policy does not keep (admins). [default: dry run]"
)
@api_option
@output_option
@_json_option
def backup_prune(apply: bool, api: str | None, output: str, as_json: bool) -> None:
    """Apply the retention policy (FABRIK_BACKUP_KEEP_*): a dry run unless --apply."""
    with open_client(api) as client:
        data = client.prune_backups(dry_run=not apply)
    emit(data, _format(output, as_json), prune_summary)


@backup_group.group("schedule")
def backup_schedule_group() -> None:
    """The backup schedule (a setting of the backup service)."""


@backup_schedule_group.command("show")
@api_option
@output_option
@_json_option
def backup_schedule_show(api: str | None, output: str, as_json: bool) -> None:
    """The cron schedule, the next slots and the retention policy, and how to change them.

    They are settings of the backup service (FABRIK_BACKUP_SCHEDULE, FABRIK_BACKUP_SCHEDULE_TIMEZONE,
    FABRIK_BACKUP_KEEP_*): change them in its environment and restart it.
    """
    with open_client(api) as client:
        data = client.backup_schedule()
    emit(data, _format(output, as_json), schedule_summary)
