"""Makes `backup_fixtures` importable, and gives tests a second, empty NATS server to restore into."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fabrik_common.natsserver import NatsServer

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture
def fresh_server(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path / "fresh-nats")
    server.start()
    try:
        yield server
    finally:
        server.stop()
