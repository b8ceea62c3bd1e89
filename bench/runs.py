"""Runs end to end over real processes: submit latency, scheduler decisions, `GET /runs` at 100k runs.

    uv run python bench/runs.py [--concurrent 100] [--queued 10000] [--stored 100000] [--parts 1,2,3]

Every part starts its own nats-server (temporary store, free ports) and the services it needs as
their own processes (`python -m fabrik_gateway` etc., as `tests/integration/test_runs_e2e.py`
does), all against that one server, and stops them and the server at the end, also on error,
Ctrl-C or SIGTERM. Figures are printed, never asserted; a non-zero exit means the benchmark itself
broke (a run that did not succeed, an event that never came).

1. `--concurrent` runs of `python -c "print('ok')"` through gateway, scheduler and the local
   executor, submitted at once with `POST /api/v1/runs` (aiohttp: httpx's pool would cost ~10 ms
   of client CPU per request at 100 connections), scheduler limits raised so that all are
   admitted. A stream watcher (an ordered consumer on `fabrik.runs.>`) records each run's events;
   every latency runs from the moment its POST was sent (client clock) to an event's `occurred_at`
   (same machine, same clock): queued, dispatched (`starting`), the workload started
   (`run.started`, stored as the record's `started_at`), `running` written, `succeeded` written.
   Baseline: the same command started directly with `subprocess.run`.
2. `--queued` `RunRequested` events published directly on the bus (not over HTTP: faster, and the
   gateway is not what is measured) before a scheduler with `FABRIK_MAX_RUNNING=--slots` and no
   executor starts; decisions/s = state transitions it writes per second, from the `occurred_at`
   of its `run.state_changed` events. Baseline: the same wire work (KV create + two acknowledged
   publishes, in turn) from a bare nats-py client. Then, in this process on the same KV data: a
   leader's load of all records, and the time to compute, encode and write the queue snapshot
   with that many entries (and for the gateway to decode and index it). Last, a second scheduler
   with room for every run (still no executor) takes over and dispatches the queue: dispatches/s.
3. `--stored` `RunRecord` values written directly into the `runs` KV bucket (msgspec-encoded, as
   the scheduler writes them; done directly for speed), then the gateway started: its read-model
   load time, then `GET /api/v1/runs` (first page of 50, one filtered by project, one with a
   cursor deep in the list) timed `--requests` times with httpx, sequentially and at
   `--concurrency`, with `/healthz` and `GET /api/v1/runs/{id}` as baselines of the HTTP stack,
   and the CPU time per request of the gateway and of this process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import msgspec
import nats
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext, api
from prometheus_client.parser import text_string_to_metric_families
from ulid import ULID

from fabrik_common.bus import EVENT_TYPE, MSG_ID
from fabrik_common.codec import encode
from fabrik_common.events import Event, RunParameters, RunQueued, RunRequested, RunStateChanged, Workload
from fabrik_common.natsserver import NatsServer, free_port
from fabrik_common.runs import TEMPLATES, AttemptRecord, QueueSnapshot, RunRecord
from fabrik_common.testing import ServiceProcess
from fabrik_common.topology import ensure_topology
from fabrik_common.tracing import TRACEPARENT, outgoing_traceparent
from fabrik_gateway.api.params import encode_cursor
from fabrik_gateway.readmodel import ReadModel
from fabrik_scheduler.scheduler import Scheduler
from fabrik_scheduler.settings import SchedulerSettings
from fabrik_scheduler.store import RunStore

TRIVIAL = (sys.executable, "-c", "print('ok')")
TERMINAL = frozenset({"succeeded", "failed", "cancelled", "timed_out", "budget_exceeded"})
STALL_SECONDS = 60.0  # no awaited event for this long: the benchmark is broken
READY_TIMEOUT = 120.0
# Admission limits nobody reaches: every run of part 1 and of the dispatch phase fits at once.
ROOMY = {"FABRIK_MAX_CPU": "1000000", "FABRIK_MAX_MEMORY": "100000Ti"}


# ------------------------------------------------------------------------------------------ helpers


def pct(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); p99 of 100 values is the 99th smallest."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:,.1f} ms" if seconds < 10 else f"{seconds:,.2f} s"


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


def event_headers(event: Event) -> dict[str, str]:
    """The headers `Bus.publish` puts on an event."""
    return {MSG_ID: event.event_id, EVENT_TYPE: event.event_type(), TRACEPARENT: outgoing_traceparent()}


async def publish_all(js: JetStreamContext, messages: Iterator[tuple[str, bytes, dict[str, str]]]) -> int:
    """Publish with `publish_async` and wait for every JetStream ack; returns how many."""
    futures: list[asyncio.Future[api.PubAck]] = []
    published = 0
    for subject, payload, headers in messages:
        futures.append(await js.publish_async(subject, payload, headers=headers))
        published += 1
        if len(futures) >= 2000:
            await asyncio.gather(*futures)
            futures.clear()
    await asyncio.gather(*futures)
    return published


def params(command: Sequence[str] = TRIVIAL) -> RunParameters:
    return RunParameters(workload=Workload(command=tuple(command)), resources=TEMPLATES["default"])


# ------------------------------------------------------------------------------------------ processes


@dataclass
class Stack:
    """One nats-server and the services of a part, each its own process; `close()` stops all."""

    root: Path
    nats: NatsServer = field(init=False)
    services: dict[str, ServiceProcess] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.nats = NatsServer(self.root / "nats", port=free_port(), monitor_port=free_port())

    def env(self, **extra: str) -> dict[str, str]:
        return {
            "FABRIK_NATS_URL": self.nats.url,
            "FABRIK_DATA_DIR": str(self.root / "data"),
            "FABRIK_LOG_FORMAT": "json",
            "FABRIK_SHUTDOWN_GRACE_SECONDS": "5",
            **extra,
        }

    async def start(self, names: Sequence[str], **extra: str) -> list[ServiceProcess]:
        """Launch the services (`gateway`, `scheduler`, ...) at once, then wait until all are ready."""
        procs: list[ServiceProcess] = []
        for name in names:
            key = name
            n = 2
            while key in self.services:
                key, n = f"{name}-{n}", n + 1
            env = self.env(FABRIK_INSTANCE_ID=f"bench-{key}", **extra)
            proc = ServiceProcess(f"fabrik_{name}", env, log_path=self.root / f"{key}.log")
            self.services[key] = proc
            proc.start_process()
            procs.append(proc)
        for proc in procs:
            await wait_ready(proc)
        return procs

    async def stop(self, proc: ServiceProcess, grace: float = 20.0) -> None:
        """SIGTERM (a clean stop: a leader releases its lease), SIGKILL if it does not end in time."""
        popen = proc.proc
        if popen is None or popen.poll() is not None:
            return
        popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while popen.poll() is None:
            if time.monotonic() > deadline:
                proc.kill()
                return
            await asyncio.sleep(0.05)

    def _stop_now(self, proc: ServiceProcess, timeout: float) -> None:
        if proc.proc is None or proc.proc.poll() is not None:
            return
        proc.proc.send_signal(signal.SIGTERM)
        try:
            proc.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()

    def close(self) -> None:
        try:
            for proc in self.services.values():
                if proc.proc is not None and proc.proc.poll() is None:
                    proc.proc.send_signal(signal.SIGTERM)
            for proc in self.services.values():
                self._stop_now(proc, timeout=10.0)
        except BaseException:
            for proc in self.services.values():
                proc.kill()
            raise
        finally:
            self.nats.stop()


async def wait_ready(proc: ServiceProcess, within: float = READY_TIMEOUT) -> None:
    """Until the service's /readyz answers 200 (as `ServiceProcess.wait_ready`, without blocking)."""
    deadline = time.monotonic() + within
    async with httpx.AsyncClient(timeout=1) as client:
        while time.monotonic() < deadline:
            if proc.proc is not None and proc.proc.poll() is not None:
                raise RuntimeError(f"{proc.module} exited with {proc.proc.returncode} (log: {proc.log_path})")
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(f"{proc.base_url}/readyz")).status_code == 200:
                    return
            await asyncio.sleep(0.05)
    raise RuntimeError(f"{proc.module} not ready within {within:.0f} s (log: {proc.log_path})")


