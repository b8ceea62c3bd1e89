"""The queue snapshot always fits in one NATS message, however long the project names."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec

from fabrik_common.runs import QueueEntry, QueueSnapshot
from fabrik_scheduler.store import fit_snapshot


def snapshot(entries: int, project: str) -> QueueSnapshot:
    return QueueSnapshot(
        taken_at=datetime.now(UTC),
        entries=[
            QueueEntry(run_id=f"{i:026d}", project=project, priority="normal", eta_seconds=float(i))
            for i in range(entries)
        ],
        total=entries,
        running=3,
    )


def test_a_small_snapshot_is_stored_whole() -> None:
    snap = snapshot(100, "demo")
    assert fit_snapshot(snap, 1024 * 1024) == msgspec.json.encode(snap)


def test_a_large_snapshot_keeps_the_head_of_the_queue_and_the_total() -> None:
    snap = snapshot(10_000, "p" * 63)
    assert len(msgspec.json.encode(snap)) > 1024 * 1024
    limit = 1024 * 1024 - 4096
    payload = fit_snapshot(snap, limit)
    assert len(payload) <= limit
    stored = msgspec.json.decode(payload, type=QueueSnapshot)
    assert stored.total == 10_000
    assert 0 < len(stored.entries) < 10_000
    assert [e.run_id for e in stored.entries] == [e.run_id for e in snap.entries[: len(stored.entries)]]
    # As many entries as fit: one more would not.
    one_more = msgspec.structs.replace(stored, entries=snap.entries[: len(stored.entries) + 1])
    assert len(msgspec.json.encode(one_more)) > limit
