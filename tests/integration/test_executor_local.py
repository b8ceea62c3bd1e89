"""The executor's local backend against a real NATS server, with real workloads.

The test plays the scheduler: it publishes `RunDispatched` / `RunCancelRequested` as the scheduler
and the gateway would, and reads what the executor publishes from the RUNS and LOGS streams.
The executor runs in this process (`running_service`) or, where it has to be killed, as its own
process (`ServiceProcess`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import msgspec
import nats.errors
import pytest
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry, generate_latest

from fabrik_common.bus import Bus, BusOptions
from fabrik_common.codec import decode_any
from fabrik_common.envs import ENVS_BUCKET, EnvCipher, encode_stored, generate_env_key
from fabrik_common.events import (
    AnyEvent,
    Event,
    RepoRef,
    Resources,
    RunCancelRequested,
    RunDispatched,
    RunFinished,
    RunLogChunk,
    RunParameters,
    RunProgress,
    RunResultReported,
    RunStarted,
    Workload,
)
from fabrik_common.ids import new_ulid, utcnow
from fabrik_common.metrics import BusMetrics
from fabrik_common.service import Service
from fabrik_common.testing import ServiceProcess, running_service
from fabrik_common.topology import ensure_topology
from fabrik_executor import procfs
from fabrik_executor.app import build
from fabrik_executor.settings import ExecutorSettings

ROOT = Path(__file__).resolve().parents[2]
HELLO = ROOT / "examples" / "hello"
PY = sys.executable
GRACE = 1.0
ENV_KEY = generate_env_key()

pytestmark = pytest.mark.slow


# --------------------------------------------------------------------------------------------
# The scheduler's side: publish dispatches and cancels, read what the executor publishes.


class Recorder:
    """Everything published on RUNS and LOGS, read through two pull consumers."""

    def __init__(self, js: JetStreamContext) -> None:
        self.js = js
        self.events: list[AnyEvent] = []
        self._subs: list[Any] = []

    async def start(self) -> None:
        # Durable: an ephemeral consumer is deleted by the server after 5 s without a fetch.
        self._subs = [
            await self.js.pull_subscribe("fabrik.runs.>", durable="test-recorder-runs", stream="RUNS"),
            await self.js.pull_subscribe("fabrik.logs.>", durable="test-recorder-logs", stream="LOGS"),
        ]

    async def poll(self) -> None:
        for sub in self._subs:
            while True:
                try:
                    msgs = await sub.fetch(256, timeout=0.1)
                except (TimeoutError, nats.errors.Error):
                    # Nothing there (or a busy server answering 503): try again on the next poll.
                    break
                for msg in msgs:
                    self.events.append(decode_any(msg.data))
                    await msg.ack()
                if len(msgs) < 256:
                    break

    def of(self, run_id: str, kind: type[Event] | None = None, attempt: int | None = None) -> list[Any]:
        return [
            e
            for e in self.events
            if getattr(e, "run_id", None) == run_id
            and (kind is None or isinstance(e, kind))
            and (attempt is None or getattr(e, "attempt", None) == attempt)
        ]

    async def wait_for(self, predicate: Callable[[], Any], timeout: float = 15.0, what: str = "") -> Any:
        deadline = time.monotonic() + timeout
        while True:
            await self.poll()
            result = predicate()
            if result:
                return result
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out waiting for {what or predicate}; events: {self.events[-20:]}"
                )
            await asyncio.sleep(0.05)

    async def finished(self, run_id: str, attempt: int = 1, timeout: float = 15.0) -> RunFinished:
        found = await self.wait_for(
            lambda: self.of(run_id, RunFinished, attempt), timeout, f"RunFinished of {run_id}/{attempt}"
        )
        return found[0]  # type: ignore[no-any-return]

    def log_lines(self, run_id: str, attempt: int = 1) -> list[tuple[int, str, str]]:
        """(number, stream, text) of every line, duplicates (a chunk re-published) removed."""
        seen: dict[int, tuple[str, str]] = {}
        for chunk in self.of(run_id, RunLogChunk, attempt):
            for i, line in enumerate(chunk.lines):
                seen.setdefault(chunk.first_line + i, (line.stream, line.text))
        return [(n, *seen[n]) for n in sorted(seen)]

    def texts(self, run_id: str, attempt: int = 1) -> list[str]:
        return [text for _, _, text in self.log_lines(run_id, attempt)]


class Scheduler:
    """Publishes what the scheduler and the gateway would."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus

    async def dispatch(self, event: RunDispatched) -> RunDispatched:
        await self.bus.publish(event)
        return event

    async def cancel(self, run_id: str) -> None:
        await self.bus.publish(RunCancelRequested(run_id=run_id, requested_by="test", reason="test cancel"))


