"""Imported runs (`run.imported`): a finished run's record, created only if absent.

The gateway publishes one `run.imported` per run of an import; this module turns the portable
document it carries into a run record in its terminal state and writes it with a KV *create*, so
a run imported twice (or an event delivered twice) is recorded once. A newly recorded run is
announced with a `run.state_changed` (from nothing to its terminal state) dated at the run's end,
so readers that follow state changes see it finish when it finished (docs/migration.md).
"""

from __future__ import annotations

import logging

from fabrik_common.bus import MSG_ID
from fabrik_common.events import RunImported, RunParameters, RunStateChanged
from fabrik_common.portable import PortableRun
from fabrik_common.runs import IMPORTED_BY_PREFIX, TEMPLATES, AttemptRecord, RunRecord
from fabrik_scheduler.scheduler import Publisher
from fabrik_scheduler.store import RunStore

log = logging.getLogger(__name__)


def record_of(run: PortableRun, imported_by: str) -> RunRecord:
    """The run record of an imported run: terminal, with the document's times and outcome."""
    attempts = [
        AttemptRecord(
            attempt=a.attempt,
            started_at=a.started_at,
            finished_at=a.finished_at,
            outcome=a.outcome,
            reason=a.reason,
            exit_code=a.exit_code,
        )
        for a in run.attempts
    ] or [
        AttemptRecord(
            attempt=1,
            started_at=run.started_at,
            finished_at=run.finished_at,
            outcome=run.state,
            reason=run.reason,
        )
    ]
    ended = run.finished_at or run.started_at or run.requested_at
    return RunRecord(
        run_id=run.run_id,
        project=run.project,
        env=run.env,
        spec_id=run.spec,
        params=RunParameters(
            spec_path=run.spec_path,
            resources=TEMPLATES["default"],
            labels=dict(run.labels),
        ),
        state=run.state,
        reason=run.reason,
        message=run.message,
        attempt=len(attempts),
        attempts=attempts,
        requested_by=f"{IMPORTED_BY_PREFIX}{run.origin.system}:{imported_by}",
        created_at=run.requested_at,
        queued_at=run.requested_at,
        started_at=run.started_at,
        finished_at=run.finished_at,
        state_entered_at=ended,
        exit_code=attempts[-1].exit_code,
    )


def state_event(record: RunRecord) -> RunStateChanged:
    return RunStateChanged(
        run_id=record.run_id,
        project=record.project,
        attempt=record.attempt,
        from_state=None,
        to_state=record.state,
        reason=record.reason,
        message=record.message,
        revision=record.revision,
        occurred_at=record.state_entered_at,
    )


def state_message_id(record: RunRecord) -> str:
    # The scheduler's own announcements use `state-<run>-<attempt>-<state>`: the same id here
    # makes a re-announcement of an imported run a duplicate of the first one.
    return f"state-{record.run_id}-{record.attempt}-{record.state}"


async def apply_import(
    store: RunStore, publisher: Publisher, event: RunImported, *, redelivered: bool = False
) -> bool:
    """Record the imported run unless a run of that id exists; True when it was created.

    A redelivered event whose record exists (created before a crash, its announcement perhaps
    not sent) announces that record again; the message id makes a second copy a duplicate."""
    if event.run.run_id != event.run_id or event.run.project != event.project:
        log.error(
            "imported run ignored: the event's run id or project differs from its document's",
            extra={"run_id": event.run_id, "document_run_id": event.run.run_id},
        )
        return False
    created = await store.create(record_of(event.run, event.imported_by))
    if created is None:
        if redelivered:
            existing = await store.get(event.run_id)
            if existing is not None and existing.requested_by.startswith(IMPORTED_BY_PREFIX):
                await publisher.publish(state_event(existing), headers={MSG_ID: state_message_id(existing)})
        log.info("imported run already recorded", extra={"run_id": event.run_id})
        return False
    await publisher.publish(state_event(created), headers={MSG_ID: state_message_id(created)})
    log.info(
        "imported run recorded",
        extra={"run_id": created.run_id, "project": created.project, "state": created.state},
    )
    return True
