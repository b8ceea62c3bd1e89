"""Reading Smithers SQLite databases into portable run documents (docs/migration.md).

A database is opened read-only. When a `-wal` file lies beside it, the newest rows may live only
there, and SQLite can read a WAL database read-only only with its `-shm` index: the database and
its `-wal` (and `-shm`) are then copied to a temporary directory and the copy is opened, so the
read sees every committed row and the original files are never written.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fabrik_common.ids import derived_ulid, is_dns1123_label
from fabrik_common.portable import (
    PortableEvent,
    PortableOrigin,
    PortableRun,
    PortableRunAttempt,
    PortableTask,
    PortableTaskAttempt,
    TerminalState,
    check,
)

# Smithers run status → (Fabrik terminal state, reason). Anything else (running, pending,
# waiting-approval, unknown words) was not finished when the database was copied: it is imported
# as `failed` with the reason `imported_incomplete`, and its status kept in the message.
STATUS_MAP: Mapping[str, tuple[TerminalState, str | None]] = {
    "finished": ("succeeded", None),
    "succeeded": ("succeeded", None),
    "success": ("succeeded", None),
    "completed": ("succeeded", None),
    "done": ("succeeded", None),
    "failed": ("failed", "workload_error"),
    "error": ("failed", "workload_error"),
    "cancelled": ("cancelled", "cancelled"),
    "canceled": ("cancelled", "cancelled"),
    "timed_out": ("timed_out", "timeout"),
    "timeout": ("timed_out", "timeout"),
}
INCOMPLETE_REASON = "imported_incomplete"
IMPORT_LABEL = "imported-from"
MESSAGE_MAX = 2000
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


class SmithersError(Exception):
    """A database that cannot be read at all (missing, not SQLite, without the Smithers tables)."""


@dataclass
class ReadResult:
    runs: list[PortableRun] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    """One line per run that could not be converted: `<db>: run <id>: <what>`."""
    warnings: list[str] = field(default_factory=list)


def map_status(status: str | None) -> tuple[TerminalState, str | None]:
    return STATUS_MAP.get((status or "").strip().lower(), ("failed", INCOMPLETE_REASON))


def run_id_for(source_run_id: str, created_at_ms: int | None) -> str:
    """`derived_ulid("smithers:<id>")` with its time part set to the run's creation, so imported
    runs sort by when they were created, and the same Smithers run always gets the same id."""
    derived = derived_ulid(f"smithers:{source_run_id}")
    if created_at_ms is None or not 0 <= created_at_ms < 2**48:
        return derived
    # A ULID's first 10 characters are its 48-bit time, the other 16 its 80 random bits.
    time_part = "".join(_CROCKFORD[(created_at_ms >> (5 * i)) & 31] for i in reversed(range(10)))
    return time_part + derived[10:]


def _time(ms: Any) -> datetime | None:
    if ms is None:
        return None
    return datetime.fromtimestamp(int(ms) / 1000, tz=UTC)


def _json(value: Any, column: str) -> Any:
    if value is None or value == "":
        return None
    if isinstance(value, bytes):
        value = value.decode()
    try:
        return json.loads(value)
    except (json.JSONDecodeError, TypeError) as exc:
        raise ValueError(f"{column} is not valid JSON ({exc})") from None


def _error_text(error: Any) -> str:
    if error is None:
        return ""
    if isinstance(error, Mapping):
        for key in ("message", "error", "reason"):
            if isinstance(error.get(key), str):
                return str(error[key])[:MESSAGE_MAX]
    if isinstance(error, str):
        return error[:MESSAGE_MAX]
    return json.dumps(error, sort_keys=True)[:MESSAGE_MAX]


@contextmanager
def open_database(path: Path) -> Iterator[sqlite3.Connection]:
    """A read-only connection that sees the database's `-wal` content when it has one."""
    if not path.is_file():
        raise SmithersError(f"{path}: no such file")
    wal = path.with_name(path.name + "-wal")
    if not wal.exists():
        connection = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            yield connection
        finally:
            connection.close()
        return
    with tempfile.TemporaryDirectory(prefix="fabrik-smithers-") as scratch:
        copy = Path(scratch) / path.name
        shutil.copy2(path, copy)
        shutil.copy2(wal, copy.with_name(copy.name + "-wal"))
        shm = path.with_name(path.name + "-shm")
        if shm.exists():
            shutil.copy2(shm, copy.with_name(copy.name + "-shm"))
        connection = sqlite3.connect(str(copy))
        try:
            yield connection
        finally:
            connection.close()


def _rows(connection: sqlite3.Connection, sql: str) -> list[sqlite3.Row]:
    connection.row_factory = sqlite3.Row
    return list(connection.execute(sql))


