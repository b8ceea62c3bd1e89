"""The health, readiness and metrics endpoints every service serves, on uvicorn inside our own loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Generator, Sequence
from typing import Any

import uvicorn
from litestar import Litestar, Response, get
from litestar.types import ControllerRouterHandler
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger(__name__)


class HealthProbe:
    """What /healthz and /readyz report: liveness is the loop answering; readiness is `checks`."""

    def __init__(self, service: str) -> None:
        self.service = service
        self.checks: dict[str, Callable[[], bool]] = {}

    def add_check(self, name: str, check: Callable[[], bool]) -> None:
        self.checks[name] = check

    def results(self) -> dict[str, bool]:
        return {name: bool(check()) for name, check in self.checks.items()}


def health_routes(probe: HealthProbe, registry: CollectorRegistry) -> list[ControllerRouterHandler]:
    @get("/healthz", include_in_schema=False, sync_to_thread=False)
    def healthz() -> dict[str, str]:
        return {"status": "ok", "service": probe.service}

    @get("/readyz", include_in_schema=False, sync_to_thread=False)
    def readyz() -> Response[dict[str, Any]]:
        results = probe.results()
        ready = all(results.values())
        return Response(
            {
                "status": "ready" if ready else "not ready",
                "service": probe.service,
                "checks": results,
            },
            status_code=200 if ready else 503,
        )

    @get("/metrics", include_in_schema=False, sync_to_thread=False)
    def metrics() -> Response[bytes]:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return [healthz, readyz, metrics]


def build_http_app(
    probe: HealthProbe,
    registry: CollectorRegistry,
    route_handlers: Sequence[ControllerRouterHandler] = (),
    **litestar_kwargs: Any,
) -> Litestar:
    return Litestar(
        route_handlers=[*health_routes(probe, registry), *route_handlers],
        logging_config=None,
        **litestar_kwargs,
    )


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its own signal handling: the service owns SIGTERM/SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


class HttpServer:
    def __init__(self, app: Any, host: str, port: int) -> None:
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_config=None,
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=5,
        )
        self._server = _EmbeddedServer(config)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._server.serve(), name="http")
        while not self._server.started:
            if self._task.done():
                self._task.result()
                raise RuntimeError("HTTP server stopped during start-up")
            await asyncio.sleep(0.01)

    @property
    def port(self) -> int:
        for server in self._server.servers:
            for sock in server.sockets:
                return int(sock.getsockname()[1])
        raise RuntimeError("HTTP server is not listening")

    async def stop(self) -> None:
        if self._task is None:
            return
        self._server.should_exit = True
        await self._task
        self._task = None
