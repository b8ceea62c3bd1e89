"""Smithers SQLite databases built from the Smithers schema, for the migration tests.

Loaded by path by `cli/tests/test_smithers.py` and `tests/integration/test_migration.py`.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE _smithers_runs (
    run_id TEXT PRIMARY KEY, workflow_name TEXT, workflow_path TEXT, status TEXT,
    created_at_ms INTEGER, started_at_ms INTEGER, finished_at_ms INTEGER,
    error_json TEXT, config_json TEXT, vcs_revision TEXT
);
CREATE TABLE _smithers_nodes (
    run_id TEXT, node_id TEXT, iteration INTEGER, state TEXT, last_attempt INTEGER,
    updated_at_ms INTEGER, output_table TEXT, label TEXT,
    PRIMARY KEY (run_id, node_id, iteration)
);
CREATE TABLE _smithers_attempts (
    run_id TEXT, node_id TEXT, iteration INTEGER, attempt INTEGER, state TEXT,
    started_at_ms INTEGER, finished_at_ms INTEGER, error_json TEXT, jj_pointer TEXT,
    PRIMARY KEY (run_id, node_id, iteration, attempt)
);
CREATE TABLE _smithers_events (
    run_id TEXT, seq INTEGER, timestamp_ms INTEGER, type TEXT, payload_json TEXT,
    PRIMARY KEY (run_id, seq)
);
"""

T0 = 1_700_000_000_000  # 2023-11-14T22:13:20Z


def run_rows(
    run_id: str,
    status: str,
    created: int,
    *,
    workflow: str = "review",
    error: Any = None,
    bad_event: bool = False,
) -> dict[str, list[tuple[Any, ...]]]:
    """A run with two tasks (`impl` over two iterations, the first failing), attempts and events."""
    started, finished = created + 1_000, created + 61_000
    err = json.dumps(error) if error is not None else None
    return {
        "_smithers_runs": [
            (
                run_id,
                workflow,
                f"workflows/{workflow}.tsx",
                status,
                created,
                started,
                finished,
                err,
                "{}",
                "abc",
            )
        ],
        "_smithers_nodes": [
            (run_id, "plan", 0, "finished", 1, created + 10_000, "plan_out", "Plan"),
            (run_id, "impl", 0, "failed", 2, created + 30_000, "impl_out", "Implement"),
            (run_id, "impl", 1, "finished", 1, created + 60_000, "impl_out", "Implement"),
        ],
        "_smithers_attempts": [
            (run_id, "plan", 0, 1, "finished", created + 1_000, created + 10_000, None, "p1"),
            (
                run_id,
                "impl",
                0,
                1,
                "failed",
                created + 10_000,
                created + 20_000,
                '{"message":"tests failed"}',
                "p2",
            ),
            (run_id, "impl", 0, 2, "failed", created + 20_000, created + 30_000, '{"message":"lint"}', "p3"),
            (run_id, "impl", 1, 1, "finished", created + 30_000, created + 60_000, None, "p4"),
        ],
        "_smithers_events": [
            (run_id, 1, created + 1_000, "RunStarted", json.dumps({"runId": run_id})),
            (run_id, 2, created + 10_000, "NodeFinished", json.dumps({"nodeId": "plan", "iteration": 0})),
            (
                run_id,
                3,
                finished,
                "RunFinished",
                "{not json" if bad_event else json.dumps({"status": status}),
            ),
        ],
    }


def insert(connection: sqlite3.Connection, rows: dict[str, list[tuple[Any, ...]]]) -> None:
    for table, values in rows.items():
        for value in values:
            marks = ",".join("?" * len(value))
            connection.execute(f"INSERT INTO {table} VALUES ({marks})", value)
    connection.commit()


def build(path: Path, runs: list[dict[str, list[tuple[Any, ...]]]]) -> Path:
    connection = sqlite3.connect(path)
    try:
        connection.executescript(SCHEMA)
        for rows in runs:
            insert(connection, rows)
    finally:
        connection.close()
    return path


def build_with_wal(
    directory: Path,
    name: str,
    old: list[dict[str, list[tuple[Any, ...]]]],
    new: list[dict[str, list[tuple[Any, ...]]]],
) -> Path:
    """A database copied while in use: `old` runs in the main file, `new` ones only in its
    `-wal` (copied with the `-shm` while the writer still had it open)."""
    work = directory / "live"
    work.mkdir(parents=True, exist_ok=True)
    source = work / name
    connection = sqlite3.connect(source)
    try:
        connection.execute("PRAGMA journal_mode=WAL")
        connection.executescript(SCHEMA)
        for rows in old:
            insert(connection, rows)
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        connection.execute("PRAGMA wal_autocheckpoint=0")
        for rows in new:
            insert(connection, rows)
        target = directory / name
        for suffix in ("", "-wal", "-shm"):
            shutil.copy2(work / (name + suffix), directory / (name + suffix))
    finally:
        connection.close()
    return target
