"""A real PostgreSQL for tests, without Docker: `pgserver` (the PostgreSQL binaries in a wheel).

Fixtures (registered by `fabrik_common.testing.plugin`):

- `postgres_server` (session): one server per test session (per xdist worker), its data in a
  temporary directory of its own, listening on a Unix socket only; stopped and deleted at the end.
- `postgres_url` (function): a fresh, empty database on that server for one test (CREATE DATABASE
  from `template1`, about 0.1 s), dropped afterwards; a libpq URL
  (`postgresql://postgres:@/<db>?host=<socket dir>`) usable by psycopg and by a service process.

When the server cannot start, the tests that need it fail with the reason if `CI=true` (a CI run
must not pass without them) and are skipped with the reason otherwise.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest

from fabrik_common.ids import new_ulid

# psycopg and pgserver are imported where they are used: fabrik_common does not depend on them,
# and this module is loaded by the plugin in every test run.


def unavailable(reason: str) -> NoReturn:
    """Fail under CI (`CI=true`), skip elsewhere, naming the reason."""
    if os.environ.get("CI", "").strip().lower() in ("true", "1", "yes"):
        pytest.fail(f"PostgreSQL is required under CI=true: {reason}", pytrace=False)
    pytest.skip(f"PostgreSQL tests skipped: {reason}")


class PostgresTestServer:
    """A running pgserver instance: URLs, and databases created and dropped per test."""

    def __init__(self, server: Any) -> None:
        self._server = server

    def url(self, database: str = "postgres") -> str:
        return str(self._server.get_uri(database))

    def create_database(self) -> str:
        """A new empty database; its name."""
        import psycopg
        from psycopg import sql

        name = f"t_{new_ulid().lower()}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return name

    def drop_database(self, name: str) -> None:
        """Drop a database, ending the connections still open to it (a service left running)."""
        import psycopg
        from psycopg import sql

        try:
            with psycopg.connect(self.url(), autocommit=True) as conn:
                conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        except psycopg.Error as exc:
            raise RuntimeError(f"dropping {name} failed: {exc}\nserver log:\n{self.log_tail()}") from exc

    def log_tail(self, size: int = 4000) -> str:
        """The end of the server's log (to explain a failure)."""
        log = Path(self._server.pgdata) / "log"
        try:
            return log.read_text(errors="replace")[-size:]
        except OSError as exc:
            return f"(no log at {log}: {exc})"

    def stop(self) -> None:
        self._server.cleanup()


def start_postgres(data_dir: Path) -> PostgresTestServer:
    """Start (or join) the pgserver instance whose data is in `data_dir`; deleted when stopped."""
    import psycopg

    with warnings.catch_warnings():
        # platformdirs warns that XDG_RUNTIME_DIR is unset (containers, CI) and uses /tmp instead.
        warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
        import pgserver

        server = pgserver.get_server(data_dir, cleanup_mode="delete")  # type: ignore[attr-defined]
    handle = PostgresTestServer(server)
    with psycopg.connect(handle.url(), autocommit=True) as conn:
        conn.execute("SELECT 1")
    return handle


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresTestServer]:
    # Not under pytest's temporary directory: every pytest process that starts makes
    # /tmp/pytest-of-<user> private again (mode 0700), and the server runs as its own system user
    # when tests run as root (pgserver's rule), so it would lose access to its data mid-session.
    base = Path(tempfile.mkdtemp(prefix="fabrik-postgres-"))
    data_dir = base / "data"
    try:
        server = start_postgres(data_dir)
    except Exception as exc:  # noqa: BLE001 - any failure to start is reported as the reason
        shutil.rmtree(base, ignore_errors=True)
        unavailable(f"pgserver could not start a server in {data_dir}: {exc!r}")
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server: PostgresTestServer) -> Iterator[str]:
    name = postgres_server.create_database()
    try:
        yield postgres_server.url(name)
    finally:
        postgres_server.drop_database(name)
