"""How an attempt's end maps to outcome and reason: one pure function, tested on its own.

| what happened | outcome / reason |
|---|---|
| the workload could not start (command missing, not executable, ...) | failed / infra_error |
| Fabrik stopped it for a cancel (or a newer attempt) | cancelled / cancelled |
| Fabrik stopped it at its deadline | timed_out / timeout |
| exit code 0 | succeeded (the only way to succeed) |
| killed by SIGKILL that Fabrik did not send | failed / oom_killed (1) |
| a memory limit was set and the end looks like an allocation failure | failed / oom_killed |
| anything else | failed / workload_error, with the exit code |

(1) On Linux an unrequested SIGKILL is almost always the kernel's OOM killer.

The memory limit is `RLIMIT_AS`, so hitting it does not kill the process: its allocation fails and
the runtime decides what happens. The heuristic for "looks like an allocation failure": one of
the last stderr lines carries a well-known out-of-memory message (Python `MemoryError`, C/C++
`std::bad_alloc` / `Cannot allocate memory` / `out of memory`, Go `runtime: out of memory`, Node
`heap out of memory`), or the process died of SIGSEGV/SIGABRT/SIGBUS with a peak resident size
of at least 90% of the limit. A workload that catches its allocation failure and exits with a
plain error message is reported as workload_error: that is its own account.
"""

from __future__ import annotations

import re
import signal
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

import msgspec

from fabrik_common.events import Outcome

KillReason = Literal["cancel", "timeout", "superseded"]

OOM_MARKERS = re.compile(
    r"MemoryError|out of memory|cannot allocate memory|std::bad_alloc|ENOMEM|memory allocation failed",
    re.IGNORECASE,
)
_CRASH_SIGNALS = {int(signal.SIGSEGV), int(signal.SIGABRT), int(signal.SIGBUS)}


class ExitStatus(msgspec.Struct, kw_only=True):
    """exit.json, written by the shim."""

    exit_code: int | None = None
    signal: int | None = None
    peak_memory_bytes: int | None = None
    finished_at: datetime | None = None
    error: str | None = None
    stderr_tail: list[str] = msgspec.field(default_factory=list)


@dataclass(frozen=True)
class Verdict:
    outcome: Outcome
    reason: str | None
    exit_code: int | None
    message: str


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _last_line(lines: list[str]) -> str:
    for line in reversed(lines):
        if line.strip():
            return line.strip()[:500]
    return ""


def _ending(status: ExitStatus) -> str:
    if status.signal is not None:
        return f"killed by {signal_name(status.signal)}"
    return f"exit code {status.exit_code}"


def format_bytes(value: int) -> str:
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if value >= size:
            return f"{value / size:.1f} {unit}"
    return f"{value} B"


def map_exit(
    status: ExitStatus,
    *,
    kill_reason: KillReason | None,
    memory_limit: int | None,
    kill_message: str = "",
) -> Verdict:
    if status.error:
        return Verdict("failed", "infra_error", None, status.error)
    if kill_reason == "cancel":
        return Verdict(
            "cancelled", "cancelled", status.exit_code, kill_message or f"cancelled ({_ending(status)})"
        )
    if kill_reason == "timeout":
        return Verdict(
            "timed_out", "timeout", status.exit_code, kill_message or f"deadline passed ({_ending(status)})"
        )
    if kill_reason == "superseded":
        return Verdict(
            "cancelled", "cancelled", status.exit_code, kill_message or "superseded by a newer attempt"
        )
    if status.exit_code == 0 and status.signal is None:
        return Verdict("succeeded", None, 0, "")
    last = _last_line(status.stderr_tail)
    if status.signal == int(signal.SIGKILL):
        return Verdict(
            "failed",
            "oom_killed",
            status.exit_code,
            "killed by SIGKILL that Fabrik did not send: most likely the kernel's OOM killer"
            + (
                f" (peak memory {format_bytes(status.peak_memory_bytes)})" if status.peak_memory_bytes else ""
            ),
        )
    if memory_limit:
        marker = next((line for line in reversed(status.stderr_tail) if OOM_MARKERS.search(line)), None)
        near_limit = status.peak_memory_bytes is not None and status.peak_memory_bytes >= 0.9 * memory_limit
        if marker is not None or (status.signal in _CRASH_SIGNALS and near_limit):
            detail = marker.strip()[:300] if marker else _ending(status)
            return Verdict(
                "failed",
                "oom_killed",
                status.exit_code,
                f"out of memory: the memory limit is {format_bytes(memory_limit)} ({detail})",
            )
    message = f"{_ending(status)}: {last}" if last else _ending(status)
    return Verdict("failed", "workload_error", status.exit_code, message)
