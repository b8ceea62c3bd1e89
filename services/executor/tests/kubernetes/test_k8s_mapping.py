"""Pod and Job conditions → outcome and reason (pure)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from fabrik_executor.kubernetes import mapping
from fabrik_executor.kubernetes.mapping import StopRequest

T0 = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)


def ts(seconds: float) -> str:
    return (T0 + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")


def job(*conditions: tuple[str, str], deleting: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "fabrik-x-1"}
    if deleting:
        meta["deletionTimestamp"] = ts(5)
    return {
        "metadata": meta,
        "status": {
            "conditions": [{"type": t, "status": "True", "reason": r, "message": r} for t, r in conditions]
        },
    }


def pod(
    state: dict[str, Any] | None = None,
    *,
    phase: str = "Running",
    reason: str | None = None,
    conditions: list[dict[str, Any]] | None = None,
    init: dict[str, Any] | None = None,
) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": phase, "conditions": conditions or []}
    if state is not None:
        status["containerStatuses"] = [{"name": "workload", "state": state}]
    if init is not None:
        status["initContainerStatuses"] = [{"name": "clone", "state": init}]
    if reason:
        status["reason"] = reason
        status["message"] = "The node was low on resource: memory."
    return {"metadata": {"name": "fabrik-x-1-abcde", "creationTimestamp": ts(0)}, "status": status}


def terminated(code: int, reason: str = "Error", message: str = "", finished: float = 3) -> dict[str, Any]:
    return {
        "terminated": {
            "exitCode": code,
            "reason": reason,
            "message": message,
            "startedAt": ts(1),
            "finishedAt": ts(finished),
        }
    }


def verdict(
    j: dict[str, Any] | None, pods: list[dict[str, Any]], stop: StopRequest | None = None
) -> tuple[Any, ...]:
    assert mapping.attempt_over(j, pods)
    v = mapping.decide(j, pods, stop)
    return (v.outcome, v.reason, v.exit_code)


def test_exit_zero_succeeds_and_nothing_else_does() -> None:
    assert verdict(
        job(("Complete", "CompletionsReached")), [pod(terminated(0, "Completed"), phase="Succeeded")]
    ) == ("succeeded", None, 0)
    assert verdict(job(("Complete", "CompletionsReached")), []) == ("succeeded", None, 0)


def test_non_zero_exit_is_a_workload_error_with_the_code_and_last_line() -> None:
    p = pod(terminated(3, message="step 1\nboom: no such file\n"), phase="Failed")
    v = mapping.decide(job(("Failed", "BackoffLimitExceeded")), [p], None)
    assert (v.outcome, v.reason, v.exit_code) == ("failed", "workload_error", 3)
    assert v.message == "exit code 3: boom: no such file"


def test_oom_killed() -> None:
    p = pod(terminated(137, "OOMKilled"), phase="Failed")
    assert verdict(job(("Failed", "BackoffLimitExceeded")), [p]) == ("failed", "oom_killed", 137)


def test_deadline_exceeded_is_timed_out_whatever_the_container_says() -> None:
    p = pod(terminated(143), phase="Failed")
    assert verdict(job(("Failed", "DeadlineExceeded")), [p]) == ("timed_out", "timeout", 143)
    assert verdict(job(("Failed", "DeadlineExceeded")), []) == ("timed_out", "timeout", None)


@pytest.mark.parametrize("reason", ["Evicted", "NodeLost", "Shutdown", "UnexpectedAdmissionError"])
def test_evicted_or_node_problems_are_infra_errors(reason: str) -> None:
    p = pod(terminated(137), phase="Failed", reason=reason)
    out, why, _ = verdict(job(("Failed", "BackoffLimitExceeded")), [p])
    assert (out, why) == ("failed", "infra_error")


def test_disruption_target_is_an_infra_error() -> None:
    p = pod(
        terminated(143),
        phase="Failed",
        conditions=[{"type": "DisruptionTarget", "status": "True", "reason": "EvictionByEvictionAPI"}],
    )
    assert verdict(job(("Failed", "BackoffLimitExceeded")), [p])[:2] == ("failed", "infra_error")


def test_job_failed_with_the_pod_gone_is_node_loss() -> None:
    v = mapping.decide(job(("Failed", "BackoffLimitExceeded")), [], None)
    assert (v.outcome, v.reason) == ("failed", "infra_error")
    assert "node lost" in v.message


def test_clone_failure_is_an_infra_error() -> None:
    p = pod(
        {"waiting": {"reason": "PodInitializing"}},
        phase="Failed",
        init={"terminated": {"exitCode": 128, "message": "fatal: repository not found"}},
    )
    v = mapping.decide(job(("Failed", "BackoffLimitExceeded")), [p], None)
    assert (v.outcome, v.reason) == ("failed", "infra_error")
    assert "repository not found" in v.message


def test_start_error_is_an_infra_error() -> None:
    p = pod(terminated(128, "StartError", 'exec: "agent": executable file not found'), phase="Failed")
    assert verdict(job(("Failed", "BackoffLimitExceeded")), [p])[:2] == ("failed", "infra_error")
    assert mapping.workload_started_at(p) is None


def test_recorded_stops() -> None:
    stop = StopRequest(why="cancel", message="cancelled by alice", at=T0 + timedelta(seconds=2))
    deleting = job(deleting=True)
    assert verdict(deleting, [], stop) == ("cancelled", "cancelled", None)
    # the pod was killed by the cancel (it ended after the stop was recorded)
    assert verdict(deleting, [pod(terminated(143, finished=4), phase="Failed")], stop)[:2] == (
        "cancelled",
        "cancelled",
    )
    # it had ended on its own before the cancel: its own end counts
    assert verdict(deleting, [pod(terminated(0, "Completed", finished=1), phase="Succeeded")], stop) == (
        "succeeded",
        None,
        0,
    )
    pull = StopRequest(why="image_pull", message="no such image", at=T0)
    assert verdict(deleting, [], pull)[:2] == ("failed", "image_pull")
    sup = StopRequest(why="superseded", at=T0)
    v = mapping.decide(deleting, [], sup)
    assert (v.outcome, v.message) == ("cancelled", "superseded by a newer attempt")


def test_attempt_over() -> None:
    running = pod({"running": {"startedAt": ts(1)}})
    assert not mapping.attempt_over(job(), [running])
    assert not mapping.attempt_over(job(deleting=True), [running])
    assert mapping.attempt_over(job(deleting=True), [])
    assert mapping.attempt_over(job(deleting=True), [pod(terminated(143), phase="Running")])
    assert mapping.attempt_over(job(("Failed", "DeadlineExceeded")), [running])
    assert mapping.attempt_over(None, [])


def test_waiting_reasons() -> None:
    backoff = pod(
        {"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image"}}, phase="Pending"
    )
    w = mapping.waiting(backoff)
    assert w is not None and w.image_pull and not w.immediate
    invalid = mapping.waiting(pod({"waiting": {"reason": "InvalidImageName"}}, phase="Pending"))
    assert invalid is not None and invalid.immediate
    assert mapping.waiting(pod({"waiting": {"reason": "ContainerCreating"}}, phase="Pending")) is None
    config = mapping.waiting(pod({"waiting": {"reason": "CreateContainerConfigError"}}, phase="Pending"))
    assert config is not None and not config.image_pull
