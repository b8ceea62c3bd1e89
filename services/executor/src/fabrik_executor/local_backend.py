"""The `local` backend: each attempt is a process group on this machine, supervised by a shim.

Start (`LocalBackend.start`, from the dispatch handler):
1. idempotency: an attempt with a state file is never started again (a redelivered dispatch
   re-publishes what was not acknowledged yet and otherwise changes nothing); a dispatch older
   than an attempt known here is stale and ignored; an older attempt of the same run still
   running here is stopped first (one workspace, one workload);
2. a cancel remembered for the run (it arrived before the dispatch) ends the attempt as
   cancelled without starting it; so does a deadline already passed (timed_out);
3. the workspace is prepared (`workspace.py`), the environment built (`env.py`), the command
   resolved; a failure here ends the attempt as failed / infra_error;
4. the shim is spawned detached (`shim.py`), `RunStarted` published, and an `AttemptRunner`
   watches the attempt until it ends.

`AttemptRunner.watch` polls (every `poll_interval_seconds`): new output (→ logs, progress,
results through `tailer.py`), the deadline and the cancel escalation (SIGTERM to the workload's
process group, SIGKILL after `cancel_grace_seconds`), `exit.json`, and whether the shim is still
alive. It ends with exactly one `RunFinished`, after every log line and the latest progress.

Recovery (`LocalBackend.recover`, at start before any message is consumed) scans
`runs/*/*/state.json`: an attempt whose shim still runs (same pid *and* start time) is reattached
from its saved output offset; one with `exit.json` is finished normally; one with neither ends
as failed / lost (resumable: the workspace stays).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import weakref
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO

from fabrik_common.events import (
    LogLine,
    RunCancelRequested,
    RunDispatched,
    RunFinished,
    RunLogChunk,
    RunStarted,
    Workload,
)
from fabrik_common.ids import utcnow
from fabrik_common.runs import parse_memory
from fabrik_executor import procfs
from fabrik_executor.backend import EventSink
from fabrik_executor.env import (
    EmptyEnvSource,
    NoRunKey,
    ProjectEnvError,
    ProjectEnvSource,
    RunKeyProvider,
    build_env,
)
from fabrik_executor.metrics import ExecutorMetrics
from fabrik_executor.outcome import ExitStatus, KillReason, Verdict, map_exit
from fabrik_executor.settings import ExecutorSettings
from fabrik_executor.state import AttemptState, CancelTombstone, Layout, write_atomic
from fabrik_executor.tailer import Emission, LogTailer, OutputReader, ProgressCoalescer
from fabrik_executor.workspace import WorkspaceError, prepare_workspace

log = logging.getLogger(__name__)

BACKEND = "local"
_RECENT_LAUNCH_SECONDS = 60.0


class LaunchError(Exception):
    """The workload cannot be started (no command, command not found, ...): infra_error."""


class DataDirLockedError(RuntimeError):
    """Another executor uses this data directory."""


def resolve_argv(workload: Workload, default_command: tuple[str, ...]) -> list[str]:
    command = list(workload.command) or list(default_command)
    argv = command + list(workload.args)
    if not command:
        raise LaunchError(
            "no command: the run has no workload.command and the executor has no FABRIK_DEFAULT_COMMAND"
        )
    return argv


def check_executable(argv0: str, *, cwd: Path, path: str) -> None:
    if "/" in argv0:
        candidate = Path(argv0) if Path(argv0).is_absolute() else cwd / argv0
        if not candidate.is_file():
            raise LaunchError(f"command not found: {argv0}")
        if not os.access(candidate, os.X_OK):
            raise LaunchError(f"command is not executable: {argv0}")
        return
    if shutil.which(argv0, path=path) is None:
        raise LaunchError(f"command not found: {argv0} (PATH={path})")


def deadline_of(dispatch: RunDispatched) -> datetime:
    """The attempt's deadline as an aware UTC datetime (a naive one is taken as UTC)."""
    deadline = dispatch.deadline
    return deadline if deadline.tzinfo is not None else deadline.replace(tzinfo=UTC)


# A dispatch issued this long after a cancel request was issued for a newer decision of the
# scheduler (a resume), not for the attempt the cancel meant.
CANCEL_DISPATCH_WINDOW = timedelta(seconds=120)


