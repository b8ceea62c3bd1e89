"""Run records in the `runs` KV bucket, written with revision checks (compare-and-set)."""

from __future__ import annotations

from collections.abc import Callable

import msgspec
import nats.errors
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from fabrik_common.runs import QueueSnapshot, RunRecord

_encode = msgspec.json.Encoder().encode
_decode_record = msgspec.json.Decoder(RunRecord).decode
_encode_snapshot = msgspec.json.Encoder().encode


class RunStore:
    def __init__(self, runs: KeyValue, queue: KeyValue, max_payload: int = 1024 * 1024) -> None:
        self.runs = runs
        self.queue = queue
        self.max_payload = max_payload

    async def get(self, run_id: str) -> RunRecord | None:
        try:
            entry = await self.runs.get(run_id)
        except KeyNotFoundError:
            return None
        if not entry.value:
            return None
        record = _decode_record(entry.value)
        record.revision = entry.revision or 0
        return record

    async def create(self, record: RunRecord) -> RunRecord | None:
        """Store a new record; None when the run already exists (a redelivered request)."""
        try:
            record.revision = await self.runs.create(record.run_id, _encode(record))
        except KeyWrongLastSequenceError:
            return None
        return record

    async def update(
        self, record: RunRecord, change: Callable[[RunRecord], RunRecord | None], *, attempts: int = 5
    ) -> RunRecord | None:
        """Apply `change` and write it if nobody wrote since; re-read and re-apply on a conflict.

        `change` returns the new record, or None when there is nothing to do.
        """
        current: RunRecord | None = record
        for _ in range(attempts):
            if current is None:
                return None
            updated = change(msgspec.structs.replace(current))
            if updated is None:
                return None
            try:
                updated.revision = await self.runs.update(
                    updated.run_id, _encode(updated), last=current.revision
                )
            except KeyWrongLastSequenceError:
                current = await self.get(record.run_id)
                continue
            return updated
        raise RuntimeError(f"run {record.run_id}: too many concurrent writes")

    async def load_all(self) -> dict[str, RunRecord]:
        """Every run record, through one ordered watch rather than a get per key.

        The watcher's own "initial values done" marker can come before values already on their
        way, so it is not trusted: an empty bucket is recognised from its stream, and otherwise
        values are read until one says nothing is pending after it (delete markers included).
        """
        records: dict[str, RunRecord] = {}
        status = await self.runs.status()
        if not status.values:
            return records
        watcher = await self.runs.watchall(ignore_deletes=False)
        try:
            while True:
                try:
                    entry = await watcher.updates(timeout=30)  # type: ignore[no-untyped-call]  # nats-py is untyped here
                except nats.errors.TimeoutError:
                    raise RuntimeError("loading run records timed out") from None
                if entry is None:
                    continue
                if entry.value and entry.operation is None:
                    record = _decode_record(entry.value)
                    record.revision = entry.revision or 0
                    records[record.run_id] = record
                else:
                    records.pop(entry.key, None)
                if entry.delta == 0:
                    break
        finally:
            await watcher.stop()  # type: ignore[no-untyped-call]
        return records

    async def write_snapshot(self, snapshot: QueueSnapshot) -> int:
        """Store the snapshot, keeping as many leading entries as fit in one NATS message.

        `total` still counts every queued run; runs beyond the stored entries have no position.
        Returns the number of entries stored.
        """
        payload = fit_snapshot(snapshot, self.max_payload - 4096)
        await self.queue.put("snapshot", payload)
        return len(msgspec.json.decode(payload, type=QueueSnapshot).entries) if payload else 0


def fit_snapshot(snapshot: QueueSnapshot, limit: int) -> bytes:
    """The encoded snapshot, trimmed (by halving, then growing back) to at most `limit` bytes."""
    payload = _encode_snapshot(snapshot)
    if len(payload) <= limit:
        return payload
    entries = snapshot.entries
    low, high = 0, len(entries)
    best = _encode_snapshot(msgspec.structs.replace(snapshot, entries=[]))
    while low <= high:
        middle = (low + high) // 2
        candidate = _encode_snapshot(msgspec.structs.replace(snapshot, entries=entries[:middle]))
        if len(candidate) <= limit:
            best, low = candidate, middle + 1
        else:
            high = middle - 1
    return best
