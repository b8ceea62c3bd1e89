"""The reaper's decisions (pure): retention, per-run override, orphans, leftover Secrets."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from fabrik_executor.kubernetes.retention import plan_reaping

NOW = datetime(2025, 6, 10, tzinfo=UTC)


def iso(days_ago: float) -> str:
    return (NOW - timedelta(days=days_ago)).strftime("%Y-%m-%dT%H:%M:%SZ")


def pvc(
    run: str, *, created: float = 10, finished: float | None = None, keep_days: str | None = None
) -> dict[str, Any]:
    annotations = {}
    if finished is not None:
        annotations["fabrik.sh/finished-at"] = iso(finished)
    if keep_days is not None:
        annotations["fabrik.sh/retention-days"] = keep_days
    return {
        "metadata": {
            "name": f"data-fabrik-{run.lower()}",
            "creationTimestamp": iso(created),
            "labels": {"fabrik.sh/run-id": run},
            "annotations": annotations,
        }
    }


def job(
    run: str,
    attempt: int = 1,
    *,
    finished: float | None = None,
    reported: bool = True,
    secrets: tuple[str, ...] = (),
) -> dict[str, Any]:
    annotations = {"fabrik.sh/status": '{"reported":true}' if reported else '{"phase":"running"}'}
    if finished is not None:
        annotations["fabrik.sh/finished-at"] = iso(finished)
    return {
        "metadata": {
            "name": f"fabrik-{run.lower()}-{attempt}",
            "annotations": annotations,
            "labels": {"fabrik.sh/run-id": run, "fabrik.sh/attempt": str(attempt)},
        },
        "spec": {
            "template": {"spec": {"volumes": [{"name": s, "secret": {"secretName": s}} for s in secrets]}}
        },
    }


def secret(
    name: str, run: str, component: str, attempt: int | None = None, project: str = "p", env: str = "dev"
) -> dict[str, Any]:
    labels = {
        "fabrik.sh/run-id": run,
        "fabrik.sh/component": component,
        "fabrik.sh/project": project,
        "fabrik.sh/env": env,
    }
    if attempt is not None:
        labels["fabrik.sh/attempt"] = str(attempt)
    return {"metadata": {"name": name, "labels": labels}}


def plan(
    pvcs: list[Any],
    jobs: list[Any],
    secrets: list[Any] = (),
    active: set[tuple[str, int]] = frozenset(),  # type: ignore[assignment]
    envs: set[tuple[str, str]] = frozenset(),
) -> list[tuple[str, str, str]]:  # type: ignore[assignment]
    out = plan_reaping(
        pvcs=pvcs,
        jobs=jobs,
        secrets=secrets,
        active_attempts=set(active),
        active_envs=set(envs),
        now=NOW,
        retention=timedelta(days=7),
        orphan_grace=timedelta(hours=1),
    )
    return [(r.kind, r.name, r.why) for r in out]


def test_terminal_runs_go_after_the_retention_and_not_before() -> None:
    assert plan([pvc("OLD")], [job("OLD", finished=8)]) == [("pvc", "data-fabrik-old", "retention")]
    assert plan([pvc("NEW")], [job("NEW", finished=6)]) == []
    # the Jobs are gone (TTL): the PVC's own record of the end is used
    assert plan([pvc("GONE", finished=9)], []) == [("pvc", "data-fabrik-gone", "retention")]
    # the latest attempt counts
    assert plan([pvc("R")], [job("R", 1, finished=9), job("R", 2, finished=1)]) == []


def test_per_run_override() -> None:
    assert plan([pvc("SHORT", keep_days="1")], [job("SHORT", finished=2)]) == [
        ("pvc", "data-fabrik-short", "retention")
    ]
    assert plan([pvc("LONG", keep_days="30")], [job("LONG", finished=9)]) == []


def test_active_runs_are_never_reaped() -> None:
    assert plan([pvc("RUN", finished=30)], [job("RUN", 2, reported=False)]) == []
    assert plan([pvc("RUN", finished=30)], [], active={("RUN", 2)}) == []


def test_orphans_older_than_the_grace() -> None:
    assert plan([pvc("ORPHAN", created=1)], []) == [("pvc", "data-fabrik-orphan", "orphaned")]
    assert plan([pvc("FRESH", created=0.01)], []) == []  # created just before its Job


def test_leftover_and_mirrored_secrets() -> None:
    secrets = [
        secret("fabrik-a-1-llm", "A", "llm-key", 1),
        secret("fabrik-b-1-llm", "B", "llm-key", 1),
        secret("fabrik-env-p-dev", "A", "env"),
        secret("fabrik-cred-gh", "A", "credentials"),
    ]
    jobs = [job("A", finished=8), job("B", reported=False, secrets=("fabrik-cred-gh",))]
    got = plan([pvc("A")], jobs, secrets, active={("B", 1)})
    assert ("pvc", "data-fabrik-a", "retention") in got
    assert ("secret", "fabrik-a-1-llm", "unused") in got
    assert ("secret", "fabrik-b-1-llm", "unused") not in got  # its attempt is active
    assert ("secret", "fabrik-cred-gh", "unused") not in got  # an active Job mounts it
    assert ("secret", "fabrik-env-p-dev", "unused") in got  # its run's workspace goes now
    assert ("secret", "fabrik-env-p-dev", "unused") not in plan(
        [pvc("A")], jobs, secrets, envs={("p", "dev")}
    )