async def http_get_json(url: str) -> Any:
    async with httpx.AsyncClient(timeout=10) as client:
        response = await client.get(url)
        response.raise_for_status()
        return response.json()


async def wait_leader(proc: ServiceProcess, within: float = 30.0) -> None:
    """Until the scheduler's `fabrik_leader` gauge is 1."""
    deadline = time.monotonic() + within
    async with httpx.AsyncClient(timeout=5) as client:
        while time.monotonic() < deadline:
            text = (await client.get(f"{proc.base_url}/metrics")).text
            if any(line.startswith("fabrik_leader 1") for line in text.splitlines()):
                return
            await asyncio.sleep(0.05)
    raise RuntimeError(f"{proc.module} did not become leader within {within} s")


def log_times(path: Path, *messages: str) -> dict[str, datetime]:
    """When a service's JSON log first said each of `messages`."""
    found: dict[str, datetime] = {}
    with path.open("rb") as lines:
        for raw in lines:
            try:
                entry = json.loads(raw)
            except ValueError:
                continue
            msg = entry.get("msg") if isinstance(entry, dict) else None
            if msg in messages and msg not in found:
                found[msg] = datetime.fromisoformat(entry["ts"])
    return found


# ------------------------------------------------------------------------------------------ stream watcher


class _Changed(msgspec.Struct):
    run_id: str
    to_state: str
    occurred_at: datetime


