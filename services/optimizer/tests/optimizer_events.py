"""Event builders shared by the optimizer tests."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from fabrik_common.events import (
    LlmUsage,
    Resources,
    RunDispatched,
    RunFinished,
    RunImported,
    RunParameters,
    RunRequested,
    RunStarted,
    RunStateChanged,
)
from fabrik_common.ids import new_ulid
from fabrik_common.portable import PortableOrigin, PortableRun, PortableRunAttempt, TerminalState

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
SMALL = Resources(cpu_request="500m", memory_request="1Gi", cpu_limit="2", memory_limit="4Gi")


def params(spec_id: str | None = "spec-a") -> RunParameters:
    return RunParameters(spec={"id": spec_id} if spec_id else None, resources=SMALL, template="default")


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def run_lifecycle(
    run_id: str | None = None,
    *,
    project: str = "demo",
    spec_id: str | None = "spec-a",
    outcome: str = "succeeded",
    queue_s: float = 5.0,
    run_s: float = 60.0,
    start: float = 0.0,
    peak: int | None = 512 * 1024**2,
) -> list[Any]:
    """What gateway, scheduler and executor publish for one run, in stream order."""
    rid = run_id or new_ulid()
    started = start + queue_s
    finished = started + run_s
    return [
        RunRequested(
            run_id=rid,
            project=project,
            env="dev",
            params=params(spec_id),
            requested_by="t",
            occurred_at=at(start),
        ),
        RunStateChanged(
            run_id=rid,
            project=project,
            attempt=1,
            from_state=None,
            to_state="queued",
            revision=1,
            occurred_at=at(start),
        ),
        RunStateChanged(
            run_id=rid,
            project=project,
            attempt=1,
            from_state="queued",
            to_state="starting",
            revision=2,
            occurred_at=at(started - 1),
        ),
        RunDispatched(
            run_id=rid,
            project=project,
            env="dev",
            attempt=1,
            params=params(spec_id),
            experiment_arm="b",
            deadline=at(started + 3600),
            occurred_at=at(started - 1),
        ),
        RunStarted(run_id=rid, attempt=1, backend="local", workload_ref="w", occurred_at=at(started)),
        RunStateChanged(
            run_id=rid,
            project=project,
            attempt=1,
            from_state="starting",
            to_state="running",
            revision=3,
            occurred_at=at(started),
        ),
        RunFinished(
            run_id=rid,
            attempt=1,
            outcome=outcome,
            reason=None if outcome == "succeeded" else "exit 1",
            peak_memory_bytes=peak,
            occurred_at=at(finished),
        ),
        RunStateChanged(
            run_id=rid,
            project=project,
            attempt=1,
            from_state="running",
            to_state=outcome,
            revision=4,
            reason=None if outcome == "succeeded" else "exit 1",
            occurred_at=at(finished),
        ),
    ]


def usage(
    *,
    model: str,
    tokens: tuple[int, int, int, int],
    prices: tuple[float, float, float, float],
    run_id: str | None = None,
    project: str | None = "demo",
    when: datetime = T0,
    call_id: str | None = None,
) -> LlmUsage:
    """One usage event; its cost is tokens * USD-per-million prices, as the llm-proxy computes it."""
    cost = sum(t * p for t, p in zip(tokens, prices, strict=True)) / 1_000_000
    return LlmUsage(
        call_id=call_id or new_ulid(),
        run_id=run_id,
        project=project,
        key_id="k",
        endpoint="chat.completions",
        model=model,
        provider="openai",
        deployment="d",
        upstream_model=model,
        streamed=False,
        input_tokens=tokens[0],
        output_tokens=tokens[1],
        cache_read_tokens=tokens[2],
        cache_write_tokens=tokens[3],
        cost_usd=cost,
        latency_ms=120.0,
        outcome="ok",
        occurred_at=when,
    )


def imported_run(
    run_id: str | None = None,
    *,
    project: str = "legacy",
    spec_id: str = "nightly-refactor",
    outcome: TerminalState = "failed",
    start: float = 0.0,
) -> list[Any]:
    """An imported run as it reaches the RUNS stream: the gateway's `run.imported` with the document
    (requested at `start`, two attempts, the second from +120 s to +330 s), then the scheduler's
    announcement of the record it created, as `fabrik_scheduler.imports.state_event` makes it."""
    rid = run_id or new_ulid()
    reason = None if outcome == "succeeded" else "workload_error"
    document = PortableRun(
        run_id=rid,
        project=project,
        env="prod",
        spec=spec_id,
        spec_path=f"specs/{spec_id}.json",
        requested_at=at(start),
        started_at=at(start + 30),
        finished_at=at(start + 330),
        state=outcome,
        reason=reason,
        message="imported",
        attempts=[
            PortableRunAttempt(
                attempt=1, started_at=at(start + 30), finished_at=at(start + 100), outcome="failed"
            ),
            PortableRunAttempt(
                attempt=2,
                started_at=at(start + 120),
                finished_at=at(start + 330),
                outcome=outcome,
                reason=reason,
            ),
        ],
        origin=PortableOrigin(system="smithers", source_run_id=f"r-{rid[-4:]}", source="smithers.db"),
    )
    return [
        RunImported(
            run_id=rid,
            project=project,
            run=document,
            imported_by="admin",
            occurred_at=T0 + timedelta(days=30),
        ),
        RunStateChanged(
            run_id=rid,
            project=project,
            attempt=2,
            from_state=None,
            to_state=outcome,
            reason=reason,
            message="imported",
            revision=1,
            occurred_at=at(start + 330),
        ),
    ]
