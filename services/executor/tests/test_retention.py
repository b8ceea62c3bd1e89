"""Retention: finished runs older than the retention go, the rest stays."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
from prometheus_client import CollectorRegistry

from fabrik_common.events import Event, Resources, RunDispatched, RunFinished, RunParameters
from fabrik_common.ids import utcnow
from fabrik_executor.local_backend import LocalBackend, tombstone_applies
from fabrik_executor.metrics import ExecutorMetrics
from fabrik_executor.settings import ExecutorSettings
from fabrik_executor.state import AttemptState, CancelTombstone

NOW = datetime(2025, 6, 1, tzinfo=UTC)


class Sink:
    def __init__(self) -> None:
        self.events: list[Event] = []

    async def publish(self, event: Event) -> None:
        self.events.append(event)


def state(run_id: str, attempt: int, finished_days_ago: float | None) -> AttemptState:
    dispatch = RunDispatched(
        run_id=run_id,
        project="demo",
        env="dev",
        attempt=attempt,
        params=RunParameters(
            resources=Resources(cpu_request="1", memory_request="1Gi", cpu_limit="1", memory_limit="1Gi")
        ),
        deadline=NOW,
    )
    s = AttemptState(run_id=run_id, attempt=attempt, dispatch=dispatch, created_at=NOW)
    if finished_days_ago is not None:
        s.phase = "finished"
        s.finished_event = RunFinished(
            run_id=run_id,
            attempt=attempt,
            outcome="succeeded",
            occurred_at=NOW - timedelta(days=finished_days_ago),
        )
        s.finished_published = True
    return s


def test_sweep(tmp_path: Path) -> None:
    settings = ExecutorSettings(data_dir=str(tmp_path), retention_days=7, cancel_memory_seconds=3600)
    backend = LocalBackend(settings, Sink(), ExecutorMetrics(CollectorRegistry(), "local"))
    layout = backend.layout
    layout.create()
    old, recent, unfinished = "0" * 25 + "1", "0" * 25 + "2", "0" * 25 + "3"
    layout.save_state(state(old, 1, 30))
    layout.save_state(state(old, 2, 10))
    layout.save_state(state(recent, 1, 30))
    layout.save_state(state(recent, 2, 1))  # the last attempt counts
    layout.save_state(state(unfinished, 1, None))
    for run_id in (old, recent, unfinished):
        (layout.workspaces / run_id).mkdir()
    layout.save_tombstone(
        CancelTombstone(run_id="x" * 26, received_at=NOW - timedelta(hours=2), max_known_attempt=0)
    )
    layout.save_tombstone(CancelTombstone(run_id="y" * 26, received_at=NOW, max_known_attempt=0))

    assert backend.sweep(NOW.timestamp()) == [old]
    assert not (layout.runs / old).exists() and not (layout.workspaces / old).exists()
    assert (layout.workspaces / recent).exists() and (layout.workspaces / unfinished).exists()
    assert [p.stem for p in layout.cancels.iterdir()] == ["y" * 26]


def test_a_remembered_cancel_stops_only_the_dispatch_it_overtook() -> None:
    now = utcnow()
    run_id = "0" * 25 + "9"

    def tomb(max_known: int = 0, age: float = 0.0) -> CancelTombstone:
        at = now - timedelta(seconds=age)
        return CancelTombstone(run_id=run_id, received_at=at, requested_at=at, max_known_attempt=max_known)

    def dispatched(attempt: int, issued_after_cancel: float) -> RunDispatched:
        d = state(run_id, attempt, None).dispatch
        return msgspec.structs.replace(d, occurred_at=now + timedelta(seconds=issued_after_cancel))

    assert tombstone_applies(tomb(), dispatched(1, -0.5), 3600)  # the cancel overtook the dispatch
    assert tombstone_applies(tomb(), dispatched(1, 5), 3600)  # dispatched before the scheduler saw it
    assert not tombstone_applies(tomb(), dispatched(1, 600), 3600)  # a later resume
    assert not tombstone_applies(tomb(max_known=2), dispatched(2, 0), 3600)  # an attempt already seen
    assert not tombstone_applies(tomb(age=7200), dispatched(1, -7200), 3600)  # forgotten