def tombstone_applies(tombstone: CancelTombstone, dispatch: RunDispatched, memory_seconds: float) -> bool:
    """Does a cancel that arrived before any attempt was here stop this dispatch?

    Yes when it is still remembered, the attempt is newer than any this executor had seen when
    the cancel arrived, and the dispatch was issued before the cancel (the cancel overtook it) or
    shortly after (the scheduler dispatched before it processed the cancel). A dispatch issued
    long after the cancel is a later decision, such as a resume, and runs."""
    if utcnow() - tombstone.received_at >= timedelta(seconds=memory_seconds):
        return False
    if dispatch.attempt <= tombstone.max_known_attempt:
        return False
    requested = tombstone.requested_at
    issued = dispatch.occurred_at
    if requested is None or requested.tzinfo is None or issued.tzinfo is None:
        return True
    return issued <= requested + CANCEL_DISPATCH_WINDOW


def _system_record(text: str) -> bytes:
    record = {"ts": utcnow().isoformat(), "stream": "system", "text": text}
    return json.dumps(record, ensure_ascii=False).encode() + b"\n"


class AttemptRunner:
    """One attempt of one run: its state, and the task that watches it to its end."""

    def __init__(self, backend: LocalBackend, state: AttemptState) -> None:
        self.backend = backend
        self.state = state
        self.task: asyncio.Task[None] | None = None
        self.done = asyncio.Event()
        self.dir = backend.layout.attempt_dir(state.run_id, state.attempt)

    @property
    def key(self) -> tuple[str, int]:
        return (self.state.run_id, self.state.attempt)

    @property
    def settings(self) -> ExecutorSettings:
        return self.backend.settings

    def save(self) -> None:
        self.backend.layout.save_state(self.state)

    def start_watching(self) -> None:
        self.task = asyncio.create_task(
            self._watch_guarded(), name=f"attempt:{self.state.run_id}:{self.state.attempt}"
        )

    # ---- stopping the workload

    async def request_kill(self, reason: KillReason, message: str) -> None:
        """Cancel, deadline or superseded: the first reason wins; SIGTERM now, SIGKILL after grace."""
        state = self.state
        if state.phase == "finished" or state.kill_reason is not None:
            return
        state.kill_reason = reason
        state.kill_message = message
        state.kill_requested_at = utcnow()
        self.save()
        log.info(
            "stopping attempt",
            extra={"run_id": state.run_id, "attempt": state.attempt, "why": reason, "detail": message},
        )
        if state.phase == "running":
            self._escalate()

    def _escalate(self) -> None:
        state = self.state
        if state.kill_reason is None or state.phase != "running":
            return
        now = utcnow()
        if state.term_sent_at is None:
            self._signal_group(signal.SIGTERM)
            state.term_sent_at = now
            self.save()
        elif state.kill_sent_at is None and now - state.term_sent_at >= timedelta(
            seconds=self.settings.cancel_grace_seconds
        ):
            self._signal_group(signal.SIGKILL)
            state.kill_sent_at = now
            self.save()

    def _workload_alive(self) -> bool:
        return procfs.is_alive(self.state.workload_pid, self.state.workload_start_time)

    def _shim_alive(self) -> bool:
        return procfs.is_alive(self.state.shim_pid, self.state.shim_start_time)

    def _signal_group(self, sig: signal.Signals) -> None:
        pgid = self.state.workload_pid
        if not pgid or not (self._shim_alive() or self._workload_alive()):
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)

    # ---- watching

    async def _watch_guarded(self) -> None:
        try:
            await self._watch()
        except asyncio.CancelledError:
            raise
        except Exception:
            # A bug here must not leave the run without an end: report what we know.
            log.exception("watching an attempt failed", extra={"run_id": self.state.run_id})
            self._signal_group(signal.SIGKILL)  # nobody would watch it any more
            with contextlib.suppress(Exception):
                await self.finish(
                    Verdict(
                        "failed",
                        "infra_error",
                        None,
                        "the executor failed while watching this attempt and stopped the workload",
                    ),
                    None,
                )
        finally:
            self.backend.forget(self)

    async def _watch(self) -> None:
        state = self.state
        settings = self.settings
        tailer = LogTailer(
            run_id=state.run_id,
            attempt=state.attempt,
            next_line=state.next_line,
            flush_interval=settings.log_flush_seconds,
            max_lines=settings.log_batch_lines,
            progress=ProgressCoalescer(
                settings.progress_interval_seconds, state=state.progress, pending=state.progress_pending
            ),
        )
        reader = OutputReader(self.dir / "output.jsonl", state.offset)
        deadline = deadline_of(state.dispatch)
        last_save = time.monotonic()
        try:
            while True:
                await self._read_output(reader, tailer)
                for emission in tailer.poll():
                    await self.emit(emission, tailer)
                exit_status = self.backend.layout.exit_status(state.run_id, state.attempt)
                lost = False
                if exit_status is None:
                    if state.kill_reason is None and utcnow() >= deadline:
                        await self.request_kill(
                            "timeout", f"the attempt passed its deadline {deadline.isoformat()}"
                        )
                    self._escalate()
                    if not self._shim_alive():
                        # The shim writes exit.json just before it exits: look once more.
                        exit_status = self.backend.layout.exit_status(state.run_id, state.attempt)
                        lost = exit_status is None
                if exit_status is not None or lost:
                    while await self._read_output(reader, tailer):
                        pass
                    for emission in tailer.flush():
                        await self.emit(emission, tailer)
                    if lost:
                        await self.finish(self._lost_verdict(), None)
                    else:
                        assert exit_status is not None
                        verdict = map_exit(
                            exit_status,
                            kill_reason=self._kill_reason_for(exit_status),
                            memory_limit=state.memory_limit_bytes,
                            kill_message=state.kill_message,
                        )
                        await self.finish(verdict, exit_status.peak_memory_bytes)
                    return
                if time.monotonic() - last_save >= 1.0:
                    state.progress = dict(tailer.progress.state)
                    state.progress_pending = tailer.progress.pending
                    self.save()
                    last_save = time.monotonic()
                await asyncio.sleep(settings.poll_interval_seconds)
        finally:
            reader.close()

    def _kill_reason_for(self, exit_status: ExitStatus) -> KillReason | None:
        """Why Fabrik stopped the workload; None if it had ended on its own before it was asked to."""
        state = self.state
        requested = state.kill_requested_at
        ended = exit_status.finished_at
        if requested is not None and ended is not None and ended < requested:
            return None
        return state.kill_reason

    async def _read_output(self, reader: OutputReader, tailer: LogTailer) -> bool:
        lines = reader.read()
        for end_offset, line in lines:
            for emission in tailer.feed(line, end_offset):
                await self.emit(emission, tailer)
        return bool(lines)

    async def emit(self, emission: Emission, tailer: LogTailer) -> None:
        await self.backend.sink.publish(emission.event)
        if isinstance(emission.event, RunLogChunk):
            self.backend.metrics.log_lines.labels(BACKEND).inc(len(emission.event.lines))
        if emission.checkpoint is not None:
            self.state.offset = emission.checkpoint.offset
            self.state.next_line = emission.checkpoint.next_line
            self.state.progress = dict(tailer.progress.state)
            self.state.progress_pending = tailer.progress.pending
            self.save()

    def _lost_verdict(self) -> Verdict:
        state = self.state
        if self._workload_alive() and state.workload_pid:
            # Its supervisor is gone, so nobody would record its end: stop what is left.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(state.workload_pid, signal.SIGKILL)
        if state.kill_reason == "cancel":
            return Verdict("cancelled", "cancelled", None, state.kill_message or "cancelled")
        if state.kill_reason == "timeout":
            return Verdict("timed_out", "timeout", None, state.kill_message or "deadline passed")
        return Verdict(
            "failed",
            "lost",
            None,
            f"the workload's supervisor (pid {state.shim_pid}) vanished without recording how the workload "
            "ended (killed, or the machine restarted); resume the run to continue from its workspace",
        )

    async def finish(self, verdict: Verdict, peak_memory_bytes: int | None) -> None:
        """Store, then publish, the attempt's one RunFinished (a stored one is re-published as is)."""
        state = self.state
        if state.finished_event is None:
            state.finished_event = RunFinished(
                run_id=state.run_id,
                attempt=state.attempt,
                outcome=verdict.outcome,
                reason=verdict.reason,
                exit_code=verdict.exit_code,
                message=verdict.message,
                peak_memory_bytes=peak_memory_bytes,
            )
            state.phase = "finished"
            self.save()
        event = state.finished_event
        if not state.finished_published:
            await self.backend.sink.publish(event)
            state.finished_published = True
            self.save()
            self.backend.metrics.runs_finished.labels(BACKEND, event.outcome, event.reason or "").inc()
            log.info(
                "attempt finished",
                extra={
                    "run_id": state.run_id,
                    "attempt": state.attempt,
                    "outcome": event.outcome,
                    "reason": event.reason,
                    "exit_code": event.exit_code,
                    "detail": event.message,
                },
            )
        self.done.set()


