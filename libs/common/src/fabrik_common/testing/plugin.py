"""pytest fixtures: `nats_server` (real JetStream, free port, temporary store) and `nats_url`;
`postgres_server` and `postgres_url` (a real PostgreSQL, see `fabrik_common.testing.postgres`).

Set FABRIK_TEST_NATS=container to run the server through testcontainers where a Docker engine exists.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from fabrik_common.testing import ContainerNatsServer, NatsServer, NatsServerLike, docker_available
from fabrik_common.testing.postgres import postgres_server, postgres_url

__all__ = ["nats_server", "nats_url", "postgres_server", "postgres_url"]


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServerLike]:
    if os.environ.get("FABRIK_TEST_NATS") == "container":
        if not docker_available():
            pytest.fail("FABRIK_TEST_NATS=container was asked for but no Docker engine is reachable")
        container = ContainerNatsServer()
        container.start()
        try:
            yield container
        finally:
            container.remove()
        return
    server = NatsServer(tmp_path / "nats")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def nats_url(nats_server: NatsServerLike) -> str:
    return nats_server.url
