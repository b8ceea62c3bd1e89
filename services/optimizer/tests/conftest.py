"""Makes the shared event builders (`optimizer_events`) importable under --import-mode=importlib,
and runs the store's tests on both backends.

`backend` is parametrized over `sqlite` and `postgres`; `stores` opens stores on it: SQLite files
in the test's temporary directory, or schemas of a fresh PostgreSQL database (`postgres_url`, from
`fabrik_common.testing.postgres`: a real server through pgserver; skipped with the reason when it
cannot start, failed under CI=true). Tests that take `stores` run the same assertions on both.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from optimizer_stores import BACKENDS, Stores


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def stores(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Stores]:
    url = request.getfixturevalue("postgres_url") if backend == "postgres" else None
    opened = Stores(backend, tmp_path, url)
    try:
        yield opened
    finally:
        opened.close()