class LocalBackend:
    """Runs attempts as local process groups and finds them again after a restart."""

    name = BACKEND

    def __init__(
        self,
        settings: ExecutorSettings,
        sink: EventSink,
        metrics: ExecutorMetrics,
        *,
        run_keys: RunKeyProvider | None = None,
        project_envs: ProjectEnvSource | None = None,
        root: Path | None = None,
    ) -> None:
        self.settings = settings
        self.sink = sink
        self.metrics = metrics
        self.run_keys = run_keys or NoRunKey()
        self.project_envs: ProjectEnvSource = project_envs or EmptyEnvSource()
        self.layout = Layout(root or settings.executor_dir())
        self._runners: dict[tuple[str, int], AttemptRunner] = {}
        # Per-run locks, dropped once nobody holds or waits for them.
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self._lock_file: IO[bytes] | None = None

    # ---- life cycle

    def open(self) -> None:
        """Create the data directory and take its lock (one executor per data directory)."""
        self.layout.create()
        lock = self.layout.lock_file.open("ab")
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            lock.close()
            raise DataDirLockedError(
                f"another executor is using {self.layout.root} (locked {self.layout.lock_file}); "
                "run one executor per data directory or set FABRIK_DATA_DIR"
            ) from exc
        self._lock_file = lock
        log.info("local backend ready", extra={"data_dir": str(self.layout.root)})

    async def close(self) -> None:
        runners = list(self._runners.values())
        for runner in runners:
            if runner.task is not None:
                runner.task.cancel()
        for runner in runners:
            if runner.task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await runner.task
            with contextlib.suppress(OSError):
                runner.save()
        self._runners.clear()
        self._update_gauge()
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def forget(self, runner: AttemptRunner) -> None:
        if self._runners.get(runner.key) is runner:
            del self._runners[runner.key]
        self._update_gauge()

    def _update_gauge(self) -> None:
        self.metrics.runs_active.labels(BACKEND).set(len(self._runners))

    def _lock(self, run_id: str) -> asyncio.Lock:
        lock = self._locks.get(run_id)
        if lock is None:
            lock = asyncio.Lock()
            self._locks[run_id] = lock
        return lock

    def _register(self, runner: AttemptRunner) -> None:
        self._runners[runner.key] = runner
        self._update_gauge()

    def active(self, run_id: str) -> list[AttemptRunner]:
        return [r for (rid, _), r in self._runners.items() if rid == run_id]

    # ---- recovery

    async def recover(self) -> None:
        counts: dict[str, int] = {}
        for path in self.layout.state_files():
            run_id, attempt = path.parent.parent.name, int(path.parent.name)
            state = self.layout.load_state(run_id, attempt)
            if state is None or state.finished_published or (run_id, attempt) in self._runners:
                continue
            action = await self._recover_attempt(state)
            counts[action] = counts.get(action, 0) + 1
            self.metrics.runs_recovered.labels(BACKEND, action).inc()
        if counts:
            log.info("recovered attempts", extra={"actions": counts})

    async def _recover_attempt(self, state: AttemptState) -> str:
        runner = AttemptRunner(self, state)
        if state.finished_event is not None:
            await self._publish_started_if_needed(state)
            await runner.finish(Verdict("failed", None, None, ""), None)  # re-publishes the stored event
            return "republished"
        shim = self.layout.shim_info(state.run_id, state.attempt)
        exit_status = self.layout.exit_status(state.run_id, state.attempt)
        launch = runner.dir / "launch.json"
        recent_launch = launch.exists() and time.time() - launch.stat().st_mtime < _RECENT_LAUNCH_SECONDS
        if shim is None and exit_status is None and recent_launch:
            # Crashed right after spawning the shim? Give it a moment to report.
            for _ in range(40):
                await asyncio.sleep(0.05)
                shim = self.layout.shim_info(state.run_id, state.attempt)
                exit_status = self.layout.exit_status(state.run_id, state.attempt)
                if shim is not None or exit_status is not None:
                    break
        if shim is None:
            if exit_status is not None:
                verdict = map_exit(exit_status, kill_reason=None, memory_limit=state.memory_limit_bytes)
                await self._finish_without_start(runner, verdict)
                return "finished"
            if await self._finish_if_stopped(runner):
                return "finished"
            message = (
                "the executor stopped while preparing this attempt; the workload never started "
                "(resume the run to try again)"
            )
            await self._finish_without_start(runner, Verdict("failed", "lost", None, message))
            return "lost"
        self._adopt_shim(
            state, shim.shim_pid, shim.shim_start_time, shim.workload_pid, shim.workload_start_time
        )
        self.layout.save_state(state)
        await self._publish_started_if_needed(state)
        self._register(runner)
        runner.start_watching()
        alive = procfs.is_alive(state.shim_pid, state.shim_start_time)
        log.info(
            "reattached attempt"
            if alive
            else "found an attempt whose supervisor ended while the executor was away",
            extra={"run_id": state.run_id, "attempt": state.attempt, "offset": state.offset},
        )
        return "reattached" if alive else "finished"

    def _adopt_shim(
        self,
        state: AttemptState,
        shim_pid: int,
        shim_start_time: str | None,
        workload_pid: int,
        workload_start_time: str | None,
    ) -> None:
        state.shim_pid = shim_pid
        state.shim_start_time = shim_start_time
        state.workload_pid = workload_pid
        state.workload_start_time = workload_start_time
        state.workload_ref = f"local:{workload_pid}"
        state.phase = "running"
        if state.started_event is None:
            state.started_event = RunStarted(
                run_id=state.run_id,
                attempt=state.attempt,
                backend="local",
                workload_ref=state.workload_ref,
                image_digest=state.dispatch.image_digest,
            )

    async def _publish_started_if_needed(self, state: AttemptState) -> None:
        if state.started_event is not None and not state.started_published:
            await self.sink.publish(state.started_event)
            state.started_published = True
            self.layout.save_state(state)

    # ---- start

    async def start(self, dispatch: RunDispatched) -> None:
        async with self._lock(dispatch.run_id):
            await self._start_locked(dispatch)

    async def _start_locked(self, dispatch: RunDispatched) -> None:
        key = (dispatch.run_id, dispatch.attempt)
        fields = {"run_id": dispatch.run_id, "attempt": dispatch.attempt}
        if key in self._runners:
            log.info("dispatch for an attempt already running here; nothing to do", extra=fields)
            return
        existing = self.layout.load_state(dispatch.run_id, dispatch.attempt)
        if existing is not None:
            log.info("dispatch for an attempt already handled here; nothing started", extra=fields)
            if not existing.finished_published:
                await self._recover_attempt(existing)
            return
        known = self.layout.attempts(dispatch.run_id)
        if known and dispatch.attempt < known[-1]:
            log.warning(
                "stale dispatch: a newer attempt exists here; ignored", extra={**fields, "newest": known[-1]}
            )
            return
        for older in self.active(dispatch.run_id):
            await older.request_kill("superseded", f"superseded by attempt {dispatch.attempt}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(older.done.wait(), self.settings.cancel_grace_seconds + 15)

        # Read before anything is recorded: a NATS error here propagates and the dispatch is
        # redelivered; an environment that cannot be used fails the attempt below.
        env_problem: str | None = None
        try:
            project_env = await self.project_envs.load(dispatch.project, dispatch.env)
        except ProjectEnvError as exc:
            project_env, env_problem = {}, str(exc)

        memory_limit: int | None = None
        if self.settings.enforce_memory_limit:
            with contextlib.suppress(ValueError):
                memory_limit = parse_memory(dispatch.params.resources.memory_limit)
        state = AttemptState(
            run_id=dispatch.run_id,
            attempt=dispatch.attempt,
            dispatch=dispatch,
            created_at=utcnow(),
            memory_limit_bytes=memory_limit,
        )
        runner = AttemptRunner(self, state)
        # From here on a cancel for this run reaches the runner (no await until the check below).
        self._register(runner)
        try:
            tombstone = self.layout.load_tombstone(dispatch.run_id)
            if tombstone is not None:
                self.layout.drop_tombstone(dispatch.run_id)
                if tombstone_applies(tombstone, dispatch, self.settings.cancel_memory_seconds):
                    state.kill_reason = "cancel"
                    state.kill_message = "cancelled before the workload started" + (
                        f" by {tombstone.requested_by}" if tombstone.requested_by else ""
                    )
            runner.dir.mkdir(parents=True, exist_ok=True)
            self.layout.save_state(state)
            if await self._finish_if_stopped(runner):
                return
            if utcnow() >= deadline_of(dispatch):
                await self._finish_without_start(
                    runner,
                    Verdict(
                        "timed_out", "timeout", None, "the deadline passed before the workload could start"
                    ),
                )
                return
            if env_problem is not None:
                await self._finish_without_start(
                    runner, Verdict("failed", "infra_error", None, f"project environment: {env_problem}")
                )
                return
            try:
                await asyncio.to_thread(self._prepare, state, runner.dir, project_env)
            except (WorkspaceError, LaunchError) as exc:
                await self._finish_without_start(runner, Verdict("failed", "infra_error", None, str(exc)))
                return
            except OSError as exc:
                await self._finish_without_start(
                    runner, Verdict("failed", "infra_error", None, f"preparing the attempt failed: {exc}")
                )
                return
            if await self._finish_if_stopped(runner):
                return
            try:
                await asyncio.to_thread(self._spawn, runner.dir)
            except LaunchError as exc:
                await self._finish_without_start(runner, Verdict("failed", "infra_error", None, str(exc)))
                return
            shim = self.layout.shim_info(state.run_id, state.attempt)
            if shim is None:
                exit_status = self.layout.exit_status(state.run_id, state.attempt) or ExitStatus(
                    error="the workload supervisor did not start"
                )
                verdict = map_exit(exit_status, kill_reason=None, memory_limit=memory_limit)
                await self._finish_without_start(runner, verdict)
                return
            self._adopt_shim(
                state, shim.shim_pid, shim.shim_start_time, shim.workload_pid, shim.workload_start_time
            )
            self.layout.save_state(state)
            self.metrics.runs_started.labels(BACKEND).inc()
            log.info(
                "workload started",
                extra={**fields, "workload_ref": state.workload_ref, "shim_pid": state.shim_pid},
            )
            await self._publish_started_if_needed(state)
            runner.start_watching()
        finally:
            if runner.task is None:
                self.forget(runner)

    async def _finish_if_stopped(self, runner: AttemptRunner) -> bool:
        state = runner.state
        if state.kill_reason is None:
            return False
        if state.kill_reason == "timeout":
            verdict = Verdict("timed_out", "timeout", None, state.kill_message)
        else:
            verdict = Verdict(
                "cancelled", "cancelled", None, state.kill_message or "cancelled before it started"
            )
        await self._finish_without_start(runner, verdict)
        return True

    async def _finish_without_start(self, runner: AttemptRunner, verdict: Verdict) -> None:
        """End an attempt whose workload never ran: its notes so far and the reason go to its log."""
        state = runner.state
        tailer = LogTailer(
            run_id=state.run_id,
            attempt=state.attempt,
            next_line=state.next_line,
            progress=ProgressCoalescer(self.settings.progress_interval_seconds),
        )
        reader = OutputReader(runner.dir / "output.jsonl", state.offset)
        try:
            for end_offset, line in reader.read():
                tailer.feed(line, end_offset)
        finally:
            reader.close()
        note = (
            f"the workload did not start: {verdict.message}"
            if verdict.message
            else "the workload did not start"
        )
        tailer.feed(LogLine(ts=utcnow(), stream="system", text=note), reader.offset)
        for emission in tailer.flush():
            await runner.emit(emission, tailer)
        await runner.finish(verdict, None)

    def _prepare(self, state: AttemptState, attempt_dir: Path, project_env: Mapping[str, str]) -> None:
        """Blocking: workspace, environment, command; writes launch.json and the first system lines."""
        dispatch = state.dispatch
        settings = self.settings
        notes: list[str] = []
        workspace = prepare_workspace(
            self.layout.root, dispatch, clone_timeout=settings.clone_timeout_seconds
        )
        notes.extend(workspace.notes)
        env, warnings = build_env(
            dispatch,
            workspace=workspace.path,
            project_env=project_env,
            llm_proxy_url=settings.llm_proxy_url,
            run_key_env=self.run_keys.llm_key_env(dispatch),
            spec_file=workspace.spec_file,
            todo_file=workspace.todo_file,
            path=settings.workload_path or None,
        )
        for warning in warnings:
            log.warning("environment entry skipped", extra={"run_id": dispatch.run_id, "detail": warning})
        argv = resolve_argv(dispatch.params.workload, settings.default_command)
        check_executable(argv[0], cwd=workspace.path, path=env["PATH"])
        launch = {
            "argv": argv,
            "cwd": str(workspace.path),
            "env": env,
            "memory_limit_bytes": state.memory_limit_bytes,
        }
        write_atomic(attempt_dir / "launch.json", json.dumps(launch).encode(), mode=0o600)
        lines = [*notes, *(f"warning: {w}" for w in warnings)]
        limit = f", memory limit {state.memory_limit_bytes} bytes" if state.memory_limit_bytes else ""
        lines.append(f"attempt {dispatch.attempt}: starting {json.dumps(argv)} in {workspace.path}{limit}")
        with (attempt_dir / "output.jsonl").open("ab") as out:
            out.write(b"".join(_system_record(line) for line in lines))

    def _spawn(self, attempt_dir: Path) -> None:
        """Blocking: start the shim (it double-forks) and wait until the workload runs or failed to."""
        try:
            done = subprocess.run(
                [sys.executable, "-m", "fabrik_executor.shim", str(attempt_dir)],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=90,
                check=False,
                close_fds=True,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise LaunchError(f"the workload supervisor could not be started: {exc}") from exc
        if done.returncode != 0:
            detail = done.stderr.decode(errors="replace").strip().splitlines()
            raise LaunchError(
                f"the workload supervisor failed (exit {done.returncode})"
                + (f": {detail[-1]}" if detail else "")
            )

    # ---- cancel

    async def cancel(self, request: RunCancelRequested) -> None:
        message = f"cancelled by {request.requested_by}" if request.requested_by else "cancelled"
        if request.reason:
            message += f": {request.reason}"
        runners = self.active(request.run_id)
        if runners:
            for runner in runners:
                await runner.request_kill("cancel", message)
            return
        known = self.layout.attempts(request.run_id)
        self.layout.save_tombstone(
            CancelTombstone(
                run_id=request.run_id,
                received_at=utcnow(),
                requested_at=request.occurred_at,
                max_known_attempt=known[-1] if known else 0,
                requested_by=request.requested_by,
                reason=request.reason,
            )
        )
        log.info(
            "cancel for a run not running here; remembered for a dispatch still on its way",
            extra={"run_id": request.run_id},
        )

    # ---- housekeeping

    async def maintain(self, interval: float = 3600.0) -> None:
        while True:
            await asyncio.to_thread(self.sweep, utcnow().timestamp())
            await asyncio.sleep(interval)

    def sweep(self, now: float) -> list[str]:
        """Delete finished runs older than the retention, and expired cancel tombstones."""
        removed: list[str] = []
        retention = self.settings.retention_days * 86400
        if self.layout.runs.is_dir():
            for run_dir in self.layout.runs.iterdir():
                run_id = run_dir.name
                if self.active(run_id) or not run_dir.is_dir():
                    continue
                attempts = self.layout.attempts(run_id)
                if not attempts:
                    continue
                states = [self.layout.load_state(run_id, a) for a in attempts]
                if not all(s is not None and s.finished_published and s.finished_event for s in states):
                    continue
                last = max(s.finished_event.occurred_at.timestamp() for s in states if s and s.finished_event)
                if now - last < retention:
                    continue
                shutil.rmtree(self.layout.workspaces / run_id, ignore_errors=True)
                shutil.rmtree(run_dir, ignore_errors=True)
                removed.append(run_id)
        if self.layout.cancels.is_dir():
            for path in self.layout.cancels.glob("*.json"):
                tombstone = self.layout.load_tombstone(path.stem)
                if (
                    tombstone is None
                    or now - tombstone.received_at.timestamp() > self.settings.cancel_memory_seconds
                ):
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
        if removed:
            log.info("retention: removed finished runs", extra={"runs": len(removed)})
        return removed


__all__ = [
    "AttemptRunner",
    "DataDirLockedError",
    "LaunchError",
    "LocalBackend",
    "check_executable",
    "resolve_argv",
]
