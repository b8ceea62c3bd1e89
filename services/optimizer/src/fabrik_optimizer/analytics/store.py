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
    """CREATE TABLE IF NOT EXISTS run_llm (
        run_id TEXT PRIMARY KEY,
        llm_cost_nanos BIGINT NOT NULL,
        calls BIGINT NOT NULL
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
SCHEMA_VERSION = "3"
TABLES: tuple[str, ...] = ("runs", "llm_calls", "run_llm", "run_models", "analytics_meta")
_RUN_LLM_CHUNK = 500


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
    """One SQLite database. Not thread-safe: the service uses it from its event loop only (queries
    from other threads open their own connection with `reader()`).

    Writes commit one by one (each event is durable in the database before its message is acked)
    unless inside `batch()`, which commits once at its end (rebuild, benchmarks). The database runs
    in WAL mode with `synchronous=NORMAL`: a commit survives a crash of the process; the last
    commits before a power loss may be lost, which a rebuild from the streams repairs. Run rows are
    cached (LRU) so that folding an event does not read the row back from the database.
    """

    def __init__(self, path: str | Path, *, cache_size: int = 20_000) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(self.path)
        self.conn.row_factory = sqlite3.Row
        if self.path != ":memory:":
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=NORMAL")
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
            rows = [tuple(row.get(c) for c in RUN_COLUMNS) for row in self._pending_runs.values()]
            self._pending_runs.clear()
            self.conn.executemany(self.sql(_UPSERT_RUN), rows)
        if self._pending_calls:
            calls = list(self._pending_calls.values())
            self._pending_calls.clear()
            self.conn.executemany(
                self.sql(_UPSERT_CALL), [tuple(r.get(c) for c in LLM_CALL_COLUMNS) for r in calls]
            )
            self._derive_run_llm(calls)

    def _derive_run_llm(self, calls: Sequence[dict[str, Any]]) -> None:
        """Recompute `run_llm` of the calls' runs from `llm_calls` (so a redelivered call is not
        counted twice) and record their models in `run_models`."""
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
            statement = (
                "INSERT INTO run_llm (run_id, llm_cost_nanos, calls) "  # noqa: S608 - only markers joined in
                "SELECT run_id, SUM(cost_nanos), COUNT(*) FROM llm_calls WHERE run_id IN (" + marks + ") "
                "GROUP BY run_id "
                "ON CONFLICT (run_id) DO UPDATE SET llm_cost_nanos = excluded.llm_cost_nanos, "
                "calls = excluded.calls"
            )
            self.conn.execute(self.sql(statement), chunk)

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
        if self.path != ":memory:":
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

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
        if self._batch_depth:
            self._pending_runs[row["run_id"]] = dict(row)
        else:
            with self.transaction():
                self.conn.execute(self.sql(_UPSERT_RUN), tuple(row.get(c) for c in RUN_COLUMNS))
        if self._cache_size:
            self._cache[row["run_id"]] = dict(row)
            self._cache.move_to_end(row["run_id"])
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)

    def runs(self) -> list[dict[str, Any]]:
        return self.query("SELECT * FROM runs ORDER BY run_id")

    # -- LLM calls -------------------------------------------------------------------------

    def put_llm_call(self, row: dict[str, Any]) -> None:
        if self._batch_depth:
            self._pending_calls[row["call_id"]] = row
            return
        with self.transaction():
            self.conn.execute(self.sql(_UPSERT_CALL), tuple(row.get(c) for c in LLM_CALL_COLUMNS))
            self._derive_run_llm([row])

    def llm_calls(self) -> list[dict[str, Any]]:
        return self.query("SELECT * FROM llm_calls ORDER BY call_id")

    def counts(self) -> tuple[int, int]:
        runs = self.conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
        calls = self.conn.execute("SELECT COUNT(*) FROM llm_calls").fetchone()[0]
        return int(runs), int(calls)
