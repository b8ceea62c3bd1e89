"""Applying decoded events to the analytics store: plain functions, no NATS.

Every function is idempotent: a run row is read, the event is folded into it, and the whole row is
upserted (keyed by run_id); an LLM call is upserted by call_id. Folding the same event twice gives
the same row. Order tolerance within a run: events of an older attempt never overwrite a newer
attempt's fields, the state follows the highest `revision` of `RunStateChanged`, timestamps within
an attempt keep their first value, and the peak memory only grows.

An imported run (`RunImported`, docs/migration.md) is folded from the document it carries, as the
scheduler records it: project, env, spec, attempts, outcome and the run's own times. It ran
outside Fabrik, so its row has the backend `imported` and no compute or storage cost.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from fabrik_common.events import (
    TERMINAL_STATES,
    LlmUsage,
    RunDispatched,
    RunEvent,
    RunFinished,
    RunImported,
    RunParameters,
    RunQueued,
    RunRequested,
    RunStarted,
    RunStateChanged,
)
from fabrik_optimizer.analytics.store import (
    DATABASE_ERRORS,
    RUN_COLUMNS,
    AnalyticsStore,
    iso,
    parse_iso,
    usd_to_nanos,
)
from fabrik_optimizer.prices import PriceBook

# The run events the store folds; every other RunEvent is accepted and ignored.
FOLDED_EVENTS: tuple[type[Any], ...] = (
    RunRequested,
    RunQueued,
    RunDispatched,
    RunStateChanged,
    RunStarted,
    RunFinished,
    RunImported,
)
RUN_SUBJECTS: tuple[str, ...] = (
    "fabrik.runs.requested.*",
    "fabrik.runs.queued.*",
    "fabrik.runs.dispatched.*",
    "fabrik.runs.state_changed.*",
    "fabrik.runs.started.*",
    "fabrik.runs.finished.*",
    "fabrik.runs.imported.*",
)
IMPORTED_BACKEND = "imported"
"""The backend of an imported run's row: it did not run on this installation."""


@dataclass(frozen=True)
class Costing:
    """What compute and storage costs of a run are computed from.

    - `node_type`: the node type a Kubernetes run is attributed to (`FABRIK_COST_NODE_TYPE`);
    - `local_node_type`: the one a `local` run is attributed to (`FABRIK_COST_LOCAL_NODE_TYPE`;
      empty: local runs cost no compute);
    - `workspace_bytes` * `retention_hours`: the storage of one run's workspace volume
      (`FABRIK_COST_WORKSPACE_SIZE`, `FABRIK_COST_WORKSPACE_RETENTION_HOURS`), charged once per run
      that ran on Kubernetes, at the storage price in force when it (first) finished.
    """

    prices: PriceBook
    node_type: str = ""
    local_node_type: str = ""
    workspace_bytes: int = 10 * 1024**3
    retention_hours: Fraction = Fraction(7 * 24)

    def node_for(self, backend: str | None) -> str:
        return self.local_node_type if backend == "local" else self.node_type


def _empty_run(run_id: str) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(RUN_COLUMNS)
    row["run_id"] = run_id
    row["attempts"] = 0
    return row


def _set_first(row: dict[str, Any], column: str, value: str) -> None:
    if row[column] is None:
        row[column] = value


def _params(row: dict[str, Any], params: RunParameters) -> None:
    spec_id = params.spec.get("id") if params.spec else None
    if isinstance(spec_id, str):
        row["spec_id"] = spec_id
    row["template"] = params.template
    row["cpu_request"] = params.resources.cpu_request
    row["memory_request"] = params.resources.memory_request
    row["cpu_limit"] = params.resources.cpu_limit
    row["memory_limit"] = params.resources.memory_limit
    row["priority"] = params.priority


def _attempt(row: dict[str, Any], attempt: int) -> bool:
    """Move the row to `attempt` if it is newer (clearing the attempt's timestamps); False if older."""
    current = int(row["attempts"] or 0)
    if attempt < current:
        return False
    if attempt > current:
        if current > 0:
            row["queued_at"] = row["started_at"] = row["finished_at"] = None
            row["peak_memory_bytes"] = None
            # The compute cost so far (earlier attempts) stays; the new attempt's adds to it.
            if row["compute_cost_nanos"] is not None:
                row["prior_compute_nanos"] = row["compute_cost_nanos"]
        row["attempts"] = attempt
    return True


