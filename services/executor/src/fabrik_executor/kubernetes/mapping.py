"""What a Job and its pods say about an attempt: pure functions over the API objects (as dicts).

| what Kubernetes shows | outcome / reason |
|---|---|
| a stop the executor recorded (`fabrik.sh/stop`) before the workload ended: | |
| · cancel, superseded, the Job deleted outside Fabrik | cancelled / cancelled |
| · an image pull failing past the grace | failed / image_pull |
| · a container that cannot be created past the grace | failed / infra_error |
| Job condition `Failed` with reason `DeadlineExceeded` | timed_out / timeout |
| pod `status.reason` `Evicted`, `NodeLost`, …, or a `DisruptionTarget` condition | failed / infra_error |
| the clone init container ended non-zero | failed / infra_error |
| workload container terminated `OOMKilled` | failed / oom_killed |
| workload container could not start (`StartError`, `ContainerCannotRun`) | failed / infra_error |
| workload container exit code 0 | succeeded (nothing else succeeds) |
| workload container exit code ≠ 0 | failed / workload_error, with the exit code |
| Job `Complete` | succeeded |
| Job `Failed` and the pod gone without a recorded end (node lost) | failed / infra_error |

An attempt is over when its Job has a `Complete` or `Failed` condition, or when the Job is gone
or being deleted and none of its pods is still alive. Until then nothing is decided: the pod
watch and the Job watch are separate streams, so the backend re-reads the pods before it
decides (a `Failed` Job can arrive before the pod update that says why).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import msgspec

from fabrik_executor.kubernetes.render import CLONE_CONTAINER, WORKLOAD_CONTAINER
from fabrik_executor.outcome import Verdict

Obj = Mapping[str, Any]
StopWhy = Literal["cancel", "superseded", "image_pull", "infra", "deleted", "timeout"]

IMAGE_PULL_REASONS = frozenset(
    {
        "ErrImagePull",
        "ImagePullBackOff",
        "InvalidImageName",
        "ErrImageNeverPull",
        "RegistryUnavailable",
        "SignatureValidationFailed",
    }
)
IMMEDIATE_PULL_FAILURES = frozenset({"InvalidImageName", "ErrImageNeverPull"})
START_FAILURE_WAITING = frozenset({"CreateContainerConfigError", "CreateContainerError", "RunContainerError"})
INFRA_POD_REASONS = frozenset(
    {
        "Evicted",
        "NodeLost",
        "Shutdown",
        "NodeShutdown",
        "Terminated",
        "UnexpectedAdmissionError",
        "OutOfcpu",
        "OutOfmemory",
        "OutOfpods",
        "NodeAffinity",
        "Preempting",
    }
)
START_FAILURE_TERMINATED = frozenset({"StartError", "ContainerCannotRun"})


class StopRequest(msgspec.Struct, kw_only=True):
    """Why the executor stopped an attempt (Job annotation `fabrik.sh/stop`), recorded before it acted."""

    why: StopWhy
    message: str = ""
    at: datetime


def meta(obj: Obj) -> Mapping[str, Any]:
    return obj.get("metadata") or {}


def name_of(obj: Obj) -> str:
    return str(meta(obj).get("name", ""))


def labels_of(obj: Obj) -> Mapping[str, str]:
    return meta(obj).get("labels") or {}


def annotations_of(obj: Obj) -> Mapping[str, str]:
    return meta(obj).get("annotations") or {}


def is_deleting(obj: Obj) -> bool:
    return bool(meta(obj).get("deletionTimestamp"))


def condition(obj: Obj, kind: str) -> Mapping[str, Any] | None:
    for cond in (obj.get("status") or {}).get("conditions") or ():
        if cond.get("type") == kind and cond.get("status") == "True":
            return dict(cond)
    return None


def job_terminal(job: Obj) -> Literal["Complete", "Failed"] | None:
    if condition(job, "Complete") is not None:
        return "Complete"
    if condition(job, "Failed") is not None:
        return "Failed"
    return None


def container_status(pod: Obj, name: str, *, init: bool = False) -> Mapping[str, Any] | None:
    key = "initContainerStatuses" if init else "containerStatuses"
    for status in (pod.get("status") or {}).get(key) or ():
        if status.get("name") == name:
            return dict(status)
    return None


def _state(status: Mapping[str, Any] | None, kind: str) -> Mapping[str, Any] | None:
    if status is None:
        return None
    state = (status.get("state") or {}).get(kind)
    return dict(state) if state else None


def workload_terminated(pod: Obj) -> Mapping[str, Any] | None:
    return _state(container_status(pod, WORKLOAD_CONTAINER), "terminated")


def workload_running(pod: Obj) -> Mapping[str, Any] | None:
    return _state(container_status(pod, WORKLOAD_CONTAINER), "running")


def workload_started_at(pod: Obj) -> str | None:
    """When the workload container started (it runs or ran), None if it never did."""
    running = workload_running(pod)
    if running is not None:
        return str(running.get("startedAt") or "") or "unknown"
    terminated = workload_terminated(pod)
    if (
        terminated is not None
        and terminated.get("startedAt")
        and (terminated.get("reason") not in START_FAILURE_TERMINATED)
    ):
        return str(terminated["startedAt"])
    return None


def pod_alive(pod: Obj) -> bool:
    phase = (pod.get("status") or {}).get("phase")
    return phase not in ("Succeeded", "Failed")


@dataclass(frozen=True)
class Waiting:
    container: str
    reason: str
    message: str

    @property
    def image_pull(self) -> bool:
        return self.reason in IMAGE_PULL_REASONS

    @property
    def immediate(self) -> bool:
        return self.reason in IMMEDIATE_PULL_FAILURES


def waiting(pod: Obj) -> Waiting | None:
    """A container of the pod stuck waiting for a reason worth watching (image pull, config)."""
    for init, name in ((True, CLONE_CONTAINER), (False, WORKLOAD_CONTAINER)):
        state = _state(container_status(pod, name, init=init), "waiting")
        if state is None:
            continue
        reason = str(state.get("reason") or "")
        if reason in IMAGE_PULL_REASONS or reason in START_FAILURE_WAITING:
            return Waiting(name, reason, str(state.get("message") or ""))
    return None


def _last_line(text: str) -> str:
    for line in reversed(text.splitlines()):
        if line.strip():
            return line.strip()[:500]
    return ""


def container_verdict(terminated: Mapping[str, Any]) -> Verdict:
    exit_code = terminated.get("exitCode")
    code = int(exit_code) if isinstance(exit_code, int) else None
    reason = str(terminated.get("reason") or "")
    detail = _last_line(str(terminated.get("message") or ""))
    if reason == "OOMKilled":
        return Verdict(
            "failed",
            "oom_killed",
            code,
            "the workload container was OOM-killed: it used more than its memory limit"
            + (f" (exit code {code})" if code is not None else ""),
        )
    if reason in START_FAILURE_TERMINATED:
        return Verdict(
            "failed", "infra_error", code, f"the workload container could not start ({reason}): {detail}"
        )
    if code == 0:
        return Verdict("succeeded", None, 0, "")
    message = f"exit code {code}: {detail}" if detail else f"exit code {code}"
    return Verdict("failed", "workload_error", code, message)


def pod_infra_failure(pod: Obj) -> Verdict | None:
    status = pod.get("status") or {}
    reason = str(status.get("reason") or "")
    message = str(status.get("message") or "")
    if reason in INFRA_POD_REASONS:
        what = "evicted" if reason == "Evicted" else f"stopped by the node ({reason})"
        return Verdict(
            "failed",
            "infra_error",
            None,
            f"the pod was {what}" + (f": {message}" if message else "") + "; resume the run to continue",
        )
    disruption = condition(pod, "DisruptionTarget")
    if disruption is not None:
        return Verdict(
            "failed",
            "infra_error",
            None,
            f"the pod was disrupted ({disruption.get('reason', '')}): {disruption.get('message', '')}; "
            "resume the run to continue",
        )
    return None


def _parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def attempt_over(job: Obj | None, pods: Iterable[Obj]) -> bool:
    """Has the attempt ended (nothing of it runs any more, or its Job says it is over)?"""
    if job is None:
        return True
    if job_terminal(job) is not None:
        return True
    if is_deleting(job):
        return not any(pod_alive(p) and not _terminated_everywhere(p) for p in pods)
    return False


def _terminated_everywhere(pod: Obj) -> bool:
    return workload_terminated(pod) is not None


def decide(job: Obj | None, pods: Iterable[Obj], stop: StopRequest | None) -> Verdict:
    """The verdict of an attempt that is over (`attempt_over`): see the table above."""
    pods = list(pods)
    terminated = next((t for t in (workload_terminated(p) for p in pods) if t is not None), None)
    if stop is not None:
        ended_at = _parse_time(str(terminated.get("finishedAt") or "")) if terminated else None
        if terminated is None or ended_at is None or ended_at >= stop.at:
            return _stop_verdict(stop, terminated)
    if job is not None:
        failed = condition(job, "Failed")
        if failed is not None and failed.get("reason") == "DeadlineExceeded":
            return Verdict(
                "timed_out",
                "timeout",
                terminated.get("exitCode") if terminated else None,
                "the attempt passed its deadline (activeDeadlineSeconds)",
            )
    for pod in pods:
        infra = pod_infra_failure(pod)
        if infra is not None:
            return infra
    for pod in pods:
        clone = _state(container_status(pod, CLONE_CONTAINER, init=True), "terminated")
        if clone is not None and clone.get("exitCode") not in (0, None):
            detail = _last_line(str(clone.get("message") or ""))
            return Verdict(
                "failed",
                "infra_error",
                None,
                f"preparing the workspace failed (clone exit code {clone.get('exitCode')})"
                + (f": {detail}" if detail else ""),
            )
    if terminated is not None:
        return container_verdict(terminated)
    if job is not None and job_terminal(job) == "Complete":
        return Verdict("succeeded", None, 0, "")
    if job is not None and job_terminal(job) == "Failed":
        failed = condition(job, "Failed") or {}
        return Verdict(
            "failed",
            "infra_error",
            None,
            "the workload's pod ended without a recorded exit (node lost or pod deleted): "
            f"{failed.get('reason', '')} {failed.get('message', '')}".rstrip()
            + "; resume the run to continue",
        )
    return Verdict(
        "failed",
        "infra_error",
        None,
        "the attempt's Job vanished before its end was recorded; resume the run to continue",
    )


def _stop_verdict(stop: StopRequest, terminated: Mapping[str, Any] | None) -> Verdict:
    code = terminated.get("exitCode") if terminated else None
    exit_code = code if isinstance(code, int) else None
    if stop.why == "image_pull":
        return Verdict("failed", "image_pull", None, stop.message)
    if stop.why == "infra":
        return Verdict("failed", "infra_error", None, stop.message)
    if stop.why == "timeout":
        return Verdict("timed_out", "timeout", exit_code, stop.message or "the attempt passed its deadline")
    if stop.why == "deleted":
        return Verdict(
            "cancelled", "cancelled", exit_code, stop.message or "the Job was deleted outside Fabrik"
        )
    default = "superseded by a newer attempt" if stop.why == "superseded" else "cancelled"
    return Verdict("cancelled", "cancelled", exit_code, stop.message or default)