def dispatch(
    command: list[str],
    *,
    run_id: str | None = None,
    attempt: int = 1,
    env: dict[str, str] | None = None,
    memory: str = "1Gi",
    deadline_s: float = 60.0,
    repo: RepoRef | None = None,
    spec: dict[str, Any] | None = None,
) -> RunDispatched:
    return RunDispatched(
        run_id=run_id or new_ulid(),
        project="demo",
        env="dev",
        attempt=attempt,
        params=RunParameters(
            spec=spec,
            repo=repo,
            workload=Workload(command=tuple(command), env=env or {}),
            resources=Resources(
                cpu_request="500m", memory_request=memory, cpu_limit="2", memory_limit=memory
            ),
            timeout_seconds=max(1, int(deadline_s)),
        ),
        deadline=utcnow() + timedelta(seconds=deadline_s),
    )


def hello(steps: int = 6, seconds: float = 0.1, **extra: str) -> tuple[list[str], dict[str, str]]:
    env = {"HELLO_STEPS": str(steps), "HELLO_STEP_SECONDS": str(seconds), **extra}
    return [PY, str(HELLO / "workload.py")], env


class Harness:
    def __init__(self, nats_url: str, data_dir: Path, bus: Bus, nc: NatsClient) -> None:
        self.nats_url = nats_url
        self.data_dir = data_dir
        self.root = data_dir / "executor"
        self.bus = bus
        self.nc = nc
        self.recorder = Recorder(nc.jetstream())
        self.scheduler = Scheduler(bus)

    def settings(self) -> ExecutorSettings:
        return ExecutorSettings(
            nats_url=self.nats_url,
            http_port=0,
            data_dir=str(self.data_dir),
            cancel_grace_seconds=GRACE,
            shutdown_grace_seconds=2.0,
            env_encryption_key=ENV_KEY,
        )

    def process(self, log_name: str = "executor.log") -> ServiceProcess:
        return ServiceProcess(
            "fabrik_executor",
            {
                "FABRIK_NATS_URL": self.nats_url,
                "FABRIK_DATA_DIR": str(self.data_dir),
                "FABRIK_CANCEL_GRACE_SECONDS": str(GRACE),
                "FABRIK_LOG_FORMAT": "text",
                "FABRIK_ENV_ENCRYPTION_KEY": ENV_KEY,
            },
            log_path=self.data_dir.parent / log_name,
        )

    def workspace(self, run_id: str) -> Path:
        return self.root / "workspaces" / run_id

    def attempt_dir(self, run_id: str, attempt: int = 1) -> Path:
        return self.root / "runs" / run_id / str(attempt)


@pytest.fixture
async def harness(nats_url: str, tmp_path: Path) -> AsyncIterator[Harness]:
    nc = NatsClient()
    await nc.connect(nats_url)
    bus = Bus(BusOptions(url=nats_url, publish_deadline=20), BusMetrics(CollectorRegistry()))
    await bus.connect()
    await ensure_topology(bus.js)
    h = Harness(nats_url, tmp_path / "data", bus, nc)
    await h.recorder.start()
    try:
        yield h
    finally:
        _kill_leftovers(h.root)
        await bus.close()
        await nc.close()


@contextlib.asynccontextmanager
async def executor(h: Harness) -> AsyncIterator[Service[Any]]:
    async with running_service(build(h.settings())) as service:
        yield service


def _kill_leftovers(root: Path) -> None:
    """Whatever a failed test left running: every workload group and shim under this data dir."""
    for shim_file in root.glob("runs/*/*/shim.json"):
        info = json.loads(shim_file.read_text())
        if procfs.is_alive(info["workload_pid"], info["workload_start_time"]):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(info["workload_pid"], signal.SIGKILL)
        if procfs.is_alive(info["shim_pid"], info["shim_start_time"]):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(info["shim_pid"], signal.SIGKILL)


