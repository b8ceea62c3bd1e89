"""Compute and storage cost: prices as data, shares of a node, price changes, Hetzner prices."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
from hcloud import APIException
from optimizer_events import run_lifecycle
from optimizer_stores import Stores

from fabrik_common.events import Resources, RunDispatched, RunParameters, RunStarted, RunStateChanged
from fabrik_common.ids import new_ulid
from fabrik_common.testing.hcloud_double import HcloudDouble
from fabrik_optimizer.analytics.ingest import Costing, apply_run_event
from fabrik_optimizer.analytics.queries import costs
from fabrik_optimizer.analytics.store import AnalyticsStore
from fabrik_optimizer.prices import (
    EPOCH,
    HcloudPrices,
    PriceBook,
    PriceError,
    default_node_price_file,
    parse_quantity,
    to_nanos,
)
from fabrik_optimizer.settings import OptimizerSettings

# One node type: 4 cores, 8 GiB, 0.04 EUR/h until 15 March 2026, 0.06 EUR/h from then; 1 EUR = 1.25 USD.
PRICE_FILE = {
    "currency_rates": {"EUR": 1.25},
    "nodes": {
        "n4": {
            "cores": 4,
            "memory_gib": 8,
            "prices": [
                {"valid_from": "2026-01-01", "hourly": 0.04, "currency": "EUR"},
                {"valid_from": "2026-03-15", "hourly": 0.06, "currency": "EUR"},
            ],
        },
        "usd-node": {"cores": 2, "memory_gib": 4, "prices": [{"valid_from": "2026-01-01", "hourly": 0.1}]},
    },
    "storage": [{"valid_from": "2026-01-01", "per_gb_month": 0.044, "currency": "EUR"}],
}


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


@pytest.fixture
def prices(tmp_path: Path) -> PriceBook:
    path = tmp_path / "nodes.json"
    path.write_text(json.dumps(PRICE_FILE))
    return PriceBook.load(path)


@pytest.fixture
def store(stores: Stores) -> AnalyticsStore:
    """A store on each backend (SQLite file, PostgreSQL schema): the same assertions on both."""
    return stores.open()


def test_quantities() -> None:
    assert parse_quantity("500m") == Fraction(1, 2)
    assert parse_quantity("2") == 2
    assert parse_quantity("1.5") == Fraction(3, 2)
    assert parse_quantity("512Mi") == 512 * 2**20
    assert parse_quantity("1G") == 10**9
    assert parse_quantity("10Gi") == 10 * 2**30
    assert parse_quantity("lots") is None and parse_quantity("") is None and parse_quantity("1Xi") is None


def test_rounding_to_nanos_is_half_even_on_the_exact_value() -> None:
    assert to_nanos(Fraction(1, 3)) == 333_333_333
    assert to_nanos(Fraction(5, 10**10)) == 0  # 0.5 nano → even
    assert to_nanos(Fraction(15, 10**10)) == 2  # 1.5 nano → even
    assert to_nanos(Decimal("0.0125")) == 12_500_000


def test_dominant_share_and_overlapping_runs_on_one_node(prices: PriceBook) -> None:
    # 0.04 EUR/h * 1.25 = 0.05 USD/h for the whole node.
    # A: 1 CPU of 4, 1 GiB of 8 → CPU dominates, share 1/4, 12:00-14:00: 0.05 * 1/4 * 2 = 0.025 USD.
    a = prices.compute_cost_nanos("n4", "1", "1Gi", at("2026-03-02T12:00"), at("2026-03-02T14:00"))
    # B: 500m (1/8), 4 GiB (1/2) → memory dominates, 13:00-13:30 (inside A): 0.05 * 1/2 * 0.5 = 0.0125.
    b = prices.compute_cost_nanos("n4", "500m", "4Gi", at("2026-03-02T13:00"), at("2026-03-02T13:30"))
    assert (a, b) == (25_000_000, 12_500_000)
    # Together they never pay more than the node: 0.0375 ≤ 0.05 USD/h * 2 h.
    assert a + b <= 100_000_000
    # A share over the whole node is capped at the node.
    assert prices.share("n4", "8", "1Gi") == 1
    assert (
        prices.compute_cost_nanos("unknown", "1", "1Gi", at("2026-03-02T12:00"), at("2026-03-02T13:00"))
        is None
    )


def test_price_change_mid_run_applies_from_valid_from(prices: PriceBook) -> None:
    # Share 1/4; 23:00-00:00 at 0.05 USD/h, 00:00-01:00 at 0.06 * 1.25 = 0.075 USD/h.
    cost = prices.compute_cost_nanos("n4", "1", "1Gi", at("2026-03-14T23:00"), at("2026-03-15T01:00"))
    assert cost == to_nanos(Fraction(1, 4) * (Fraction(5, 100) + Fraction(75, 1000)))  # 0.03125
    assert cost == 31_250_000
    # Time before the first price costs nothing.
    assert (
        prices.compute_cost_nanos("n4", "4", "1Gi", at("2025-12-31T23:00"), at("2026-01-01T01:00"))
        == 50_000_000
    )


def test_the_one_price_shortcut_gives_the_exact_value(prices: PriceBook) -> None:
    """An attempt under one price is computed in integers; it must equal the Fraction path."""
    rng = random.Random(11)
    timeline = prices._nodes["n4"]
    checked = 0
    for _ in range(3000):
        start = at("2025-12-20T00:00") + timedelta(
            seconds=rng.randrange(120 * 86400), microseconds=rng.randrange(10**6)
        )
        end = start + timedelta(seconds=rng.randrange(0, 3 * 86400), microseconds=rng.randrange(10**6))
        cpu, memory = rng.choice(["1", "500m", "3", "7", None]), rng.choice(["1Gi", "3G", "777Mi", None])
        share = prices.share("n4", cpu, memory)
        assert share is not None
        total, _ = timeline.integrate_hours(start, end)
        assert prices.compute_cost_nanos("n4", cpu, memory, start, end) == to_nanos(total * share)
        checked += timeline.only_price(start, end) is not None
    assert checked > 2000  # most took the shortcut; the others crossed a price change or its start
    # Ties go to even, as round() of a Fraction: half the usd-node (0.1 USD/h) costs 1/72 n$ per µs.
    start = at("2026-03-02T12:00")
    node = ("usd-node", "1", "2Gi")
    assert prices.compute_cost_nanos(*node, start, start + timedelta(microseconds=36)) == 0  # 0.5
    assert prices.compute_cost_nanos(*node, start, start + timedelta(microseconds=108)) == 2  # 1.5
    assert prices.compute_cost_nanos(*node, start, start + timedelta(microseconds=90)) == 1  # 1.25
    assert prices.compute_cost_nanos(*node, start, start + timedelta(microseconds=270)) == 4  # 3.75


def test_storage_is_size_times_retention(prices: PriceBook) -> None:
    # 10 GiB * 168 h * 0.044 EUR * 1.25 / 730 h = 0.126575342465… USD
    cost = prices.storage_cost_nanos(10 * 2**30, Fraction(168), at("2026-03-02T00:00"))
    assert cost == 126_575_342
    assert prices.storage_cost_nanos(10 * 2**30, Fraction(168), at("2025-03-02T00:00")) == 0  # no price yet


def test_a_currency_without_a_rate_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "nodes.json"
    path.write_text(
        json.dumps(
            {
                "nodes": {
                    "x": {
                        "cores": 1,
                        "memory_gib": 1,
                        "prices": [{"valid_from": "2026-01-01", "hourly": 1, "currency": "CHF"}],
                    }
                }
            }
        )
    )
    with pytest.raises(PriceError, match="FABRIK_CURRENCY_RATES"):
        PriceBook.load(path)
    assert PriceBook.load(path, {"CHF": 1.1}).node_hourly_usd("x", at("2026-02-01T00:00")) == Fraction(11, 10)
    path.write_text(
        json.dumps(
            {
                "nodes": {
                    "x": {
                        "cores": 1,
                        "memory_gib": 1,
                        "prices": [{"valid_from": "2026-01-01T00:00", "hourly": 1}],
                    }
                }
            }
        )
    )
    with pytest.raises(PriceError, match="UTC offset"):
        PriceBook.load(path)


def test_the_repository_price_file_loads() -> None:
    path = default_node_price_file()
    assert path is not None
    book = PriceBook.load(path)
    assert "cx32" in book.node_types()
    assert book.node_hourly_usd("cx32", at("2026-03-01T00:00")) is not None


def lifecycle_on_node(
    rid: str,
    *,
    cpu: str,
    memory: str,
    start: datetime,
    seconds: float,
    backend: str = "kubernetes",
    attempt: int = 1,
) -> list[Any]:
    params = RunParameters(
        spec={"id": "s"},
        resources=Resources(cpu_request=cpu, memory_request=memory, cpu_limit="2", memory_limit="4Gi"),
    )
    end = start + timedelta(seconds=seconds)
    return [
        RunDispatched(
            run_id=rid,
            project="p",
            env="dev",
            attempt=attempt,
            params=params,
            deadline=end,
            occurred_at=start,
        ),
        RunStarted(run_id=rid, attempt=attempt, backend=backend, workload_ref="w", occurred_at=start),  # type: ignore[arg-type]
        RunStateChanged(
            run_id=rid,
            project="p",
            attempt=attempt,
            from_state="running",
            to_state="failed" if attempt == 1 else "succeeded",
            revision=10 * attempt,
            occurred_at=end,
        ),
    ]


def test_compute_and_storage_costs_of_runs_in_the_store(prices: PriceBook, store: AnalyticsStore) -> None:
    costing = Costing(prices=prices, node_type="n4", local_node_type="", workspace_bytes=10 * 2**30)
    a, b, local = new_ulid(), new_ulid(), new_ulid()
    for event in lifecycle_on_node(a, cpu="1", memory="1Gi", start=at("2026-03-02T12:00"), seconds=7200):
        apply_run_event(store, event, costing)
    for event in lifecycle_on_node(b, cpu="500m", memory="4Gi", start=at("2026-03-02T13:00"), seconds=1800):
        apply_run_event(store, event, costing)
    for event in lifecycle_on_node(
        local, cpu="1", memory="1Gi", start=at("2026-03-02T13:00"), seconds=60, backend="local"
    ):
        apply_run_event(store, event, costing)
    rows = {r["run_id"]: r for r in store.runs()}
    assert rows[a]["compute_cost_nanos"] == 25_000_000 and rows[a]["node_type"] == "n4"
    assert rows[b]["compute_cost_nanos"] == 12_500_000
    assert rows[a]["storage_cost_nanos"] == rows[b]["storage_cost_nanos"] == 126_575_342
    # A local run: no node type configured for local runs → no compute, and no workspace volume.
    assert rows[local]["compute_cost_nanos"] is None and rows[local]["storage_cost_nanos"] is None

    (row,) = costs(store, "project")
    assert row["compute_cost_usd"] == Decimal("0.0375")
    assert row["storage_cost_usd"] == Decimal("0.253150684")
    assert row["total_cost_usd"] == Decimal("0.290650684") and row["compute_runs"] == 2
    assert costs(store, "model") == []
    (day,) = costs(store, "day")
    assert day["day"] == "2026-03-02"

    # The same events again change nothing.
    before = store.runs()
    for event in lifecycle_on_node(a, cpu="1", memory="1Gi", start=at("2026-03-02T12:00"), seconds=7200):
        apply_run_event(store, event, costing)
    assert store.runs() == before

    # A resumed run pays both attempts; storage once.
    for event in lifecycle_on_node(
        a, cpu="1", memory="1Gi", start=at("2026-03-03T12:00"), seconds=3600, attempt=2
    ):
        apply_run_event(store, event, costing)
    row_a = store.get_run(a)
    assert row_a is not None and row_a["attempts"] == 2
    assert row_a["compute_cost_nanos"] == 25_000_000 + 12_500_000
    assert row_a["storage_cost_nanos"] == 126_575_342


def test_local_runs_can_be_attributed_to_a_node(prices: PriceBook, store: AnalyticsStore) -> None:
    costing = Costing(prices=prices, node_type="n4", local_node_type="usd-node")
    rid = new_ulid()
    for event in lifecycle_on_node(
        rid, cpu="1", memory="1Gi", start=at("2026-03-02T12:00"), seconds=3600, backend="local"
    ):
        apply_run_event(store, event, costing)
    row = store.get_run(rid)
    # usd-node: 2 cores, 4 GiB, 0.1 USD/h; share 1/2 → 0.05 USD.
    assert row is not None and row["compute_cost_nanos"] == 50_000_000 and row["storage_cost_nanos"] is None


def test_runs_without_costing_keep_no_cost(store: AnalyticsStore) -> None:
    for event in run_lifecycle():
        apply_run_event(store, event)
    (row,) = store.runs()
    assert row["compute_cost_nanos"] is None and row["backend"] == "local"


def test_settings_validate_the_workspace_size() -> None:
    with pytest.raises(ValueError, match="FABRIK_COST_WORKSPACE_SIZE"):
        OptimizerSettings(cost_workspace_size="big")
    assert OptimizerSettings(cost_workspace_size="20Gi").workspace_bytes() == 20 * 2**30


@pytest.fixture
async def hetzner() -> AsyncIterator[HcloudDouble]:
    double = await HcloudDouble().start()
    double.add_server_type("cx22", 2, 4.0, {"fsn1": "0.0060", "hel1": "0.0050"})
    double.add_server_type("n4", 4, 8.0, {"fsn1": "0.0400"})
    for i in range(60):  # more than one page (the client asks for 50 per page)
        double.add_server_type(f"filler{i}", 1, 1.0, {"nbg1": "0.0010"})
    yield double
    await double.stop()


async def test_hetzner_prices_through_the_hcloud_client(hetzner: HcloudDouble, prices: PriceBook) -> None:
    source = HcloudPrices("hcloud-test-token", endpoint=hetzner.endpoint, location="fsn1")
    fetched = await asyncio.to_thread(source.fetch)
    assert len(fetched) == 62 and [c[1].get("page") for c in hetzner.calls] == ["1", "2"]
    assert fetched["cx22"].hourly == Decimal("0.0060") and fetched["cx22"].location == "fsn1"
    assert fetched["cx22"].cores == 2 and fetched["cx22"].memory_gib == 4.0
    assert fetched["filler0"].location == "nbg1"  # not offered in fsn1: the first listed location

    gross = await asyncio.to_thread(
        HcloudPrices("hcloud-test-token", endpoint=hetzner.endpoint, gross=True).fetch
    )
    assert gross["cx22"].hourly == Decimal("0.0071")  # 0.0060 * 1.19, as the API rounds it

    now = at("2026-03-20T10:00")
    changed = prices.merge_hcloud(fetched, "EUR", now)
    # cx22 was unknown: priced from the epoch on. n4 costs 0.06 in the file since 15 March, the API
    # says 0.04: a new entry from the fetch time on; history before it is untouched.
    assert "cx22" in changed and "n4" in changed
    assert prices.node_hourly_usd("cx22", EPOCH) == Fraction(75, 10000)  # 0.006 * 1.25
    assert prices.node_hourly_usd("n4", now - timedelta(seconds=1)) == Fraction(75, 1000)
    assert prices.node_hourly_usd("n4", now) == Fraction(5, 100)
    # The same prices again change nothing.
    assert prices.merge_hcloud(fetched, "EUR", now + timedelta(days=1)) == []

    hetzner.set_price("cx22", "fsn1", "0.0080")
    later = await asyncio.to_thread(source.fetch)
    assert prices.merge_hcloud(later, "EUR", now + timedelta(days=1)) == ["cx22"]
    assert prices.node_hourly_usd("cx22", now) == Fraction(75, 10000)
    assert prices.node_hourly_usd("cx22", now + timedelta(days=1)) == Fraction(1, 100)


async def test_hetzner_errors_surface(hetzner: HcloudDouble) -> None:
    with pytest.raises(APIException, match="unable to authenticate"):
        await asyncio.to_thread(HcloudPrices("wrong", endpoint=hetzner.endpoint).fetch)
    hetzner.fail(503, "unavailable")
    with pytest.raises(APIException, match="unavailable"):
        await asyncio.to_thread(HcloudPrices("hcloud-test-token", endpoint=hetzner.endpoint).fetch)
