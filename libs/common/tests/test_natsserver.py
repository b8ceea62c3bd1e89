"""The embedded nats-server and the service processes of the tests: ports they picked themselves
are picked again when another process took them first (parallel test workers); ports they were
given are never changed."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from fabrik_common.natsserver import NatsServer, NatsServerError
from fabrik_common.testing import ServiceProcess


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    yield sock
    sock.close()


def test_a_chosen_port_taken_before_start_is_chosen_again(tmp_path: Path, listener: socket.socket) -> None:
    server = NatsServer(tmp_path / "nats")
    server.port = taken = listener.getsockname()[1]  # another process bound it in between
    server.start()
    try:
        assert server.running
        assert server.port != taken
    finally:
        server.stop()


def test_a_given_port_in_use_fails_in_the_servers_words(tmp_path: Path, listener: socket.socket) -> None:
    taken = listener.getsockname()[1]
    server = NatsServer(tmp_path / "nats", port=taken)
    with pytest.raises(NatsServerError, match="address already in use"):
        server.start()
    assert server.port == taken


def test_a_restart_keeps_its_port(tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "nats")
    server.start()
    port = server.port
    try:
        server.restart()
        assert server.port == port
        assert server.running
    finally:
        server.stop()


def test_a_service_whose_chosen_port_was_taken_starts_on_another(
    tmp_path: Path, listener: socket.socket, nats_url: str
) -> None:
    service = ServiceProcess(
        "fabrik_backup",
        {"FABRIK_NATS_URL": nats_url, "FABRIK_DATA_DIR": str(tmp_path)},
        log_path=tmp_path / "b.log",
    )
    service.http_port = taken = listener.getsockname()[1]  # another process bound it in between
    service.env["FABRIK_HTTP_PORT"] = str(taken)
    service.start(ready_timeout=60)
    try:
        assert service.http_port != taken
        assert "address already in use" in (tmp_path / "b.log").read_text()
    finally:
        service.kill()