class _Started(msgspec.Struct):
    run_id: str
    occurred_at: datetime


_decode_changed = msgspec.json.Decoder(_Changed).decode
_decode_started = msgspec.json.Decoder(_Started).decode


@dataclass
class Milestones:
    """What one run went through: event time (`occurred_at`) and when the watcher saw it."""

    at: dict[str, float] = field(default_factory=dict)
    seen: dict[str, float] = field(default_factory=dict)


class RunWatcher:
    """An ordered consumer on the RUNS stream: `run.state_changed` (by target state) and `run.started`."""

    def __init__(self) -> None:
        self.runs: dict[str, Milestones] = {}
        self.counts: Counter[str] = Counter()
        self.changes: list[tuple[float, str]] = []  # (occurred_at, to_state) of every transition
        self._sub: Subscription | None = None
        self._last_event = time.monotonic()

    async def start(self, js: JetStreamContext, subject: str = "fabrik.runs.>") -> None:
        self._sub = await js.subscribe(
            subject, cb=self._on_msg, ordered_consumer=True, deliver_policy=api.DeliverPolicy.NEW
        )

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None

    async def _on_msg(self, msg: Msg) -> None:
        now = time.time()
        kind = (msg.headers or {}).get(EVENT_TYPE)
        if kind == "run.state_changed":
            changed = _decode_changed(msg.data)
            run_id, milestone, at = changed.run_id, changed.to_state, changed.occurred_at.timestamp()
            self.changes.append((at, milestone))
        elif kind == "run.started":
            started = _decode_started(msg.data)
            run_id, milestone, at = started.run_id, "started", started.occurred_at.timestamp()
        else:
            return
        run = self.runs.setdefault(run_id, Milestones())
        run.at.setdefault(milestone, at)
        run.seen.setdefault(milestone, now)
        self.counts[milestone] += 1
        self._last_event = time.monotonic()

    async def wait(self, done: Callable[[], bool], what: str) -> None:
        """Until `done()` (checked every 20 ms); fails when no event came for STALL_SECONDS."""
        self._last_event = time.monotonic()
        while not done():
            await asyncio.sleep(0.02)
            if time.monotonic() - self._last_event > STALL_SECONDS:
                raise RuntimeError(
                    f"no progress for {STALL_SECONDS:.0f} s waiting for {what}: {dict(self.counts)}"
                )

    def finished(self, run_ids: Sequence[str]) -> bool:
        return all(self.state_of(r) in TERMINAL for r in run_ids)

    def state_of(self, run_id: str) -> str | None:
        run = self.runs.get(run_id)
        if run is None:
            return None
        reached = [s for s in run.at if s in TERMINAL]
        return reached[0] if reached else None


# ------------------------------------------------------------------------------------------ part 1