async def start_process(h: Harness, log_name: str) -> ServiceProcess:
    proc = h.process(log_name)
    try:
        await asyncio.to_thread(proc.start, 60.0)
    except BaseException:
        proc.kill()
        raise
    return proc


def workload_pid(started: RunStarted) -> int:
    backend, _, pid = started.workload_ref.partition(":")
    assert backend == "local"
    return int(pid)


# --------------------------------------------------------------------------------------------


async def test_hello_succeeds_with_progress_result_logs_and_file(harness: Harness) -> None:
    h, rec = harness, harness.recorder
    command, env = hello(steps=6, seconds=0.2)
    spec = json.loads((HELLO / "spec.json").read_text())
    async with executor(h) as service:
        run = await h.scheduler.dispatch(dispatch(command, env=env, spec=spec))
        finished = await rec.finished(run.run_id)
        await asyncio.sleep(0.1)
        metrics = generate_latest(service.registry).decode()

    assert finished.outcome == "succeeded"
    assert finished.reason is None
    assert finished.exit_code == 0
    assert finished.peak_memory_bytes and finished.peak_memory_bytes > 1_000_000

    started = rec.of(run.run_id, RunStarted)
    assert len(started) == 1
    assert started[0].backend == "local"
    assert started[0].workload_ref.startswith("local:")

    # Progress: coalesced (at most 2 per second), the latest state published before the end.
    progress = rec.of(run.run_id, RunProgress)
    assert len(progress) >= 2
    first, last = progress[0].occurred_at, progress[-1].occurred_at
    assert len(progress) <= 2 * (last - first).total_seconds() + 2
    gaps = [(b.occurred_at - a.occurred_at).total_seconds() for a, b in itertools.pairwise(progress)]
    assert all(gap >= 0.45 for gap in gaps[:-1]), gaps  # the last one may be the final flush
    assert (progress[-1].phase, progress[-1].task, progress[-1].finished, progress[-1].total) == (
        "verify",
        "done",
        6,
        6,
    )
    assert {p.phase for p in progress} >= {"plan", "verify"}

    results = rec.of(run.run_id, RunResultReported)
    assert [r.result["status"] for r in results] == ["ok"]
    assert results[0].result["resumed_from"] == 0

    # Logs: numbered consecutively from 0, in order, protocol lines included.
    lines = rec.log_lines(run.run_id)
    assert [n for n, _, _ in lines] == list(range(len(lines)))
    texts = [t for _, _, t in lines]
    steps = [t for t in texts if t.startswith("step ")]
    assert steps == [
        f"step {i}/6: {p}"
        for i, p in enumerate(["plan", "plan", "implement", "implement", "verify", "verify"], 1)
    ]
    assert any(t.startswith("::fabrik::result ") for t in texts)
    assert lines[0][1] == "system"  # the executor's own "starting ..." line
    assert "hello: Hello, Fabrik" in texts[texts.index(next(t for t in texts if t.startswith("hello: ")))]

    # Order on the RUNS stream: RunFinished after every progress event of the attempt.
    runs_events = [e for e in rec.of(run.run_id) if not isinstance(e, RunLogChunk)]
    assert isinstance(runs_events[-1], RunFinished)

    assert 'fabrik_executor_runs_started_total{backend="local"} 1.0' in metrics
    assert 'fabrik_executor_runs_finished_total{backend="local",outcome="succeeded",reason=""} 1.0' in metrics
    assert 'fabrik_executor_runs_active{backend="local"} 0.0' in metrics
    assert f'fabrik_executor_log_lines_published_total{{backend="local"}} {len(lines)}.0' in metrics

    ws = h.workspace(run.run_id)
    assert (ws / "hello.txt").read_text().startswith(f"Hello from Fabrik run {run.run_id}, attempt 1")
    assert json.loads((ws / ".fabrik" / "spec.json").read_text())["id"] == "hello"


