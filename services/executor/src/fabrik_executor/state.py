"""What the local backend keeps on disk, so that it survives its own crash.

    <data>/
      executor.lock                     flock: one executor per data directory
      env/<project>/<env>.env           project environments (dotenv)
      workspaces/<run_id>/              the run's workspace, shared by its attempts
      runs/<run_id>/workspace.json      marker: the workspace is prepared
      runs/<run_id>/<attempt>/          one attempt:
        state.json                      AttemptState (this module), written by the executor
        launch.json                     argv, cwd, env, memory limit: read by the shim (mode 0600)
        shim.json                       pids and start times, written by the shim
        output.jsonl                    the workload's output, appended by the shim
        exit.json                       the workload's end, written by the shim
        shim.log                        the shim's own errors
      cancels/<run_id>.json             a cancel that arrived for a run not (yet) hosted here

Every JSON file is written atomically (temporary file + rename). The events that must be
published exactly once per attempt (`RunStarted`, `RunFinished`) are stored in state.json
*before* they are published, and flagged once JetStream acknowledged them: after a crash the
same event (same `event_id`, so JetStream drops a duplicate) is published again, never a
different one.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, TypeVar

import msgspec

from fabrik_common.events import RunDispatched, RunFinished, RunStarted
from fabrik_executor.outcome import ExitStatus, KillReason

log = logging.getLogger(__name__)

T = TypeVar("T")
Phase = Literal["preparing", "running", "finished"]


class AttemptState(msgspec.Struct, kw_only=True):
    run_id: str
    attempt: int
    dispatch: RunDispatched
    created_at: datetime
    phase: Phase = "preparing"
    memory_limit_bytes: int | None = None
    workload_ref: str | None = None
    shim_pid: int | None = None
    shim_start_time: str | None = None
    workload_pid: int | None = None
    workload_start_time: str | None = None
    started_event: RunStarted | None = None
    started_published: bool = False
    kill_reason: KillReason | None = None
    kill_message: str = ""
    kill_requested_at: datetime | None = None
    term_sent_at: datetime | None = None
    kill_sent_at: datetime | None = None
    offset: int = 0
    next_line: int = 0
    progress: dict[str, Any] = msgspec.field(default_factory=dict)
    progress_pending: bool = False
    finished_event: RunFinished | None = None
    finished_published: bool = False


class ShimInfo(msgspec.Struct, kw_only=True):
    """shim.json, written by the shim once the workload runs."""

    shim_pid: int
    shim_start_time: str | None = None
    workload_pid: int
    workload_start_time: str | None = None
    started_at: datetime | None = None


class CancelTombstone(msgspec.Struct, kw_only=True):
    """A cancel for a run that had no active attempt here: it stops the next attempt dispatched."""

    run_id: str
    received_at: datetime
    max_known_attempt: int
    requested_at: datetime | None = None
    """When the cancel was requested (the event's occurred_at)."""
    requested_by: str = ""
    reason: str = ""


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    tmp.replace(path)


def read_struct(path: Path, cls: type[T]) -> T | None:
    """The file decoded as `cls`; None if it does not exist or is not valid (logged)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        return msgspec.json.decode(data, type=cls)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        log.error(  # noqa: TRY400 - the reason is in the record
            "unreadable state file", extra={"path": str(path), "error": str(exc)}
        )
        return None


class Layout:
    """Paths under the executor's data directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.runs = root / "runs"
        self.workspaces = root / "workspaces"
        self.cancels = root / "cancels"
        self.env = root / "env"
        self.lock_file = root / "executor.lock"

    def create(self) -> None:
        for path in (self.root, self.runs, self.workspaces, self.cancels, self.env):
            path.mkdir(parents=True, exist_ok=True)

    def run_dir(self, run_id: str) -> Path:
        return self.runs / run_id

    def attempt_dir(self, run_id: str, attempt: int) -> Path:
        return self.runs / run_id / str(attempt)

    def state_file(self, run_id: str, attempt: int) -> Path:
        return self.attempt_dir(run_id, attempt) / "state.json"

    def attempts(self, run_id: str) -> list[int]:
        """Attempt numbers of `run_id` with a state file, ascending."""
        run_dir = self.run_dir(run_id)
        if not run_dir.is_dir():
            return []
        return sorted(
            int(p.name) for p in run_dir.iterdir() if p.name.isdigit() and (p / "state.json").exists()
        )

    def state_files(self) -> Iterator[Path]:
        if not self.runs.is_dir():
            return
        for run_dir in sorted(self.runs.iterdir()):
            if not run_dir.is_dir():
                continue
            for attempt_dir in sorted(run_dir.iterdir(), key=lambda p: (len(p.name), p.name)):
                state = attempt_dir / "state.json"
                if attempt_dir.name.isdigit() and state.exists():
                    yield state

    # ---- attempt state

    def load_state(self, run_id: str, attempt: int) -> AttemptState | None:
        return read_struct(self.state_file(run_id, attempt), AttemptState)

    def save_state(self, state: AttemptState) -> None:
        directory = self.attempt_dir(state.run_id, state.attempt)
        directory.mkdir(parents=True, exist_ok=True)
        write_atomic(directory / "state.json", msgspec.json.encode(state))

    def shim_info(self, run_id: str, attempt: int) -> ShimInfo | None:
        return read_struct(self.attempt_dir(run_id, attempt) / "shim.json", ShimInfo)

    def exit_status(self, run_id: str, attempt: int) -> ExitStatus | None:
        return read_struct(self.attempt_dir(run_id, attempt) / "exit.json", ExitStatus)

    # ---- cancels for runs not hosted here

    def tombstone_file(self, run_id: str) -> Path:
        return self.cancels / f"{run_id}.json"

    def save_tombstone(self, tombstone: CancelTombstone) -> None:
        self.cancels.mkdir(parents=True, exist_ok=True)
        write_atomic(self.tombstone_file(tombstone.run_id), msgspec.json.encode(tombstone))

    def load_tombstone(self, run_id: str) -> CancelTombstone | None:
        return read_struct(self.tombstone_file(run_id), CancelTombstone)

    def drop_tombstone(self, run_id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.tombstone_file(run_id).unlink()