async def part_concurrent(stack: Stack, n: int) -> None:
    print(
        f"\n== part 1: {n} concurrent runs of python -c \"print('ok')\" (gateway, scheduler, local executor)"
    )
    gateway, scheduler, _executor = await stack.start(
        ("gateway", "scheduler", "executor"),
        FABRIK_MAX_RUNNING=str(max(100, 2 * n)),
        # Anonymous callers may submit, as on the local stack of `fabrik up`.
        FABRIK_ANONYMOUS_ROLE="admin",
        **ROOMY,
    )
    await wait_leader(scheduler)
    api_url = f"{gateway.base_url}/api/v1"
    baseline = await asyncio.to_thread(start_directly, 10)

    nc = await nats.connect(stack.nats.url, name="bench-watcher")
    watcher = RunWatcher()
    try:
        await watcher.start(nc.jetstream())
        body = {"project": "bench", "workload": {"command": list(TRIVIAL)}}
        # aiohttp, not httpx, for the burst: httpx's pool costs ~10 ms of client CPU per request
        # with 100 connections, which would be measured here as the gateway's latency.
        connector = aiohttp.TCPConnector(limit=n)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(60)) as client:
            # Open the n connections, and one unreported warm-up run: first-use costs are no figure.
            async def touch() -> None:
                async with client.get(f"{gateway.base_url}/healthz") as response:
                    await response.read()

            await asyncio.gather(*(touch() for _ in range(n)))
            async with client.post(f"{api_url}/runs", json=body) as response:
                warm = (await response.json())["run_id"]
            await watcher.wait(lambda: watcher.finished([warm]), "the warm-up run")

            submitted: dict[str, tuple[float, float]] = {}

            async def submit() -> None:
                sent = time.time()
                async with client.post(f"{api_url}/runs", json=body) as response:
                    text = await response.text()
                answered = time.time()
                if response.status != 201:
                    raise RuntimeError(f"POST /runs answered {response.status}: {text}")
                submitted[json.loads(text)["run_id"]] = (sent, answered)

            progress(f"submitting {n} runs at once")
            server_before = await server_seconds(gateway.base_url)
            first_sent = time.time()
            await asyncio.gather(*(submit() for _ in range(n)))
            server_after = await server_seconds(gateway.base_url)
            ids = list(submitted)
            await watcher.wait(lambda: watcher.finished(ids), f"{n} runs to finish")
            all_done = max(watcher.runs[r].at[watcher.state_of(r) or ""] for r in ids)
    finally:
        await watcher.stop()
        await nc.close()

    outcomes = Counter(watcher.state_of(r) for r in ids)
    if outcomes != {"succeeded": n}:
        raise RuntimeError(f"not every run succeeded: {dict(outcomes)}; see the logs in {stack.root}")

    def since_submit(milestone: str, observed: bool = False) -> list[float]:
        out = []
        for run_id, (sent, _) in submitted.items():
            run = watcher.runs[run_id]
            out.append((run.seen if observed else run.at)[milestone] - sent)
        return out

    stages: list[tuple[str, list[float]]] = [
        ("POST answered (201)", [answered - sent for sent, answered in submitted.values()]),
        ("queued written (scheduler)", since_submit("queued")),
        ("dispatched: starting written (scheduler)", since_submit("starting")),
        ("workload started: run.started = started_at (executor)", since_submit("started")),
        ("running written: state_changed -> running", since_submit("running")),
        ("  the same, seen by a stream watcher", since_submit("running", observed=True)),
        ("succeeded written", since_submit("succeeded")),
    ]
    rows = [[label, ms(pct(v, 50)), ms(pct(v, 99)), ms(max(v))] for label, v in stages]
    table(
        f"part 1: {n} concurrent runs, latency from the POST being sent (client clock) to each milestone",
        ["milestone", "p50", "p99", "max"],
        rows,
    )
    starts = sorted(watcher.runs[r].at["started"] for r in ids)
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    wall = all_done - first_sent
    print(
        f"submit -> running (state_changed): p50 {ms(pct(stages[4][1], 50))}, p99 {ms(pct(stages[4][1], 99))}"
    )
    print(f"submit -> succeeded: p50 {ms(pct(stages[6][1], 50))}, p99 {ms(pct(stages[6][1], 99))}")
    posts = server_after[1] - server_before[1]
    if posts:
        print(
            f"gateway: {ms((server_after[0] - server_before[0]) / posts)} per POST inside the gateway "
            f"(mean over the burst of {n})"
        )
    print(f"all {n} runs succeeded {ms(wall)} after the first POST: {n / wall:.1f} runs/s end to end")
    if gaps:
        print(
            f"executor: a workload started every {ms(statistics.median(gaps))} (median gap between "
            "consecutive run.started events; the executor starts one dispatch at a time)"
        )
    print(f"baseline: the workload started directly (subprocess.run, median of 10): {ms(baseline)}")


def start_directly(rounds: int) -> float:
    """Baseline: median seconds to run the trivial workload with `subprocess.run`."""
    times: list[float] = []
    for _ in range(rounds):
        started = time.perf_counter()
        subprocess.run(TRIVIAL, check=True, capture_output=True)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


# ------------------------------------------------------------------------------------------ part 2


class NullPublisher:
    """The in-process scheduler of part 2 must not announce anything."""

    async def publish(self, event: Event, *, headers: Any = None) -> None:
        return None


def requested_events(n: int, projects: int) -> Iterator[tuple[str, bytes, dict[str, str]]]:
    p = params()
    for i in range(n):
        event = RunRequested(
            run_id=str(ULID()), project=f"proj-{i % projects:02d}", env="dev", params=p, requested_by="bench"
        )
        yield event.subject(), encode(event), event_headers(event)


async def timed(fn: Callable[[], Any], rounds: int = 5) -> tuple[float, Any]:
    """Median seconds of `rounds` calls of `fn` (awaited when it returns a coroutine), and its last result."""
    times: list[float] = []
    result: Any = None
    for _ in range(rounds):
        started = time.perf_counter()
        result = fn()
        if asyncio.iscoroutine(result):
            result = await result
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU time of a process so far (Linux /proc), None where unknown."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def resident_bytes(pid: int | None) -> int | None:
    """Resident set size of a process (Linux /proc), None where unknown."""
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class CpuShare:
    """CPU used by some processes (and this one) between `begin()` and `end()`, as shares of one core."""

    def __init__(self, pids: dict[str, int | None]) -> None:
        self.pids = pids
        self._start: tuple[float, dict[str, float | None]] | None = None
        self.shares: dict[str, float] = {}

    def _sample(self) -> tuple[float, dict[str, float | None]]:
        cpu = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        cpu["bench"] = time.process_time()
        return time.perf_counter(), cpu

    def begin(self) -> None:
        if self._start is None:
            self._start = self._sample()

    def end(self) -> None:
        if self._start is None:
            return
        (t0, cpu0), (t1, cpu1) = self._start, self._sample()
        for name, before in cpu0.items():
            after = cpu1.get(name)
            if before is not None and after is not None and t1 > t0:
                self.shares[name] = (after - before) / (t1 - t0)

    def text(self) -> str:
        return ", ".join(f"{name} {share:.0%}" for name, share in self.shares.items()) or "unknown"


