"""Backup, verify and restore operations as state machines persisted in the `backups` KV bucket.

requested → running → succeeded | failed | cancelled, with `cancelling` between a cancel request and
the work's end. Every operation has a deadline: past it, a non-terminal operation is failed (the
work is stopped where it runs). A running operation's owner writes a heartbeat; when it stops (the
process died), any replica takes the operation over and runs it again — backups resume after their
last stored chunk, restores skip streams already restored — so nothing stays in progress forever.
All writes use revision checks, so two replicas never both take an operation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NoKeysError
from nats.js.kv import KeyValue

from fabrik_common.aio import cancel_all
from fabrik_common.backup_rpc import TERMINAL_STATES, Operation
from fabrik_common.events import (
    AlertRaised,
    BackupOperation,
    BackupRequested,
    BackupState,
    BackupStateChanged,
    Event,
)
from fabrik_common.ids import new_ulid

log = logging.getLogger(__name__)

OP_PREFIX = "op."
VERIFIED_PREFIX = "verified."

Publish = Callable[[Event], Awaitable[Any]]


Worker = Callable[[Operation, Callable[[int, int], Awaitable[None]]], Coroutine[Any, Any, dict[str, Any]]]
"""Does an operation's work: (operation, report(bytes, parts)) -> result; `report` raises
`OperationStoppedError` once the operation must stop."""


class OperationNotFoundError(LookupError):
    pass


class OperationStoppedError(Exception):
    """Raised from a worker's progress report once its operation must stop (cancel, deadline)."""


async def stop_work(work: asyncio.Future[Any]) -> None:
    """Cancel `work` and wait until it has ended. The NATS client swallows a cancellation that
    lands in some of its awaits, so the cancel is repeated until one takes effect (the worker's
    progress report raises `OperationStoppedError` meanwhile as well)."""
    while not work.done():
        work.cancel()
        await asyncio.wait({work}, timeout=0.2)
    if not work.cancelled():
        work.exception()  # retrieved: the failure of a stopped operation is not reported again


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Timing:
    heartbeat_seconds: float = 2.0
    stale_seconds: float = 15.0
    reap_seconds: float = 2.0


class OperationStore:
    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    async def create(self, op: Operation) -> None:
        await self.kv.create(OP_PREFIX + op.operation_id, msgspec.json.encode(op))

    async def get(self, operation_id: str) -> tuple[Operation, int]:
        try:
            entry = await self.kv.get(OP_PREFIX + operation_id)
        except KeyNotFoundError as exc:
            raise OperationNotFoundError(operation_id) from exc
        assert entry.value is not None and entry.revision is not None
        return msgspec.json.decode(entry.value, type=Operation), entry.revision

    async def update(self, operation_id: str, change: Callable[[Operation], Operation | None]) -> Operation:
        """Apply `change` with a revision check (retried on a concurrent write); None: no change."""
        while True:
            op, revision = await self.get(operation_id)
            new = change(op)
            if new is None:
                return op
            try:
                await self.kv.update(OP_PREFIX + operation_id, msgspec.json.encode(new), last=revision)
                return new
            except KeyWrongLastSequenceError:
                continue

    async def all(self) -> list[Operation]:
        try:
            keys = await self.kv.keys()
        except NoKeysError:
            return []
        ops = []
        for key in keys:
            if key.startswith(OP_PREFIX):
                with contextlib.suppress(OperationNotFoundError):
                    ops.append((await self.get(key[len(OP_PREFIX) :]))[0])
        return sorted(ops, key=lambda o: o.requested_at)

    async def mark_verified(self, backup_id: str, at: datetime) -> None:
        await self.kv.put(VERIFIED_PREFIX + backup_id, at.isoformat().encode())

    async def verified_at(self, backup_id: str) -> datetime | None:
        try:
            entry = await self.kv.get(VERIFIED_PREFIX + backup_id)
        except KeyNotFoundError:
            return None
        return datetime.fromisoformat(entry.value.decode()) if entry.value else None

    async def forget_verified(self, backup_id: str) -> None:
        with contextlib.suppress(KeyNotFoundError):
            await self.kv.delete(VERIFIED_PREFIX + backup_id)


