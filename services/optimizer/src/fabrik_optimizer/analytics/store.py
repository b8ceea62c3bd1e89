"""The analytics store: two tables (`runs`, `llm_calls`) on SQLite through the stdlib `sqlite3`.

Portability rule: the schema and every query use only SQL that PostgreSQL runs unchanged — standard
types (TEXT, BIGINT, DOUBLE PRECISION), `INSERT ... ON CONFLICT (...) DO UPDATE`, CASE, COALESCE,
COUNT/SUM/GROUP BY/HAVING. No SQLite-only functions (`julianday`, `strftime`, `date`, `printf`,
`IFNULL`, multi-argument `max`): date parts and durations are computed in Python at ingest time and
stored as columns. Timestamps are ISO-8601 UTC text (`YYYY-MM-DDTHH:MM:SS.ffffff+00:00`), which
sorts and compares correctly as text; the calendar day of an LLM call is its own column. Costs are
stored as integer nano-dollars so that sums are exact.

Two backends run the same schema and the same query text: SQLite (the embedded default, a file)
and PostgreSQL (through `psycopg`, when `FABRIK_ANALYTICS_DATABASE_URL` is set; the tables live in
one schema, `analytics` by default). What truly differs between them is switched in `_Dialect`
and nowhere else: the parameter markers, the collation of text columns, how the tables of a
store are listed, the errors that mean "the database, not the event", and SQLite's pragmas.
"""

from __future__ import annotations

import json
import operator
import os
import re
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql as pgsql
from psycopg.rows import dict_row

from fabrik_common.experiments import parse_stamp_text
from fabrik_common.urls import redact_url

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
    # Derived from runs.experiment_arm at ingest: an experiment's runs by index, where the text
    # column could only be scanned with LIKE (every run, for every experiment, every minute).
    """CREATE TABLE IF NOT EXISTS run_arms (
        experiment_id TEXT NOT NULL,
        run_id TEXT NOT NULL,
        arm TEXT NOT NULL,
        PRIMARY KEY (experiment_id, run_id)
    )""",
    "CREATE TABLE IF NOT EXISTS analytics_meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
)
# Bumped whenever a table changes: a store of another version is emptied at open and must be
# rebuilt from the streams (`AnalyticsStore.reset` tells the service to do so).
SCHEMA_VERSION = "5"
TABLES: tuple[str, ...] = ("runs", "llm_calls", "run_llm", "run_models", "run_arms", "analytics_meta")
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
_UPSERT_RUN_ARM = (
    "INSERT INTO run_arms (experiment_id, run_id, arm) VALUES (?, ?, ?) "
    "ON CONFLICT (experiment_id, run_id) DO UPDATE SET arm = excluded.arm"
)
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

DEFAULT_SCHEMA = "analytics"
"""The PostgreSQL schema that holds the live store's tables."""
REBUILD_INFIX = "_rebuild_"
"""A rebuild builds into the schema `<schema>_rebuild_<ulid>`; the replaced one is `<schema>_old_<ulid>`
until it is dropped."""
OLD_INFIX = "_old_"


@dataclass(frozen=True, repr=False)
class PostgresLocation:
    """Where a PostgreSQL store lives: a libpq URL (`postgresql://user:pass@host:port/db`, query
    parameters such as `?host=/socket/dir&sslmode=require` included), a password given apart from
    the URL (a mounted secret; None: the URL's), and the schema holding the tables."""

    url: str
    password: str | None = None
    schema: str = DEFAULT_SCHEMA

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", self.schema):
            raise ValueError(
                f"schema {self.schema!r} must be a lower-case SQL identifier of at most 63 characters"
            )

    def __repr__(self) -> str:  # never the password, from the URL or apart
        return f"PostgresLocation({self.describe()!r})"

    def with_schema(self, schema: str) -> PostgresLocation:
        return PostgresLocation(self.url, self.password, schema)

    def describe(self) -> str:
        """The URL without its password, and the schema (for logs and `AnalyticsStore.path`)."""
        return f"{redact_url(self.url)}#{self.schema}"

    def connect(self, *, read_only: bool = False) -> psycopg.Connection[Any]:
        """A connection in autocommit mode (transactions are explicit) whose search path is the schema."""
        extra: dict[str, Any] = {} if self.password is None else {"password": self.password}
        conn: psycopg.Connection[Any] = psycopg.connect(self.url, autocommit=True, **extra)
        try:
            conn.execute(pgsql.SQL("SET search_path TO {}").format(pgsql.Identifier(self.schema)))
            if read_only:
                conn.execute("SET default_transaction_read_only = on")
        except BaseException:
            conn.close()
            raise
        return conn