def read_database(path: Path, *, project: str, env: str = "dev") -> ReadResult:
    """Every run of one database as portable documents; per-run problems go to `errors`."""
    for name, value in (("project", project), ("env", env)):
        if not is_dns1123_label(value):
            raise ValueError(
                f"--{name} {value!r} must be a DNS-1123 label: lowercase letters, digits and '-', "
                "start and end alphanumeric, at most 63 characters"
            )
    result = ReadResult()
    try:
        with open_database(path) as connection:
            runs = _rows(connection, "SELECT * FROM _smithers_runs ORDER BY created_at_ms, run_id")
            nodes = _rows(connection, "SELECT * FROM _smithers_nodes ORDER BY run_id, node_id, iteration")
            attempts = _rows(
                connection, "SELECT * FROM _smithers_attempts ORDER BY run_id, node_id, iteration, attempt"
            )
            events = _rows(connection, "SELECT * FROM _smithers_events ORDER BY run_id, seq")
    except sqlite3.Error as exc:
        raise SmithersError(f"{path}: not a readable Smithers database ({exc})") from exc
    nodes_of: dict[str, list[sqlite3.Row]] = {}
    for row in nodes:
        nodes_of.setdefault(str(row["run_id"]), []).append(row)
    attempts_of: dict[tuple[str, str, int], list[sqlite3.Row]] = {}
    for row in attempts:
        key = (str(row["run_id"]), str(row["node_id"]), int(row["iteration"] or 0))
        attempts_of.setdefault(key, []).append(row)
    events_of: dict[str, list[sqlite3.Row]] = {}
    for row in events:
        events_of.setdefault(str(row["run_id"]), []).append(row)
    for row in runs:
        source_id = str(row["run_id"])
        try:
            run = _convert(
                row,
                nodes_of.get(source_id, []),
                attempts_of,
                events_of.get(source_id, []),
                project=project,
                env=env,
                source=str(path),
            )
        except ValueError as exc:
            result.errors.append(f"{path}: run {source_id}: {exc}")
            continue
        if run.reason == INCOMPLETE_REASON:
            result.warnings.append(
                f"{path}: run {source_id}: status {row['status']!r} is not finished; "
                f"imported as failed ({INCOMPLETE_REASON})"
            )
        result.runs.append(run)
    return result


def _convert(
    row: sqlite3.Row,
    nodes: list[sqlite3.Row],
    attempts_of: Mapping[tuple[str, str, int], list[sqlite3.Row]],
    events: list[sqlite3.Row],
    *,
    project: str,
    env: str,
    source: str,
) -> PortableRun:
    source_id = str(row["run_id"])
    error = _json(row["error_json"], "error_json")
    _json(row["config_json"], "config_json")  # checked, not carried: it may hold credentials
    state, reason = map_status(row["status"])
    created, started, finished = (
        _time(row["created_at_ms"]),
        _time(row["started_at_ms"]),
        _time(row["finished_at_ms"]),
    )
    known = [t for t in (created, started, finished) if t is not None]
    if not known:
        raise ValueError("created_at_ms, started_at_ms and finished_at_ms are all empty")
    requested = min(known)
    message = _error_text(error)
    if reason == INCOMPLETE_REASON:
        message = f"Smithers status {row['status']!r} when imported" + (f": {message}" if message else "")
    tasks: list[PortableTask] = []
    for node in nodes:
        iteration = int(node["iteration"] or 0)
        task_attempts = [
            PortableTaskAttempt(
                attempt=int(a["attempt"] or 0),
                state=str(a["state"] or ""),
                started_at=_time(a["started_at_ms"]),
                finished_at=_time(a["finished_at_ms"]),
                error=_json(
                    a["error_json"], f"_smithers_attempts.error_json ({node['node_id']}#{iteration})"
                ),
            )
            for a in attempts_of.get((source_id, str(node["node_id"]), iteration), [])
        ]
        tasks.append(
            PortableTask(
                id=str(node["node_id"]),
                iteration=iteration,
                state=str(node["state"] or ""),
                label=node["label"],
                updated_at=_time(node["updated_at_ms"]),
                attempts=task_attempts,
            )
        )
    portable_events = [
        PortableEvent(
            seq=int(e["seq"]),
            time=_time(e["timestamp_ms"]),
            type=str(e["type"]),
            payload=_json(e["payload_json"], f"_smithers_events.payload_json (seq {e['seq']})"),
        )
        for e in events
    ]
    run = PortableRun(
        run_id=run_id_for(source_id, row["created_at_ms"]),
        project=project,
        env=env,
        spec=row["workflow_name"],
        spec_path=row["workflow_path"],
        labels={IMPORT_LABEL: "smithers"},
        requested_at=requested,
        started_at=started,
        finished_at=finished,
        state=state,
        reason=reason,
        message=message,
        attempts=[
            PortableRunAttempt(
                attempt=1, started_at=started, finished_at=finished, outcome=state, reason=reason
            )
        ],
        tasks=tasks,
        events=portable_events,
        origin=PortableOrigin(system="smithers", source_run_id=source_id, source=Path(source).name),
    )
    check(run)
    return run
