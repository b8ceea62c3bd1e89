"""`KubernetesBackend`: each attempt is a Job in the runs namespace; the executor watches, it never polls.

Start (`start`, from the dispatch handler; returns once the Job exists — `RunStarted` follows
when the workload container runs):
1. idempotency: an attempt known here, or whose Job exists already (AlreadyExists), is adopted,
   never created twice; a dispatch older than a known attempt is ignored; an older attempt of
   the run still active is stopped first (superseded);
2. a cancel that arrived before the dispatch, or a deadline already past, ends the attempt
   without creating anything; a tag-only image (no digest in the dispatch) is resolved to its
   digest through the registry (`registry.py`; unresolvable: failed / image_pull); a run that
   cannot be rendered ends failed / infra_error, with the reason in the run's log;
3. the workspace PVC (per run; AlreadyExists on a resume), the mirrored project env and
   credential bundles, the per-attempt Secrets (LLM key, spec), then the Job.

Watching (`maintain`): one `Informer` on Jobs and one on Pods with `fabrik.sh/managed-by=fabrik`.
Every event reconciles the attempt: workload running → `RunStarted` (and the log is followed);
image pull failing past the grace → stop (image_pull); the attempt over (`mapping.attempt_over`)
→ finish. A ticker flushes log chunks and progress, saves the log cursor into the Job's
`fabrik.sh/status` annotation, and runs the retention reaper.

Finish (exactly once per attempt): pods re-read, the log drained, the verdict decided
(`mapping.decide`), `RunFinished` stored in the Job's `fabrik.sh/outcome` annotation, published,
then the Job marked reported and its `fabrik.sh/report` finalizer removed. A restarted
executor re-publishes a stored, unreported outcome as is (same event id: JetStream drops the
duplicate) and never decides twice.

Cancel: `fabrik.sh/stop` recorded on the Job, then the Job deleted with foreground propagation;
the pods go, the attempt is over, and it finishes as cancelled.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import math
import time
import weakref
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import aiohttp
import msgspec
from kubernetes_asyncio.client.exceptions import ApiException
from prometheus_client import CollectorRegistry, Counter

from fabrik_common.events import (
    LogLine,
    RunCancelRequested,
    RunDispatched,
    RunFinished,
    RunLogChunk,
    RunStarted,
)
from fabrik_common.ids import new_ulid, utcnow
from fabrik_common.runkeys import load_run_key_secret
from fabrik_executor.backend import EventSink
from fabrik_executor.env import NoRunKey, ProjectEnvError, ProjectEnvSource, RunKeyProvider
from fabrik_executor.kubernetes import mapping, render
from fabrik_executor.kubernetes.api import (
    JSON_PATCH,
    MERGE_PATCH,
    Apis,
    ClientSettings,
    build_api_client,
    escape_pointer,
    is_already_exists,
    is_conflict,
    is_not_found,
    k8s,
    read_json,
)
from fabrik_executor.kubernetes.logs import (
    Deduper,
    LogCursor,
    iter_lines,
    ns_to_datetime,
    since_seconds,
    split_line,
)
from fabrik_executor.kubernetes.mapping import Obj, StopRequest, StopWhy
from fabrik_executor.kubernetes.registry import RegistryClient, RegistryError
from fabrik_executor.kubernetes.retention import Reap, plan_reaping
from fabrik_executor.kubernetes.watch import Informer
from fabrik_executor.llmkeys import SignedRunKeys
from fabrik_executor.local_backend import tombstone_applies
from fabrik_executor.metrics import ExecutorMetrics
from fabrik_executor.outcome import Verdict
from fabrik_executor.settings import ExecutorSettings
from fabrik_executor.state import CancelTombstone
from fabrik_executor.tailer import Emission, LogTailer, ProgressCoalescer

log = logging.getLogger(__name__)

BACKEND: Final = "kubernetes"


@dataclass(frozen=True)
class KubernetesConfig:
    """The backend's knobs (from ExecutorSettings, see `from_settings`)."""

    render: render.RenderConfig
    registry: RegistryClient = field(default_factory=RegistryClient)
    """Resolves a tag-only workload image to its digest at submit (`registry.py`)."""
    system_namespace: str = "fabrik-system"
    image_pull_grace_seconds: float = 120.0
    log_drain_seconds: float = 15.0
    checkpoint_seconds: float = 5.0
    watch_timeout_seconds: int = 300
    reap_interval_seconds: float = 600.0
    orphan_grace_seconds: float = 3600.0
    mirror_sync_seconds: float = 60.0
    progress_interval_seconds: float = 0.5
    log_flush_seconds: float = 0.1
    log_batch_lines: int = 200
    cancel_memory_seconds: float = 3600.0
    tick_seconds: float = 0.1

    @property
    def namespace(self) -> str:
        return self.render.namespace


class KubernetesMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.reaped = Counter(
            "fabrik_executor_k8s_reaped",
            "Objects the retention reaper deleted, by kind and why",
            ("kind", "why"),
            registry=registry,
        )
        self.watch_restarts = Counter(
            "fabrik_executor_k8s_watch_restarts",
            "Watches started again, by resource and why (timeout, dropped, gone, error)",
            ("resource", "why"),
            registry=registry,
        )
        self.api_errors = Counter(
            "fabrik_executor_k8s_api_errors",
            "Kubernetes API calls that failed, by operation",
            ("operation",),
            registry=registry,
        )