async def bare_round_trips(js: JetStreamContext, m: int) -> tuple[float, float]:
    """Baseline: the wire work of one queue decision without the scheduler, `m` times: a KV create
    of a run record, then a `run.queued` and a `run.state_changed` publish, each acknowledged
    before the next, as `Scheduler._on_requested` does. Returns per second, and this process's
    CPU seconds per item."""
    kv = await js.create_key_value(api.KeyValueConfig(bucket="bench-baseline", history=5))
    now = datetime.now(UTC)
    p = params()
    started, cpu = time.perf_counter(), time.process_time()
    for _ in range(m):
        run_id = str(ULID())
        record = RunRecord(
            run_id=run_id,
            project="proj-00",
            env="dev",
            params=p,
            state="queued",
            attempts=[AttemptRecord(attempt=1)],
            requested_by="bench",
            created_at=now,
            queued_at=now,
            state_entered_at=now,
            deadline=now,
        )
        await kv.create(run_id, msgspec.json.encode(record))
        queued = RunQueued(run_id=run_id, project="proj-00", attempt=1)
        await js.publish(queued.subject(), encode(queued), headers=event_headers(queued))
        changed = RunStateChanged(
            run_id=run_id, project="proj-00", attempt=1, from_state=None, to_state="queued", revision=1
        )
        await js.publish(changed.subject(), encode(changed), headers=event_headers(changed))
    return m / (time.perf_counter() - started), (time.process_time() - cpu) / m