async def test_environment_and_nonzero_exit(harness: Harness) -> None:
    h, rec = harness, harness.recorder
    # The project env from the store (written directly: the gateway would refuse reserved keys,
    # which the executor skips all the same).
    kv = await h.bus.js.key_value(ENVS_BUCKET)
    project_env = {"GREETING": "hi there", "FABRIK_RUN_ID": "forged", "SMITHERS_X": "1"}
    await kv.put(
        "demo.dev", encode_stored(project_env, EnvCipher.from_text(ENV_KEY), updated_by="t", revision=1)
    )
    code = (
        "import os, sys\n"
        "e = os.environ\n"
        "print(e['GREETING'], e['FABRIK_RUN_ID'], e['OPENAI_BASE_URL'], e['ANTHROPIC_BASE_URL'],"
        " e['HOME'] == e['FABRIK_WORKSPACE'] == os.getcwd(), e.get('FROM_WORKLOAD'),"
        " 'NATS' in ''.join(e), sep='|')\n"
        "print('something broke', file=sys.stderr)\n"
        "sys.exit(3)\n"
    )
    async with executor(h):
        run = await h.scheduler.dispatch(dispatch([PY, "-c", code], env={"FROM_WORKLOAD": "yes"}))
        finished = await rec.finished(run.run_id)

    assert (finished.outcome, finished.reason, finished.exit_code) == ("failed", "workload_error", 3)
    assert "something broke" in finished.message
    texts = rec.texts(run.run_id)
    assert f"hi there|{run.run_id}|http://127.0.0.1:8081/v1|http://127.0.0.1:8081|True|yes|False" in texts
    warnings = [t for t in texts if t.startswith("warning:")]
    assert any("FABRIK_RUN_ID is reserved" in w for w in warnings)
    assert any("SMITHERS_X is reserved" in w for w in warnings)


async def test_cancel_mid_run_kills_the_whole_process_group(harness: Harness) -> None:
    h, rec = harness, harness.recorder
    # Ignores SIGTERM (so the SIGKILL after the grace period is needed) and has a child process.
    script = 'trap "" TERM; sleep 60 & echo "child $!"; echo ready; while true; do sleep 0.1; done'
    async with executor(h):
        run = await h.scheduler.dispatch(dispatch(["bash", "-c", script]))
        await rec.wait_for(lambda: "ready" in rec.texts(run.run_id), what="ready")
        pgid = workload_pid(rec.of(run.run_id, RunStarted)[0])
        assert len(procfs.group_members(pgid)) >= 2
        cancelled_at = time.monotonic()
        await h.scheduler.cancel(run.run_id)
        finished = await rec.finished(run.run_id)
        took = time.monotonic() - cancelled_at

    assert (finished.outcome, finished.reason) == ("cancelled", "cancelled")
    assert "cancelled by test" in finished.message
    assert GRACE * 0.9 <= took < GRACE + 3
    assert procfs.group_members(pgid) == []


async def test_deadline_times_out(harness: Harness) -> None:
    h, rec = harness, harness.recorder
    async with executor(h):
        run = await h.scheduler.dispatch(dispatch(["sleep", "30"], deadline_s=1.0))
        finished = await rec.finished(run.run_id)
    assert (finished.outcome, finished.reason) == ("timed_out", "timeout")
    assert procfs.group_members(workload_pid(rec.of(run.run_id, RunStarted)[0])) == []


async def test_memory_limit_is_oom_killed(harness: Harness) -> None:
    h, rec = harness, harness.recorder
    code = "print('allocating', flush=True); x = bytearray(400 * 1024 * 1024); print('allocated')"
    async with executor(h):
        run = await h.scheduler.dispatch(dispatch([PY, "-c", code], memory="200Mi"))
        finished = await rec.finished(run.run_id)
    assert (finished.outcome, finished.reason) == ("failed", "oom_killed"), finished
    assert "200.0 MiB" in finished.message
    assert "allocated" not in rec.texts(run.run_id)


async def test_redelivered_dispatch_starts_nothing_twice(harness: Harness) -> None:
    h, rec = harness, harness.recorder
    code = "import os, time; open('pids', 'a').write(f'{os.getpid()}\\n'); time.sleep(0.5)"
    async with executor(h):
        run = dispatch([PY, "-c", code])
        await h.scheduler.dispatch(run)
        # The same attempt again, as a redelivery or a duplicate publish with a new event id.
        await h.scheduler.dispatch(msgspec.structs.replace(run, event_id=new_ulid()))
        await rec.finished(run.run_id)
        await h.scheduler.dispatch(msgspec.structs.replace(run, event_id=new_ulid()))
        await asyncio.sleep(0.5)
        await rec.poll()
    assert len(rec.of(run.run_id, RunStarted)) == 1
    assert len(rec.of(run.run_id, RunFinished)) == 1
    assert len((h.workspace(run.run_id) / "pids").read_text().split()) == 1


