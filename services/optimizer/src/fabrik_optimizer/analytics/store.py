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

import contextlib
import json
import operator
import os
import sqlite3
from collections import OrderedDict
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
    "cpu_limit",
    "memory_limit",
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
    "backend",
    "node_type",
    "finished_day",
    "compute_cost_nanos",
    "prior_compute_nanos",
    "storage_cost_nanos",
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
        cpu_limit TEXT,
        memory_limit TEXT,
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
        experiment_arm TEXT,
        backend TEXT,
        node_type TEXT,
        finished_day TEXT,
        compute_cost_nanos BIGINT,
        prior_compute_nanos BIGINT,
        storage_cost_nanos BIGINT
    )""",
    "CREATE INDEX IF NOT EXISTS runs_project ON runs (project)",
    "CREATE INDEX IF NOT EXISTS runs_spec ON runs (spec_id)",
    "CREATE INDEX IF NOT EXISTS runs_finished ON runs (finished_at)",
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
    # Derived from llm_calls at ingest, per run: what insights need without scanning every call.
    # `models` is the run's `run_models` as a JSON array (sorted), so that all insights come from
    # one scan of runs joined with run_llm.
    """CREATE TABLE IF NOT EXISTS run_llm (
        run_id TEXT PRIMARY KEY,
        llm_cost_nanos BIGINT NOT NULL,
        calls BIGINT NOT NULL,
        models TEXT
    )""",
    """CREATE TABLE IF NOT EXISTS run_models (
        run_id TEXT NOT NULL,
        model TEXT NOT NULL,
        PRIMARY KEY (run_id, model)
    )""",
    "CREATE TABLE IF NOT EXISTS analytics_meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
)
# Bumped whenever a table changes: a store of another version is emptied at open and must be
# rebuilt from the streams (`AnalyticsStore.reset` tells the service to do so).
SCHEMA_VERSION = "4"
TABLES: tuple[str, ...] = ("runs", "llm_calls", "run_llm", "run_models", "analytics_meta")
_RUN_LLM_CHUNK = 500


def iso(ts: datetime) -> str:
    """A timestamp as sortable ISO-8601 UTC text (naive times are taken as UTC)."""
    if ts.tzinfo is not UTC:  # decoded event times are already UTC
        ts = ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)
    return ts.isoformat(timespec="microseconds")


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
_UPSERT_RUN_LLM = _upsert("run_llm", ("run_id", "llm_cost_nanos", "calls", "models"), "run_id")
_run_values = operator.itemgetter(*RUN_COLUMNS)
_call_values = operator.itemgetter(*LLM_CALL_COLUMNS)


def _values(row: dict[str, Any], getter: operator.itemgetter[Any], columns: Sequence[str]) -> tuple[Any, ...]:
    """A row's values in column order (a missing column is NULL)."""
    try:
        return tuple(getter(row))
    except KeyError:
        return tuple(row.get(c) for c in columns)


# The writer folds the WAL into the database file every 10,000 pages (40 MiB) rather than SQLite's
# 1,000: a row rewritten by many commits in between is copied once, and the checkpoint's fsync is
# paid a tenth as often.
WRITER_PRAGMAS: tuple[str, ...] = ("PRAGMA wal_autocheckpoint=10000",)