async def part_queue(stack: Stack, n: int, slots: int, projects: int) -> None:
    print(f"\n== part 2: {n:,} queued runs over {projects} projects (scheduler only, no executor)")
    nc = await nats.connect(stack.nats.url, name="bench-part2")
    js = nc.jetstream()
    watcher = RunWatcher()
    snapshots: list[int] = []

    async def on_snapshot(msg: Msg) -> None:
        snapshots.append(len(msg.data))

    try:
        await ensure_topology(js)
        m = min(n, 2000)
        progress(f"baseline: {m:,} x (KV create + 2 acknowledged publishes) from a bare nats-py client")
        baseline_rate, baseline_cpu = await bare_round_trips(js, m)
        progress(f"publishing {n:,} run.requested events directly on the bus (publish_async, not HTTP)")
        started = time.perf_counter()
        await publish_all(js, requested_events(n, projects))
        publish_seconds = time.perf_counter() - started
        await watcher.start(js, "fabrik.runs.state_changed.*")
        snapshot_sub = await nc.subscribe("$KV.queue.snapshot", cb=on_snapshot)

        # Decisions: a scheduler limited to `slots` running runs works through the backlog.
        progress(f"starting a scheduler with FABRIK_MAX_RUNNING={slots}; it decides on the backlog")
        spawned = time.time()
        (scheduler,) = await stack.start(("scheduler",), FABRIK_MAX_RUNNING=str(slots))
        admitted = min(slots, n)
        flood_cpu = CpuShare(
            {"scheduler": scheduler.proc.pid if scheduler.proc else None, "nats": stack.nats.pid}
        )

        def all_decided() -> bool:
            if watcher.changes:
                flood_cpu.begin()
            return watcher.counts["queued"] >= n and watcher.counts["starting"] >= admitted

        await watcher.wait(all_decided, f"{n:,} runs to be queued")
        flood_cpu.end()
        decided = sorted(at for at, _ in watcher.changes)
        decide_seconds = max(decided[-1] - decided[0], 1e-9)
        decisions = len(decided)
        flood_snapshots = list(snapshots)
        await stack.stop(scheduler)

        # The snapshot and a leader's load, in this process, on the same KV data.
        progress("timing a leader's load and the queue snapshot in-process")
        settings = SchedulerSettings(max_running=slots)
        store = RunStore(await js.key_value("runs"), await js.key_value("queue"))
        inproc = Scheduler(settings, store, NullPublisher())
        load_seconds, _ = await timed(inproc.load, rounds=3)
        compute_seconds, snapshot = await timed(inproc.snapshot)
        encoded = msgspec.json.encode(snapshot)
        encode_seconds, _ = await timed(lambda: msgspec.json.encode(snapshot))
        put_seconds, _ = await timed(lambda: store.queue.put("snapshot", encoded))
        write_seconds, _ = await timed(lambda: store.write_snapshot(inproc.snapshot()))
        snapshot_decoder = msgspec.json.Decoder(QueueSnapshot)
        readmodel = ReadModel()
        gateway_seconds, _ = await timed(lambda: readmodel.set_queue(snapshot_decoder.decode(encoded)))

        # Dispatch: a scheduler with room for every run takes over (no executor: queued -> starting).
        to_dispatch = n - admitted
        dispatched: list[float] = []
        dispatch_cpu = CpuShare({})
        snapshots_before_dispatch = len(snapshots)
        if to_dispatch:
            watcher.changes.clear()
            watcher.counts.clear()
            progress(f"starting a scheduler with FABRIK_MAX_RUNNING={n + slots}; it dispatches the queue")
            respawned = time.time()
            (leader,) = await stack.start(("scheduler",), FABRIK_MAX_RUNNING=str(n + slots), **ROOMY)
            dispatch_cpu = CpuShare(
                {"scheduler": leader.proc.pid if leader.proc else None, "nats": stack.nats.pid}
            )

            def all_dispatched() -> bool:
                if watcher.changes:
                    dispatch_cpu.begin()
                return watcher.counts["starting"] >= to_dispatch

            await watcher.wait(all_dispatched, f"{to_dispatch:,} dispatches")
            dispatch_cpu.end()
            dispatched = sorted(at for at, state in watcher.changes if state == "starting")
        dispatch_snapshots = len(snapshots) - snapshots_before_dispatch
        await snapshot_sub.unsubscribe()
    finally:
        await watcher.stop()
        await nc.close()

    decision_rate = (decisions - 1) / decide_seconds
    rows = [
        [
            f"baseline: bare KV create + 2 publishes, in turn ({m:,}x)",
            f"{baseline_rate:,.0f} /s",
            ms(m / baseline_rate),
        ],
        [
            f"decisions: transitions written (queued + {admitted} starting)",
            f"{decision_rate:,.0f} /s",
            ms(decide_seconds),
        ],
        ["  decisions / baseline", f"{decision_rate / baseline_rate:.0%}", ""],
        ["  scheduler process spawned -> last decision", "", ms(decided[-1] - spawned)],
        [
            "  queue snapshots written meanwhile (largest, bytes)",
            f"{len(flood_snapshots)}",
            f"{max(flood_snapshots, default=0):,}",
        ],
        [
            "run.requested published beforehand (publish_async; info)",
            f"{n / publish_seconds:,.0f} /s",
            ms(publish_seconds),
        ],
    ]
    if dispatched:
        dispatch_seconds = max(dispatched[-1] - dispatched[0], 1e-9)
        rows += [
            [
                f"dispatches: queued -> starting ({len(dispatched):,} runs)",
                f"{(len(dispatched) - 1) / dispatch_seconds:,.0f} /s",
                ms(dispatch_seconds),
            ],
            [
                "  new leader spawned -> first dispatch (start, election, load)",
                "",
                ms(dispatched[0] - respawned),
            ],
            ["  queue snapshots written meanwhile (the pass holds the lock)", f"{dispatch_snapshots}", ""],
        ]
    table(f"part 2: {n:,} queued runs, scheduler throughput", ["figure", "rate", "time"], rows)
    print(f"CPU while deciding (share of one core): {flood_cpu.text()}")
    scheduler_share = flood_cpu.shares.get("scheduler")
    if scheduler_share is not None:
        print(
            f"CPU per decision: scheduler {ms(scheduler_share / decision_rate)}, "
            f"bare baseline client {ms(baseline_cpu)} per KV create + 2 publishes"
        )
    if dispatched:
        print(f"CPU while dispatching (share of one core): {dispatch_cpu.text()}")
    entries = len(snapshot.entries)
    rows = [
        [f"leader load of {n:,} records (Scheduler.load)", ms(load_seconds)],
        [f"snapshot compute ({entries:,} entries; holds the scheduler lock)", ms(compute_seconds)],
        [
            f"snapshot encode ({len(encoded):,} bytes; NATS max_payload {nc.max_payload:,})",
            ms(encode_seconds),
        ],
        ["snapshot KV put", ms(put_seconds)],
        ["write_snapshot end to end (compute + encode + put)", ms(write_seconds)],
        ["gateway: decode + index the snapshot (ReadModel.set_queue)", ms(gateway_seconds)],
    ]
    table(
        "part 2: queue snapshot and leader load, in this process on the same KV data "
        "(median of 5; load of 3)",
        ["figure", "time"],
        rows,
    )


# ------------------------------------------------------------------------------------------ part 3


STATES = ("succeeded",) * 85 + ("failed",) * 8 + ("cancelled",) * 4 + ("timed_out",) * 2 + ("queued",)


