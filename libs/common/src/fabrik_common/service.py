"""A Fabrik service: settings, a bus, typed subscribers, an HTTP app, and a clean shutdown."""

from __future__ import annotations

import asyncio
import faulthandler
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar, cast

from litestar.types import ControllerRouterHandler
from prometheus_client import CollectorRegistry, Gauge

from fabrik_common.aio import cancel_all
from fabrik_common.bus import Bus, BusOptions, ConsumerGroup, Router
from fabrik_common.http import HealthProbe, HttpServer, build_http_app
from fabrik_common.lease import LeaderLease
from fabrik_common.log import configure_logging
from fabrik_common.metrics import BusMetrics
from fabrik_common.settings import CommonSettings, SettingsError, load_settings
from fabrik_common.topology import TopologyLimits, ensure_topology

log = logging.getLogger(__name__)
SHUTDOWN_DEADLINE_EXIT_CODE = 70  # EX_SOFTWARE: the shutdown, not the work, failed

StateT = TypeVar("StateT")
SettingsT = TypeVar("SettingsT", bound=CommonSettings)


class Service(Generic[StateT]):
    """Starts in order (connect, topology, state, consumers, HTTP) and stops in reverse.

    `on_start(service)` builds the service's state (domain objects, KV handles) once the bus is
    connected; handlers receive it as `ctx.state`. `on_stop(state)` releases it.
    """

    def __init__(
        self,
        name: str,
        settings: CommonSettings,
        *,
        routers: Sequence[Router] = (),
        on_start: Callable[[Service[StateT]], Awaitable[StateT]] | None = None,
        on_stop: Callable[[StateT], Awaitable[None]] | None = None,
        route_handlers: Sequence[ControllerRouterHandler] = (),
        http_app_kwargs: dict[str, Any] | None = None,
        topology: TopologyLimits | None = None,
        background: Sequence[Callable[[StateT], Awaitable[None]]] = (),
        leader_lease: str | None = None,
        on_elected: Callable[[StateT], Awaitable[None]] | None = None,
        lease_ttl: float = 6.0,
    ) -> None:
        self.name = name
        self.settings = settings
        self.instance_id = settings.instance_id or f"{socket.gethostname()}-{os.getpid()}"
        self.registry = CollectorRegistry()
        self.metrics = BusMetrics(self.registry)
        self.bus = Bus(
            BusOptions(
                url=settings.nats_url,
                name=f"{name}:{self.instance_id}",
                connect_timeout=settings.nats_connect_timeout,
                max_reconnect_wait=settings.nats_max_reconnect_wait,
            ),
            self.metrics,
        )
        self.routers = list(routers)
        self._on_start = on_start
        self._on_stop = on_stop
        self._background_factories = list(background)
        self._background: list[asyncio.Task[None]] = []
        self.topology = topology or TopologyLimits(
            replicas=settings.stream_replicas,
            logs_max_age_seconds=settings.logs_max_age_seconds,
            logs_max_bytes=settings.logs_max_bytes,
            dedupe_window_seconds=settings.dedupe_window_seconds,
        )
        self.probe = HealthProbe(name)
        self.probe.add_check("nats", lambda: self.bus.connected)
        self._started = False
        self.probe.add_check("started", lambda: self._started)
        self.http_app = build_http_app(self.probe, self.registry, route_handlers, **(http_app_kwargs or {}))
        self.http = HttpServer(self.http_app, settings.http_host, settings.http_port)
        self._consumers: ConsumerGroup[StateT] | None = None
        self._state: StateT | None = None
        self._stop_requested = asyncio.Event()
        self.leader_lease_name = leader_lease
        self.lease_ttl = lease_ttl
        self._on_elected = on_elected
        self.lease: LeaderLease | None = None
        self._campaign: asyncio.Task[None] | None = None
        self._leader_gauge = Gauge(
            "fabrik_leader", "1 while this replica is the leader (or needs no leader)", registry=self.registry
        )

    @property
    def state(self) -> StateT:
        if self._state is None:
            raise RuntimeError(f"{self.name} has not started")
        return self._state

    async def start(self) -> None:
        await self.http.start()
        try:
            await self._start_after_http()
        except BaseException:
            # A failed start must not leave a half-started service (port bound, connection open).
            await self.bus.close()
            await self.http.stop()
            raise
        self._started = True
        log.info("service started", extra={"http_port": self.http.port, "instance": self.instance_id})

    async def _start_after_http(self) -> None:
        await self.bus.connect()
        await ensure_topology(self.bus.js, self.topology)
        if self._on_start is not None:
            self._state = await self._on_start(self)
        if self.leader_lease_name is None:
            await self._start_work()
            self._leader_gauge.set(1)
        else:
            kv = await self.bus.js.key_value("leases")
            self.lease = LeaderLease(
                kv,
                self.leader_lease_name,
                self.instance_id,
                ttl=self.lease_ttl,
                renew_interval=self.lease_ttl / 4,
            )
            self._campaign = asyncio.create_task(
                self.lease.run(self._elected, self._deposed, self._stop_requested), name="lease"
            )

    @property
    def is_leader(self) -> bool:
        return self.lease is None or self.lease.is_leader

    async def _elected(self) -> None:
        if self._on_elected is not None:
            await self._on_elected(self.state)
        await self._start_work()
        self._leader_gauge.set(1)

    async def _deposed(self) -> None:
        self._leader_gauge.set(0)
        await self._stop_work()

    async def _start_work(self) -> None:
        """Consumers and background tasks: everything a (leading) replica does."""
        subscribers = [s for router in self.routers for s in router.subscribers]
        # A service without on_start has no state; its handlers are typed Context[None].
        self._consumers = ConsumerGroup(self.bus, subscribers, cast(StateT, self._state))
        await self._consumers.start()
        self._background = [asyncio.create_task(self._supervise(f)) for f in self._background_factories]

    async def _stop_work(self) -> None:
        if self._consumers is not None:
            await self._consumers.stop(self.settings.shutdown_grace_seconds)
            self._consumers = None
        background, self._background = self._background, []
        await cancel_all(background)

    async def _supervise(self, factory: Callable[[StateT], Awaitable[None]]) -> None:
        name = getattr(factory, "__qualname__", repr(factory))
        while not self._stop_requested.is_set():
            try:
                await factory(cast(StateT, self._state))
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("background task crashed; restarting in 1 s", extra={"task": name})
                await asyncio.sleep(1.0)

    async def stop(self) -> None:
        self._started = False
        self._stop_requested.set()
        if self._campaign is not None:
            # The campaign stops the work when it steps down, then releases the lease.
            await self._campaign
            self._campaign = None
        else:
            await self._stop_work()
        if self._on_stop is not None and self._state is not None:
            await self._on_stop(self._state)
        await self.bus.close()
        await self.http.stop()
        log.info("service stopped")

    def request_stop(self) -> None:
        self._stop_requested.set()

    async def run(self, *, deadline: bool = False) -> None:
        """Start, serve until SIGTERM or SIGINT, then stop cleanly. With `deadline` (a service's own
        process), the process exits within `shutdown_deadline_seconds` of the stop even when
        something in the shutdown hangs."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        try:
            await self.start()
            await self._stop_requested.wait()
        finally:
            if deadline:
                exit_by_deadline(self.name, self.settings.shutdown_deadline_seconds)
            await self.stop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)


def run_service(settings_cls: type[SettingsT], build: Callable[[SettingsT], Service[Any]], name: str) -> None:
    """The `main()` of every service: settings from the environment, JSON logs, run until signalled."""
    try:
        settings = load_settings(settings_cls)
    except SettingsError as exc:
        print(f"fabrik-{name}: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    configure_logging(name, settings.log_level, settings.log_format)
    asyncio.run(build(settings).run(deadline=True))


def exit_by_deadline(name: str, seconds: float) -> threading.Timer:
    """End the process `seconds` from now unless it has exited by then: a shutdown that hangs (a
    task that swallows its cancellation, a thread that never returns) must not leave a service
    that neither serves nor goes away. The stacks of every thread go to stderr first, to find it.
    A daemon thread: it never keeps the process alive itself."""

    def expire() -> None:
        log.error("shutdown did not finish in time; exiting", extra={"service": name, "seconds": seconds})
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        os._exit(SHUTDOWN_DEADLINE_EXIT_CODE)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
    return timer