class Operations:
    """Starts, tracks, cancels and reaps operations; `workers` do the work of each kind."""

    def __init__(
        self,
        store: OperationStore,
        workers: dict[BackupOperation, Worker],
        *,
        instance: str,
        target: str,
        publish: Publish,
        timing: Timing | None = None,
    ) -> None:
        self.store = store
        self.workers = workers
        self.instance = instance
        self.target = target
        self.publish = publish
        self.timing = timing or Timing()
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self._progress: dict[str, tuple[int, int]] = {}
        self._cancel_requested: dict[str, bool] = {}
        self._stopping: dict[str, asyncio.Event] = {}

    async def submit(
        self,
        kind: BackupOperation,
        backup_id: str,
        *,
        deadline_seconds: float,
        options: dict[str, Any] | None = None,
        actor: str = "",
    ) -> Operation:
        now = _now()
        op = Operation(
            operation_id=new_ulid(),
            operation=kind,
            state="requested",
            backup_id=backup_id,
            target=self.target,
            options=options or {},
            requested_by=actor,
            requested_at=now,
            deadline=now + timedelta(seconds=deadline_seconds),
        )
        await self.store.create(op)
        await self._emit_requested(op)
        await self._emit(op)
        self._start(op.operation_id)
        return op

    async def _emit_requested(self, op: Operation) -> None:
        await self.publish(
            BackupRequested(
                operation_id=op.operation_id,
                operation=op.operation,
                target=op.target,
                backup_id=op.backup_id,
                options=dict(op.options),
                requested_by=op.requested_by,
            )
        )

    async def _emit(self, op: Operation) -> None:
        await self.publish(
            BackupStateChanged(
                operation_id=op.operation_id,
                operation=op.operation,
                state=op.state,
                backup_id=op.backup_id,
                message=op.message,
                bytes_done=op.bytes_done,
                parts_done=op.parts_done,
            )
        )

    def _start(self, operation_id: str) -> None:
        if operation_id in self.tasks:
            return
        task = asyncio.create_task(self._run(operation_id), name=f"backup-op-{operation_id}")
        self.tasks[operation_id] = task
        task.add_done_callback(lambda _t: self.tasks.pop(operation_id, None))

    async def _transition(
        self, operation_id: str, state: BackupState, message: str = "", **fields: Any
    ) -> Operation | None:
        changed = False

        def change(op: Operation) -> Operation | None:
            nonlocal changed
            if op.state in TERMINAL_STATES:
                return None
            changed = True
            done = self._progress.get(operation_id, (op.bytes_done, op.parts_done))
            return msgspec.structs.replace(
                op,
                state=state,
                message=message or op.message,
                finished_at=_now() if state in TERMINAL_STATES else op.finished_at,
                bytes_done=done[0],
                parts_done=done[1],
                **fields,
            )

        op = await self.store.update(operation_id, change)
        if not changed:
            return None
        await self._emit(op)
        if op.state == "failed":
            await self._alert(op)
        return op

    async def _alert(self, op: Operation) -> None:
        """A failed operation raises an alert through the platform's alerting (OPS stream)."""
        await self.publish(
            AlertRaised(
                alert_id=new_ulid(),
                key=f"backup.{op.operation}.{op.operation_id}",
                severity="warning" if op.operation == "verify" else "critical",
                source="backup",
                title=f"{op.operation} of {op.backup_id} failed",
                message=op.message,
                entity_kind="backup",
                entity_id=op.backup_id,
                labels={"operation": op.operation, "operation_id": op.operation_id, "target": op.target},
            )
        )

    async def _warn(self, op: Operation, notes: list[str]) -> None:
        await self.publish(
            AlertRaised(
                alert_id=new_ulid(),
                key=f"backup.{op.operation}.{op.operation_id}.warning",
                severity="warning",
                source="backup",
                title=f"{op.operation} of {op.backup_id} succeeded with warnings",
                message="; ".join(notes),
                entity_kind="backup",
                entity_id=op.backup_id,
                labels={"operation": op.operation, "operation_id": op.operation_id, "target": op.target},
            )
        )

    async def _take(self, operation_id: str) -> Operation | None:
        """Become the owner of a requested (or abandoned) operation; None if that is not possible."""
        taken = False
        now = _now()

        def change(op: Operation) -> Operation | None:
            nonlocal taken
            if op.state not in ("requested", "running"):
                return None
            if op.state == "running" and op.owner != self.instance and not self._stale(op, now):
                return None
            taken = True
            return msgspec.structs.replace(
                op,
                state="running",
                owner=self.instance,
                started_at=op.started_at or now,
                heartbeat_at=now,
                attempts=op.attempts + 1,
            )

        op = await self.store.update(operation_id, change)
        return op if taken else None

    def _stale(self, op: Operation, now: datetime) -> bool:
        beat = op.heartbeat_at or op.requested_at
        return (now - beat).total_seconds() > self.timing.stale_seconds

    async def _run(self, operation_id: str) -> None:
        op = await self._take(operation_id)
        if op is None:
            return
        await self._emit(op)
        remaining = (op.deadline - _now()).total_seconds()
        worker = self.workers[op.operation]

        stopping = self._stopping.setdefault(operation_id, asyncio.Event())

        async def report(bytes_done: int, parts_done: int) -> None:
            self._progress[operation_id] = (bytes_done, parts_done)
            if stopping.is_set():
                raise OperationStoppedError(operation_id)

        work = asyncio.create_task(worker(op, report))
        beat = asyncio.create_task(self._heartbeat(operation_id, work))
        try:
            try:
                result = await asyncio.wait_for(asyncio.shield(work), max(remaining, 0.001))
            except TimeoutError:
                stopping.set()
                await stop_work(work)
                await self._transition(
                    operation_id, "failed", f"deadline exceeded ({op.deadline.isoformat()})"
                )
                return
            except asyncio.CancelledError:
                if work.cancelled() or self._cancel_requested.get(operation_id):
                    stopping.set()
                    await stop_work(work)
                    await self._transition(operation_id, "cancelled", "cancelled on request")
                    return
                raise  # the service is stopping: the operation stays running and is taken over
            except Exception as exc:  # noqa: BLE001 - any failure of the work fails the operation, with the reason
                log.warning(
                    "backup operation failed", extra={"operation_id": operation_id, "error": str(exc)}
                )
                await self._transition(operation_id, "failed", f"{type(exc).__name__}: {exc}")
                return
            # A success can carry warnings (volume snapshots that failed): the operation says so
            # in its message and an alert is raised, but the work it did is not failed for them.
            notes = [str(w) for w in result.get("warnings") or []]
            final = await self._transition(operation_id, "succeeded", "; ".join(notes), result=result)
            if final is not None and notes:
                await self._warn(final, notes)
            if final is not None and op.operation == "verify":
                await self.store.mark_verified(op.backup_id, _now())
        finally:
            beat.cancel()
            with contextlib.suppress(BaseException):
                await beat
            stopping.set()
            await stop_work(work)
            self._progress.pop(operation_id, None)
            self._stopping.pop(operation_id, None)
            self._cancel_requested.pop(operation_id, None)

    async def _heartbeat(self, operation_id: str, work: asyncio.Task[dict[str, Any]]) -> None:
        while not work.done():
            await asyncio.sleep(self.timing.heartbeat_seconds)
            progress = self._progress.get(operation_id)

            def beat(op: Operation, progress: tuple[int, int] | None = progress) -> Operation | None:
                if op.state in TERMINAL_STATES or op.owner != self.instance:
                    return None
                done = progress or (op.bytes_done, op.parts_done)
                return msgspec.structs.replace(
                    op, heartbeat_at=_now(), bytes_done=done[0], parts_done=done[1]
                )

            op = await self.store.update(operation_id, beat)
            if op.state == "cancelling":
                self._cancel_local(operation_id)
                return

    def _cancel_local(self, operation_id: str) -> None:
        task = self.tasks.get(operation_id)
        if task is not None:
            self._cancel_requested[operation_id] = True
            task.cancel()

    async def cancel(self, operation_id: str) -> Operation:
        def change(op: Operation) -> Operation | None:
            if op.state in TERMINAL_STATES or op.state == "cancelling":
                return None
            if op.state == "requested" and operation_id not in self.tasks:
                return msgspec.structs.replace(
                    op, state="cancelled", message="cancelled on request", finished_at=_now()
                )
            return msgspec.structs.replace(op, state="cancelling", message="cancel requested")

        before, _rev = await self.store.get(operation_id)
        op = await self.store.update(operation_id, change)
        if op.state != before.state:
            await self._emit(op)
        if op.state == "cancelling":
            self._cancel_local(operation_id)
        return op

    async def reap_once(self) -> None:
        """Fail what is past its deadline, finish cancels whose owner is gone, take over the rest."""
        now = _now()
        for op in await self.store.all():
            if op.state in TERMINAL_STATES:
                continue
            local = op.operation_id in self.tasks
            if now > op.deadline and not local:
                await self._transition(
                    op.operation_id, "failed", f"deadline exceeded ({op.deadline.isoformat()})"
                )
            elif (
                op.state == "cancelling" and not local and (op.owner == self.instance or self._stale(op, now))
            ):
                await self._transition(op.operation_id, "cancelled", "cancelled on request")
            elif not local and (op.owner == self.instance or self._stale(op, now) or op.state == "requested"):
                if op.owner not in (None, self.instance):
                    log.warning(
                        "taking over an abandoned operation",
                        extra={"operation_id": op.operation_id, "owner": op.owner},
                    )
                self._start(op.operation_id)

    async def reaper(self) -> None:
        while True:
            try:
                await self.reap_once()
            except Exception:
                log.exception("reaping backup operations failed; retried")
            await asyncio.sleep(self.timing.reap_seconds)

    async def stop(self) -> None:
        # Repeated cancels (cancel_all): a single one can be swallowed inside nats-py.
        await cancel_all(list(self.tasks.values()))