def stored_records(n: int, projects: int, ids: list[str]) -> Iterator[tuple[str, bytes, dict[str, str]]]:
    """`n` run records a scheduler could have written, oldest first; their ids go to `ids`."""
    base = datetime.now(UTC) - timedelta(milliseconds=10 * n)
    p = params()
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
            params=msgspec.structs.replace(p, labels={"team": f"team-{i % 5}"}),
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
        yield f"$KV.runs.{run_id}", msgspec.json.encode(record), {}


@dataclass
class HttpTiming:
    latencies: list[float]
    seconds: float
    server_mean: float | None  # mean seconds inside the gateway (its request histogram)
    gateway_cpu: float | None  # CPU seconds of the gateway process per request
    client_cpu: float  # CPU seconds of this process per request


async def server_seconds(base_url: str) -> tuple[float, float]:
    """Sum and count of `fabrik_http_request_seconds` over every route but /metrics."""
    async with httpx.AsyncClient(timeout=10) as client:
        text = (await client.get(f"{base_url}/metrics")).text
    total, count = 0.0, 0.0
    for family in text_string_to_metric_families(text):
        if family.name != "fabrik_http_request_seconds":
            continue
        for sample in family.samples:
            if sample.labels.get("route") == "/metrics":
                continue
            if sample.name.endswith("_sum"):
                total += sample.value
            elif sample.name.endswith("_count"):
                count += sample.value
    return total, count


