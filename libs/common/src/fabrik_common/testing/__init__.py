"""Test harness: a real NATS JetStream server per test, and services started in-process or as processes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any, Protocol

from fabrik_common.natsserver import NatsServer, free_port
from fabrik_common.service import Service

__all__ = [
    "ContainerNatsServer",
    "NatsServer",
    "NatsServerLike",
    "ServiceProcess",
    "docker_available",
    "free_port",
    "running_service",
]


class NatsServerLike(Protocol):
    @property
    def url(self) -> str: ...

    def start(self, timeout: float = ...) -> None: ...

    def stop(self, timeout: float = ...) -> None: ...

    def kill(self) -> None: ...

    def restart(self, timeout: float = ...) -> None: ...


def docker_available() -> bool:
    try:
        import docker  # type: ignore[import-untyped]

        docker.from_env().ping()
    except Exception:  # noqa: BLE001 - any failure means "no usable engine"
        return False
    return True


class ContainerNatsServer:
    """NATS JetStream in a container through testcontainers (where a Docker engine exists)."""

    IMAGE = "nats:2.11-alpine"

    def __init__(self) -> None:
        from testcontainers.core.container import DockerContainer

        self._container: Any = (
            DockerContainer(self.IMAGE).with_command("-js -sd /data").with_exposed_ports(4222)
        )

    @property
    def url(self) -> str:
        host = self._container.get_container_host_ip()
        return f"nats://{host}:{self._container.get_exposed_port(4222)}"

    def start(self, timeout: float = 30.0) -> None:
        self._container.start()
        deadline = time.monotonic() + timeout
        while "Server is ready" not in self._container.get_logs()[0].decode(errors="replace"):
            if time.monotonic() > deadline:
                raise TimeoutError("NATS container did not become ready")
            time.sleep(0.1)

    def stop(self, timeout: float = 10.0) -> None:
        self._container.get_wrapped_container().stop(timeout=int(timeout))

    def kill(self) -> None:
        self._container.get_wrapped_container().kill()

    def restart(self, timeout: float = 30.0) -> None:
        self._container.get_wrapped_container().restart()

    def remove(self) -> None:
        self._container.stop()


@contextlib.asynccontextmanager
async def running_service(service: Service[Any]) -> AsyncIterator[Service[Any]]:
    """Run a service in this process for the duration of the block."""
    await service.start()
    try:
        yield service
    finally:
        await service.stop()


class ServiceProcess:
    """A service started as `python -m <module>` with the given environment, ready when /readyz is 200."""

    def __init__(
        self,
        module: str,
        env: Mapping[str, str],
        *,
        http_port: int | None = None,
        log_path: Path | None = None,
        argv: tuple[str, ...] = (),
    ) -> None:
        self.module = module
        # A port picked here can be taken by another process before the service binds it (tests
        # run in parallel workers): only such a port is picked again when that happens.
        self._port_chosen = http_port is None
        self.http_port = http_port or free_port()
        self.env = {**os.environ, **env, "FABRIK_HTTP_PORT": str(self.http_port)}
        self.log_path = log_path
        self.argv = argv
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, ready_timeout: float = 30.0) -> ServiceProcess:
        self.start_process()
        self.wait_ready(ready_timeout)
        return self

    def start_process(self) -> None:
        """Launch without waiting for readiness."""
        out: Any = self.log_path.open("ab") if self.log_path else subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", self.module, *self.argv],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        finally:
            if self.log_path:
                out.close()

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                if self._lost_its_port():
                    self.http_port = free_port()
                    self.env["FABRIK_HTTP_PORT"] = str(self.http_port)
                    self.start_process()
                    continue
                raise RuntimeError(f"{self.module} exited with {self.proc.returncode} (log: {self.log_path})")
            try:
                with urllib.request.urlopen(f"{self.base_url}/readyz", timeout=1) as response:  # noqa: S310
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        raise TimeoutError(f"{self.module} not ready within {timeout}s (log: {self.log_path})")

    def _lost_its_port(self) -> bool:
        """Whether the service exited because its chosen port was taken (said in its log)."""
        if not self._port_chosen or self.log_path is None or not self.log_path.exists():
            return False
        tail = self.log_path.read_text(errors="replace")[-4000:]
        return "address already in use" in tail.lower() and str(self.http_port) in tail

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait: the clean shutdown path. Returns the exit code. A service that has
        not exited within `timeout` is killed before the TimeoutExpired is raised, so that a
        failing test leaves no process behind."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> ServiceProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()