DATABASE_ERRORS: tuple[type[Exception], ...] = (sqlite3.OperationalError, psycopg.OperationalError)
"""Failures of the database rather than of an event (locked, disk full, connection lost): a batch
that meets one is not committed and is tried again as a whole."""


class _Dialect:
    """The differences between SQLite and PostgreSQL that cannot be written away, in one place.

    - Parameter markers: the query text uses `?` (sqlite3's qmark style); psycopg takes `%s`
      (and a literal `%` must then be doubled).
    - Text collation: SQLite compares text byte by byte; a PostgreSQL database's default collation
      is usually a language's (`en_US.UTF-8`), which orders `spec-a`/`spec_b` and punctuation
      differently. The ISO timestamps and group keys rely on byte order, so on PostgreSQL every
      TEXT column is declared `COLLATE "C"` (the same order as SQLite, and faster).
    - Listing a store's tables: `sqlite_master` against `information_schema.tables`.
    - Pragmas (WAL, synchronous, checkpoints) are SQLite's only; a PostgreSQL rebuild's schema
      commits without waiting for the WAL flush instead (`synchronous_commit = off`).
    """

    def __init__(self, postgres: bool) -> None:
        self.postgres = postgres
        self._translated: dict[str, str] = {}
        self._lock = threading.Lock()

    def sql(self, statement: str) -> str:
        if not self.postgres:
            return statement
        found = self._translated.get(statement)
        if found is None:
            # No statement has a `?` or `%` inside a string literal: a plain replacement is exact.
            found = statement.replace("%", "%%").replace("?", "%s")
            with self._lock:
                if len(self._translated) > 4096:  # queries built per request (IN lists): bounded
                    self._translated.clear()
                self._translated[statement] = found
        return found

    def schema(self, statement: str) -> str:
        return re.sub(r"\bTEXT\b", 'TEXT COLLATE "C"', statement) if self.postgres else statement

    @property
    def list_tables(self) -> str:
        if self.postgres:
            return "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()"
        return "SELECT name FROM sqlite_master WHERE type = 'table'"


_SQLITE = _Dialect(postgres=False)
_POSTGRES = _Dialect(postgres=True)


