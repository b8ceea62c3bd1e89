"""The gateway's edge: authenticated `GET /api/v1/runs` at 100,000 runs, and live-stream fan-out.

    uv run python bench/gateway.py [--stored 100000] [--requests 2000] [--subscribers 1000] [--parts 1,2]

Starts its own nats-server (temporary store, free ports, loopback only) and the real gateway as its
own process (`python -m fabrik_gateway`, HS256 JWTs, anonymous access off), and stops both and
deletes the store at the end, also on an error, Ctrl-C or SIGTERM. Figures are printed, never
asserted; a non-zero exit means the benchmark itself broke (a lost message, a refused request).

1. `--stored` `RunRecord` values are written into the `runs` KV bucket (as the scheduler writes
   them, directly with `publish_async` for speed) *before* the gateway starts, so that the gateway
   loads them through its real path (the KV watcher). Then `GET /api/v1/runs?limit=50` with a
   bearer JWT, `--requests` times sequentially and at `--concurrency` (aiohttp): p50, p99,
   requests/s and the gateway's CPU per request. Baselines from the same gateway: `GET /healthz`
   (the HTTP stack, no authentication) and `GET /api/v1/runs/{id}` (authentication and routing
   around a single dictionary read). Aim: list p99 < 20 ms.
2. `--subscribers` WebSocket subscribers of `/api/v1/stream` (each authenticated with its own
   `access_token`), then `--events` events published one at a time; the delivery latency is from
   just before the publish to the moment the subscriber's socket delivers the message to this
   process (a minimal sans-I/O WebSocket client per connection, timestamped on arrival, so that
   the client's own cost stays small). Baselines in the same run: a bare NATS subscriber in this
   process (what the bus alone costs) and a single WebSocket subscriber. Aim: fan-out p99 < 200 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import msgspec
import nats
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext, api
from ulid import ULID
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.uri import parse_uri

from fabrik_common.bus import EVENT_TYPE, MSG_ID
from fabrik_common.codec import encode
from fabrik_common.events import RunParameters, RunProgress, Workload
from fabrik_common.natsserver import NatsServer, free_port
from fabrik_common.runs import TEMPLATES, AttemptRecord, RunRecord
from fabrik_common.testing import ServiceProcess
from fabrik_common.topology import ensure_topology
from fabrik_gateway.auth.jwt import mint_hs256

SECRET = "bench-" + "s" * 32
READY_TIMEOUT = 180.0
STATES = ("succeeded",) * 17 + ("failed", "cancelled", "queued")
LIST_AIM_P99 = 0.020
FANOUT_AIM_P99 = 0.200
DELIVERY_TIMEOUT = 30.0


# ------------------------------------------------------------------------------------------ output


def pct(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:,.2f} ms"


def table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "-" * (sum(widths) + 2 * (len(widths) - 1))
    print()
    print(title)
    print(line)
    for n, row in enumerate([header, *rows]):
        cells = [f"{c:<{widths[0]}}" if i == 0 else f"{c:>{widths[i]}}" for i, c in enumerate(row)]
        print("  ".join(cells))
        if n == 0:
            print(line)
    print(line, flush=True)


def progress(text: str) -> None:
    print(f"  .. {text}", flush=True)


def aim(value: float, limit: float) -> str:
    return f"{'met' if value < limit else 'NOT met'} (p99 < {limit * 1000:.0f} ms)"


def cpu_seconds(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


# ------------------------------------------------------------------------------------------ stack


@dataclass
class Stack:
    root: Path
    nats: NatsServer = field(init=False)
    gateway: ServiceProcess | None = None

    def __post_init__(self) -> None:
        self.nats = NatsServer(self.root / "nats", port=free_port(), monitor_port=free_port())

    async def start_gateway(self) -> ServiceProcess:
        env = {
            "FABRIK_NATS_URL": self.nats.url,
            "FABRIK_DATA_DIR": str(self.root / "data"),
            "FABRIK_LOG_FORMAT": "json",
            "FABRIK_INSTANCE_ID": "bench-gateway",
            "FABRIK_JWT_HS256_SECRET": SECRET,
            "FABRIK_ANONYMOUS_ROLE": "none",
            # One client makes every request here: the per-caller rate limit is not what is measured.
            "FABRIK_RATE_LIMIT_PER_MINUTE": "100000000",
            "FABRIK_RATE_LIMIT_BURST": "1000000",
        }
        self.gateway = ServiceProcess("fabrik_gateway", env, log_path=self.root / "gateway.log")
        self.gateway.start_process()
        deadline = time.monotonic() + READY_TIMEOUT
        async with httpx.AsyncClient(timeout=2) as client:
            while time.monotonic() < deadline:
                proc = self.gateway.proc
                if proc is not None and proc.poll() is not None:
                    raise RuntimeError(
                        f"the gateway exited with {proc.returncode} (log: {self.gateway.log_path})"
                    )
                try:
                    if (await client.get(f"{self.gateway.base_url}/readyz")).status_code == 200:
                        return self.gateway
                except httpx.HTTPError:
                    pass
                await asyncio.sleep(0.05)
        raise RuntimeError(f"the gateway was not ready within {READY_TIMEOUT:.0f} s")

    def close(self) -> None:
        try:
            proc = self.gateway.proc if self.gateway is not None else None
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        finally:
            self.nats.stop()


def stored_records(n: int, projects: int, ids: list[str]) -> Iterator[tuple[str, bytes]]:
    """`n` run records a scheduler could have written, oldest first; their ids go to `ids`."""
    base = datetime.now(UTC) - timedelta(milliseconds=10 * n)
    params = RunParameters(workload=Workload(command=("true",)), resources=TEMPLATES["default"])
    for i in range(n):
        created = base + timedelta(milliseconds=10 * i)
        run_id = str(ULID.from_datetime(created))
        state = STATES[i % len(STATES)]
        done = state != "queued"
        started = created + timedelta(seconds=2) if done else None
        finished = created + timedelta(seconds=30) if done else None
        record = RunRecord(
            run_id=run_id,
            project=f"proj-{i % projects:02d}",
            env="dev",
            params=msgspec.structs.replace(params, labels={"team": f"team-{i % 5}"}),
            state=state,  # type: ignore[arg-type]
            reason=None if state in ("succeeded", "queued") else "workload_error",
            attempts=[
                AttemptRecord(attempt=1, dispatched_at=started, started_at=started, finished_at=finished)
            ],
            requested_by="bench",
            created_at=created,
            queued_at=created,
            started_at=started,
            finished_at=finished,
            state_entered_at=finished or created,
            exit_code=(0 if state == "succeeded" else 1) if done else None,
        )
        ids.append(run_id)
        yield f"$KV.runs.{run_id}", msgspec.json.encode(record)


async def publish_all(js: JetStreamContext, messages: Iterator[tuple[str, bytes]]) -> None:
    futures: list[asyncio.Future[api.PubAck]] = []
    for subject, payload in messages:
        futures.append(await js.publish_async(subject, payload))
        if len(futures) >= 2000:
            await asyncio.gather(*futures)
            futures.clear()
    await asyncio.gather(*futures)


# ------------------------------------------------------------------------------------------ part 1


@dataclass
class Timing:
    latencies: list[float]
    seconds: float
    gateway_cpu: float | None
    client_cpu: float


async def time_gets(
    base_url: str, path: str, headers: dict[str, str], n: int, concurrency: int, pid: int | None
) -> Timing:
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(
        base_url, connector=connector, headers=headers, timeout=aiohttp.ClientTimeout(30)
    ) as client:

        async def one() -> float:
            started = time.perf_counter()
            async with client.get(path) as response:
                await response.read()
            elapsed = time.perf_counter() - started
            if response.status != 200:
                raise RuntimeError(f"GET {path} answered {response.status}")
            return elapsed

        for _ in range(50):  # warm-up, unreported
            await one()
        latencies: list[float] = []

        async def worker(count: int) -> None:
            for _ in range(count):
                latencies.append(await one())

        gateway_before, client_before = cpu_seconds(pid), time.process_time()
        started = time.perf_counter()
        await asyncio.gather(*(worker(n // concurrency + (i < n % concurrency)) for i in range(concurrency)))
        seconds = time.perf_counter() - started
        gateway_after, client_after = cpu_seconds(pid), time.process_time()
    gateway_cpu = (
        (gateway_after - gateway_before) / n
        if gateway_before is not None and gateway_after is not None
        else None
    )
    return Timing(latencies, seconds, gateway_cpu, (client_after - client_before) / n)


async def part_list(stack: Stack, n: int, projects: int, requests: int, concurrency: int) -> ServiceProcess:
    print(f"\n== part 1: authenticated GET /api/v1/runs?limit=50 with {n:,} runs stored")
    nc = await nats.connect(stack.nats.url, name="bench-writer")
    ids: list[str] = []
    try:
        js = nc.jetstream()
        await ensure_topology(js)
        progress(
            f"writing {n:,} RunRecord values into the runs KV bucket (the scheduler's job, done directly)"
        )
        started = time.perf_counter()
        await publish_all(js, stored_records(n, projects, ids))
        write_seconds = time.perf_counter() - started
        stored = (await js.stream_info("KV_runs")).state.messages
        if stored != n:
            raise RuntimeError(f"the runs bucket holds {stored} records, expected {n}")
    finally:
        await nc.close()

    progress("starting the gateway on the full bucket (it loads the records through its KV watcher)")
    started = time.perf_counter()
    gateway = await stack.start_gateway()
    ready_seconds = time.perf_counter() - started
    token = mint_hs256(SECRET, "bench", "viewer")
    auth = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=gateway.base_url, headers=auth, timeout=10) as client:
        total = sum(p["total"] for p in (await client.get("/api/v1/projects")).json()["items"])
        if total != n:
            raise RuntimeError(f"the gateway's read model lists {total} runs, expected {n}")
        page = (await client.get("/api/v1/runs?limit=50")).json()
        if len(page["items"]) != 50 or page["items"][0]["run_id"] != ids[-1]:
            raise RuntimeError("GET /api/v1/runs?limit=50 did not answer the newest 50 runs")
        if (
            await client.get("/api/v1/runs?limit=50", headers={"Authorization": "Bearer nope"})
        ).status_code != 401:
            raise RuntimeError("a bad bearer token was not refused")

    pid = gateway.proc.pid if gateway.proc is not None else None
    cases = [
        ("baseline: GET /healthz (no auth)", "/healthz", {}),
        ("baseline: GET /api/v1/runs/{id} (JWT)", f"/api/v1/runs/{ids[n // 2]}", auth),
        ("GET /api/v1/runs?limit=50 (JWT)", "/api/v1/runs?limit=50", auth),
    ]
    rows: list[list[str]] = []
    verdicts: list[str] = []
    for label, path, headers in cases:
        for c in (1, concurrency):
            progress(f"{label}: {requests:,} requests at concurrency {c}")
            t = await time_gets(gateway.base_url, path, headers, requests, c, pid)
            p99 = pct(t.latencies, 99)
            rows.append(
                [
                    label,
                    str(c),
                    ms(pct(t.latencies, 50)),
                    ms(p99),
                    f"{len(t.latencies) / t.seconds:,.0f}",
                    ms(t.gateway_cpu) if t.gateway_cpu is not None else "-",
                    ms(t.client_cpu),
                ]
            )
            if path.startswith("/api/v1/runs?"):
                verdicts.append(f"list at concurrency {c}: p99 {ms(p99)}, aim {aim(p99, LIST_AIM_P99)}")
    table(
        f"part 1: {n:,} runs written to KV in {write_seconds:,.1f} s; gateway spawn -> ready (read model "
        f"loaded) {ready_seconds:,.1f} s",
        ["request", "conc.", "p50", "p99", "req/s", "gw CPU/req", "client CPU/req"],
        rows,
    )
    for verdict in verdicts:
        print(f"aim: {verdict}")
    return gateway


# ------------------------------------------------------------------------------------------ part 2


class Watch:
    """Counts the subscribers that received the event being measured, as their bytes arrive."""

    def __init__(self) -> None:
        self.marker = b""
        self.count = 0
        self.expected = 0
        self.done = asyncio.Event()

    def expect(self, event_id: str, subscribers: int) -> None:
        self.marker = event_id.encode()
        self.count = 0
        self.expected = subscribers
        self.done.clear()

    def saw(self, data: bytes) -> None:
        if self.marker and self.marker in data:
            self.count += 1
            if self.count >= self.expected:
                self.done.set()


class WsClient(asyncio.Protocol):
    """A minimal WebSocket client: the sans-I/O protocol of `websockets`, every text message
    timestamped when its bytes arrive (parsing waits until the measurement is over)."""

    def __init__(self, url: str, watch: Watch) -> None:
        self.protocol = ClientProtocol(parse_uri(url), max_size=None)
        self.request = self.protocol.connect()
        self.watch = watch
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed = False
        self.received: list[tuple[float, bytes]] = []
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.protocol.send_request(self.request)
        self._flush()

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        self.protocol.receive_data(data)
        for event in self.protocol.events_received():
            if isinstance(event, Frame) and event.opcode == Opcode.TEXT:
                payload = bytes(event.data)
                self.received.append((now, payload))
                self.watch.saw(payload)
            elif isinstance(event, Response):
                if event.status_code == 101:
                    self.opened.set_result(None)
                else:
                    self.opened.set_exception(RuntimeError(f"handshake refused: {event.status_code}"))
            elif isinstance(event, Frame) and event.opcode == Opcode.CLOSE:
                self.closed = True
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(f"connection lost: {exc}"))

    def _flush(self) -> None:
        assert self.transport is not None
        for chunk in self.protocol.data_to_send():
            if chunk:
                self.transport.write(chunk)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.protocol.send_close(1000)
            self._flush()
            self.transport.close()

    def arrivals(self) -> dict[str, float]:
        """event id -> arrival time of every event message (heartbeats skipped)."""
        out: dict[str, float] = {}
        for at, data in self.received:
            message = json.loads(data)
            if "event" in message:
                out[message["event"]["event_id"]] = at
        return out


async def open_clients(url: str, n: int, watch: Watch, parallel: int = 50) -> list[WsClient]:
    loop = asyncio.get_running_loop()
    limit = asyncio.Semaphore(parallel)
    host, port = url.split("//", 1)[1].split("/", 1)[0].split(":")

    async def one() -> WsClient:
        async with limit:
            _, client = await loop.create_connection(lambda: WsClient(url, watch), host, int(port))
            await asyncio.wait_for(client.opened, 60)
            return client

    return list(await asyncio.gather(*(one() for _ in range(n))))


@dataclass
class Delivery:
    latencies: list[float] = field(default_factory=list)
    slowest: list[float] = field(default_factory=list)
    """Per event: the latency of the last subscriber to get it."""


async def measure_fanout(
    js: JetStreamContext, clients: Sequence[WsClient], watch: Watch, events: int, run_id: str, gap: float
) -> Delivery:
    for client in clients:
        client.received.clear()
    sent: dict[str, float] = {}
    for i in range(events):
        event = RunProgress(run_id=run_id, attempt=1, finished=i, total=events)
        payload = encode(event)
        headers = {MSG_ID: event.event_id, EVENT_TYPE: event.event_type()}
        watch.expect(event.event_id, len(clients))
        sent[event.event_id] = time.perf_counter()
        await js.publish(event.subject(), payload, headers=headers)
        try:
            await asyncio.wait_for(watch.done.wait(), DELIVERY_TIMEOUT)
        except TimeoutError:
            raise RuntimeError(
                f"{len(clients) - watch.count} of {len(clients)} subscribers missed an event"
            ) from None
        await asyncio.sleep(gap)
    watch.expect("", 0)
    result = Delivery()
    arrivals = [client.arrivals() for client in clients]
    for event_id, at in sent.items():
        per_event = []
        for seen in arrivals:
            arrived = seen.get(event_id)
            if arrived is None:
                raise RuntimeError(f"a subscriber never received event {event_id}")
            per_event.append(arrived - at)
        result.latencies.extend(per_event)
        result.slowest.append(max(per_event))
    return result


async def nats_baseline(nc: NatsClient, js: JetStreamContext, events: int, run_id: str) -> list[float]:
    arrivals: dict[str, float] = {}

    async def on_msg(msg: Any) -> None:
        arrivals[msg.headers.get(MSG_ID, "")] = time.perf_counter()

    sub = await nc.subscribe(f"fabrik.runs.progress.{run_id}", cb=on_msg)
    latencies: list[float] = []
    try:
        for i in range(events):
            event = RunProgress(run_id=run_id, attempt=1, finished=i, total=events)
            started = time.perf_counter()
            await js.publish(event.subject(), encode(event), headers={MSG_ID: event.event_id})
            deadline = time.monotonic() + DELIVERY_TIMEOUT
            while event.event_id not in arrivals:
                if time.monotonic() > deadline:
                    raise RuntimeError("the bare NATS subscriber did not receive an event")
                await asyncio.sleep(0.0005)
            latencies.append(arrivals[event.event_id] - started)
            await asyncio.sleep(0.05)
    finally:
        await sub.unsubscribe()
    return latencies


async def part_fanout(stack: Stack, gateway: ServiceProcess | None, subscribers: int, events: int) -> None:
    print(f"\n== part 2: one event fanned out to {subscribers:,} WebSocket subscribers of /api/v1/stream")
    if gateway is None:
        nc0 = await nats.connect(stack.nats.url)
        await ensure_topology(nc0.jetstream())
        await nc0.close()
        gateway = await stack.start_gateway()
    base = gateway.base_url.replace("http://", "ws://")
    url = f"{base}/api/v1/stream?access_token={mint_hs256(SECRET, 'bench-ws', 'viewer')}"
    async with httpx.AsyncClient(timeout=5) as client:
        response = await client.get(
            f"{gateway.base_url}/api/v1/stream", headers={"Accept": "text/event-stream"}
        )
        if response.status_code == 404:
            raise RuntimeError(
                "GET /api/v1/stream is 404: the live stream is not wired into fabrik_gateway.app"
            )
    run_id = str(ULID())
    nc = await nats.connect(stack.nats.url, name="bench-publisher")
    clients: list[WsClient] = []
    try:
        js = nc.jetstream()
        progress(f"baseline: a bare NATS subscriber in this process, {events} events")
        bare = await nats_baseline(nc, js, events, run_id)

        progress(f"baseline: one WebSocket subscriber, {events} events")
        watch = Watch()
        clients = await open_clients(url, 1, watch)
        await warm_up(js, clients, run_id)
        single = await measure_fanout(js, clients, watch, events, run_id, gap=0.05)

        progress(f"opening {subscribers - 1:,} more WebSocket subscribers")
        started = time.perf_counter()
        clients += await open_clients(url, subscribers - 1, watch)
        connect_seconds = time.perf_counter() - started
        await warm_up(js, clients, run_id)
        pid = gateway.proc.pid if gateway.proc is not None else None
        progress(f"{events} events, one at a time, each to {subscribers:,} subscribers")
        cpu_before, client_before = cpu_seconds(pid), time.process_time()
        many = await measure_fanout(js, clients, watch, events, run_id, gap=0.1)
        cpu_after, client_after = cpu_seconds(pid), time.process_time()
    finally:
        for ws in clients:
            ws.close()
        await nc.close()
    gw_cpu = (cpu_after - cpu_before) / events if cpu_before is not None and cpu_after is not None else None

    def row(label: str, values: Sequence[float], slowest: Sequence[float] | None) -> list[str]:
        return [
            label,
            f"{len(values):,}",
            ms(pct(values, 50)),
            ms(pct(values, 99)),
            ms(max(values)),
            ms(pct(slowest, 50)) if slowest else "-",
        ]

    table(
        f"part 2: publish -> message on the subscriber's socket ({subscribers:,} subscribers connected in "
        f"{connect_seconds:,.1f} s)",
        ["delivery", "deliveries", "p50", "p99", "max", "last subscriber, p50"],
        [
            row("baseline: bare NATS subscriber", bare, None),
            row("baseline: 1 WebSocket subscriber", single.latencies, single.slowest),
            row(f"{subscribers:,} WebSocket subscribers", many.latencies, many.slowest),
        ],
    )
    if gw_cpu is not None:
        per_send = gw_cpu / subscribers
        print(f"gateway CPU per event fanned out: {ms(gw_cpu)} ({per_send * 1e6:,.0f} µs per subscriber)")
    bench_cpu = (client_after - client_before) / events
    print(f"bench CPU per event (receiving {subscribers:,} messages): {ms(bench_cpu)}")
    print(
        f"aim: fan-out p99 {ms(pct(many.latencies, 99))}, aim {aim(pct(many.latencies, 99), FANOUT_AIM_P99)}"
    )


async def warm_up(js: JetStreamContext, clients: Sequence[WsClient], run_id: str) -> None:
    """Publish until every subscriber has joined the hub and received an event (unreported)."""
    deadline = time.monotonic() + 60
    while any(not any(b'"event"' in d for _, d in c.received) for c in clients):
        if time.monotonic() > deadline:
            raise RuntimeError("subscribers did not receive the warm-up events")
        event = RunProgress(run_id=run_id, attempt=1, message="warm-up")
        await js.publish(event.subject(), encode(event), headers={MSG_ID: event.event_id})
        await asyncio.sleep(0.2)
    await asyncio.sleep(0.5)  # the last warm-up events land before the measurement starts
    if any(c.closed for c in clients):
        raise RuntimeError("a subscriber was closed during the warm-up")


# ------------------------------------------------------------------------------------------ main


async def run(root: Path, args: argparse.Namespace) -> None:
    stack = Stack(root)
    try:
        stack.nats.start()
        gateway = None
        if 1 in args.parts:
            gateway = await part_list(stack, args.stored, args.projects, args.requests, args.concurrency)
        if 2 in args.parts:
            await part_fanout(stack, gateway, args.subscribers, args.events)
    finally:
        stack.close()


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--stored", type=int, default=100_000, help="part 1: run records stored")
    parser.add_argument("--projects", type=int, default=10, help="part 1: projects the runs spread over")
    parser.add_argument("--requests", type=int, default=2_000, help="part 1: requests per measurement")
    parser.add_argument("--concurrency", type=int, default=8, help="part 1: concurrent requests")
    parser.add_argument("--subscribers", type=int, default=1_000, help="part 2: WebSocket subscribers")
    parser.add_argument("--events", type=int, default=20, help="part 2: events measured")
    parser.add_argument("--parts", default="1,2", help="which parts to run: 1, 2 or 1,2")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    args = parser.parse_args(argv)
    try:
        args.parts = sorted({int(p) for p in args.parts.split(",") if p.strip()})
    except ValueError:
        parser.error("--parts takes 1 and/or 2")
    if not args.parts or set(args.parts) - {1, 2}:
        parser.error("--parts takes 1 and/or 2")
    if min(args.stored, args.projects, args.requests, args.concurrency, args.subscribers, args.events) < 1:
        parser.error("every size must be at least 1")
    if args.stored < 100:
        parser.error("--stored must be at least 100")
    return args


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGTERM, _interrupt)
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix="fabrik-bench-gateway-")
    try:
        asyncio.run(run(Path(tmp), args))
    except KeyboardInterrupt:
        print("\ninterrupted: gateway and server stopped", file=sys.stderr)
        return 130
    finally:
        if args.keep:
            print(f"\nlogs and stores kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    cpus = os.cpu_count() or 1
    load_after = os.getloadavg()[0]
    print(
        f"\ntotal {time.perf_counter() - started:,.0f} s on {cpus} CPUs; "
        f"load average {load_before:.1f} before, {load_after:.1f} after"
    )
    if max(load_before, load_after) > cpus:
        print("note: other processes competed for the CPU; figures are noisy, compare runs back to back.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
