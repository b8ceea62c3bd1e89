"""Stores on either backend for the optimizer's tests (the `stores` fixture of conftest.py)."""

from __future__ import annotations

import re
import sqlite3
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg

from fabrik_optimizer.analytics.store import AnalyticsStore, PostgresLocation

BACKENDS = ("sqlite", "postgres")


class Stores:
    """Opens stores on one backend; `name` tells them apart (a file, or a schema)."""

    def __init__(self, backend: str, tmp_path: Path, postgres_url: str | None) -> None:
        self.backend = backend
        self.tmp_path = tmp_path
        self.url = postgres_url
        self._open: list[AnalyticsStore] = []

    def location(self, name: str = "analytics") -> Path | PostgresLocation:
        if self.url is not None:
            return PostgresLocation(self.url, schema=name)
        return self.tmp_path / f"{name}.db"

    def open(self, name: str = "analytics", *, bulk: bool = False) -> AnalyticsStore:
        store = AnalyticsStore(self.location(name), bulk=bulk)
        self._open.append(store)
        return store

    def settings(self, name: str = "analytics") -> dict[str, Any]:
        """The optimizer settings that put its store there."""
        if self.url is not None:
            return {"analytics_database_url": self.url}
        return {"analytics_db": str(self.tmp_path / f"{name}.db")}

    def close(self) -> None:
        for store in self._open:
            store.close()


@contextmanager
def statements(store: AnalyticsStore) -> Iterator[list[str]]:
    """The statements sent by the store's connection during the block, as the database received
    them: SQLite's trace callback, or libpq's protocol trace (PQtrace) of PostgreSQL's simple
    queries, which are how psycopg sends BEGIN, COMMIT and ROLLBACK. The list is complete when
    the block ends."""
    found: list[str] = []
    if store.postgres is None:
        store.conn.set_trace_callback(found.append)
        try:
            yield found
        finally:
            store.conn.set_trace_callback(None)
        return
    with tempfile.TemporaryFile("w+") as trace:
        store.conn.pgconn.trace(trace.fileno())
        store.conn.pgconn.set_trace_flags(psycopg.pq.Trace.SUPPRESS_TIMESTAMPS)
        try:
            yield found
        finally:
            store.conn.pgconn.untrace()
            trace.seek(0)
            found.extend(re.findall(r'^F\t\d+\tQuery\t "(.*)"$', trace.read(), flags=re.MULTILINE))


def database_failure(backend: str) -> type[Exception]:
    """The error a backend raises when the database, not the data, fails (locked, connection lost)."""
    return sqlite3.OperationalError if backend == "sqlite" else psycopg.OperationalError