class AnalyticsStore:
    """One analytics database: a SQLite file (or `:memory:`), or a schema of a PostgreSQL database
    (`PostgresLocation`). Not thread-safe: the service uses it from its event loop only (queries
    from other threads open their own connection with `reader()`).

    Writes commit one by one unless inside `batch()`, which writes each changed row once and
    commits once at its end: the live handlers and the rebuild apply a batch of events that way
    (`ingest.apply_events`), and the live handlers' messages are acked after that commit. SQLite
    runs in WAL mode with `synchronous=NORMAL`: a commit survives a crash of the process; the last
    commits before a power loss may be lost, which a rebuild from the streams repairs. A `bulk`
    store (a rebuild's new file or schema) is thrown away if the process dies before it is swapped
    in: on SQLite it keeps its rollback journal in memory and never syncs until `finish()`; on
    PostgreSQL its commits do not wait for the WAL flush (the swap's commit does). Run rows are
    cached (LRU) so that folding an event does not read the row back from the database: the store
    must be the only writer of its tables (one optimizer replica).
    """

    def __init__(
        self, path: str | Path | PostgresLocation, *, cache_size: int = 20_000, bulk: bool = False
    ) -> None:
        self.postgres = path if isinstance(path, PostgresLocation) else None
        self.dialect = _POSTGRES if self.postgres is not None else _SQLITE
        self.path = self.postgres.describe() if self.postgres is not None else str(path)
        """The SQLite file (`:memory:` for a store without a file), or the PostgreSQL URL and schema."""
        self.bulk = bulk and self.path != ":memory:"
        self.conn: Any = self._connect()
        self._cache: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._cache_size = cache_size
        self._batch_depth = 0
        # Inside a batch, writes are held here (latest row per key) and written at its end.
        self._pending_runs: dict[str, dict[str, Any]] = {}
        self._pending_calls: dict[str, dict[str, Any]] = {}
        # Inside a batch, the runs `prefetch_runs` found missing: `get_run` does not ask again.
        self._absent: set[str] = set()
        self.reset = False
        """True when the store held another schema version and was emptied: rebuild it."""
        self._open_schema()

    def _connect(self) -> Any:
        if self.postgres is not None:
            pg = self.postgres.connect()
            pg.execute(
                pgsql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(pgsql.Identifier(self.postgres.schema))
            )
            if self.bulk:
                pg.execute("SET synchronous_commit = off")
            return pg
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path)
        conn.row_factory = sqlite3.Row
        if self.bulk:
            # A store being rebuilt, thrown away if the process dies meanwhile: the rollback
            # journal in memory (a failed batch still rolls back) and no syncs, until `finish()`.
            conn.execute("PRAGMA journal_mode=MEMORY")
            conn.execute("PRAGMA synchronous=OFF")
        elif self.path != ":memory:":
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            for pragma in WRITER_PRAGMAS:
                conn.execute(pragma)
        return conn

    def _usable(self) -> None:
        """Reconnect to PostgreSQL after the connection was lost (a server restart, a failover):
        the failing batch was rolled back and raised; the next one gets a new connection."""
        if self.postgres is not None and (self.conn.closed or self.conn.broken):
            self.conn = self._connect()

    def _open_schema(self) -> None:
        existing = {r[0] for r in self.conn.execute(self.dialect.list_tables).fetchall()}
        version: str | None = None
        if "analytics_meta" in existing:
            found = self.conn.execute(
                "SELECT value FROM analytics_meta WHERE name = 'schema_version'"
            ).fetchone()
            version = found[0] if found else None
        with self.transaction():
            if version != SCHEMA_VERSION and existing & {"runs", "llm_calls"}:
                for table in TABLES:
                    self.conn.execute(f"DROP TABLE IF EXISTS {table}")
                self.reset = True
            for statement in SCHEMA:
                self.conn.execute(self.dialect.schema(statement))
            self.conn.execute(
                self.sql(
                    "INSERT INTO analytics_meta (name, value) VALUES ('schema_version', ?) "
                    "ON CONFLICT (name) DO UPDATE SET value = excluded.value"
                ),
                (SCHEMA_VERSION,),
            )

    def drop_leftovers(self) -> list[str]:
        """PostgreSQL, at the service's start: drop the schemas of rebuilds that never finished
        (the process died) and of stores replaced but not dropped yet — this service is their
        only writer. The names dropped; nothing on SQLite (a rebuild's file is removed when the
        next rebuild starts)."""
        if self.postgres is None:
            return []
        base = self.postgres.schema
        dropped: list[str] = []
        for (name,) in self.conn.execute("SELECT nspname FROM pg_namespace").fetchall():
            if name.startswith((base + REBUILD_INFIX, base + OLD_INFIX)):
                self.conn.execute(
                    pgsql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(pgsql.Identifier(name))
                )
                dropped.append(name)
        return dropped

    def close(self) -> None:
        self.conn.close()

    @contextmanager
    def _commit(self) -> Iterator[None]:
        """One transaction: committed at the end of the block, rolled back on an exception."""
        if self.postgres is not None:
            self._usable()
            with self.conn.transaction():
                yield
        else:
            with self.conn:
                yield

    @contextmanager
    def transaction(self) -> Iterator[Any]:
        if self._batch_depth:
            yield self.conn  # the enclosing batch commits
            return
        with self._commit():
            yield self.conn

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Group many writes into one commit (rolled back on error, with the row cache). Rows are
        written once per batch, however many events changed them."""
        self._batch_depth += 1
        try:
            if self._batch_depth == 1:
                with self._commit():
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
            if not self._batch_depth:
                self._absent.clear()

    def _execute(self, statement: str, params: Sequence[Any]) -> None:
        self.conn.execute(self.sql(statement), params)

    def _executemany(self, statement: str, rows: Sequence[Sequence[Any]]) -> None:
        if self.postgres is not None:
            with self.conn.cursor() as cursor:
                cursor.executemany(self.sql(statement), rows)
        else:
            self.conn.executemany(self.sql(statement), rows)

    def _flush(self) -> None:
        if self._pending_runs:
            pending = list(self._pending_runs.values())
            self._pending_runs.clear()
            self._executemany(_UPSERT_RUN, [_values(row, _run_values, RUN_COLUMNS) for row in pending])
            self._derive_run_arms(pending)
        if self._pending_calls:
            calls = list(self._pending_calls.values())
            self._pending_calls.clear()
            self._executemany(_UPSERT_CALL, [_values(r, _call_values, LLM_CALL_COLUMNS) for r in calls])
            self._derive_run_llm(calls)

    def _derive_run_arms(self, rows: Sequence[dict[str, Any]]) -> None:
        arms = [
            (experiment_id, row["run_id"], arm)
            for row in rows
            if row.get("experiment_arm")
            for experiment_id, arm in parse_stamp_text(row["experiment_arm"]).items()
        ]
        if arms:
            self._executemany(_UPSERT_RUN_ARM, arms)

    def _derive_run_llm(self, calls: Sequence[dict[str, Any]]) -> None:
        """Record the calls' models in `run_models` and recompute `run_llm` of their runs from
        `llm_calls` and `run_models` (so a redelivered call is not counted twice)."""
        run_ids = sorted({r["run_id"] for r in calls if r.get("run_id")})
        if not run_ids:
            return
        self._executemany(
            "INSERT INTO run_models (run_id, model) VALUES (?, ?) ON CONFLICT (run_id, model) DO NOTHING",
            [(r["run_id"], r["model"]) for r in calls if r.get("run_id")],
        )
        for i in range(0, len(run_ids), _RUN_LLM_CHUNK):
            chunk = run_ids[i : i + _RUN_LLM_CHUNK]
            marks = ", ".join("?" for _ in chunk)
            models: dict[str, list[str]] = {}
            for run_id, model in self._fetch(
                f"SELECT run_id, model FROM run_models WHERE run_id IN ({marks})",  # noqa: S608
                chunk,
            ):
                models.setdefault(run_id, []).append(model)
            sums = self._fetch(
                "SELECT run_id, SUM(cost_nanos), COUNT(*) FROM llm_calls "  # noqa: S608 - markers only
                f"WHERE run_id IN ({marks}) GROUP BY run_id",
                chunk,
            )
            # PostgreSQL's SUM of BIGINT is NUMERIC (a Decimal): written back as the integer it is.
            self._executemany(
                _UPSERT_RUN_LLM,
                [
                    (run_id, int(cost), int(n), json.dumps(sorted(models.get(run_id, ()))))
                    for run_id, cost, n in sums
                ],
            )

    def _fetch(self, statement: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Rows as tuples, without flushing a batch's pending writes."""
        if self.postgres is not None:
            self._usable()
            with self.conn.cursor() as cursor:
                return list(cursor.execute(self.sql(statement), tuple(params)).fetchall())
        cursor = self.conn.cursor()
        cursor.row_factory = None
        return list(cursor.execute(self.sql(statement), tuple(params)).fetchall())

    def sql(self, statement: str) -> str:
        """The query text in the backend's parameter style (`?` for SQLite, `%s` for psycopg)."""
        return self.dialect.sql(statement)

    def query(self, statement: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        self._flush()  # a query inside a batch sees the batch's writes
        return self._dicts(statement, params)

    def _dicts(self, statement: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """Rows as dicts, without flushing a batch's pending writes."""
        if self.postgres is not None:
            self._usable()
            with self.conn.cursor(row_factory=dict_row) as cursor:
                return list(cursor.execute(self.sql(statement), tuple(params)).fetchall())
        return [dict(row) for row in self.conn.execute(self.sql(statement), tuple(params)).fetchall()]

    def tuples(self, statement: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Rows as plain tuples: much cheaper than dicts for large results."""
        self._flush()
        return self._fetch(statement, params)

    def reader(self) -> AnalyticsStore:
        """A second connection to the same store, for queries in another thread (SQLite's WAL and
        PostgreSQL let readers run beside the writer). The in-memory store has no second
        connection: itself."""
        if self.path == ":memory:":
            return self
        reader = AnalyticsStore.__new__(AnalyticsStore)
        reader.postgres = self.postgres
        reader.dialect = self.dialect
        reader.path = self.path
        reader.bulk = False
        if self.postgres is not None:
            reader.conn = self.postgres.connect(read_only=True)
        else:
            reader.conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
            reader.conn.row_factory = sqlite3.Row
        reader._cache = OrderedDict()
        reader._cache_size = 0
        reader._batch_depth = 0
        reader._pending_runs = {}
        reader._pending_calls = {}
        reader._absent = set()
        reader.reset = False
        return reader

    def checkpoint(self) -> None:
        """Fold the WAL into the database file (before the file is moved); SQLite only."""
        if self.postgres is None and self.path != ":memory:" and not self.bulk:
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def finish(self) -> None:
        """Close the store with everything on disk (the file can then be moved): a checkpoint, or
        for a bulk store an fsync of the file. A bulk store reopened without `bulk` is a WAL
        store. (A PostgreSQL rebuild's schema is made durable by `swap_into`'s commit.)"""
        self.checkpoint()
        self.close()
        if self.bulk and self.postgres is None:
            fd = os.open(self.path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def swap_into(self, live: PostgresLocation, old_schema: str) -> None:
        """PostgreSQL: make this (rebuilt) schema the live one in one transaction — the live
        schema is renamed to `old_schema` and this one to the live name, so a reader sees either
        the whole old store or the whole new one. The commit waits for the WAL flush, so what was
        written with `synchronous_commit = off` before it is durable once the new store is live.
        Then drop `old_schema` with `drop_schema` and open the live store anew."""
        assert self.postgres is not None
        ident = pgsql.Identifier
        self.conn.execute("SET synchronous_commit = on")
        with self.conn.transaction():
            self.conn.execute(
                pgsql.SQL("ALTER SCHEMA {} RENAME TO {}").format(ident(live.schema), ident(old_schema))
            )
            self.conn.execute(
                pgsql.SQL("ALTER SCHEMA {} RENAME TO {}").format(
                    ident(self.postgres.schema), ident(live.schema)
                )
            )

    def drop_schema(self, schema: str) -> None:
        """PostgreSQL: drop a schema with its tables, then close this store. It waits for queries
        still running on those tables (run it off the event loop); one interrupted is dropped at
        the next open of the live store."""
        assert self.postgres is not None
        try:
            self.conn.execute(pgsql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(pgsql.Identifier(schema)))
        finally:
            self.close()

    def drop(self) -> None:
        """PostgreSQL: drop this store's schema (a rebuild given up) and close it."""
        assert self.postgres is not None
        if self.conn.closed or self.conn.broken:
            self.conn = self.postgres.connect()
        self.drop_schema(self.postgres.schema)

    # -- runs ------------------------------------------------------------------------------

    def prefetch_runs(self, run_ids: Iterable[str]) -> None:
        """Inside a batch: read the rows of these runs that are neither cached nor pending, 500 per
        query, and remember which runs do not exist yet, so that folding the batch reads nothing
        more — rather than one query per run not in the cache (a round trip each on PostgreSQL;
        every new run is one). Outside a batch: nothing."""
        if not self._batch_depth or not self._cache_size:
            return
        wanted = sorted(
            {
                r
                for r in run_ids
                if r not in self._pending_runs and r not in self._cache and r not in self._absent
            }
        )
        for i in range(0, len(wanted), _RUN_LLM_CHUNK):
            chunk = wanted[i : i + _RUN_LLM_CHUNK]
            marks = ", ".join("?" for _ in chunk)
            found = self._dicts(f"SELECT * FROM runs WHERE run_id IN ({marks})", chunk)  # noqa: S608 - markers only
            for row in found:
                self._remember(row)
            self._absent.update(set(chunk).difference(row["run_id"] for row in found))

    def _remember(self, row: dict[str, Any]) -> None:
        cache = self._cache
        cache[row["run_id"]] = row
        cache.move_to_end(row["run_id"])
        if len(cache) > self._cache_size:
            cache.popitem(last=False)

    def get_run(self, run_id: str) -> dict[str, Any] | None:
        pending = self._pending_runs.get(run_id)
        if pending is not None:
            return dict(pending)
        cached = self._cache.get(run_id)
        if cached is not None:
            self._cache.move_to_end(run_id)
            return dict(cached)
        if run_id in self._absent:
            return None
        found = self._dicts("SELECT * FROM runs WHERE run_id = ?", (run_id,))
        return found[0] if found else None

    def put_run(self, row: dict[str, Any]) -> None:
        """Write a run row (upsert). The store keeps `row` itself: do not change it afterwards
        (`get_run` hands out copies)."""
        run_id = row["run_id"]
        if self._batch_depth:
            self._pending_runs[run_id] = row
        else:
            with self.transaction():
                self._execute(_UPSERT_RUN, _values(row, _run_values, RUN_COLUMNS))
                self._derive_run_arms([row])
        if self._cache_size:
            self._remember(row)

    def runs(self) -> list[dict[str, Any]]:
        return self.query("SELECT * FROM runs ORDER BY run_id")

    # -- LLM calls -------------------------------------------------------------------------

    def put_llm_call(self, row: dict[str, Any]) -> None:
        if self._batch_depth:
            self._pending_calls[row["call_id"]] = row
            return
        with self.transaction():
            self._execute(_UPSERT_CALL, _values(row, _call_values, LLM_CALL_COLUMNS))
            self._derive_run_llm([row])

    def llm_calls(self) -> list[dict[str, Any]]:
        return self.query("SELECT * FROM llm_calls ORDER BY call_id")

    def counts(self) -> tuple[int, int]:
        runs = self._fetch("SELECT COUNT(*) FROM runs")[0][0]
        calls = self._fetch("SELECT COUNT(*) FROM llm_calls")[0][0]
        return int(runs), int(calls)
