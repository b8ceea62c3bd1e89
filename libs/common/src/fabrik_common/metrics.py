"""Prometheus metrics, one registry per service instance (so replicas can share a process in tests)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class BusMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        labels = ("consumer",)
        self.processed = Counter(
            "fabrik_messages_processed", "Messages handled and acked", labels, registry=registry
        )
        self.failed = Counter(
            "fabrik_messages_failed", "Handler failures (each nak)", labels, registry=registry
        )
        self.dead_lettered = Counter(
            "fabrik_messages_dead_lettered",
            "Messages sent to the dead-letter subject",
            (*labels, "reason"),
            registry=registry,
        )
        self.redelivered = Counter(
            "fabrik_messages_redelivered", "Deliveries after the first", labels, registry=registry
        )
        self.handling_seconds = Histogram(
            "fabrik_message_handling_seconds",
            "Time spent in the handler",
            labels,
            registry=registry,
            buckets=(
                0.0005,
                0.001,
                0.0025,
                0.005,
                0.01,
                0.025,
                0.05,
                0.1,
                0.25,
                0.5,
                1,
                2.5,
                5,
                10,
                30,
            ),
        )
        self.published = Counter(
            "fabrik_events_published",
            "Events published (acknowledged by JetStream)",
            ("type",),
            registry=registry,
        )
        self.publish_retries = Counter(
            "fabrik_publish_retries",
            "Publish attempts retried after a timeout or disconnect",
            registry=registry,
        )
        self.connected = Gauge("fabrik_nats_connected", "1 while connected to NATS", registry=registry)
        self.reconnects = Counter("fabrik_nats_reconnects", "Reconnections to NATS", registry=registry)