class AnalyticsStore:
    """One SQLite database. Not thread-safe: the service uses it from its event loop only (queries
    from other threads open their own connection with `reader()`).

    Writes commit one by one unless inside `batch()`, which writes each changed row once and
    commits once at its end: the live handlers and the rebuild apply a batch of events that way
    (`ingest.apply_events`), and the live handlers' messages are acked after that commit. The
    database runs in WAL mode with `synchronous=NORMAL`: a commit survives a crash of the process;
    the last commits before a power loss may be lost, which a rebuild from the streams repairs. A
    `bulk` store (a rebuild's new file) keeps its rollback journal in memory and never syncs until
    `finish()`: it is thrown away if the process dies first. Run rows are cached (LRU) so that
    folding an event does not read the row back from the database.
    """

    def __init__(self, path: str | Path, *, cache_size: int = 20_000, bulk: bool = False) -> None:
        self.path = str(path)
        self.bulk = bulk and self.path != ":memory:"
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(self.path)
        self.conn.row_factory = sqlite3.Row
        if self.bulk:
            # A store being rebuilt, thrown away if the process dies meanwhile: the rollback
            # journal in memory (a failed batch still rolls back) and no syncs, until `finish()`.
            self.conn.execute("PRAGMA journal_mode=MEMORY")
            self.conn.execute("PRAGMA synchronous=OFF")
        elif self.path != ":memory:":
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=NORMAL")
            for pragma in WRITER_PRAGMAS:
                self.conn.execute(pragma)
        self._cache: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._cache_size = cache_size
        self._batch_depth = 0
        # Inside a batch, writes are held here (latest row per key) and written at its end.
        self._pending_runs: dict[str, dict[str, Any]] = {}
        self._pending_calls: dict[str, dict[str, Any]] = {}
        self.reset = False
        """True when the file held another schema version and was emptied: rebuild it."""
        self._open_schema()

    def _open_schema(self) -> None:
        version: str | None = None
        with contextlib.suppress(sqlite3.OperationalError):
            found = self.conn.execute(
                "SELECT value FROM analytics_meta WHERE name = 'schema_version'"
            ).fetchone()
            version = found[0] if found else None
        existing = {
            r[0] for r in self.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
        }
        with self.transaction():
            if version != SCHEMA_VERSION and existing & {"runs", "llm_calls"}:
                for table in TABLES:
                    self.conn.execute(f"DROP TABLE IF EXISTS {table}")
                self.reset = True
            for statement in SCHEMA:
                self.conn.execute(statement)
            self.conn.execute(
                self.sql(
                    "INSERT INTO analytics_meta (name, value) VALUES ('schema_version', ?) "
                    "ON CONFLICT (name) DO UPDATE SET value = excluded.value"
                ),
                (SCHEMA_VERSION,),
            )

    def close(self) -> None:
        self.conn.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        if self._batch_depth:
            yield self.conn  # the enclosing batch commits
            return
        with self.conn:
            yield self.conn

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Group many writes into one commit (rolled back on error, with the row cache). Rows are
        written once per batch, however many events changed them."""
        self._batch_depth += 1
        try:
            if self._batch_depth == 1:
                with self.conn:
                    yield
                    self._flush()
            else:
                yield
        except BaseException:
            self._cache.clear()
            self._pending_runs.clear()
            self._pending_calls.clear()
            raise
        finally:
            self._batch_depth -= 1

    def _flush(self) -> None:
        if self._pending_runs:
            rows = [_values(row, _run_values, RUN_COLUMNS) for row in self._pending_runs.values()]
            self._pending_runs.clear()
            self.conn.executemany(self.sql(_UPSERT_RUN), rows)
        if self._pending_calls:
            calls = list(self._pending_calls.values())
            self._pending_calls.clear()
            self.conn.executemany(
                self.sql(_UPSERT_CALL), [_values(r, _call_values, LLM_CALL_COLUMNS) for r in calls]
            )
            self._derive_run_llm(calls)

    def _derive_run_llm(self, calls: Sequence[dict[str, Any]]) -> None:
        """Record the calls' models in `run_models` and recompute `run_llm` of their runs from
        `llm_calls` and `run_models` (so a redelivered call is not counted twice)."""
        run_ids = sorted({r["run_id"] for r in calls if r.get("run_id")})
        if not run_ids:
            return
        self.conn.executemany(
            self.sql(
                "INSERT INTO run_models (run_id, model) VALUES (?, ?) ON CONFLICT (run_id, model) DO NOTHING"
            ),
            [(r["run_id"], r["model"]) for r in calls if r.get("run_id")],
        )
        for i in range(0, len(run_ids), _RUN_LLM_CHUNK):
            chunk = run_ids[i : i + _RUN_LLM_CHUNK]
            marks = ", ".join("?" for _ in chunk)
            models: dict[str, list[str]] = {}
            for run_id, model in self.conn.execute(
                self.sql(f"SELECT run_id, model FROM run_models WHERE run_id IN ({marks})"),  # noqa: S608
                chunk,
            ):
                models.setdefault(run_id, []).append(model)
            sums = self.conn.execute(
                self.sql(
                    "SELECT run_id, SUM(cost_nanos), COUNT(*) FROM llm_calls "  # noqa: S608 - markers only
                    f"WHERE run_id IN ({marks}) GROUP BY run_id"
                ),
                chunk,
            ).fetchall()
            self.conn.executemany(
                self.sql(_UPSERT_RUN_LLM),
                [(run_id, cost, n, json.dumps(sorted(models.get(run_id, ())))) for run_id, cost, n in sums],
            )

    @staticmethod
    def sql(statement: str) -> str:
        """The one dialect hook: SQLite's `?` parameters (a PostgreSQL driver would map them to `%s`)."""
        return statement

    def query(self, statement: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        self._flush()  # a query inside a batch sees the batch's writes
        return [dict(row) for row in self.conn.execute(self.sql(statement), tuple(params)).fetchall()]

    def tuples(self, statement: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Rows as plain tuples: much cheaper than dicts for large results."""
        self._flush()
        cursor = self.conn.cursor()
        cursor.row_factory = None
        return cursor.execute(self.sql(statement), tuple(params)).fetchall()

    def reader(self) -> AnalyticsStore:
        """A second connection to the same file, for queries in another thread (WAL lets readers
        run beside the writer). The in-memory store has no second connection: itself."""
        if self.path == ":memory:":
            return self
        reader = AnalyticsStore.__new__(AnalyticsStore)
        reader.path = self.path
        reader.bulk = False
        reader.conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
        reader.conn.row_factory = sqlite3.Row
        reader._cache = OrderedDict()
        reader._cache_size = 0
        reader._batch_depth = 0
        reader._pending_runs = {}
        reader._pending_calls = {}
        reader.reset = False
        return reader

    def checkpoint(self) -> None:
        """Fold the WAL into the database file (before the file is moved)."""
        if self.path != ":memory:" and not self.bulk:
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def finish(self) -> None:
        """Close the store with everything on disk (the file can then be moved): a checkpoint, or
        for a bulk store an fsync of the file. A bulk store reopened without `bulk` is a WAL store."""
        self.checkpoint()
        self.close()
        if self.bulk:
            fd = os.open(self.path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    # -- runs ------------------------------------------------------------------------------

    def get_run(self, run_id: str) -> dict[str, Any] | None:
        pending = self._pending_runs.get(run_id)
        if pending is not None:
            return dict(pending)
        cached = self._cache.get(run_id)
        if cached is not None:
            self._cache.move_to_end(run_id)
            return dict(cached)
        row = self.conn.execute(self.sql("SELECT * FROM runs WHERE run_id = ?"), (run_id,)).fetchone()
        return dict(row) if row is not None else None

    def put_run(self, row: dict[str, Any]) -> None:
        """Write a run row (upsert). The store keeps `row` itself: do not change it afterwards
        (`get_run` hands out copies)."""
        run_id = row["run_id"]
        if self._batch_depth:
            self._pending_runs[run_id] = row
        else:
            with self.transaction():
                self.conn.execute(self.sql(_UPSERT_RUN), _values(row, _run_values, RUN_COLUMNS))
        if self._cache_size:
            cache = self._cache
            cache[run_id] = row
            cache.move_to_end(run_id)
            if len(cache) > self._cache_size:
                cache.popitem(last=False)

    def runs(self) -> list[dict[str, Any]]:
        return self.query("SELECT * FROM runs ORDER BY run_id")

    # -- LLM calls -------------------------------------------------------------------------

    def put_llm_call(self, row: dict[str, Any]) -> None:
        if self._batch_depth:
            self._pending_calls[row["call_id"]] = row
            return
        with self.transaction():
            self.conn.execute(self.sql(_UPSERT_CALL), _values(row, _call_values, LLM_CALL_COLUMNS))
            self._derive_run_llm([row])

    def llm_calls(self) -> list[dict[str, Any]]:
        return self.query("SELECT * FROM llm_calls ORDER BY call_id")

    def counts(self) -> tuple[int, int]:
        runs = self.conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
        calls = self.conn.execute("SELECT COUNT(*) FROM llm_calls").fetchone()[0]
        return int(runs), int(calls)
