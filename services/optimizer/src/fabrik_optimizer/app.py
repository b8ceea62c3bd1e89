"""Wiring and start-up of the optimizer service."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import UTC, datetime

import nats.errors
import psycopg
from nats.js.kv import KeyValue

from fabrik_common.aio import cancel_all
from fabrik_common.clock import SYSTEM_CLOCK, Clock
from fabrik_common.service import Service, run_service
from fabrik_optimizer.analytics import queries
from fabrik_optimizer.analytics.ingest import Costing
from fabrik_optimizer.analytics.rebuild import Rebuilder
from fabrik_optimizer.analytics.store import AnalyticsStore
from fabrik_optimizer.budgets import WATCH_KEYS, BudgetBook, BudgetMonitor, month_bounds
from fabrik_optimizer.experiments.candidates import CandidatePolicy, CandidateService, auto_loop
from fabrik_optimizer.experiments.service import BusinessHours, Experiments, Limits, evaluation_loop
from fabrik_optimizer.experiments.spec_pr import SpecPullRequests
from fabrik_optimizer.handlers import router
from fabrik_optimizer.prices import HcloudPrices, PriceBook
from fabrik_optimizer.rpc import RpcServer
from fabrik_optimizer.settings import OptimizerSettings
from fabrik_optimizer.state import OptimizerState

NAME = "optimizer"
# Budgets are evaluated at least this often even without new events (a new month starts).
BUDGET_IDLE_SECONDS = 60.0
HCLOUD_RETRY_SECONDS = 3600.0

log = logging.getLogger(__name__)


async def load_budgets(kv: KeyValue, book: BudgetBook, wait: float = 5.0, settle: float = 0.25) -> None:
    """Read every budget definition now (a watch's initial values; `kv.keys` filters by substring).

    nats-py's "initial values done" marker can come before values still on their way, so the load
    ends with the value that says nothing is pending after it; a bare marker is believed only when
    no value follows it within `settle` seconds (no budget at all)."""
    watcher = await kv.watch(WATCH_KEYS)
    marker_seen = False
    try:
        while True:
            try:
                entry = await watcher.updates(timeout=settle if marker_seen else wait)  # type: ignore[no-untyped-call]
            except nats.errors.TimeoutError:
                if marker_seen:
                    return
                raise
            if entry is None:
                marker_seen = True
                continue
            deleted = entry.operation in ("DEL", "PURGE")
            book.observe(entry.key, None if deleted else entry.value)
            if entry.delta == 0:
                return
    finally:
        with contextlib.suppress(Exception):
            await watcher.stop()  # type: ignore[no-untyped-call]


async def follow_budgets(kv: KeyValue, book: BudgetBook) -> None:
    """Keep the budget definitions current (a put through another replica, or by hand)."""
    watcher = await kv.watch(WATCH_KEYS)
    try:
        async for entry in watcher:
            if entry is None:
                continue
            deleted = entry.operation in ("DEL", "PURGE")
            book.observe(entry.key, None if deleted else entry.value)
    finally:
        with contextlib.suppress(Exception):
            await watcher.stop()  # type: ignore[no-untyped-call]


async def evaluate_budgets(state: OptimizerState, interval: float) -> None:
    """After new events (at most every `interval` s) and at least every minute: announce crossings."""
    monitor = state.monitor
    assert monitor is not None
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(state.dirty.wait(), BUDGET_IDLE_SECONDS)
        state.dirty.clear()
        if monitor.book.definitions:
            now = monitor.clock()
            start, end = month_bounds(f"{now.year:04d}-{now.month:02d}")
            spend = queries.spend(state.store, start, end)
            try:
                await monitor.evaluate(spend, now)
            except (nats.errors.Error, TimeoutError) as exc:
                log.warning("budget evaluation failed; retried", extra={"error": repr(exc)})
                state.dirty.set()
        await asyncio.sleep(interval)


async def refresh_hcloud(source: HcloudPrices, prices: PriceBook, settings: OptimizerSettings) -> None:
    """Fetch Hetzner Cloud prices now and again after the cache time (an hour after a failure)."""
    while True:
        delay = settings.hcloud_cache_seconds
        try:
            fetched = await asyncio.to_thread(source.fetch)
            changed = prices.merge_hcloud(fetched, settings.hcloud_currency, datetime.now(UTC))
            log.info(
                "node prices fetched from Hetzner Cloud",
                extra={"node_types": len(fetched), "changed": changed, "location": source.location},
            )
        except Exception as exc:  # noqa: BLE001 - any failure of the API or the library: keep the old prices
            log.warning(
                "fetching Hetzner Cloud prices failed; keeping the known prices", extra={"error": repr(exc)}
            )
            delay = min(delay, HCLOUD_RETRY_SECONDS)
        await asyncio.sleep(delay)


def build_costing(settings: OptimizerSettings) -> Costing:
    prices = PriceBook.load(settings.node_prices_path(), settings.currency_rates)
    return Costing(
        prices=prices,
        node_type=settings.cost_node_type,
        local_node_type=settings.cost_local_node_type,
        workspace_bytes=settings.workspace_bytes(),
        retention_hours=settings.retention_hours(),
    )


def build(settings: OptimizerSettings, *, clock: Clock | None = None) -> Service[OptimizerState]:
    """`clock` drives the experiments' evaluation (max duration, business hours, timestamps); tests
    pass a manual one. The system clock by default."""
    hours = BusinessHours.parse(settings.business_hours, settings.business_days, settings.business_timezone)
    spec_repository = settings.spec_pull_requests()
    costing = build_costing(settings)
    token = settings.hcloud_api_token()
    hcloud = (
        HcloudPrices(
            token,
            endpoint=settings.hcloud_api_endpoint,
            location=settings.hcloud_location,
            gross=settings.hcloud_gross,
        )
        if token
        else None
    )
    rpc_server: list[RpcServer] = []

    async def on_start(service: Service[OptimizerState]) -> OptimizerState:
        postgres = settings.analytics_postgres()
        try:
            store = AnalyticsStore(postgres if postgres is not None else settings.analytics_db_path())
        except psycopg.OperationalError as exc:
            assert postgres is not None
            raise RuntimeError(
                f"the analytics store on PostgreSQL ({postgres.describe()}, FABRIK_ANALYTICS_DATABASE_URL) "
                f"cannot be opened: {exc}"
            ) from exc
        log.info(
            "analytics store open",
            extra={
                "backend": "postgresql" if postgres else "sqlite",
                "path": store.path,
                "reset": store.reset,
            },
        )
        if dropped := store.drop_leftovers():
            log.warning("dropped the schemas of unfinished rebuilds", extra={"schemas": dropped})
        js = service.bus.js
        config_kv = await js.key_value("config")
        limits_kv = await js.key_value("limits")
        state = OptimizerState(store, costing)
        await load_budgets(config_kv, state.book)
        state.monitor = BudgetMonitor(state.book, limits_kv, service.bus.publish)
        rebuilder = Rebuilder(js, lambda: state.store, state.set_store, state.write_lock, costing)
        experiments = Experiments(
            config_kv,
            service.bus.publish,
            lambda: state.store,
            clock or SYSTEM_CLOCK,
            Limits(max_active=settings.max_active_experiments, hours=hours),
        )
        if spec_repository is not None:
            experiments.propose_change = SpecPullRequests(spec_repository).propose
        candidates = CandidateService(
            experiments,
            lambda: state.store,
            CandidatePolicy(
                min_runs=settings.candidate_min_runs,
                oom_rate=settings.candidate_oom_rate,
                headroom=settings.candidate_memory_headroom,
            ),
            auto=settings.optimizer_auto,
        )
        server = RpcServer(
            service.bus.nc,
            state,
            config_kv,
            rebuilder,
            timeout=settings.rpc_timeout_seconds,
            experiments=experiments,
            js=js,
            candidates=candidates,
        )
        state.tasks.append(
            asyncio.create_task(evaluation_loop(experiments, settings.experiment_eval_seconds))
        )
        if settings.optimizer_auto:
            state.tasks.append(asyncio.create_task(auto_loop(candidates, settings.candidate_eval_seconds)))
        await server.start()
        rpc_server.append(server)
        if hcloud is not None:
            state.tasks.append(asyncio.create_task(refresh_hcloud(hcloud, costing.prices, settings)))
        state.tasks.append(asyncio.create_task(follow_budgets(config_kv, state.book)))
        if store.reset:
            log.warning("analytics store had another schema; rebuilding it from the streams")

            async def rebuild_at_start() -> None:
                started = time.monotonic()
                await rebuilder.rebuild()
                log.info("start-up rebuild done", extra={"seconds": round(time.monotonic() - started, 1)})

            state.tasks.append(asyncio.create_task(rebuild_at_start()))
        return state

    async def on_stop(state: OptimizerState) -> None:
        for server in rpc_server:
            await server.stop()
        # Repeated cancels (cancel_all): a single one can be swallowed inside nats-py.
        await cancel_all(state.tasks)
        state.store.close()

    async def budgets(state: OptimizerState) -> None:
        await evaluate_budgets(state, settings.budget_eval_seconds)

    return Service(NAME, settings, routers=[router], on_start=on_start, on_stop=on_stop, background=[budgets])


def main() -> None:
    run_service(OptimizerSettings, build, NAME)
