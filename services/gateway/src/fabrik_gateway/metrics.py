"""The gateway's Prometheus metrics, on the service's registry, and the ASGI middleware that counts
requests by route template and status."""

from __future__ import annotations

import time
from collections.abc import Callable

from litestar.enums import ScopeType
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

UNMATCHED = "unmatched"


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry, known_runs: Callable[[], int]) -> None:
        self.requests = Counter(
            "fabrik_http_requests",
            "HTTP requests answered, by route template and status",
            ("method", "route", "status"),
            registry=registry,
        )
        self.request_seconds = Histogram(
            "fabrik_http_request_seconds",
            "Time to answer an HTTP request (streams: until they end)",
            ("method", "route"),
            registry=registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 60),
        )
        self.submits = Counter(
            "fabrik_runs_submitted",
            "POST /runs outcomes: created, replayed (Idempotency-Key), rejected",
            ("outcome",),
            registry=registry,
        )
        self.undecodable = Counter(
            "fabrik_gateway_undecodable_records",
            "KV records the read model could not decode (skipped)",
            ("bucket",),
            registry=registry,
        )
        self.known_runs = Gauge("fabrik_gateway_runs", "Runs in the gateway's read model", registry=registry)
        self.known_runs.set_function(lambda: float(known_runs()))

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.request_seconds.labels(method, route).observe(seconds)


def metrics_middleware(metrics: Callable[[], GatewayMetrics | None]) -> Callable[[ASGIApp], ASGIApp]:
    """Counts each matched request (unmatched ones are counted by the 404 handler)."""

    def factory(app: ASGIApp) -> ASGIApp:
        async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != ScopeType.HTTP:
                await app(scope, receive, send)
                return
            status = 500
            started = time.perf_counter()

            async def send_wrapper(message: Message) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = int(message["status"])
                await send(message)

            try:
                await app(scope, receive, send_wrapper)
            finally:
                current = metrics()
                if current is not None:
                    route = str(scope.get("path_template") or UNMATCHED)
                    current.observe(
                        str(scope.get("method", "")), route, status, time.perf_counter() - started
                    )

        return middleware

    return factory