async def test_cancel_before_dispatch_means_it_never_runs(harness: Harness) -> None:
    h, rec = harness, harness.recorder
    async with executor(h):
        run = dispatch(["bash", "-c", "touch ran; sleep 5"])
        await h.scheduler.cancel(run.run_id)
        await asyncio.sleep(0.3)  # the cancel overtakes the dispatch
        await h.scheduler.dispatch(run)
        finished = await rec.finished(run.run_id)
    assert (finished.outcome, finished.reason) == ("cancelled", "cancelled")
    assert rec.of(run.run_id, RunStarted) == []
    assert not (h.workspace(run.run_id) / "ran").exists()


async def test_repository_ref_and_start_failures(harness: Harness, tmp_path: Path) -> None:
    h, rec = harness, harness.recorder
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / "file.txt").write_text("version one\n")
    subprocess.run([*git, "-C", str(repo), "add", "."], check=True)
    subprocess.run([*git, "-C", str(repo), "commit", "-qm", "one"], check=True)
    subprocess.run([*git, "-C", str(repo), "tag", "v1"], check=True)
    (repo / "file.txt").write_text("version two\n")
    subprocess.run([*git, "-C", str(repo), "commit", "-qam", "two"], check=True)

    async with executor(h):
        at_v1 = await h.scheduler.dispatch(
            dispatch(["cat", "file.txt"], repo=RepoRef(url=str(repo), ref="v1"))
        )
        bad_repo = await h.scheduler.dispatch(dispatch(["true"], repo=RepoRef(url=str(tmp_path / "nowhere"))))
        bad_ref = await h.scheduler.dispatch(
            dispatch(["true"], repo=RepoRef(url=str(repo), ref="no-such-ref"))
        )
        missing = await h.scheduler.dispatch(dispatch(["no-such-command-xyz"]))
        results = {r.run_id: await rec.finished(r.run_id) for r in (at_v1, bad_repo, bad_ref, missing)}

    assert results[at_v1.run_id].outcome == "succeeded"
    assert "version one" in rec.texts(at_v1.run_id)
    for run in (bad_repo, bad_ref, missing):
        finished = results[run.run_id]
        assert (finished.outcome, finished.reason) == ("failed", "infra_error"), finished
        assert rec.of(run.run_id, RunStarted) == []
    assert "does not exist" in results[bad_repo.run_id].message
    assert "git checkout no-such-ref failed" in results[bad_ref.run_id].message
    assert "command not found: no-such-command-xyz" in results[missing.run_id].message
    # Why it did not start is in the run's log too.
    assert any(
        t.startswith("the workload did not start: command not found: no-such-command-xyz")
        for t in rec.texts(missing.run_id)
    )


async def test_resume_reuses_the_workspace_and_continues_from_the_checkpoint(harness: Harness) -> None:
    h, rec = harness, harness.recorder
    command, env = hello(steps=4, seconds=0.05, HELLO_FAIL_AFTER_STEP="2")
    async with executor(h):
        first = await h.scheduler.dispatch(dispatch(command, env=env))
        failed = await rec.finished(first.run_id, 1)
        assert (failed.outcome, failed.reason, failed.exit_code) == ("failed", "workload_error", 1)
        await h.scheduler.dispatch(dispatch(command, env=env, run_id=first.run_id, attempt=2))
        second = await rec.finished(first.run_id, 2)

    assert second.outcome == "succeeded"
    result = rec.of(first.run_id, RunResultReported, attempt=2)[0].result
    assert (result["attempt"], result["resumed_from"]) == (2, 2)
    texts = rec.texts(first.run_id, 2)
    assert "hello: attempt 2 resumes after step 2 of 4" in texts
    assert [t for t in texts if t.startswith("step ")] == ["step 3/4: implement", "step 4/4: verify"]
    assert rec.log_lines(first.run_id, 2)[0][0] == 0  # line numbers restart per attempt
    assert "attempt 2" in (h.workspace(first.run_id) / "hello.txt").read_text()


