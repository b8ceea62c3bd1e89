"""Exit mapping: outcome and reason from how the workload ended."""

from __future__ import annotations

import signal

import pytest

from fabrik_executor.outcome import ExitStatus, map_exit

MiB = 1024**2


def status(code: int | None = 0, sig: int | None = None, **kwargs: object) -> ExitStatus:
    return ExitStatus(exit_code=code, signal=sig, **kwargs)  # type: ignore[arg-type]


def test_only_exit_code_zero_succeeds() -> None:
    verdict = map_exit(status(0), kill_reason=None, memory_limit=None)
    assert (verdict.outcome, verdict.reason, verdict.exit_code) == ("succeeded", None, 0)


def test_non_zero_exit_is_a_workload_error_with_the_last_stderr_line() -> None:
    verdict = map_exit(
        status(3, stderr_tail=["first", "the real cause", ""]), kill_reason=None, memory_limit=None
    )
    assert (verdict.outcome, verdict.reason, verdict.exit_code) == ("failed", "workload_error", 3)
    assert verdict.message == "exit code 3: the real cause"


def test_killed_by_a_signal_is_a_workload_error() -> None:
    verdict = map_exit(status(128 + 15, int(signal.SIGTERM)), kill_reason=None, memory_limit=512 * MiB)
    assert (verdict.outcome, verdict.reason, verdict.exit_code) == ("failed", "workload_error", 143)
    assert verdict.message == "killed by SIGTERM"


def test_sigkill_not_sent_by_fabrik_is_oom_killed() -> None:
    verdict = map_exit(status(137, int(signal.SIGKILL)), kill_reason=None, memory_limit=None)
    assert (verdict.outcome, verdict.reason) == ("failed", "oom_killed")
    assert "OOM killer" in verdict.message


@pytest.mark.parametrize(
    "tail",
    [
        ["Traceback (most recent call last):", "MemoryError"],
        ["terminate called after throwing an instance of 'std::bad_alloc'"],
        ["fatal error: runtime: out of memory"],
        ["FATAL ERROR: Reached heap limit Allocation failed - JavaScript heap out of memory"],
    ],
)
def test_allocation_failure_under_a_memory_limit_is_oom_killed(tail: list[str]) -> None:
    verdict = map_exit(status(1, stderr_tail=tail), kill_reason=None, memory_limit=200 * MiB)
    assert (verdict.outcome, verdict.reason, verdict.exit_code) == ("failed", "oom_killed", 1)
    assert "200.0 MiB" in verdict.message


def test_memory_error_without_a_limit_is_the_workloads_own_error() -> None:
    verdict = map_exit(status(1, stderr_tail=["MemoryError"]), kill_reason=None, memory_limit=None)
    assert verdict.reason == "workload_error"


def test_crash_near_the_limit_is_oom_killed_far_from_it_is_not() -> None:
    near = status(139, int(signal.SIGSEGV), peak_memory_bytes=190 * MiB)
    far = status(139, int(signal.SIGSEGV), peak_memory_bytes=20 * MiB)
    assert map_exit(near, kill_reason=None, memory_limit=200 * MiB).reason == "oom_killed"
    assert map_exit(far, kill_reason=None, memory_limit=200 * MiB).reason == "workload_error"


def test_what_fabrik_stopped_wins_over_the_exit_status() -> None:
    killed = status(137, int(signal.SIGKILL))
    cancelled = map_exit(killed, kill_reason="cancel", memory_limit=None, kill_message="cancelled by ann")
    assert (cancelled.outcome, cancelled.reason, cancelled.message) == (
        "cancelled",
        "cancelled",
        "cancelled by ann",
    )
    timed_out = map_exit(status(0), kill_reason="timeout", memory_limit=None)
    assert (timed_out.outcome, timed_out.reason) == ("timed_out", "timeout")
    superseded = map_exit(killed, kill_reason="superseded", memory_limit=None)
    assert superseded.outcome == "cancelled"


def test_could_not_start_is_an_infra_error() -> None:
    verdict = map_exit(
        ExitStatus(error="cannot start 'x': No such file or directory"), kill_reason=None, memory_limit=None
    )
    assert (verdict.outcome, verdict.reason, verdict.exit_code) == ("failed", "infra_error", None)
