"""The retention reaper's decisions: a pure function over the listed PVCs, Jobs and Secrets.

- A workspace PVC is deleted once its run is over (no attempt active: every Job reported) and
  its last attempt ended longer ago than the retention: the run's own
  (`fabrik.sh/retention-days` on the PVC, from the run label `retention.fabrik.sh/days`) or the
  executor's (`FABRIK_RETENTION_DAYS`, 7). When the run ended is read from the Jobs'
  `fabrik.sh/finished-at` and from the PVC's own `fabrik.sh/finished-at` (written when an
  attempt finishes; the Jobs go after `ttlSecondsAfterFinished`).
- An orphaned PVC — no Job of its run exists and it never recorded an end — is deleted once it
  is older than the orphan grace (1 h; a PVC is created just before its Job).
- Per-attempt Secrets (LLM key, spec) of attempts no longer active are deleted (normally they go
  when the attempt finishes; this catches what a crash left).
- Mirrored Secrets (project env, credential bundles) are shared by the runs of a project/env:
  one is deleted when no active Job uses it and the run that last wrote it has no workspace
  left — it goes with that run's retention, and the next run mirrors it again.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from fabrik_executor.kubernetes import render

Obj = Mapping[str, Any]


@dataclass(frozen=True)
class Reap:
    kind: Literal["pvc", "secret"]
    name: str
    run_id: str
    why: Literal["retention", "orphaned", "unused"]
    detail: str = ""


def _meta(obj: Obj) -> Mapping[str, Any]:
    return obj.get("metadata") or {}


def _labels(obj: Obj) -> Mapping[str, str]:
    return _meta(obj).get("labels") or {}


def _annotations(obj: Obj) -> Mapping[str, str]:
    return _meta(obj).get("annotations") or {}


def _time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def job_reported(job: Obj) -> bool:
    status = _annotations(job).get(render.ANN_STATUS) or ""
    return '"reported":true' in status.replace(" ", "")


def _secret_refs(job: Obj) -> set[str]:
    spec = ((job.get("spec") or {}).get("template") or {}).get("spec") or {}
    names: set[str] = set()
    for volume in spec.get("volumes") or ():
        secret = (volume.get("secret") or {}).get("secretName")
        if secret:
            names.add(str(secret))
    for container in [*(spec.get("containers") or ()), *(spec.get("initContainers") or ())]:
        for source in container.get("envFrom") or ():
            ref = (source.get("secretRef") or {}).get("name")
            if ref:
                names.add(str(ref))
    return names


def plan_reaping(
    *,
    pvcs: Iterable[Obj],
    jobs: Iterable[Obj],
    secrets: Iterable[Obj],
    active_attempts: set[tuple[str, int]],
    active_envs: set[tuple[str, str]],
    now: datetime,
    retention: timedelta,
    orphan_grace: timedelta,
) -> list[Reap]:
    jobs = list(jobs)
    by_run: dict[str, list[Obj]] = {}
    for job in jobs:
        run_id = _labels(job).get(render.LABEL_RUN_ID)
        if run_id:
            by_run.setdefault(run_id, []).append(job)
    active_runs = {run_id for run_id, _ in active_attempts} | {
        run_id for run_id, run_jobs in by_run.items() if any(not job_reported(j) for j in run_jobs)
    }
    in_use: set[str] = set()
    for job in jobs:
        if not job_reported(job):
            in_use |= _secret_refs(job)

    plan: list[Reap] = []
    kept_runs: set[str] = set()
    for pvc in pvcs:
        name = str(_meta(pvc).get("name", ""))
        run_id = _labels(pvc).get(render.LABEL_RUN_ID, "")
        if run_id in active_runs:
            kept_runs.add(run_id)
            continue
        ends = [_time(_annotations(j).get(render.ANN_FINISHED_AT)) for j in by_run.get(run_id, [])]
        ends.append(_time(_annotations(pvc).get(render.ANN_FINISHED_AT)))
        known = [e for e in ends if e is not None]
        if known:
            keep_for = retention
            override = _annotations(pvc).get(render.ANN_RETENTION_DAYS)
            if override is not None:
                try:
                    keep_for = timedelta(days=max(0.0, float(override)))
                except ValueError:
                    keep_for = retention
            ended = max(known)
            if now - ended >= keep_for:
                plan.append(
                    Reap("pvc", name, run_id, "retention", f"run ended {ended.isoformat()}, kept {keep_for}")
                )
                continue
            kept_runs.add(run_id)
            continue
        created = _time(_meta(pvc).get("creationTimestamp"))
        if not by_run.get(run_id) and created is not None and now - created >= orphan_grace:
            plan.append(
                Reap("pvc", name, run_id, "orphaned", "no Job of its run exists and no end was recorded")
            )
            continue
        kept_runs.add(run_id)

    for secret in secrets:
        name = str(_meta(secret).get("name", ""))
        labels = _labels(secret)
        run_id = labels.get(render.LABEL_RUN_ID, "")
        component = labels.get(render.LABEL_COMPONENT, "")
        if component in ("llm-key", "spec"):
            try:
                attempt = int(labels.get(render.LABEL_ATTEMPT, ""))
            except ValueError:
                continue
            if (run_id, attempt) in active_attempts or run_id in active_runs:
                continue
            plan.append(Reap("secret", name, run_id, "unused", f"attempt {attempt} is over"))
        elif component in ("env", "credentials"):
            if name in in_use or run_id in kept_runs or run_id in active_runs:
                continue
            if component == "env":
                env = (labels.get(render.LABEL_PROJECT, ""), labels.get(render.LABEL_ENV, ""))
                if env in active_envs:
                    continue
            plan.append(Reap("secret", name, run_id, "unused", "mirrored Secret no active run uses"))
    return plan