async def test_executor_killed_mid_run_reattaches_and_finishes(harness: Harness) -> None:
    h, rec = harness, harness.recorder
    # Ticks (with progress) until the test lets it finish, so the restart is surely mid-run.
    code = (
        "import os, time\n"
        "from fabrik_runtime import report_progress\n"
        "i = 0\n"
        "while not os.path.exists('go'):\n"
        "    print(f'tick {i}', flush=True)\n"
        "    report_progress(phase='implement', finished=i, total=1000)\n"
        "    i += 1\n"
        "    time.sleep(0.05)\n"
        "report_progress(phase='verify', finished=1000, total=1000)\n"
        "print('done')\n"
    )
    proc = await start_process(h, "executor-1.log")
    try:
        run = await h.scheduler.dispatch(dispatch([PY, "-c", code]))
        await rec.wait_for(lambda: "tick 5" in rec.texts(run.run_id), what="tick 5")
        proc.kill()  # SIGKILL: no clean shutdown
        killed_at = utcnow()
        proc = await start_process(h, "executor-2.log")
        await rec.wait_for(
            lambda: any(line.ts > killed_at for c in rec.of(run.run_id, RunLogChunk) for line in c.lines),
            what="lines written after the kill",
        )
        (h.workspace(run.run_id) / "go").touch()
        finished = await rec.finished(run.run_id, timeout=20)
    finally:
        proc.kill()

    assert finished.outcome == "succeeded", finished
    assert "reattached attempt" in (h.data_dir.parent / "executor-2.log").read_text()
    assert len(rec.of(run.run_id, RunStarted)) == 1
    assert len(rec.of(run.run_id, RunFinished)) == 1
    lines = rec.log_lines(run.run_id)
    assert [n for n, _, _ in lines] == list(range(len(lines)))  # no gap, no line twice
    ticks = [t for _, _, t in lines if t.startswith("tick ")]
    assert ticks == [f"tick {i}" for i in range(len(ticks))]
    assert len(ticks) > 10
    assert lines[-1][2] == "done"
    last = rec.of(run.run_id, RunProgress)[-1]
    assert (last.phase, last.finished) == ("verify", 1000)


async def test_shim_killed_while_executor_is_down_is_lost(harness: Harness) -> None:
    h, rec = harness, harness.recorder
    proc = await start_process(h, "executor-1.log")
    try:
        run = await h.scheduler.dispatch(dispatch(["bash", "-c", "echo ready; sleep 30"]))
        await rec.wait_for(lambda: "ready" in rec.texts(run.run_id), what="ready")
        proc.kill()
        info = json.loads((h.attempt_dir(run.run_id) / "shim.json").read_text())
        os.kill(info["shim_pid"], signal.SIGKILL)
        proc = await start_process(h, "executor-2.log")
        finished = await rec.finished(run.run_id, timeout=20)
    finally:
        proc.kill()

    assert (finished.outcome, finished.reason) == ("failed", "lost"), finished
    assert "resume" in finished.message
    assert procfs.group_members(info["workload_pid"]) == []  # the orphaned workload was stopped too


async def test_workload_that_ends_while_the_executor_is_stopped_is_reported_on_restart(
    harness: Harness,
) -> None:
    h, rec = harness, harness.recorder
    code = (
        "import os, time\n"
        "print('tick 0', flush=True)\n"
        "while not os.path.exists('go'):\n"
        "    time.sleep(0.02)\n"
        "for i in range(1, 5):\n"
        "    print(f'tick {i}')\n"
    )
    async with executor(h):
        run = await h.scheduler.dispatch(dispatch([PY, "-c", code]))
        await rec.wait_for(lambda: "tick 0" in rec.texts(run.run_id), what="tick 0")
    # A clean stop leaves the workload running; let it end while no executor is there.
    shim = json.loads((h.attempt_dir(run.run_id) / "shim.json").read_text())
    assert procfs.is_alive(shim["workload_pid"], shim["workload_start_time"])
    (h.workspace(run.run_id) / "go").touch()
    deadline = time.monotonic() + 10
    while not (h.attempt_dir(run.run_id) / "exit.json").exists():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    await rec.poll()
    assert rec.of(run.run_id, RunFinished) == []
    async with executor(h):
        finished = await rec.finished(run.run_id)
    assert finished.outcome == "succeeded"
    assert [t for t in rec.texts(run.run_id) if t.startswith("tick")] == [f"tick {i}" for i in range(5)]