class JobRecord(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The executor's bookkeeping on the Job (annotation `fabrik.sh/status`)."""

    phase: str = "created"
    started_event_id: str = ""
    started_reported: bool = False
    reported: bool = False
    log: LogCursor = msgspec.field(default_factory=LogCursor)
    progress: dict[str, Any] = msgspec.field(default_factory=dict)
    progress_pending: bool = False


_record_decoder = msgspec.json.Decoder(JobRecord)
_finished_decoder = msgspec.json.Decoder(RunFinished)
_stop_decoder = msgspec.json.Decoder(StopRequest)


def _decode_record(text: str | None) -> JobRecord:
    if not text:
        return JobRecord()
    try:
        return _record_decoder.decode(text)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return JobRecord()


def _encode(value: Any) -> str:
    return msgspec.json.encode(value).decode()


def _parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


@dataclass(eq=False)
class Attempt:
    """One attempt (a Job) as this executor knows it."""

    run_id: str
    attempt: int
    project: str
    env: str
    job_name: str
    record: JobRecord
    tailer: LogTailer
    image_digest: str | None = None
    job: Obj | None = None
    job_seen: bool = False
    pods: dict[str, Obj] = field(default_factory=dict)
    stop: StopRequest | None = None
    outcome: RunFinished | None = None
    reported: bool = False
    pull_since: float | None = None
    waiting_noted: str = ""
    seq: int = 0
    cursors: dict[int, tuple[int, int]] = field(default_factory=dict)
    cursor: LogCursor = field(default_factory=LogCursor)
    cursor_saved: LogCursor = field(default_factory=LogCursor)
    log_task: asyncio.Task[None] | None = None
    log_done: asyncio.Event = field(default_factory=asyncio.Event)
    finish_task: asyncio.Task[None] | None = None
    started_task: asyncio.Task[None] | None = None
    stop_task: asyncio.Task[None] | None = None
    emit_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    report_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    ended_at: datetime | None = None
    outcome_saved: bool = True
    """Whether `outcome` is stored in the Job's `fabrik.sh/outcome` (or there is no Job to store it in)."""
    created: bool = True
    """False while `start` creates the attempt's objects: its notes wait (a failed start that is
    retried must not have published half of a log)."""

    @property
    def key(self) -> tuple[str, int]:
        return (self.run_id, self.attempt)

    def note(self, text: str) -> None:
        """A `system` line in the run's log (published with the next chunk)."""
        self.tailer.feed(LogLine(ts=utcnow(), stream="system", text=text), self.seq)
        self.cursors.setdefault(self.seq, (self.cursor.ts, self.cursor.skip))

    def workload_pod(self) -> Obj | None:
        """The pod whose workload container runs or ran (the newest one)."""
        candidates = [p for p in self.pods.values() if mapping.workload_started_at(p) is not None]
        if not candidates:
            return None
        return max(candidates, key=lambda p: str(mapping.meta(p).get("creationTimestamp", "")))

    def workload_ended(self) -> bool:
        pod = self.workload_pod()
        return pod is None or mapping.workload_terminated(pod) is not None


class KubernetesBackend:
    """Runs attempts as Kubernetes Jobs and finds them again after a restart."""

    name = BACKEND

    def __init__(
        self,
        config: KubernetesConfig,
        sink: EventSink,
        metrics: ExecutorMetrics,
        apis: Apis,
        *,
        registry: CollectorRegistry | None = None,
        run_keys: RunKeyProvider | None = None,
        project_envs: ProjectEnvSource | None = None,
    ) -> None:
        self.config = config
        self.sink = sink
        self.metrics = metrics
        self.k8s_metrics = KubernetesMetrics(registry or CollectorRegistry())
        self.apis = apis
        self.run_keys = run_keys or NoRunKey()
        self.project_envs = project_envs
        self.attempts: dict[tuple[str, int], Attempt] = {}
        self.tombstones: dict[str, CancelTombstone] = {}
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self._tasks: set[asyncio.Task[Any]] = set()
        selector = render.MANAGED_SELECTOR
        self.jobs = Informer(
            "jobs",
            self.apis.batch.list_namespaced_job,
            config.namespace,
            selector,
            self._on_job,
            timeout_seconds=config.watch_timeout_seconds,
            restarts=self.k8s_metrics.watch_restarts,
        )
        self.pods = Informer(
            "pods",
            self.apis.core.list_namespaced_pod,
            config.namespace,
            selector,
            self._on_pod,
            timeout_seconds=config.watch_timeout_seconds,
            restarts=self.k8s_metrics.watch_restarts,
        )
        self._last_checkpoint = 0.0
        self._last_reap = time.monotonic()
        self._last_mirror_sync = time.monotonic()

    # ---- life cycle ------------------------------------------------------------------------

    async def recover(self) -> None:
        """List Jobs and Pods (no watch yet): adopt every attempt whose end is not reported."""
        await self.jobs.relist()
        await self.pods.relist()
        active = [a for a in self.attempts.values() if not a.reported]
        for attempt in active:
            self.metrics.runs_recovered.labels(BACKEND, "adopted").inc()
            self._reconcile(attempt)
        log.info(
            "kubernetes backend ready",
            extra={"namespace": self.config.namespace, "active_attempts": len(active)},
        )

    async def maintain(self) -> None:
        """Watches, the ticker (log flushes, checkpoints) and the reaper; runs until cancelled."""
        tasks = [
            asyncio.create_task(self.jobs.run(), name="watch:jobs"),
            asyncio.create_task(self.pods.run(), name="watch:pods"),
            asyncio.create_task(self._ticker(), name="k8s:ticker"),
        ]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            await self._cancel_attempt_tasks()

    async def close(self) -> None:
        await self._cancel_attempt_tasks()
        await self.apis.close()

    async def _cancel_attempt_tasks(self) -> None:
        tasks = [t for t in self._tasks if not t.done()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for attempt in self.attempts.values():
            attempt.log_task = attempt.finish_task = attempt.started_task = attempt.stop_task = None

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "kubernetes backend task failed", exc_info=task.exception(), extra={"task": task.get_name()}
            )

    def _lock(self, run_id: str) -> asyncio.Lock:
        lock = self._locks.get(run_id)
        if lock is None:
            lock = asyncio.Lock()
            self._locks[run_id] = lock
        return lock

    def active(self, run_id: str | None = None) -> list[Attempt]:
        return [
            a for a in self.attempts.values() if not a.reported and (run_id is None or a.run_id == run_id)
        ]

    def _update_gauge(self) -> None:
        self.metrics.runs_active.labels(BACKEND).set(len(self.active()))

    # ---- adopting attempts from the cluster ------------------------------------------------

    def _new_attempt(
        self,
        *,
        run_id: str,
        attempt: int,
        project: str,
        env: str,
        record: JobRecord,
        image_digest: str | None,
    ) -> Attempt:
        tailer = LogTailer(
            run_id=run_id,
            attempt=attempt,
            next_line=record.log.line,
            flush_interval=self.config.log_flush_seconds,
            max_lines=self.config.log_batch_lines,
            progress=ProgressCoalescer(
                self.config.progress_interval_seconds,
                state=record.progress,
                pending=record.progress_pending,
            ),
        )
        return Attempt(
            run_id=run_id,
            attempt=attempt,
            project=project,
            env=env,
            job_name=render.job_name(run_id, attempt),
            record=record,
            tailer=tailer,
            image_digest=image_digest,
            cursor=LogCursor(line=record.log.line, ts=record.log.ts, skip=record.log.skip),
            cursor_saved=LogCursor(line=record.log.line, ts=record.log.ts, skip=record.log.skip),
        )

    def _adopt(self, job: Obj) -> Attempt | None:
        labels = mapping.labels_of(job)
        run_id = labels.get(render.LABEL_RUN_ID)
        try:
            number = int(labels.get(render.LABEL_ATTEMPT, ""))
        except ValueError:
            return None
        if not run_id:
            return None
        key = (run_id, number)
        existing = self.attempts.get(key)
        if existing is not None:
            return existing
        annotations = mapping.annotations_of(job)
        record = _decode_record(annotations.get(render.ANN_STATUS))
        attempt = self._new_attempt(
            run_id=run_id,
            attempt=number,
            project=labels.get(render.LABEL_PROJECT, ""),
            env=labels.get(render.LABEL_ENV, ""),
            record=record,
            image_digest=annotations.get(render.ANN_IMAGE_DIGEST) or None,
        )
        attempt.reported = record.reported
        attempt.ended_at = _parse_time(annotations.get(render.ANN_FINISHED_AT))
        self._load_annotations(attempt, job)
        if attempt.reported:
            attempt.done.set()
        self.attempts[key] = attempt
        self._update_gauge()
        return attempt

    @staticmethod
    def _load_annotations(attempt: Attempt, job: Obj) -> None:
        annotations = mapping.annotations_of(job)
        if attempt.stop is None and annotations.get(render.ANN_STOP):
            with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
                attempt.stop = _stop_decoder.decode(annotations[render.ANN_STOP])
        if attempt.outcome is None and annotations.get(render.ANN_OUTCOME):
            with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
                attempt.outcome = _finished_decoder.decode(annotations[render.ANN_OUTCOME])

    # ---- watch handlers --------------------------------------------------------------------

    async def _on_job(self, kind: str, job: Obj) -> None:
        attempt = self._adopt(job)
        if attempt is None:
            return
        if kind == "DELETED":
            attempt.job = None
        else:
            attempt.job = job
            self._load_annotations(attempt, job)
        attempt.job_seen = True
        attempt.changed.set()
        self._reconcile(attempt)

    async def _on_pod(self, kind: str, pod: Obj) -> None:
        labels = mapping.labels_of(pod)
        run_id = labels.get(render.LABEL_RUN_ID)
        try:
            number = int(labels.get(render.LABEL_ATTEMPT, ""))
        except ValueError:
            return
        attempt = self.attempts.get((run_id or "", number))
        if attempt is None:
            return
        name = mapping.name_of(pod)
        if kind == "DELETED":
            attempt.pods.pop(name, None)
        else:
            attempt.pods[name] = pod
        attempt.changed.set()
        self._reconcile(attempt)

    # ---- reconcile -------------------------------------------------------------------------

    def _reconcile(self, attempt: Attempt) -> None:
        """Decide what the latest state of an attempt asks for (never blocks; work goes to tasks)."""
        if attempt.reported or attempt.finish_task is not None:
            return
        pod = attempt.workload_pod()
        if pod is not None:
            if not attempt.record.started_reported and attempt.started_task is None:
                attempt.started_task = self._spawn(
                    self._report_started(attempt, pod), f"started:{attempt.job_name}"
                )
            if attempt.log_task is None:
                attempt.log_done.clear()
                attempt.log_task = self._spawn(self._follow_logs(attempt), f"logs:{attempt.job_name}")
        self._check_waiting(attempt)
        job = attempt.job
        if job is not None and mapping.is_deleting(job) and attempt.stop is None:
            attempt.stop = StopRequest(
                why="deleted", message="the Job was deleted outside Fabrik", at=utcnow()
            )
            attempt.note("the attempt's Job was deleted outside Fabrik; stopping its pods")
            attempt.stop_task = self._spawn(self._delete_pods(attempt), f"delete-pods:{attempt.job_name}")
        if not attempt.job_seen and job is None:
            return
        if not self.pods.synced.is_set():
            return  # at start-up: decide only once the pods are known too
        if mapping.attempt_over(job, attempt.pods.values()):
            attempt.finish_task = self._spawn(self._finish(attempt), f"finish:{attempt.job_name}")

    def _check_waiting(self, attempt: Attempt) -> None:
        waiting = next(
            (w for w in (mapping.waiting(p) for p in attempt.pods.values()) if w is not None), None
        )
        if waiting is None:
            attempt.pull_since = None
            return
        now = time.monotonic()
        if attempt.waiting_noted != waiting.reason:
            attempt.waiting_noted = waiting.reason
            attempt.note(
                f"waiting: container {waiting.container}: {waiting.reason}"
                + (f": {waiting.message}" if waiting.message else "")
            )
        if attempt.pull_since is None:
            attempt.pull_since = now
        if attempt.stop is not None:
            return
        overdue = now - attempt.pull_since >= self.config.image_pull_grace_seconds
        if waiting.image_pull and (waiting.immediate or overdue):
            grace = self.config.image_pull_grace_seconds
            message = (
                f"the image of container {waiting.container} could not be pulled"
                + ("" if waiting.immediate else f" for {grace:g} s")
                + f": {waiting.reason}"
                + (f": {waiting.message}" if waiting.message else "")
            )
            self._request_stop(attempt, "image_pull", message)
        elif not waiting.image_pull and overdue:
            self._request_stop(
                attempt,
                "infra",
                f"container {waiting.container} could not be created: {waiting.reason}: {waiting.message}",
            )

    def _request_stop(self, attempt: Attempt, why: StopWhy, message: str) -> None:
        if attempt.stop is not None or attempt.stop_task is not None:
            return
        attempt.stop_task = self._spawn(self._stop(attempt, why, message), f"stop:{attempt.job_name}")

    # ---- RunStarted ------------------------------------------------------------------------

    async def _report_started(self, attempt: Attempt, pod: Obj) -> None:
        async with attempt.report_lock:
            await self._report_started_locked(attempt, pod)

    async def _report_started_locked(self, attempt: Attempt, pod: Obj | None) -> None:
        if attempt.record.started_reported:
            return
        event = RunStarted(
            event_id=attempt.record.started_event_id or new_ulid(),
            run_id=attempt.run_id,
            attempt=attempt.attempt,
            backend=BACKEND,
            workload_ref=f"kubernetes:{self.config.namespace}/{attempt.job_name}",
            image_digest=attempt.image_digest,
        )
        await self.sink.publish(event)
        attempt.record.started_reported = True
        attempt.record.phase = "running"
        self.metrics.runs_started.labels(BACKEND).inc()
        started_at = (mapping.workload_started_at(pod) if pod is not None else None) or render.iso(utcnow())
        log.info(
            "workload running",
            extra={"run_id": attempt.run_id, "attempt": attempt.attempt, "job": attempt.job_name},
        )
        await self._patch_annotations(
            attempt, {render.ANN_STARTED_AT: started_at, render.ANN_STATUS: self._record_json(attempt)}
        )

    # ---- logs ------------------------------------------------------------------------------

    async def _follow_logs(self, attempt: Attempt) -> None:
        dedupe = Deduper(attempt.cursor.ts, attempt.cursor.skip)
        delay = 0.1
        try:
            while True:
                pod = attempt.workload_pod()
                if pod is None:
                    if not attempt.pods or attempt.job is None:
                        return
                    attempt.changed.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(attempt.changed.wait(), 1.0)
                    continue
                pod_name = mapping.name_of(pod)
                ended = mapping.workload_terminated(pod) is not None
                try:
                    response = await self.apis.core.read_namespaced_pod_log(
                        pod_name,
                        self.config.namespace,
                        container=render.WORKLOAD_CONTAINER,
                        follow=True,
                        timestamps=True,
                        since_seconds=since_seconds(dedupe.ts, utcnow()),
                        _preload_content=False,
                    )
                except (aiohttp.ClientError, TimeoutError, ApiException) as exc:
                    log.info("opening the log failed; retrying", extra={"pod": pod_name, "error": repr(exc)})
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 2.0)
                    continue
                if response.status == 404:
                    response.release()
                    attempt.pods.pop(pod_name, None)
                    if attempt.workload_pod() is None:
                        return
                    continue
                if response.status >= 400:
                    body = (await response.text())[:300]
                    response.release()
                    log.debug("log not available yet", extra={"pod": pod_name, "detail": body})
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 2.0)
                    continue
                dedupe.reset_connection()
                try:
                    async for raw in iter_lines(response.content):
                        ts, text = split_line(raw)
                        if not dedupe.accept(ts):
                            continue
                        attempt.seq += 1
                        attempt.cursors[attempt.seq] = (dedupe.ts, dedupe.skip)
                        line = LogLine(
                            ts=ns_to_datetime(ts) if ts is not None else utcnow(), stream="stdout", text=text
                        )
                        emissions = attempt.tailer.feed(line, attempt.seq)
                        if emissions:
                            async with attempt.emit_lock:
                                for emission in emissions:
                                    await self._emit(attempt, emission)
                    delay = 0.1
                except (aiohttp.ClientError, TimeoutError) as exc:
                    log.info(
                        "log stream dropped; following again", extra={"pod": pod_name, "error": repr(exc)}
                    )
                finally:
                    response.release()
                latest = attempt.pods.get(pod_name)
                if ended or latest is None or mapping.workload_terminated(latest) is not None:
                    if latest is None or ended:
                        return
                    continue  # terminated since: read once more to the end, then stop
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
        finally:
            attempt.log_done.set()

    async def _emit(self, attempt: Attempt, emission: Emission) -> None:
        await self.sink.publish(emission.event)
        if isinstance(emission.event, RunLogChunk):
            self.metrics.log_lines.labels(BACKEND).inc(len(emission.event.lines))
        checkpoint = emission.checkpoint
        if checkpoint is not None:
            ts, skip = attempt.cursors.get(checkpoint.offset, (attempt.cursor.ts, attempt.cursor.skip))
            attempt.cursor = LogCursor(line=checkpoint.next_line, ts=ts, skip=skip)
            for seq in [s for s in attempt.cursors if s < checkpoint.offset]:
                del attempt.cursors[seq]

    async def _flush_due(self, attempt: Attempt) -> None:
        async with attempt.emit_lock:
            for emission in attempt.tailer.poll():
                await self._emit(attempt, emission)

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(self.config.tick_seconds)
            now = time.monotonic()
            for attempt in self.active():
                if attempt.finish_task is None and attempt.created:
                    await self._flush_due(attempt)
                    self._check_waiting(attempt)
            if now - self._last_checkpoint >= self.config.checkpoint_seconds:
                self._last_checkpoint = now
                for attempt in self.active():
                    if attempt.finish_task is None and attempt.cursor != attempt.cursor_saved:
                        await self._save_checkpoint(attempt)
            if now - self._last_mirror_sync >= self.config.mirror_sync_seconds:
                self._last_mirror_sync = now
                await self._sync_mirrors()
            if now - self._last_reap >= self.config.reap_interval_seconds:
                self._last_reap = now
                try:
                    await self.reap(utcnow())
                except (ApiException, aiohttp.ClientError) as exc:
                    log.warning("retention pass failed", extra={"error": repr(exc)})

    def _record_json(self, attempt: Attempt) -> str:
        attempt.record.log = LogCursor(
            line=attempt.cursor.line, ts=attempt.cursor.ts, skip=attempt.cursor.skip
        )
        attempt.record.progress = dict(attempt.tailer.progress.state)
        attempt.record.progress_pending = attempt.tailer.progress.pending
        return _encode(attempt.record)

    async def _save_checkpoint(self, attempt: Attempt) -> None:
        saved = LogCursor(line=attempt.cursor.line, ts=attempt.cursor.ts, skip=attempt.cursor.skip)
        await self._patch_annotations(attempt, {render.ANN_STATUS: self._record_json(attempt)})
        attempt.cursor_saved = saved

    async def _patch_annotations(self, attempt: Attempt, annotations: dict[str, str]) -> str:
        """Merge-patch the Job's annotations: "ok", "gone" (no Job) or "failed" (logged)."""
        try:
            job = await self.apis.batch.patch_namespaced_job(
                attempt.job_name,
                self.config.namespace,
                {"metadata": {"annotations": annotations}},
                _content_type=MERGE_PATCH,
                _preload_content=False,
            )
            updated = await read_json(job)
        except ApiException as exc:
            if is_not_found(exc):
                return "gone"
            self.k8s_metrics.api_errors.labels("patch_job").inc()
            log.warning("annotating the Job failed", extra={"job": attempt.job_name, "error": _short(exc)})
            return "failed"
        except aiohttp.ClientError as exc:
            self.k8s_metrics.api_errors.labels("patch_job").inc()
            log.warning("annotating the Job failed", extra={"job": attempt.job_name, "error": repr(exc)})
            return "failed"
        if attempt.job is not None:
            attempt.job = updated
        return "ok"

    # ---- start -----------------------------------------------------------------------------

    async def start(self, dispatch: RunDispatched) -> None:
        async with self._lock(dispatch.run_id):
            await self._start_locked(dispatch)

    async def _start_locked(self, dispatch: RunDispatched) -> None:
        key = (dispatch.run_id, dispatch.attempt)
        fields = {"run_id": dispatch.run_id, "attempt": dispatch.attempt}
        if key in self.attempts:
            log.info("dispatch for an attempt known here; nothing to do", extra=fields)
            return
        existing = await self._read_job(render.job_name(dispatch.run_id, dispatch.attempt))
        if existing is not None:
            log.info("dispatch for an attempt whose Job exists; adopted", extra=fields)
            await self._on_job("ADDED", existing)
            return
        known = [
            a for (rid, n), a in self.attempts.items() if rid == dispatch.run_id and n > dispatch.attempt
        ]
        if known:
            log.warning("stale dispatch: a newer attempt exists; ignored", extra=fields)
            return
        for older in self.active(dispatch.run_id):
            await self._stop(older, "superseded", f"superseded by attempt {dispatch.attempt}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(older.done.wait(), self.config.log_drain_seconds + 30)

        record = JobRecord(started_event_id=new_ulid())
        attempt = self._new_attempt(
            run_id=dispatch.run_id,
            attempt=dispatch.attempt,
            project=dispatch.project,
            env=dispatch.env,
            record=record,
            image_digest=None,
        )
        attempt.created = False
        self.attempts[key] = attempt
        self._update_gauge()
        try:
            await self._start_attempt(dispatch, attempt, record)
        except BaseException:
            # Nothing was decided: forget it, so that the redelivered dispatch starts it again.
            if not attempt.reported and attempt.job is None and not attempt.job_seen:
                self.attempts.pop(key, None)
                self._update_gauge()
            raise

    async def _start_attempt(self, dispatch: RunDispatched, attempt: Attempt, record: JobRecord) -> None:
        fields = {"run_id": dispatch.run_id, "attempt": dispatch.attempt}
        tombstone = self.tombstones.pop(dispatch.run_id, None)
        if tombstone is not None and tombstone_applies(
            tombstone, dispatch, self.config.cancel_memory_seconds
        ):
            message = "cancelled before the workload started" + (
                f" by {tombstone.requested_by}" if tombstone.requested_by else ""
            )
            await self._finish_without_job(attempt, Verdict("cancelled", "cancelled", None, message))
            return
        now = utcnow()
        deadline = dispatch.deadline if dispatch.deadline.tzinfo else dispatch.deadline.replace(tzinfo=UTC)
        if now >= deadline:
            await self._finish_without_job(
                attempt,
                Verdict("timed_out", "timeout", None, "the deadline passed before the workload could start"),
            )
            return
        resolved = await self._resolve_image(dispatch, attempt)
        if resolved is None:
            return
        dispatch = resolved
        llm_key = self._llm_key(dispatch)
        inputs = render.AttemptInputs(
            now=now, started_event_id=record.started_event_id, llm_key=llm_key is not None
        )
        try:
            job, warnings = render.render_job(dispatch, self.config.render, inputs)
        except render.RenderError as exc:
            await self._finish_without_job(attempt, Verdict("failed", "infra_error", None, str(exc)))
            return
        attempt.image_digest = render.digest_of(job["metadata"]["annotations"][render.ANN_IMAGE])
        for warning in warnings:
            attempt.note(f"warning: {warning}")
        try:
            await self._create_objects(dispatch, attempt, job, llm_key)
            attempt.created = True
        except ProjectEnvError as exc:
            await self._finish_without_job(
                attempt,
                Verdict("failed", "infra_error", None, f"the project environment cannot be used: {exc}"),
            )
            return
        except (ApiException, aiohttp.ClientError, RuntimeError) as exc:
            self.k8s_metrics.api_errors.labels("create").inc()
            attempt.created = True
            if await self._read_job(attempt.job_name) is None:
                await self._finish_without_job(
                    attempt,
                    Verdict(
                        "failed",
                        "infra_error",
                        None,
                        f"the attempt's Kubernetes objects could not be created: {_short(exc)}",
                    ),
                )
                return
        log.info(
            "job created", extra={**fields, "job": attempt.job_name, "image_digest": attempt.image_digest}
        )

    async def _resolve_image(self, dispatch: RunDispatched, attempt: Attempt) -> RunDispatched | None:
        """A tag-only image (and no digest in the dispatch: a first attempt) → the dispatch with the
        digest the tag points at now; a resume carries the recorded digest and is not resolved
        again. None: the tag could not be resolved, and the attempt has ended (image_pull)."""
        if (dispatch.image_digest or "").strip():
            return dispatch
        image = (dispatch.params.workload.image or self.config.render.default_image or "").strip()
        if not image or "@" in image:
            return dispatch  # nothing to resolve (rendering says what is wrong, if anything)
        try:
            digest = await self.config.registry.resolve(image)
        except RegistryError as exc:
            log.warning(
                "image tag not resolved",
                extra={"run_id": dispatch.run_id, "attempt": dispatch.attempt, "detail": str(exc)},
            )
            await self._finish_without_job(attempt, Verdict("failed", "image_pull", None, str(exc)))
            return None
        attempt.note(f"image {image} resolved to {digest}")
        return msgspec.structs.replace(dispatch, image_digest=digest)

    def _llm_key(self, dispatch: RunDispatched) -> str | None:
        env = self.run_keys.llm_key_env(dispatch)
        return env.get("FABRIK_LLM_KEY") or env.get("OPENAI_API_KEY") or env.get("ANTHROPIC_API_KEY") or None

    async def _create_objects(
        self, dispatch: RunDispatched, attempt: Attempt, job: Obj, llm_key: str | None
    ) -> None:
        ns = self.config.namespace
        pvc = render.render_pvc(dispatch, self.config.render)
        try:
            await self.apis.core.create_namespaced_persistent_volume_claim(ns, pvc)
            attempt.note(
                f"workspace: new volume {render.pvc_name(dispatch.run_id)} ({self.config.render.pvc_size})"
            )
        except ApiException as exc:
            if not is_already_exists(exc):
                raise
            attempt.note(f"workspace: reusing volume {render.pvc_name(dispatch.run_id)}")
        labels = render.run_labels(dispatch)
        await self._mirror_env(dispatch.project, dispatch.env, labels, attempt)
        for target, secret in render.credential_bundles(
            dispatch, self.config.render.credential_bundles
        ).items():
            default = self.config.render.credential_bundles.get(target) == secret
            await self._mirror_bundle(target, secret, labels, attempt, trusted=default)
        if llm_key is not None:
            await self._apply_secret(render.render_llm_secret(dispatch, llm_key, self.config.render))
        spec_secret = render.render_spec_secret(dispatch, self.config.render)
        if spec_secret is not None:
            await self._apply_secret(spec_secret)
        image = job["metadata"]["annotations"][render.ANN_IMAGE]
        attempt.note(f"attempt {dispatch.attempt}: Job {attempt.job_name} in namespace {ns}, image {image}")
        try:
            await self.apis.batch.create_namespaced_job(ns, job)
        except ApiException as exc:
            if not is_already_exists(exc):
                raise
            log.info("job already exists; adopted", extra={"job": attempt.job_name})

    async def _read_job(self, name: str) -> Obj | None:
        try:
            response = await self.apis.batch.read_namespaced_job(
                name, self.config.namespace, _preload_content=False
            )
            result: Obj = await read_json(response)
            return result
        except ApiException as exc:
            if is_not_found(exc):
                return None
            raise

    async def _read_secret(self, namespace: str, name: str) -> Obj | None:
        try:
            response = await self.apis.core.read_namespaced_secret(name, namespace, _preload_content=False)
            result: Obj = await read_json(response)
            return result
        except ApiException as exc:
            if is_not_found(exc):
                return None
            raise

    async def _apply_secret(self, manifest: Obj) -> None:
        """Create, or replace what is there (the resourceVersion guards against a concurrent
        writer; writers of one Secret in this executor take turns, and an unchanged Secret is
        not written again)."""
        ns = manifest["metadata"]["namespace"]
        name = manifest["metadata"]["name"]
        async with self._lock(f"secret:{ns}/{name}"):
            await self._apply_secret_locked(ns, name, manifest)

    async def _apply_secret_locked(self, ns: str, name: str, manifest: Obj) -> None:
        last: Exception | None = None
        for _ in range(8):
            try:
                await self.apis.core.create_namespaced_secret(ns, manifest)
                return
            except ApiException as exc:
                if not is_already_exists(exc):
                    raise
            current = await self._read_secret(ns, name)
            if current is None:
                continue
            if (current.get("data") or {}) == manifest.get("data", {}) and mapping.labels_of(
                current
            ) == manifest["metadata"].get("labels", {}):
                return
            replacement = json.loads(json.dumps(manifest))
            replacement["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
            try:
                await self.apis.core.replace_namespaced_secret(name, ns, replacement)
                return
            except ApiException as exc:
                if not (is_conflict(exc) or is_not_found(exc)):
                    raise
                last = exc
            await asyncio.sleep(0.05)
        raise RuntimeError(
            f"secret {ns}/{name} kept changing while it was written: {_short(last or Exception())}"
        )

    async def _env_source(self, project: str, env: str) -> tuple[Obj | None, str]:
        """The project env as a Secret-shaped dict, and where it came from: the environments store
        (written by `fabrik env`) when it has the environment, else the Secret
        `fabrik-env-<project>-<env>` in the system namespace (managed with kubectl or GitOps)."""
        name = render.env_secret_name(project, env)
        if self.project_envs is not None:
            values = await self.project_envs.load(project, env)
            if values:
                data = {k: base64.b64encode(v.encode()).decode() for k, v in values.items()}
                return {"metadata": {"name": name}, "data": data}, "the environments store"
        source = await self._read_secret(self.config.system_namespace, name)
        return source, f"Secret {self.config.system_namespace}/{name}"

    async def _mirror_env(
        self, project: str, env: str, labels: dict[str, str], attempt: Attempt | None
    ) -> None:
        name = render.env_secret_name(project, env)
        source, origin = await self._env_source(project, env)
        if source is None:
            log.info(
                "no project environment; the run gets an empty env",
                extra={"secret": f"{self.config.system_namespace}/{name}", "project": project, "env": env},
            )
            if attempt is not None:
                attempt.note(
                    f"project env: {project}/{env} is not set (no stored environment, no Secret {name} "
                    f"in {self.config.system_namespace}); the run gets none"
                )
            return
        mirrored = render.mirror_secret(
            source,
            name=name,
            namespace=self.config.namespace,
            labels={**labels, render.LABEL_COMPONENT: "env"},
            env_keys_only=True,
        )
        await self._apply_secret(mirrored.manifest)
        if attempt is not None:
            attempt.note(f"project env: {len(mirrored.manifest['data'])} variables from {origin}")
            for skipped in mirrored.skipped:
                attempt.note(f"warning: project env: {skipped}, skipped")

    async def _mirror_bundle(
        self, target: str, secret: str, labels: dict[str, str], attempt: Attempt | None, *, trusted: bool
    ) -> None:
        source = await self._read_secret(self.config.system_namespace, secret)
        if source is None or (
            not trusted and mapping.labels_of(source).get("fabrik.sh/credentials") != "true"
        ):
            why = "does not exist" if source is None else "is not labelled fabrik.sh/credentials=true"
            log.warning(
                "credential bundle not mirrored", extra={"target": target, "secret": secret, "why": why}
            )
            if attempt is not None:
                attempt.note(
                    f"warning: credentials {target}: Secret {secret} in {self.config.system_namespace} "
                    f"{why}; {render.CREDENTIALS_DIR}/{target}/ will be empty"
                )
            return
        mirrored = render.mirror_secret(
            source,
            name=render.mirrored_bundle_name(secret),
            namespace=self.config.namespace,
            labels={**labels, render.LABEL_COMPONENT: "credentials"},
        )
        await self._apply_secret(mirrored.manifest)
        if attempt is not None:
            attempt.note(f"credentials {target}: {secret} at {render.CREDENTIALS_DIR}/{target}/")

    async def _sync_mirrors(self) -> None:
        """Copy rotated credential bundles and env Secrets again (mounted directories follow)."""
        active = self.active()
        if not active:
            return
        done: set[str] = set()
        for attempt in active:
            job = attempt.job
            if job is None:
                continue
            labels = {
                k: v
                for k, v in mapping.labels_of(job).items()
                if k in (render.LABEL_RUN_ID, render.LABEL_PROJECT, render.LABEL_SPEC, render.LABEL_ENV)
            }
            labels[render.LABEL_MANAGED_BY] = render.MANAGED_BY
            try:
                env_key = f"env:{attempt.project}:{attempt.env}"
                if env_key not in done:
                    done.add(env_key)
                    await self._mirror_env(attempt.project, attempt.env, labels, None)
                for volume in ((job.get("spec") or {}).get("template") or {}).get("spec", {}).get(
                    "volumes"
                ) or []:
                    name = str((volume.get("secret") or {}).get("secretName") or "")
                    prefix = "fabrik-cred-"
                    if name.startswith(prefix) and name not in done:
                        done.add(name)
                        await self._mirror_bundle(
                            volume["name"],
                            name[len(prefix) :],
                            labels,
                            None,
                            trusted=name[len(prefix) :] in self.config.render.credential_bundles.values(),
                        )
            except (ApiException, aiohttp.ClientError, RuntimeError) as exc:
                log.warning("syncing mirrored secrets failed", extra={"error": _short(exc)})

    # ---- stopping --------------------------------------------------------------------------

    async def _stop(self, attempt: Attempt, why: StopWhy, message: str) -> None:
        """Record why (annotation), then delete the Job with foreground propagation."""
        if attempt.reported or attempt.stop is not None:
            return
        attempt.stop = StopRequest(why=why, message=message, at=utcnow())
        log.info(
            "stopping attempt",
            extra={"run_id": attempt.run_id, "attempt": attempt.attempt, "why": why, "detail": message},
        )
        attempt.note(f"stopping: {message}")
        await self._patch_annotations(attempt, {render.ANN_STOP: _encode(attempt.stop)})
        try:
            await self.apis.batch.delete_namespaced_job(
                attempt.job_name,
                self.config.namespace,
                body=k8s.V1DeleteOptions(propagation_policy="Foreground"),
                _preload_content=False,
            )
        except ApiException as exc:
            if not is_not_found(exc):
                self.k8s_metrics.api_errors.labels("delete_job").inc()
                log.warning("deleting the Job failed", extra={"job": attempt.job_name, "error": _short(exc)})
        self._reconcile(attempt)

    async def _delete_pods(self, attempt: Attempt) -> None:
        for name in list(attempt.pods):
            with contextlib.suppress(ApiException):
                await self.apis.core.delete_namespaced_pod(
                    name, self.config.namespace, _preload_content=False
                )

    async def cancel(self, request: RunCancelRequested) -> None:
        message = f"cancelled by {request.requested_by}" if request.requested_by else "cancelled"
        if request.reason:
            message += f": {request.reason}"
        async with self._lock(request.run_id):
            attempts = self.active(request.run_id)
            if attempts:
                for attempt in attempts:
                    await self._stop(attempt, "cancel", message)
                return
            known = [n for (rid, n) in self.attempts if rid == request.run_id]
            self.tombstones[request.run_id] = CancelTombstone(
                run_id=request.run_id,
                received_at=utcnow(),
                requested_at=request.occurred_at,
                max_known_attempt=max(known) if known else 0,
                requested_by=request.requested_by,
                reason=request.reason,
            )
            log.info(
                "cancel for a run with no active attempt here; remembered for a dispatch still on its way",
                extra={"run_id": request.run_id},
            )

    # ---- finishing -------------------------------------------------------------------------

    async def _refresh_pods(self, attempt: Attempt) -> None:
        try:
            response = await self.apis.core.list_namespaced_pod(
                self.config.namespace,
                label_selector=f"batch.kubernetes.io/job-name={attempt.job_name}",
                _preload_content=False,
            )
            data = await read_json(response)
        except (ApiException, aiohttp.ClientError) as exc:
            log.info("re-reading the pods failed", extra={"job": attempt.job_name, "error": _short(exc)})
            return
        attempt.pods = {mapping.name_of(p): p for p in data.get("items") or []}

    async def _pod_warnings(self, attempt: Attempt) -> list[str]:
        lines: list[str] = []
        for name in list(attempt.pods):
            try:
                response = await self.apis.core.list_namespaced_event(
                    self.config.namespace,
                    field_selector=f"involvedObject.name={name}",
                    _preload_content=False,
                )
                data = await read_json(response)
            except (ApiException, aiohttp.ClientError):
                continue
            for event in data.get("items") or []:
                if event.get("type") == "Warning":
                    lines.append(f"kubernetes: {event.get('reason', '')}: {event.get('message', '')}")
        return lines[-10:]

    async def _finish(self, attempt: Attempt) -> None:
        try:
            async with attempt.report_lock:
                await self._finish_locked(attempt)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("finishing an attempt failed; retrying", extra={"job": attempt.job_name})
            await asyncio.sleep(1.0)
            attempt.finish_task = None
            self._reconcile(attempt)
        else:
            if not attempt.reported:
                attempt.finish_task = None

    async def _finish_locked(self, attempt: Attempt) -> None:
        if attempt.reported:
            return
        event = attempt.outcome
        if event is None:
            await self._refresh_pods(attempt)
            if attempt.job is not None:
                fresh = await self._read_job(attempt.job_name)
                attempt.job = fresh
                if fresh is not None:
                    self._load_annotations(attempt, fresh)
            event = attempt.outcome
        if event is None:
            if not mapping.attempt_over(attempt.job, attempt.pods.values()):
                return  # the other watch had not caught up; the next event finishes it
            if attempt.log_task is None and attempt.workload_pod() is not None:
                # It ran to its end while nobody watched: read its log before reporting the end.
                attempt.log_done.clear()
                attempt.log_task = self._spawn(self._follow_logs(attempt), f"logs:{attempt.job_name}")
            if attempt.log_task is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(attempt.log_done.wait(), self.config.log_drain_seconds)
            verdict = mapping.decide(attempt.job, attempt.pods.values(), attempt.stop)
            if verdict.reason in ("infra_error", "image_pull"):
                for line in await self._pod_warnings(attempt):
                    attempt.note(line)
            if verdict.message:
                attempt.note(
                    f"the attempt ended: {verdict.outcome} ({verdict.reason}): {verdict.message}"
                    if verdict.reason
                    else f"the attempt ended: {verdict.outcome}"
                )
            else:
                attempt.note(f"the attempt ended: {verdict.outcome}")
            async with attempt.emit_lock:
                for emission in attempt.tailer.flush():
                    await self._emit(attempt, emission)
            if attempt.workload_pod() is not None or attempt.record.started_reported:
                await self._report_started_locked(attempt, attempt.workload_pod())
            event = RunFinished(
                run_id=attempt.run_id,
                attempt=attempt.attempt,
                outcome=verdict.outcome,
                reason=verdict.reason,
                exit_code=verdict.exit_code,
                message=verdict.message,
            )
            attempt.outcome = event
            attempt.outcome_saved = False
            attempt.record.phase = "finished"
            attempt.ended_at = utcnow()
        if not attempt.outcome_saved:
            # Stored before it is published: a restarted executor publishes this very event.
            saved = await self._patch_annotations(
                attempt,
                {
                    render.ANN_OUTCOME: _encode(event),
                    render.ANN_FINISHED_AT: render.iso(attempt.ended_at or utcnow()),
                    render.ANN_STATUS: self._record_json(attempt),
                },
            )
            if saved == "failed":
                raise RuntimeError("the attempt's outcome could not be recorded on its Job")
            attempt.outcome_saved = True
        await self.sink.publish(event)
        attempt.record.reported = True
        attempt.reported = True
        self.metrics.runs_finished.labels(BACKEND, event.outcome, event.reason or "").inc()
        log.info(
            "attempt finished",
            extra={
                "run_id": attempt.run_id,
                "attempt": attempt.attempt,
                "outcome": event.outcome,
                "reason": event.reason,
                "exit_code": event.exit_code,
                "detail": event.message,
            },
        )
        await self._mark_reported(attempt, event)
        attempt.done.set()
        self._update_gauge()

    async def _mark_reported(self, attempt: Attempt, event: RunFinished) -> None:
        """Status `reported`, finalizer off (JSON patch with a test, so a concurrent change is not lost);
        the PVC learns when its run last ended; the attempt's own Secrets go."""
        ns = self.config.namespace
        finished_at = render.iso(attempt.ended_at or event.occurred_at)
        for _ in range(5):
            job = attempt.job if attempt.job is not None else await self._read_job(attempt.job_name)
            if job is None:
                break
            ops: list[dict[str, Any]] = [
                {
                    "op": "add",
                    "path": "/metadata/annotations/" + escape_pointer(render.ANN_STATUS),
                    "value": self._record_json(attempt),
                }
            ]
            finalizers = list(mapping.meta(job).get("finalizers") or [])
            if render.FINALIZER in finalizers:
                index = finalizers.index(render.FINALIZER)
                ops += [
                    {"op": "test", "path": f"/metadata/finalizers/{index}", "value": render.FINALIZER},
                    {"op": "remove", "path": f"/metadata/finalizers/{index}"},
                ]
            try:
                response = await self.apis.batch.patch_namespaced_job(
                    attempt.job_name, ns, ops, _content_type=JSON_PATCH, _preload_content=False
                )
                await read_json(response)
                break
            except ApiException as exc:
                if is_not_found(exc):
                    break
                attempt.job = None  # stale: read it again
                if exc.status not in (409, 422):
                    log.warning(
                        "marking the Job reported failed",
                        extra={"job": attempt.job_name, "error": _short(exc)},
                    )
                    break
        with contextlib.suppress(ApiException, aiohttp.ClientError):
            await self.apis.core.patch_namespaced_persistent_volume_claim(
                render.pvc_name(attempt.run_id),
                ns,
                {
                    "metadata": {
                        "annotations": {
                            render.ANN_FINISHED_AT: finished_at,
                            render.ANN_OUTCOME: event.outcome,
                        }
                    }
                },
                _content_type=MERGE_PATCH,
                _preload_content=False,
            )
        for name in (
            render.llm_secret_name(attempt.run_id, attempt.attempt),
            render.spec_secret_name(attempt.run_id, attempt.attempt),
        ):
            with contextlib.suppress(ApiException, aiohttp.ClientError):
                await self.apis.core.delete_namespaced_secret(name, ns, _preload_content=False)

    async def _finish_without_job(self, attempt: Attempt, verdict: Verdict) -> None:
        """End an attempt that never got a Job (cancelled early, deadline past, not renderable)."""
        attempt.note(
            f"the workload did not start: {verdict.message}"
            if verdict.message
            else "the workload did not start"
        )
        async with attempt.emit_lock:
            for emission in attempt.tailer.flush():
                await self._emit(attempt, emission)
        event = RunFinished(
            run_id=attempt.run_id,
            attempt=attempt.attempt,
            outcome=verdict.outcome,
            reason=verdict.reason,
            exit_code=verdict.exit_code,
            message=verdict.message,
        )
        attempt.outcome = event
        attempt.ended_at = utcnow()
        await self.sink.publish(event)
        attempt.reported = True
        attempt.record.reported = True
        attempt.done.set()
        self.metrics.runs_finished.labels(BACKEND, event.outcome, event.reason or "").inc()
        log.info(
            "attempt finished without a workload",
            extra={
                "run_id": attempt.run_id,
                "attempt": attempt.attempt,
                "outcome": event.outcome,
                "reason": event.reason,
                "detail": event.message,
            },
        )
        self._update_gauge()

    # ---- retention -------------------------------------------------------------------------

    async def reap(self, now: datetime) -> list[Reap]:
        """Delete workspace PVCs of runs ended longer ago than their retention, orphaned PVCs,
        and mirrored or per-attempt Secrets nothing active uses any more."""
        ns = self.config.namespace
        pvcs = await read_json(
            await self.apis.core.list_namespaced_persistent_volume_claim(
                ns, label_selector=render.MANAGED_SELECTOR, _preload_content=False
            )
        )
        jobs = await read_json(
            await self.apis.batch.list_namespaced_job(
                ns, label_selector=render.MANAGED_SELECTOR, _preload_content=False
            )
        )
        secrets = await read_json(
            await self.apis.core.list_namespaced_secret(
                ns, label_selector=render.MANAGED_SELECTOR, _preload_content=False
            )
        )
        active = {(a.run_id, a.attempt) for a in self.active()}
        plan = plan_reaping(
            pvcs=list(pvcs.get("items") or []),
            jobs=list(jobs.get("items") or []),
            secrets=list(secrets.get("items") or []),
            active_attempts=active,
            active_envs={(a.project, a.env) for a in self.active()},
            now=now,
            retention=timedelta(days=self.config.render.retention_days),
            orphan_grace=timedelta(seconds=self.config.orphan_grace_seconds),
        )
        for item in plan:
            try:
                if item.kind == "pvc":
                    await self.apis.core.delete_namespaced_persistent_volume_claim(
                        item.name, ns, _preload_content=False
                    )
                else:
                    await self.apis.core.delete_namespaced_secret(item.name, ns, _preload_content=False)
            except ApiException as exc:
                if not is_not_found(exc):
                    log.warning("retention: delete failed", extra={"object": item.name, "error": _short(exc)})
                    continue
            self.k8s_metrics.reaped.labels(item.kind, item.why).inc()
            log.info(
                "retention: deleted",
                extra={
                    "kind": item.kind,
                    "object": item.name,
                    "run_id": item.run_id,
                    "why": item.why,
                    "detail": item.detail,
                },
            )
        return plan


def _short(exc: BaseException) -> str:
    text = str(getattr(exc, "reason", "") or exc)
    body = getattr(exc, "body", None)
    if body:
        with contextlib.suppress(ValueError, AttributeError):
            text = str(json.loads(body).get("message") or text)
    return text[:300]


def config_from_settings(settings: ExecutorSettings) -> KubernetesConfig:
    return KubernetesConfig(
        render=render.RenderConfig(
            namespace=settings.k8s_namespace,
            storage_class=settings.k8s_storage_class,
            pvc_size=settings.k8s_pvc_size,
            clone_image=settings.k8s_clone_image,
            default_image=settings.k8s_default_image,
            default_command=settings.default_command,
            llm_proxy_url=settings.k8s_llm_proxy_url or settings.llm_proxy_url,
            ttl_seconds_after_finished=settings.k8s_ttl_seconds_after_finished,
            termination_grace_seconds=max(1, math.ceil(settings.cancel_grace_seconds)),
            credential_bundles=dict(settings.k8s_credential_bundles),
            image_pull_secrets=settings.k8s_image_pull_secrets,
            retention_days=settings.retention_days,
        ),
        registry=RegistryClient(
            insecure=settings.k8s_insecure_registries,
            auth_file=settings.k8s_registry_auth_file,
            timeout_seconds=settings.k8s_registry_timeout_seconds,
        ),
        system_namespace=settings.k8s_system_namespace,
        image_pull_grace_seconds=settings.k8s_image_pull_grace_seconds,
        log_drain_seconds=settings.k8s_log_drain_seconds,
        checkpoint_seconds=settings.k8s_checkpoint_seconds,
        watch_timeout_seconds=settings.k8s_watch_timeout_seconds,
        reap_interval_seconds=settings.k8s_reap_interval_seconds,
        orphan_grace_seconds=settings.k8s_orphan_grace_seconds,
        mirror_sync_seconds=settings.k8s_mirror_sync_seconds,
        progress_interval_seconds=settings.progress_interval_seconds,
        log_flush_seconds=settings.log_flush_seconds,
        log_batch_lines=settings.log_batch_lines,
        cancel_memory_seconds=settings.cancel_memory_seconds,
    )


async def build_backend(
    settings: ExecutorSettings,
    sink: EventSink,
    metrics: ExecutorMetrics,
    registry: CollectorRegistry,
    *,
    project_envs: ProjectEnvSource | None = None,
) -> KubernetesBackend:
    """The backend as the executor service runs it, configured from its settings."""
    api_client = await build_api_client(
        ClientSettings(
            api_url=settings.k8s_api_url,
            mode=settings.k8s_config,
            kubeconfig=settings.k8s_kubeconfig,
            context=settings.k8s_context,
        )
    )
    secret = load_run_key_secret(settings.run_key_secret, settings.run_key_secret_file)
    if "@" not in settings.k8s_clone_image:
        log.warning("the clone image is not pinned by digest", extra={"image": settings.k8s_clone_image})
    return KubernetesBackend(
        config_from_settings(settings),
        sink,
        metrics,
        Apis(api_client),
        registry=registry,
        run_keys=SignedRunKeys(secret) if secret else None,
        project_envs=project_envs,
    )