async def time_gets(
    base_url: str, path: str, n: int, concurrency: int, expect_items: int | None, gateway_pid: int | None
) -> HttpTiming:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=30, limits=limits) as client:

        async def one() -> float:
            started = time.perf_counter()
            response = await client.get(path)
            elapsed = time.perf_counter() - started
            if response.status_code != 200:
                raise RuntimeError(f"GET {path} answered {response.status_code}: {response.text[:300]}")
            return elapsed

        for _ in range(min(50, n)):  # warm-up, unreported; the answer is checked here only
            response = await client.get(path)
            if response.status_code != 200:
                raise RuntimeError(f"GET {path} answered {response.status_code}: {response.text[:300]}")
            if expect_items is not None and len(response.json()["items"]) != expect_items:
                raise RuntimeError(f"GET {path}: expected {expect_items} items")
        latencies: list[float] = []

        async def worker(count: int) -> None:
            for _ in range(count):
                latencies.append(await one())

        before = await server_seconds(base_url)
        gateway_before, client_before = cpu_seconds(gateway_pid), time.process_time()
        started = time.perf_counter()
        shares = [n // concurrency + (1 if i < n % concurrency else 0) for i in range(concurrency)]
        await asyncio.gather(*(worker(c) for c in shares))
        seconds = time.perf_counter() - started
        gateway_after, client_after = cpu_seconds(gateway_pid), time.process_time()
        after = await server_seconds(base_url)
    count = after[1] - before[1]
    gateway_cpu = (
        (gateway_after - gateway_before) / n
        if gateway_before is not None and gateway_after is not None
        else None
    )
    return HttpTiming(
        latencies,
        seconds,
        (after[0] - before[0]) / count if count else None,
        gateway_cpu,
        (client_after - client_before) / n,
    )


async def part_list(stack: Stack, n: int, projects: int, requests: int, concurrency: int) -> None:
    print(f"\n== part 3: GET /api/v1/runs with {n:,} runs stored (gateway)")
    nc = await nats.connect(stack.nats.url, name="bench-part3")
    try:
        js = nc.jetstream()
        await ensure_topology(js)
        # Baseline start: the same gateway on an empty bucket.
        started = time.perf_counter()
        (empty,) = await stack.start(("gateway",))
        empty_ready = time.perf_counter() - started
        await stack.stop(empty)

        progress(f"writing {n:,} RunRecord values into the runs KV bucket directly (the scheduler's job)")
        ids: list[str] = []
        started = time.perf_counter()
        await publish_all(js, stored_records(n, projects, ids))
        write_seconds = time.perf_counter() - started
        info = await js.stream_info("KV_runs")
        if info.state.messages != n:
            raise RuntimeError(f"the runs bucket holds {info.state.messages} records, expected {n}")
    finally:
        await nc.close()

    progress("starting the gateway on the full bucket")
    started = time.perf_counter()
    (gateway,) = await stack.start(("gateway",))
    full_ready = time.perf_counter() - started
    projects_view = await http_get_json(f"{gateway.base_url}/api/v1/projects")
    total = sum(p["total"] for p in projects_view["items"])
    if total != n:
        raise RuntimeError(f"the gateway's read model lists {total} runs, expected {n}")
    assert gateway.log_path is not None
    logged = log_times(gateway.log_path, "service started", "read model loaded")
    load_logged = (
        (logged["read model loaded"] - logged["service started"]).total_seconds()
        if len(logged) == 2
        else None
    )

    ids.sort()
    deep = ids[len(ids) // 10]  # 90% of the way down from the newest
    cases: list[tuple[str, str, int | None]] = [
        ("baseline: GET /healthz", "/healthz", None),
        ("baseline: GET /api/v1/runs/{id}", f"/api/v1/runs/{ids[len(ids) // 2]}", None),
        ("GET /api/v1/runs (newest 50)", "/api/v1/runs", 50),
        ("GET /api/v1/runs?project=proj-03", "/api/v1/runs?project=proj-03", 50),
        ("GET /api/v1/runs?cursor=<90% deep>", f"/api/v1/runs?cursor={encode_cursor(deep)}", 50),
    ]
    rows: list[list[str]] = []
    for label, path, items in cases:
        for c in (1, concurrency):
            progress(f"{label}, {requests:,} requests at concurrency {c}")
            t = await time_gets(
                gateway.base_url, path, requests, c, items, gateway.proc.pid if gateway.proc else None
            )
            rows.append(
                [
                    label,
                    str(c),
                    ms(pct(t.latencies, 50)),
                    ms(pct(t.latencies, 99)),
                    f"{len(t.latencies) / t.seconds:,.0f}",
                    ms(t.server_mean) if t.server_mean is not None else "-",
                    ms(t.gateway_cpu) if t.gateway_cpu is not None else "-",
                    ms(t.client_cpu),
                ]
            )
    load_rows = [
        ["records written to KV (publish_async)", f"{n / write_seconds:,.0f} /s", ms(write_seconds)],
        ["gateway spawn -> ready, empty bucket (baseline)", "", ms(empty_ready)],
        [f"gateway spawn -> ready, {n:,} records", "", ms(full_ready)],
    ]
    if load_logged is not None:
        load_rows.append(
            [
                "read-model load (gateway log: started -> loaded)",
                f"{n / load_logged:,.0f} /s",
                ms(load_logged),
            ]
        )
    rss = resident_bytes(gateway.proc.pid if gateway.proc else None)
    if rss is not None:
        load_rows.append(["gateway resident memory after the load", "", f"{rss / 2**20:,.0f} MiB"])
    table(f"part 3: {n:,} runs stored, gateway read model", ["figure", "rate", "time"], load_rows)
    table(
        f"part 3: {requests:,} httpx requests per line (after 50 unreported); server = mean time in "
        "the gateway's handler; gw CPU / client CPU = CPU time per request of the gateway / this process",
        ["request", "conc.", "p50", "p99", "req/s", "server", "gw CPU", "client CPU"],
        rows,
    )


# ------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--concurrent", type=int, default=100, help="part 1: runs submitted at once")
    parser.add_argument("--queued", type=int, default=10_000, help="part 2: runs requested")
    parser.add_argument("--slots", type=int, default=10, help="part 2: FABRIK_MAX_RUNNING while queuing")
    parser.add_argument("--stored", type=int, default=100_000, help="part 3: run records stored")
    parser.add_argument(
        "--projects", type=int, default=10, help="parts 2 and 3: projects the runs spread over"
    )
    parser.add_argument("--requests", type=int, default=2_000, help="part 3: requests per measurement")
    parser.add_argument("--concurrency", type=int, default=8, help="part 3: concurrent requests")
    parser.add_argument("--parts", default="1,2,3", help="which parts to run, e.g. 1,3")
    parser.add_argument(
        "--keep", action="store_true", help="keep the temporary directory (logs) and print it"
    )
    args = parser.parse_args(argv)
    try:
        args.parts = sorted({int(p) for p in args.parts.split(",") if p.strip()})
    except ValueError:
        parser.error("--parts takes numbers: 1, 2, 3")
    if not args.parts or set(args.parts) - {1, 2, 3}:
        parser.error("--parts takes 1, 2 and/or 3")
    sizes = (
        args.concurrent,
        args.queued,
        args.slots,
        args.stored,
        args.projects,
        args.requests,
        args.concurrency,
    )
    if min(sizes) < 1:
        parser.error("every size must be at least 1")
    return args


def run_part(part: int, root: Path, args: argparse.Namespace) -> None:
    stack = Stack(root / f"part{part}")
    try:
        stack.nats.start()
        if part == 1:
            asyncio.run(part_concurrent(stack, args.concurrent))
        elif part == 2:
            asyncio.run(part_queue(stack, args.queued, args.slots, args.projects))
        else:
            asyncio.run(part_list(stack, args.stored, args.projects, args.requests, args.concurrency))
    finally:
        stack.close()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    # SIGTERM cleans up like Ctrl-C: every part stops its services and its server on the way out.
    signal.signal(signal.SIGTERM, _interrupt)
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix="fabrik-bench-runs-")
    try:
        for part in args.parts:
            run_part(part, Path(tmp), args)
    except KeyboardInterrupt:
        print("\ninterrupted: services and servers stopped", file=sys.stderr)
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
