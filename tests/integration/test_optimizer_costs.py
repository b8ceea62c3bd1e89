"""The optimizer's costs, budgets and rebuild over a real NATS, with the real llm-proxy (the
rebuild on both store backends: SQLite, and PostgreSQL through pgserver).

The optimizer and the llm-proxy run in-process against one NATS server; requests go through the
optimizer's NATS request/reply contract (`fabrik_common.optimizer_rpc`) exactly as the gateway
sends them; LLM calls go through the proxy's OpenAI endpoint with run keys and the offline echo
provider (priced by the test's price file).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import nats
import openai
import pytest
from nats.aio.client import Client as NatsClient
from prometheus_client import CollectorRegistry

from fabrik_common import optimizer_rpc as rpc
from fabrik_common.bus import Bus, BusOptions
from fabrik_common.codec import EventCodec
from fabrik_common.events import (
    AlertRaised,
    BudgetLevelCrossed,
    LlmUsage,
    Resources,
    RunDispatched,
    RunFinished,
    RunParameters,
    RunRequested,
    RunStarted,
    RunStateChanged,
)
from fabrik_common.ids import new_ulid
from fabrik_common.metrics import BusMetrics
from fabrik_common.runkeys import issue_run_key
from fabrik_common.testing import running_service
from fabrik_common.topology import ensure_topology
from fabrik_llm_proxy.app import build as build_proxy
from fabrik_llm_proxy.pricing import PriceEntry, PriceTable
from fabrik_llm_proxy.settings import LlmProxySettings
from fabrik_optimizer.analytics.ingest import Costing
from fabrik_optimizer.analytics.rebuild import replay_into
from fabrik_optimizer.analytics.store import AnalyticsStore, PostgresLocation
from fabrik_optimizer.app import build as build_optimizer
from fabrik_optimizer.prices import PriceBook
from fabrik_optimizer.settings import OptimizerSettings

SECRET = b"optimizer-costs-test-secret-0123456789"
USER = [{"role": "user", "content": "say something"}]
R = TypeVar("R")


async def until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not await predicate() if asyncio.iscoroutinefunction(predicate) else not predicate():
        assert time.monotonic() < deadline, f"{what} not reached in time"
        await asyncio.sleep(0.05)


async def call(
    nc: NatsClient, subject: str, request: msgspec.Struct, response: type[R], timeout: float = 10
) -> R:
    reply = await nc.request(subject, rpc.encode(request), timeout=timeout)
    decoded = rpc.decode_response(reply.data, response)
    assert not isinstance(decoded, rpc.RpcError), decoded
    return decoded


async def call_error(nc: NatsClient, subject: str, body: bytes) -> rpc.RpcError:
    reply = await nc.request(subject, body, timeout=10)
    decoded = rpc.decode_response(reply.data, rpc.CostsResponse)
    assert isinstance(decoded, rpc.RpcError), decoded
    return decoded


def optimizer_settings(nats_url: str, db: Path, **extra: Any) -> OptimizerSettings:
    return OptimizerSettings(
        nats_url=nats_url,
        http_port=0,
        log_format="text",
        analytics_db=str(db),
        budget_eval_seconds=0.05,
        **extra,
    )


@contextlib.asynccontextmanager
async def connected(nats_url: str) -> AsyncIterator[tuple[Bus, NatsClient]]:
    bus = Bus(BusOptions(url=nats_url), BusMetrics(CollectorRegistry()))
    await bus.connect()
    await ensure_topology(bus.js)
    nc = await nats.connect(nats_url)
    try:
        yield bus, nc
    finally:
        await nc.close()
        await bus.close()


@contextlib.asynccontextmanager
async def llm_proxy(nats_url: str, tmp: Path) -> AsyncIterator[str]:
    # Echo calls are priced as "echo": 250,000 USD per million tokens, so every call costs a few dollars.
    prices = {"models": {"echo": [{"valid_from": "2020-01-01", "input": 250000.0, "output": 250000.0}]}}
    (tmp / "prices.json").write_text(json.dumps(prices))
    settings = LlmProxySettings(
        nats_url=nats_url,
        http_port=0,
        log_format="text",
        llm_reload_seconds=0.1,
        llm_flush_seconds=0.05,
        llm_prices_file=str(tmp / "prices.json"),
        run_key_secret=SECRET.decode(),
    )
    service = build_proxy(settings)
    async with running_service(service):
        yield f"http://127.0.0.1:{service.http.port}/v1"


def client(base_url: str, project: str) -> openai.AsyncOpenAI:
    key = issue_run_key(
        SECRET,
        run_id=new_ulid(),
        project=project,
        budget_usd=None,
        expires_at=datetime.now(UTC) + timedelta(hours=1),
    )
    return openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=30)


async def test_an_over_limit_project_is_refused_others_served_and_each_level_alerts_once(
    nats_url: str, tmp_path: Path
) -> None:
    async with connected(nats_url) as (bus, nc):
        crossed: list[BudgetLevelCrossed] = []
        alerts: list[AlertRaised] = []
        crossed_codec: EventCodec[BudgetLevelCrossed] = EventCodec(BudgetLevelCrossed)
        alert_codec: EventCodec[AlertRaised] = EventCodec(AlertRaised)

        async def on_crossed(msg: Any) -> None:
            crossed.append(crossed_codec.decode(msg.data))

        async def on_alert(msg: Any) -> None:
            alerts.append(alert_codec.decode(msg.data))

        await bus.js.subscribe(BudgetLevelCrossed.SUBJECT, cb=on_crossed, ordered_consumer=True)
        await bus.js.subscribe("fabrik.alerts.raised.*", cb=on_alert, ordered_consumer=True)

        db = tmp_path / "analytics.db"
        async with (
            running_service(build_optimizer(optimizer_settings(nats_url, db))) as optimizer,
            llm_proxy(nats_url, tmp_path) as base_url,
        ):
            # Invalid budgets come back naming the field and the rule.
            error = await call_error(nc, rpc.BUDGETS_PUT, b'{"scope": "project", "llm_usd_per_month": 1}')
            assert (error.status, error.field, error.rule) == (
                400,
                "project",
                "required when scope is project",
            )
            error = await call_error(nc, rpc.BUDGETS_PUT, b'{"scope": "project", "project": "Bad_Name"}')
            assert error.field == "project" and "regex" in error.rule
            error = await call_error(nc, rpc.BUDGETS_PUT, b'{"scope": "global", "warning": 1.5}')
            assert error.field == "warning"

            put = await call(
                nc,
                rpc.BUDGETS_PUT,
                rpc.BudgetsPutRequest(scope="project", project="capped", llm_usd_per_month=1.0, actor="test"),
                rpc.BudgetsPutResponse,
            )
            assert put.definition.llm_usd_per_month == 1.0 and put.status.llm.level == "ok"
            # Written where the llm-proxy reads it, in a form it reads.
            config = await bus.js.key_value("config")
            stored = json.loads((await config.get("budgets.project.capped")).value or b"null")
            assert stored["llm_usd_per_month"] == 1.0 and stored["warning"] == 0.8
            await asyncio.sleep(0.3)  # the proxy's watch

            capped, free = client(base_url, "capped"), client(base_url, "free")
            await capped.chat.completions.create(model="gpt-test", messages=USER)  # type: ignore[arg-type]
            await asyncio.sleep(0.3)  # the proxy's spend counter is flushed
            with pytest.raises(openai.APIStatusError) as refused:
                await capped.chat.completions.create(model="gpt-test", messages=USER)  # type: ignore[arg-type]
            assert refused.value.status_code == 402
            for _ in range(3):  # other projects are served
                await free.chat.completions.create(model="gpt-test", messages=USER)  # type: ignore[arg-type]

            # The optimizer saw the spend, crossed warning and limit, and announced each once.
            await until(lambda: len(crossed) >= 2 and len(alerts) >= 2, what="budget alerts")
            await asyncio.sleep(0.5)  # more evaluations, after more usage events
            await free.chat.completions.create(model="gpt-test", messages=USER)  # type: ignore[arg-type]
            await asyncio.sleep(0.5)
            assert sorted((e.project, e.level) for e in crossed) == [
                ("capped", "limit"),
                ("capped", "warning"),
            ]
            assert sorted(a.severity for a in alerts) == ["critical", "warning"]

            status = await call(
                nc, rpc.BUDGETS_GET, rpc.BudgetsGetRequest(project="capped"), rpc.BudgetsGetResponse
            )
            (capped_status,) = [s for s in status.budgets if s.project == "capped"]
            assert capped_status.blocked and capped_status.llm.level == "limit"
            usages = [u for u in optimizer.state.store.llm_calls() if u["project"] == "capped"]
            assert capped_status.llm.spent_usd == sum(Decimal(u["cost_nanos"]) for u in usages) / 10**9
            assert capped_status.llm.spent_usd > 1
            everyone = await call(nc, rpc.BUDGETS_GET, rpc.BudgetsGetRequest(), rpc.BudgetsGetResponse)
            assert [s.project for s in everyone.budgets] == ["capped"]

            # A raised limit lifts the block.
            await call(
                nc,
                rpc.BUDGETS_PUT,
                rpc.BudgetsPutRequest(scope="project", project="capped", llm_usd_per_month=1000.0),
                rpc.BudgetsPutResponse,
            )
            await asyncio.sleep(0.3)
            await capped.chat.completions.create(model="gpt-test", messages=USER)  # type: ignore[arg-type]
            # Lowered again: over the limit again in the same period, but already announced.
            await call(
                nc,
                rpc.BUDGETS_PUT,
                rpc.BudgetsPutRequest(scope="project", project="capped", llm_usd_per_month=1.0),
                rpc.BudgetsPutResponse,
            )
            await asyncio.sleep(0.5)
            assert len(crossed) == 2

        # A restarted optimizer (same store, same KV) announces nothing again.
        before = len(crossed)
        async with running_service(build_optimizer(optimizer_settings(nats_url, db))) as again:
            assert again.state.book.definitions["budgets.project.capped"].llm_usd_per_month == 1.0
            again.state.dirty.set()
            await asyncio.sleep(0.5)
            monitor = again.state.monitor
            assert monitor is not None and monitor.announced == []
        assert len(crossed) == before == 2


def priced_usage(
    table: PriceTable, when: datetime, tokens: tuple[int, int, int, int], run_id: str | None, project: str
) -> LlmUsage:
    cost = table.cost(
        ("m",),
        when,
        input_tokens=tokens[0],
        output_tokens=tokens[1],
        cache_read_tokens=tokens[2],
        cache_write_tokens=tokens[3],
    )
    return LlmUsage(
        call_id=new_ulid(),
        run_id=run_id,
        project=project,
        key_id="k",
        endpoint="messages",
        model="m",
        provider="anthropic",
        deployment="d",
        upstream_model="m",
        streamed=True,
        input_tokens=tokens[0],
        output_tokens=tokens[1],
        cache_read_tokens=tokens[2],
        cache_write_tokens=tokens[3],
        cost_usd=cost,
        latency_ms=10.0,
        outcome="ok",
        occurred_at=when,
    )


async def test_llm_costs_add_up_exactly_across_a_mid_month_price_change(
    nats_url: str, tmp_path: Path
) -> None:
    # The llm-proxy's own price table (the component that prices calls): USD per million tokens,
    # input / output / cache read / cache write; cheaper from 16 March 2026 (UTC midnight).
    table = PriceTable(
        {
            "m": (
                PriceEntry(
                    valid_from=datetime(2026, 3, 1).date(),
                    input=3.0,
                    output=15.0,
                    cache_read=0.3,
                    cache_write=3.75,
                ),
                PriceEntry(
                    valid_from=datetime(2026, 3, 16).date(),
                    input=1.5,
                    output=7.5,
                    cache_read=0.15,
                    cache_write=1.875,
                ),
            )
        }
    )
    before = datetime(2026, 3, 15, 23, 59, 59, 999999, tzinfo=UTC)
    after = datetime(2026, 3, 16, tzinfo=UTC)
    events = [
        # 10,000 * 3 + 2,000 * 15 + 50,000 * 0.3 + 4,000 * 3.75 = 90,000 µ$ → $0.09
        priced_usage(table, before, (10_000, 2_000, 50_000, 4_000), None, "alpha"),
        # 10,000 * 1.5 + 2,000 * 7.5 + 50,000 * 0.15 + 4,000 * 1.875 = 45,000 µ$ → $0.045
        priced_usage(table, after, (10_000, 2_000, 50_000, 4_000), None, "alpha"),
        # 1 * 1.5 + 1 * 7.5 + 3 * 0.15 + 0 = 9.45 µ$ → $0.00000945
        priced_usage(table, after, (1, 1, 3, 0), None, "beta"),
        # 333 * 3 + 0 + 0 + 0 = 999 µ$ → $0.000999 (0.1 + 0.2-style float sums do not matter)
        priced_usage(table, before - timedelta(days=3), (333, 0, 0, 0), None, "beta"),
    ]
    async with (
        connected(nats_url) as (bus, nc),
        running_service(build_optimizer(optimizer_settings(nats_url, tmp_path / "a.db"))) as optimizer,
    ):
        for event in events:
            await bus.publish(event)
        await bus.publish(msgspec.structs.replace(events[0], event_id=new_ulid()))  # redelivered
        await until(lambda: len(optimizer.state.store.llm_calls()) == 4, what="usage ingested")
        await asyncio.sleep(0.2)

        by_day = await call(nc, rpc.COSTS, rpc.CostsRequest(group_by="day"), rpc.CostsResponse)
        assert {r.group: r.llm_cost_usd for r in by_day.rows} == {
            "2026-03-12": Decimal("0.000999"),
            "2026-03-15": Decimal("0.09"),
            "2026-03-16": Decimal("0.045") + Decimal("0.00000945"),
        }
        assert by_day.totals.llm_cost_usd == Decimal("0.13600845")
        assert by_day.totals.total_cost_usd == Decimal("0.13600845")

        by_project = await call(nc, rpc.COSTS, rpc.CostsRequest(group_by="project"), rpc.CostsResponse)
        rows = {r.group: r for r in by_project.rows}
        assert rows["alpha"].llm_cost_usd == Decimal("0.135") and rows["alpha"].calls == 2
        assert rows["alpha"].cache_read_tokens == 100_000 and rows["alpha"].cache_write_tokens == 8_000
        assert rows["beta"].llm_cost_usd == Decimal("0.00100845")

        # The month split at the change: [1 March, 16 March) and [16 March, 1 April).
        first = await call(
            nc,
            rpc.COSTS,
            rpc.CostsRequest(group_by="model", from_=datetime(2026, 3, 1, tzinfo=UTC), to=after),
            rpc.CostsResponse,
        )
        assert first.totals.llm_cost_usd == Decimal("0.090999")
        assert first.rows[0].compute_cost_usd is None  # not attributable to a model

        error = await call_error(nc, rpc.COSTS, b'{"group_by": "colour"}')
        assert error.field == "group_by" and error.status == 400
        error = await call_error(
            nc, rpc.COSTS, b'{"from": "2026-03-02T00:00:00Z", "to": "2026-03-01T00:00:00Z"}'
        )
        assert error.field == "to"


def run_history(
    project: str, spec: str, rid: str, *, start: datetime, attempts: int, outcome: str
) -> list[Any]:
    params = RunParameters(
        spec={"id": spec},
        resources=Resources(cpu_request="1", memory_request="2Gi", cpu_limit="2", memory_limit="4Gi"),
    )
    events: list[Any] = [
        RunRequested(
            run_id=rid, project=project, env="dev", params=params, requested_by="u", occurred_at=start
        )
    ]
    t, revision = start, 0
    for n in range(1, attempts + 1):
        final = n == attempts
        to = outcome if final else "failed"
        started, ended = t + timedelta(seconds=10), t + timedelta(seconds=600)
        revision += 3
        events += [
            RunStateChanged(
                run_id=rid,
                project=project,
                attempt=n,
                from_state=None,
                to_state="queued",
                revision=revision - 2,
                occurred_at=t,
            ),
            RunDispatched(
                run_id=rid,
                project=project,
                env="dev",
                attempt=n,
                params=params,
                deadline=ended,
                occurred_at=started,
            ),
            RunStarted(run_id=rid, attempt=n, backend="kubernetes", workload_ref="job", occurred_at=started),
            RunStateChanged(
                run_id=rid,
                project=project,
                attempt=n,
                from_state="starting",
                to_state="running",
                revision=revision - 1,
                occurred_at=started,
            ),
            RunFinished(
                run_id=rid,
                attempt=n,
                outcome=to,
                reason=None if to == "succeeded" else "oom_killed",
                peak_memory_bytes=3 * 2**30,
                occurred_at=ended,
            ),  # type: ignore[arg-type]
            RunStateChanged(
                run_id=rid,
                project=project,
                attempt=n,
                from_state="running",
                to_state=to,
                revision=revision,
                reason=None if to == "succeeded" else "oom_killed",
                occurred_at=ended,
            ),  # type: ignore[arg-type]
        ]
        t = ended + timedelta(seconds=30)
    return events


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_rebuild_from_the_streams_equals_the_incrementally_built_store(
    nats_url: str, tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    # SQLite: a fresh file swapped in; PostgreSQL (a real server, pgserver): a fresh schema
    # swapped in with renames. The same assertions on both.
    url: str | None = request.getfixturevalue("postgres_url") if backend == "postgres" else None
    base = datetime(2026, 3, 2, 9, tzinfo=UTC)
    history: list[Any] = []
    for i in range(30):
        rid = new_ulid()
        history += run_history(
            f"p{i % 3}",
            f"s{i % 4}",
            rid,
            start=base + timedelta(minutes=i),
            attempts=1 + i % 3,
            outcome="succeeded" if i % 4 else "failed",
        )
        history.append(
            priced_usage(
                PriceTable({"m": (PriceEntry(valid_from=base.date(), input=1, output=2),)}),
                base,
                (100 * i, 10, 0, 0),
                rid,
                f"p{i % 3}",
            )
        )
    history.append(priced_usage(PriceTable(), base, (5, 5, 0, 0), None, "p0"))  # a call without a run
    store_settings: dict[str, Any] = {"analytics_database_url": url} if url else {}
    settings = optimizer_settings(nats_url, tmp_path / "live.db", cost_node_type="cx32", **store_settings)
    async with connected(nats_url) as (bus, nc), running_service(build_optimizer(settings)) as optimizer:
        for event in history:
            await bus.publish(event)
        # Some events redelivered (new message ids), one out of order.
        for event in (history[5], history[3], history[-2]):
            await bus.publish(msgspec.structs.replace(event, event_id=new_ulid()))
        total = sum(isinstance(e, LlmUsage) for e in history)
        await until(
            lambda: (
                len(optimizer.state.store.llm_calls()) == total
                and sum(r["state"] in ("succeeded", "failed") for r in optimizer.state.store.runs()) == 30
            ),
            what="history ingested",
        )
        await asyncio.sleep(0.3)
        incremental = (optimizer.state.store.runs(), optimizer.state.store.llm_calls())
        assert all(r["compute_cost_nanos"] for r in incremental[0])
        costs_before = await call(nc, rpc.COSTS, rpc.CostsRequest(group_by="spec"), rpc.CostsResponse)

        rebuilt = await call(
            nc, rpc.REBUILD, rpc.RebuildRequest(actor="test"), rpc.RebuildResponse, timeout=60
        )
        assert (rebuilt.runs, rebuilt.llm_calls) == (30, total)
        assert rebuilt.usage_events == total + 1  # the redelivered one is folded again
        assert (optimizer.state.store.runs(), optimizer.state.store.llm_calls()) == incremental
        costs_after = await call(nc, rpc.COSTS, rpc.CostsRequest(group_by="spec"), rpc.CostsResponse)
        assert costs_after == costs_before

        # The live store goes on after the swap.
        late = new_ulid()
        for event in run_history(
            "p9", "s9", late, start=base + timedelta(hours=5), attempts=1, outcome="succeeded"
        ):
            await bus.publish(event)
        await until(
            lambda: (optimizer.state.store.get_run(late) or {}).get("state") == "succeeded",
            what="live after swap",
        )

        # An independent replay into a fresh store gives the same rows.
        fresh = AnalyticsStore(PostgresLocation(url, schema="fresh") if url else tmp_path / "fresh.db")
        try:
            costing = Costing(
                prices=PriceBook.load(settings.node_prices_path(), settings.currency_rates),
                node_type="cx32",
                workspace_bytes=settings.workspace_bytes(),
                retention_hours=settings.retention_hours(),
            )
            await replay_into(bus.js, fresh, costing)
            assert (fresh.runs(), fresh.llm_calls()) == (
                optimizer.state.store.runs(),
                optimizer.state.store.llm_calls(),
            )
        finally:
            fresh.close()

        found = await call(nc, rpc.INSIGHTS, rpc.InsightsRequest(min_runs=5), rpc.InsightsResponse)
        assert found.runs == 31 and found.retried_runs == 20
        assert found.most_retried[0].attempts == 3
        assert {r.group for r in found.success_rate["spec"]} == {"s0", "s1", "s2", "s3"}
        assert found.oom and found.oom[0].suggested_limit_bytes == 3840 * 2**20  # 3 GiB * 1.25
