"""The analytics store: two tables (`runs`, `llm_calls`) on SQLite through the stdlib `sqlite3`.

Portability rule: the schema and every query use only SQL that PostgreSQL runs unchanged — standard
types (TEXT, BIGINT, DOUBLE PRECISION), `INSERT ... ON CONFLICT (...) DO UPDATE`, CASE, COALESCE,
COUNT/SUM/GROUP BY/HAVING. No SQLite-only functions (`julianday`, `strftime`, `date`, `printf`,
`IFNULL`, multi-argument `max`): date parts and durations are computed in Python at ingest time and
stored as columns. Timestamps are ISO-8601 UTC text (`YYYY-MM-DDTHH:MM:SS.ffffff+00:00`), which
sorts and compares correctly as text; the calendar day of an LLM call is its own column. Costs are
stored as integer nano-dollars so that sums are exact. Only the parameter style (`?`) differs from a
PostgreSQL driver's, and `AnalyticsStore.sql()` is the single place to translate it.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

NANOS_PER_USD = 1_000_000_000

RUN_COLUMNS: tuple[str, ...] = (
    "run_id",
    "project",
    "env",
    "spec_id",
    "template",
    "cpu_request",
    "memory_request",
    "priority",
    "attempts",
    "state",
    "state_revision",
    "reason",
    "created_at",
    "queued_at",
    "started_at",
    "finished_at",
    "queue_seconds",
    "run_seconds",
    "peak_memory_bytes",
    "experiment_arm",
)

LLM_CALL_COLUMNS: tuple[str, ...] = (
    "call_id",
    "run_id",
    "project",
    "model",
    "provider",
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "cost_nanos",
    "latency_ms",
    "outcome",
    "occurred_at",
    "occurred_day",
)

SCHEMA: tuple[str, ...] = (
    """CREATE TABLE IF NOT EXISTS runs (
        run_id TEXT PRIMARY KEY,
        project TEXT,
        env TEXT,
        spec_id TEXT,
        template TEXT,
        cpu_request TEXT,
        memory_request TEXT,
        priority TEXT,
        attempts INTEGER NOT NULL DEFAULT 0,
        state TEXT,
        state_revision BIGINT,
        reason TEXT,
        created_at TEXT,
        queued_at TEXT,
        started_at TEXT,
        finished_at TEXT,
        queue_seconds DOUBLE PRECISION,
        run_seconds DOUBLE PRECISION,
        peak_memory_bytes BIGINT,
        experiment_arm TEXT
    )""",
    "CREATE INDEX IF NOT EXISTS runs_project ON runs (project)",
    "CREATE INDEX IF NOT EXISTS runs_spec ON runs (spec_id)",
    """CREATE TABLE IF NOT EXISTS llm_calls (
        call_id TEXT PRIMARY KEY,
        run_id TEXT,
        project TEXT,
        model TEXT NOT NULL,
        provider TEXT NOT NULL,
        input_tokens BIGINT NOT NULL DEFAULT 0,
        output_tokens BIGINT NOT NULL DEFAULT 0,
        cache_read_tokens BIGINT NOT NULL DEFAULT 0,
        cache_write_tokens BIGINT NOT NULL DEFAULT 0,
        cost_nanos BIGINT NOT NULL DEFAULT 0,
        latency_ms DOUBLE PRECISION,
        outcome TEXT NOT NULL,
        occurred_at TEXT NOT NULL,
        occurred_day TEXT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS llm_calls_run ON llm_calls (run_id)",
    "CREATE INDEX IF NOT EXISTS llm_calls_occurred ON llm_calls (occurred_at)",
)


def iso(ts: datetime) -> str:
    """A timestamp as sortable ISO-8601 UTC text (naive times are taken as UTC)."""
    if ts.tzinfo is None:
        ts = ts.replace(tzinfo=UTC)
    return ts.astimezone(UTC).isoformat(timespec="microseconds")


def parse_iso(text: str) -> datetime:
    return datetime.fromisoformat(text)


def usd_to_nanos(usd: float | Decimal) -> int:
    return int((Decimal(str(usd)) * NANOS_PER_USD).to_integral_value())


def nanos_to_usd(nanos: int) -> Decimal:
    return Decimal(nanos) / NANOS_PER_USD


def _upsert(table: str, columns: Sequence[str], key: str) -> str:
    names = ", ".join(columns)
    marks = ", ".join("?" for _ in columns)
    updates = ", ".join(f"{c} = excluded.{c}" for c in columns if c != key)
    return f"INSERT INTO {table} ({names}) VALUES ({marks}) ON CONFLICT ({key}) DO UPDATE SET {updates}"  # noqa: S608


_UPSERT_RUN = _upsert("runs", RUN_COLUMNS, "run_id")
_UPSERT_CALL = _upsert("llm_calls", LLM_CALL_COLUMNS, "call_id")


class AnalyticsStore:
    """One SQLite database. Not thread-safe: the service uses it from its event loop only."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(self.path)
        self.conn.row_factory = sqlite3.Row
        if self.path != ":memory:":
            self.conn.execute("PRAGMA journal_mode=WAL")
        with self.transaction():
            for statement in SCHEMA:
                self.conn.execute(statement)

    def close(self) -> None:
        self.conn.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self.conn:
            yield self.conn

    @staticmethod
    def sql(statement: str) -> str:
        """The one dialect hook: SQLite's `?` parameters (a PostgreSQL driver would map them to `%s`)."""
        return statement

    def query(self, statement: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        return [dict(row) for row in self.conn.execute(self.sql(statement), tuple(params)).fetchall()]

    # -- runs ------------------------------------------------------------------------------

    def get_run(self, run_id: str) -> dict[str, Any] | None:
        row = self.conn.execute(self.sql("SELECT * FROM runs WHERE run_id = ?"), (run_id,)).fetchone()
        return dict(row) if row is not None else None

    def put_run(self, row: dict[str, Any]) -> None:
        with self.transaction():
            self.conn.execute(self.sql(_UPSERT_RUN), tuple(row.get(c) for c in RUN_COLUMNS))

    def runs(self) -> list[dict[str, Any]]:
        return self.query("SELECT * FROM runs ORDER BY run_id")

    # -- LLM calls -------------------------------------------------------------------------

    def put_llm_call(self, row: dict[str, Any]) -> None:
        with self.transaction():
            self.conn.execute(self.sql(_UPSERT_CALL), tuple(row.get(c) for c in LLM_CALL_COLUMNS))

    def llm_calls(self) -> list[dict[str, Any]]:
        return self.query("SELECT * FROM llm_calls ORDER BY call_id")
