"""Prometheus metrics of the llm-proxy, on the service's registry."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)


class ProxyMetrics:
    def child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, cached: the hot path skips prometheus_client's lock and checks."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def __init__(self, registry: CollectorRegistry) -> None:
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self.requests = Counter(
            "fabrik_llm_requests",
            "LLM calls answered, by endpoint, model alias and HTTP status",
            ("endpoint", "model", "status"),
            registry=registry,
        )
        self.latency = Histogram(
            "fabrik_llm_request_seconds",
            "Time from request to the end of the response (streams: to their last byte)",
            ("endpoint",),
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.ttfb = Histogram(
            "fabrik_llm_ttfb_seconds",
            "Time from request to the first byte of the upstream's answer",
            ("endpoint",),
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.overhead = Histogram(
            "fabrik_llm_overhead_seconds",
            "Time spent in the proxy itself (the X-Fabrik-Overhead-Ms header)",
            ("endpoint",),
            buckets=_OVERHEAD_BUCKETS,
            registry=registry,
        )
        self.tokens = Counter(
            "fabrik_llm_tokens",
            "Tokens by model alias and kind (input, output, cache_read, cache_write)",
            ("model", "kind"),
            registry=registry,
        )
        self.cost = Counter("fabrik_llm_cost_usd", "Cost of LLM calls in USD", ("model",), registry=registry)
        self.upstream_errors = Counter(
            "fabrik_llm_upstream_errors",
            "Failed upstream attempts by deployment and kind (status code, connect, timeout, protocol)",
            ("deployment", "kind"),
            registry=registry,
        )
        self.retries = Counter(
            "fabrik_llm_retries",
            "Upstream attempts after the first, by deployment",
            ("deployment",),
            registry=registry,
        )
        self.refused = Counter(
            "fabrik_llm_refused",
            "Calls refused by the proxy, by reason (auth, budget, rate_limit, invalid_request, ...)",
            ("reason",),
            registry=registry,
        )
        self.circuit_state = Gauge(
            "fabrik_llm_circuit_state",
            "Circuit breaker state: 0 closed, 1 half-open, 2 open",
            ("kind", "name"),
            registry=registry,
        )
        self.usage_events_dropped = Counter(
            "fabrik_llm_usage_events_dropped",
            "Usage events dropped because the publish queue was full (NATS unreachable for long)",
            registry=registry,
        )
        self.stream_errors = Counter(
            "fabrik_llm_stream_errors",
            "Streams ended with an error event after their first byte",
            ("endpoint",),
            registry=registry,
        )
        self.inflight = Gauge("fabrik_llm_inflight", "LLM calls in progress", registry=registry)
