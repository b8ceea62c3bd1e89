"""The executor's own Prometheus metrics (next to the bus metrics every service has)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class ExecutorMetrics:
    def __init__(self, registry: CollectorRegistry, backend: str) -> None:
        self.backend = backend
        self.runs_active = Gauge(
            "fabrik_executor_runs_active",
            "Attempts running (or being prepared) here",
            ("backend",),
            registry=registry,
        )
        self.runs_started = Counter(
            "fabrik_executor_runs_started",
            "Attempts whose workload was started",
            ("backend",),
            registry=registry,
        )
        self.runs_finished = Counter(
            "fabrik_executor_runs_finished",
            "Attempts finished, by outcome and reason",
            ("backend", "outcome", "reason"),
            registry=registry,
        )
        self.log_lines = Counter(
            "fabrik_executor_log_lines_published",
            "Workload log lines published",
            ("backend",),
            registry=registry,
        )
        self.runs_recovered = Counter(
            "fabrik_executor_runs_recovered",
            "Attempts found again after an executor restart, by what became of them",
            ("backend", "action"),
            registry=registry,
        )