def _seconds(start: str | None, end: str | None) -> float | None:
    if start is None or end is None:
        return None
    return max(0.0, (parse_iso(end) - parse_iso(start)).total_seconds())


def _derive(row: dict[str, Any], costing: Costing | None) -> None:
    row["queue_seconds"] = _seconds(row["queued_at"], row["started_at"])
    row["run_seconds"] = _seconds(row["started_at"], row["finished_at"])
    row["finished_day"] = row["finished_at"][:10] if row["finished_at"] else None
    if costing is not None and row["started_at"] and row["finished_at"]:
        _costs(row, costing)


def _costs(row: dict[str, Any], costing: Costing) -> None:
    """Compute (all attempts) and storage (once) cost of a run whose current attempt has ended."""
    if row["backend"] == IMPORTED_BACKEND:
        return  # its nodes and volumes were not this installation's: nothing to attribute
    started, finished = parse_iso(row["started_at"]), parse_iso(row["finished_at"])
    node = row["node_type"] or costing.node_for(row["backend"])
    row["node_type"] = node or None
    attempt_cost = (
        costing.prices.compute_cost_nanos(node, row["cpu_request"], row["memory_request"], started, finished)
        if node
        else None
    )
    prior = row["prior_compute_nanos"]
    if attempt_cost is not None or prior is not None:
        row["compute_cost_nanos"] = int(prior or 0) + int(attempt_cost or 0)
    if row["storage_cost_nanos"] is None and row["backend"] not in (None, "local"):
        row["storage_cost_nanos"] = costing.prices.storage_cost_nanos(
            costing.workspace_bytes, costing.retention_hours, finished
        )


def _imported(row: dict[str, Any], event: RunImported) -> bool:
    """Fold an imported run's document the way the scheduler records it (`record_of`): created and
    queued when requested, one attempt per attempt of the document (at least one), the run's own
    start and end. Like the scheduler, an import never overwrites a run of the same id that Fabrik
    recorded itself (its `run.requested` set `created_at`); False then."""
    run = event.run
    if run.run_id != event.run_id or run.project != event.project:
        return False  # the scheduler ignores such an event: no record, so no row either
    if row["created_at"] is not None and row["backend"] != IMPORTED_BACKEND:
        return False
    row["project"], row["env"] = event.project, run.env
    row["spec_id"] = run.spec
    row["backend"] = IMPORTED_BACKEND
    # The scheduler's announcement of the record carries this attempt: equal, it changes no time.
    row["attempts"] = len(run.attempts) or 1
    row["created_at"] = row["queued_at"] = iso(run.requested_at)
    row["started_at"] = iso(run.started_at) if run.started_at else None
    if run.finished_at is not None:
        row["finished_at"] = iso(run.finished_at)
    if row["state_revision"] is None:
        row["state"], row["reason"] = run.state, run.reason
    return True


def fold_run_event(row: dict[str, Any], event: RunEvent, costing: Costing | None = None) -> bool:
    """Fold one event into a run row in place; False when the event carries nothing for the store."""
    at = iso(event.occurred_at)
    if isinstance(event, RunRequested):
        row["project"], row["env"] = event.project, event.env
        _params(row, event.params)
        row["created_at"] = at
    elif isinstance(event, RunQueued):
        row["project"] = event.project
        if _attempt(row, event.attempt):
            _set_first(row, "queued_at", at)
    elif isinstance(event, RunDispatched):
        row["project"], row["env"] = event.project, event.env
        if _attempt(row, event.attempt):
            _params(row, event.params)
            if event.experiment_arm is not None:
                row["experiment_arm"] = event.experiment_arm
    elif isinstance(event, RunStateChanged):
        row["project"] = event.project
        if _attempt(row, event.attempt):
            if event.to_state == "queued":
                _set_first(row, "queued_at", at)
            elif event.to_state == "running":
                _set_first(row, "started_at", at)
            elif event.to_state in TERMINAL_STATES:
                _set_first(row, "finished_at", at)
            revision = row["state_revision"]
            if revision is None or event.revision >= int(revision):
                row["state"], row["state_revision"] = event.to_state, event.revision
                row["reason"] = event.reason
    elif isinstance(event, RunStarted):
        if _attempt(row, event.attempt):
            _set_first(row, "started_at", at)
            row["backend"] = event.backend
    elif isinstance(event, RunFinished):
        if _attempt(row, event.attempt):
            _set_first(row, "finished_at", at)
            if event.peak_memory_bytes is not None:
                peak = row["peak_memory_bytes"]
                row["peak_memory_bytes"] = max(int(peak or 0), event.peak_memory_bytes)
            # The scheduler's state change is authoritative; the executor's outcome fills the gap.
            if row["state"] not in TERMINAL_STATES:
                row["state"] = event.outcome
                row["reason"] = event.reason
    elif isinstance(event, RunImported):
        if not _imported(row, event):
            return False
    else:
        return False
    _derive(row, costing)
    return True


