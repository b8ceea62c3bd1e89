"""Budget levels, projection and once-per-level-per-period alerts, against a real NATS KV."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import msgspec
import pytest
from prometheus_client import CollectorRegistry

from fabrik_common import optimizer_rpc as rpc
from fabrik_common.bus import Bus, BusOptions
from fabrik_common.events import AlertRaised, BudgetLevelCrossed, Event
from fabrik_common.metrics import BusMetrics
from fabrik_common.topology import ensure_topology, stream_for_subject
from fabrik_optimizer.budgets import (
    AlertMarker,
    BudgetBook,
    BudgetMonitor,
    alert_marker_key,
    budget_status,
    crossed_level,
    elapsed_fraction,
    parse_definition,
)

NOW = datetime(2026, 3, 11, tzinfo=UTC)  # 10 of 31 days of March have passed
USD = 1_000_000_000


def test_rpc_subjects_are_outside_every_stream() -> None:
    for subject in rpc.SUBJECTS:
        with pytest.raises(LookupError):
            stream_for_subject(subject)


def test_definitions_are_compatible_with_what_the_llm_proxy_reads() -> None:
    assert parse_definition(b"250") == rpc.BudgetDefinition(llm_usd_per_month=250.0)
    assert parse_definition(b"null") is None
    stored = parse_definition(
        b'{"llm_usd_per_month": 10, "compute_usd_per_month": 5, "warning": 0.5, "x": 1}'
    )
    assert stored == rpc.BudgetDefinition(llm_usd_per_month=10, compute_usd_per_month=5, warning=0.5)
    with pytest.raises(msgspec.ValidationError):
        parse_definition(b'{"warning": 1.5}')


def test_levels_and_linear_projection() -> None:
    assert elapsed_fraction("2026-03", NOW) == pytest.approx(10 / 31)
    assert elapsed_fraction("2026-02", NOW) == 1.0 and elapsed_fraction("2026-04", NOW) == 0.0
    assert crossed_level(79_999_999_999, 100, 0.8) is None
    assert crossed_level(80 * USD, 100, 0.8) == "warning"
    assert crossed_level(100 * USD, 100, 0.8) == "limit"
    status = budget_status(
        "project",
        "demo",
        rpc.BudgetDefinition(llm_usd_per_month=100, compute_usd_per_month=50),
        "2026-03",
        (31 * USD, 45 * USD),
        NOW,
    )
    assert status.llm.level == "ok" and status.llm.spent_usd == Decimal(31)
    assert status.llm.projected_usd == Decimal("96.100000000")  # 31 / (10/31)
    assert status.compute.level == "warning" and status.compute.used == 0.9
    assert not status.blocked
    over = budget_status(
        "project", "demo", rpc.BudgetDefinition(llm_usd_per_month=1), "2026-03", (USD, 0), NOW
    )
    assert over.blocked and over.llm.level == "limit" and over.compute.level == "none"


@pytest.fixture
async def bus(nats_url: str) -> AsyncIterator[Bus]:
    b = Bus(BusOptions(url=nats_url), BusMetrics(CollectorRegistry()))
    await b.connect()
    await ensure_topology(b.js)
    yield b
    await b.close()


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> datetime:
        return self.now


async def test_each_level_is_announced_once_per_period_across_replicas(bus: Bus) -> None:
    limits = await bus.js.key_value("limits")
    book = BudgetBook()
    book.observe("budgets.project.demo", b'{"llm_usd_per_month": 10, "compute_usd_per_month": 100}')
    book.observe("budgets.global", b'{"llm_usd_per_month": 1000}')
    book.observe("budgets.unrelated", b"5")  # not a budget key: ignored
    published: list[Event] = []

    async def publish(event: Event) -> Any:
        published.append(event)
        return await bus.publish(event)

    clock = Clock()
    first = BudgetMonitor(book, limits, publish, clock=clock)
    second = BudgetMonitor(book, limits, publish, clock=clock)  # another replica

    assert await first.evaluate({"demo": (7 * USD, 0)}) == 0
    assert await first.evaluate({"demo": (8 * USD, 0)}) == 1  # 80 %: warning
    assert await second.evaluate({"demo": (9 * USD, 0)}) == 0  # already announced
    assert await first.evaluate({"demo": (8 * USD, 0)}) == 0
    assert await second.evaluate({"demo": (12 * USD, 0), "other": (1 * USD, 0)}) == 1  # limit
    assert await first.evaluate({"demo": (20 * USD, 0)}) == 0
    crossed = [e for e in published if isinstance(e, BudgetLevelCrossed)]
    alerts = [e for e in published if isinstance(e, AlertRaised)]
    assert [(e.scope, e.project, e.kind, e.level, e.period) for e in crossed] == [
        ("project", "demo", "llm", "warning", "2026-03"),
        ("project", "demo", "llm", "limit", "2026-03"),
    ]
    assert crossed[1].spent_usd == 12.0 and crossed[1].limit_usd == 10.0
    assert [(a.severity, a.project) for a in alerts] == [("warning", "demo"), ("critical", "demo")]
    assert "refused" in alerts[1].message and alerts[1].subject() == "fabrik.alerts.raised.critical"

    # A new month: the same levels are announced again, once.
    clock.now = datetime(2026, 4, 2, tzinfo=UTC)
    assert await first.evaluate({"demo": (11 * USD, 0)}) == 2  # warning and limit at once
    assert await second.evaluate({"demo": (11 * USD, 0)}) == 0
    assert [e.period for e in published if isinstance(e, BudgetLevelCrossed)][-2:] == ["2026-04", "2026-04"]


async def test_a_pending_marker_left_by_a_dead_replica_is_finished_with_the_same_ids(bus: Bus) -> None:
    limits = await bus.js.key_value("limits")
    book = BudgetBook()
    book.observe("budgets.global", b'{"compute_usd_per_month": 10}')
    key = alert_marker_key("2026-03", "global", None, "compute", "warning")
    left = AlertMarker(
        state="pending",
        crossed_event_id="01JQ0000000000000000000001",
        alert_event_id="01JQ0000000000000000000002",
        alert_id="01JQ0000000000000000000003",
        created_at=NOW - timedelta(minutes=5),
    )
    await limits.create(key, msgspec.json.encode(left))
    published: list[Event] = []

    async def publish(event: Event) -> Any:
        published.append(event)

    monitor = BudgetMonitor(book, limits, publish, clock=lambda: NOW)
    assert await monitor.evaluate({None: (0, 9 * USD)}) == 1
    assert [e.event_id for e in published] == [left.crossed_event_id, left.alert_event_id]
    entry = await limits.get(key)
    assert entry.value is not None and msgspec.json.decode(entry.value, type=AlertMarker).state == "sent"
    assert await monitor.evaluate({None: (0, 9 * USD)}) == 0