def apply_run_event(store: AnalyticsStore, event: RunEvent, costing: Costing | None = None) -> bool:
    """Fold a run event into its row in the store; True when the store was written."""
    if not isinstance(event, FOLDED_EVENTS):
        return False  # progress, results, requests to cancel...: nothing for the store
    row = store.get_run(event.run_id) or _empty_run(event.run_id)
    if not fold_run_event(row, event, costing):
        return False
    store.put_run(row)
    return True


def llm_call_row(event: LlmUsage) -> dict[str, Any]:
    at = iso(event.occurred_at)
    return {
        "call_id": event.call_id,
        "run_id": event.run_id,
        "project": event.project,
        "model": event.model,
        "provider": event.provider,
        "input_tokens": event.input_tokens,
        "output_tokens": event.output_tokens,
        "cache_read_tokens": event.cache_read_tokens,
        "cache_write_tokens": event.cache_write_tokens,
        "cost_nanos": usd_to_nanos(event.cost_usd),
        "latency_ms": event.latency_ms,
        "outcome": event.outcome,
        "occurred_at": at,
        "occurred_day": at[:10],
    }


def apply_llm_usage(store: AnalyticsStore, event: LlmUsage) -> None:
    """Record one LLM call (upsert by call_id: a redelivered usage event is stored once)."""
    store.put_llm_call(llm_call_row(event))


@dataclass
class Applied:
    """What `apply_events` did: how many events changed the store, and the events that failed."""

    changed: int = 0
    failed: dict[int, Exception] = field(default_factory=dict)
    """Index in the batch → why that event could not be applied (the others are committed)."""


def _fold_all(
    store: AnalyticsStore, events: Sequence[RunEvent | LlmUsage], costing: Costing | None
) -> Applied:
    applied = Applied()
    for index, event in enumerate(events):
        try:
            if isinstance(event, LlmUsage):
                apply_llm_usage(store, event)
                applied.changed += 1
            elif apply_run_event(store, event, costing):
                applied.changed += 1
        except DATABASE_ERRORS:
            raise  # the database, not the event
        except Exception as exc:  # noqa: BLE001 - reported per event: the rest of the batch goes on
            applied.failed[index] = exc
    return applied


def apply_events(
    store: AnalyticsStore, events: Sequence[RunEvent | LlmUsage], costing: Costing | None = None
) -> Applied:
    """Apply a batch of events in one transaction: one commit for all of them (group commit).

    An event that fails to fold is reported in `Applied.failed` and leaves the store as it was
    before it; the others are committed. When the commit itself fails on the data (a value the
    database refuses), the batch is rolled back and applied again one event per transaction, so
    that only the offending events fail. A failure of the database itself (`DATABASE_ERRORS`:
    SQLite locked, a disk full or unwritable, the PostgreSQL connection lost) is raised with
    nothing of the batch committed: all of it can be tried again. Idempotent like the
    single-event functions: a batch applied twice (a redelivery) leaves the same rows."""
    try:
        with store.batch():
            store.prefetch_runs(e.run_id for e in events if isinstance(e, FOLDED_EVENTS))
            return _fold_all(store, events, costing)
    except DATABASE_ERRORS:
        raise
    except Exception:  # noqa: BLE001 - the commit refused some row: find it, one event at a time
        result = Applied()
        for index, event in enumerate(events):
            try:
                with store.batch():
                    single = _fold_all(store, [event], costing)
            except DATABASE_ERRORS:
                raise
            except Exception as exc:  # noqa: BLE001 - this event's row cannot be written
                result.failed[index] = exc
                continue
            result.changed += single.changed
            if single.failed:
                result.failed[index] = single.failed[0]
        return result
