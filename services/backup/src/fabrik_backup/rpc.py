"""The backup service's request/reply endpoints (contract: `fabrik_common.backup_rpc`)."""

from __future__ import annotations

import builtins
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TypeVar

import msgspec
from kubernetes_asyncio.client.exceptions import ApiException
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from fabrik_backup.archive.format import MANIFEST, ArchiveError, Manifest, decode_manifest
from fabrik_backup.operations import OperationNotFoundError, Operations
from fabrik_backup.retention import BackupInfo, RetentionPlan, RetentionPolicy, plan_retention
from fabrik_backup.schedule import iter_slots
from fabrik_backup.snapshots import NETWORK_ERRORS, VolumeSnapshotter, api_message
from fabrik_backup.targets.base import Target
from fabrik_common import backup_rpc as rpc
from fabrik_common.backup_rpc import (
    TERMINAL_STATES,
    BackupSummary,
    CancelRequest,
    CreateRequest,
    DeleteRequest,
    DeleteResponse,
    GetRequest,
    ListRequest,
    ListResponse,
    Operation,
    OperationResponse,
    PruneRequest,
    PruneResponse,
    RestoreRequest,
    RpcError,
    ScheduleRequest,
    ScheduleResponse,
    VerifyRequest,
)
from fabrik_common.ids import new_ulid
from fabrik_common.rpcserver import request_handler, subscribe_all, unsubscribe_all

log = logging.getLogger(__name__)

Req = TypeVar("Req")


class RequestError(Exception):
    def __init__(self, status: int, rule: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.error = RpcError(status=status, rule=rule, message=message, field=field)


def new_backup_id(now: datetime | None = None) -> str:
    """Sortable by time: `20261129T201500Z-<random>`."""
    now = now or datetime.now(UTC)
    return f"{now:%Y%m%dT%H%M%SZ}-{new_ulid()[-8:].lower()}"


async def delete_backup(target: Target, backup_id: str) -> int:
    """Remove an archive's parts, the manifest first: it stops being listed or restorable before
    any chunk goes. Returns the number of parts removed."""
    names = await target.list(f"{backup_id}/")
    manifest = f"{backup_id}/{MANIFEST}"
    if manifest in names:
        await target.delete(manifest)
    for name in names:
        if name != manifest:
            await target.delete(name)
    return len(names)


async def list_manifests(target: Target) -> list[Manifest]:
    manifests = []
    for name in await target.list():
        if name.count("/") == 1 and name.endswith("/" + MANIFEST):
            try:
                manifests.append(decode_manifest(await target.get(name), name))
            except ArchiveError as exc:
                log.warning("unreadable manifest skipped", extra={"part": name, "error": str(exc)})
    return sorted(manifests, key=lambda m: m.created_at)


class RpcServer:
    def __init__(
        self,
        nc: NatsClient,
        operations: Operations,
        target: Target,
        *,
        deadlines: dict[str, float],
        retention: RetentionPolicy | None = None,
        schedule: str = "",
        schedule_timezone: str = "UTC",
        snapshotter: VolumeSnapshotter | None = None,
    ) -> None:
        self.nc = nc
        self.snapshotter = snapshotter
        self.schedule = schedule
        self.schedule_timezone = schedule_timezone
        self.ops = operations
        self.target = target
        self.deadlines = deadlines
        self.retention = retention or RetentionPolicy()
        self._subs: list[Subscription] = []

    async def start(self) -> None:
        routes: list[tuple[str, Callable[[Msg], Awaitable[None]]]] = [
            (rpc.CREATE, self._handler(CreateRequest, self.create)),
            (rpc.LIST, self._handler(ListRequest, self.list)),
            (rpc.GET, self._handler(GetRequest, self.get)),
            (rpc.VERIFY, self._handler(VerifyRequest, self.verify)),
            (rpc.RESTORE, self._handler(RestoreRequest, self.restore)),
            (rpc.CANCEL, self._handler(CancelRequest, self.cancel)),
            (rpc.DELETE, self._handler(DeleteRequest, self.delete)),
            (rpc.PRUNE, self._handler(PruneRequest, self.prune)),
            (rpc.SCHEDULE, self._handler(ScheduleRequest, self.schedule_info)),
        ]
        self._subs += await subscribe_all(self.nc, routes, rpc.QUEUE_GROUP)

    async def stop(self) -> None:
        subs, self._subs = self._subs, []
        await unsubscribe_all(subs)

    def _handler(
        self, request_type: type[Req], serve: Callable[[Req], Awaitable[msgspec.Struct]]
    ) -> Callable[[Msg], Awaitable[None]]:
        return request_handler(rpc, request_type, serve, expected=(RequestError,))

    async def _manifest_exists(self, backup_id: str) -> None:
        names = await self.target.list(f"{backup_id}/{MANIFEST}")
        if f"{backup_id}/{MANIFEST}" not in names:
            raise RequestError(
                404, "unknown backup", f"backup_id: no complete backup {backup_id}", "backup_id"
            )

    async def _busy(self, match: Callable[[Operation], bool], message: str, field: str) -> None:
        for op in await self.ops.store.all():
            if op.state not in TERMINAL_STATES and match(op):
                raise RequestError(
                    409, "operation in progress", f"{field}: {message} ({op.operation_id})", field
                )

    async def create(self, request: CreateRequest) -> OperationResponse:
        backup_id = request.backup_id or new_backup_id()
        await self._busy(
            lambda op: op.operation == "backup" and op.backup_id == backup_id,
            f"a backup of {backup_id} is running",
            "backup_id",
        )
        op = await self.ops.submit(
            "backup",
            backup_id,
            deadline_seconds=request.deadline_seconds or self.deadlines["backup"],
            options={"streams": request.streams} if request.streams is not None else {},
            actor=request.actor,
        )
        return OperationResponse(operation=op)

    async def list(self, request: ListRequest) -> ListResponse:
        summaries = []
        for m in await list_manifests(self.target):
            summaries.append(
                BackupSummary(
                    backup_id=m.backup_id,
                    created_at=m.created_at,
                    completed_at=m.completed_at,
                    streams=len(m.streams),
                    messages=m.messages,
                    data_bytes=m.data_bytes,
                    stored_bytes=m.stored_bytes,
                    parts=m.parts,
                    verified_at=await self.ops.store.verified_at(m.backup_id),
                    volume_snapshots=m.volume_snapshots,
                )
            )
        ops = await self.ops.store.all()
        return ListResponse(target=self.target.url, backups=summaries, operations=ops[-request.operations :])

    async def get(self, request: GetRequest) -> OperationResponse:
        try:
            op, _rev = await self.ops.store.get(request.operation_id)
        except OperationNotFoundError as exc:
            raise RequestError(
                404, "unknown operation", f"operation_id: no operation {request.operation_id}", "operation_id"
            ) from exc
        return OperationResponse(operation=op)

    async def verify(self, request: VerifyRequest) -> OperationResponse:
        await self._manifest_exists(request.backup_id)
        op = await self.ops.submit(
            "verify",
            request.backup_id,
            deadline_seconds=request.deadline_seconds or self.deadlines["verify"],
            options={"deep": request.deep},
            actor=request.actor,
        )
        return OperationResponse(operation=op)

    async def restore(self, request: RestoreRequest) -> OperationResponse:
        if (request.backup_id is None) == (request.at is None):
            raise RequestError(
                400,
                "exactly one of backup_id and at",
                "backup_id: give exactly one of backup_id and at",
                "backup_id",
            )
        backup_id = request.backup_id
        if backup_id is None:
            assert request.at is not None
            candidates = [m for m in await list_manifests(self.target) if m.created_at <= request.at]
            if not candidates:
                raise RequestError(
                    404,
                    "no backup at or before",
                    f"at: no complete backup at or before {request.at.isoformat()}",
                    "at",
                )
            backup_id = candidates[-1].backup_id
        else:
            await self._manifest_exists(backup_id)
        await self._busy(lambda op: op.operation == "restore", "another restore is running", "backup_id")
        options: dict[str, object] = {"replace": list(request.replace)}
        if request.streams is not None:
            options["streams"] = list(request.streams)
        op = await self.ops.submit(
            "restore",
            backup_id,
            deadline_seconds=request.deadline_seconds or self.deadlines["restore"],
            options=options,
            actor=request.actor,
        )
        return OperationResponse(operation=op)

    async def cancel(self, request: CancelRequest) -> OperationResponse:
        try:
            op = await self.ops.cancel(request.operation_id)
        except OperationNotFoundError as exc:
            raise RequestError(
                404, "unknown operation", f"operation_id: no operation {request.operation_id}", "operation_id"
            ) from exc
        return OperationResponse(operation=op)

    async def delete(self, request: DeleteRequest) -> DeleteResponse:
        busy = [
            op.operation_id
            for op in await self.ops.store.all()
            if op.backup_id == request.backup_id and op.state not in TERMINAL_STATES
        ]
        if busy:
            raise RequestError(
                409,
                "operation in progress",
                f"backup_id: operation {busy[0]} is using {request.backup_id}",
                "backup_id",
            )
        if not await self.target.list(f"{request.backup_id}/"):
            raise RequestError(
                404, "unknown backup", f"backup_id: no backup {request.backup_id}", "backup_id"
            )
        try:
            snapshots = await self.delete_snapshots(request.backup_id)
        except (ApiException, *NETWORK_ERRORS) as exc:
            raise RequestError(
                500,
                "volume snapshots not deleted",
                f"backup_id: the VolumeSnapshots of {request.backup_id} could not be deleted "
                f"({api_message(exc)}); the backup is kept, try again",
                "backup_id",
            ) from exc
        removed = await delete_backup(self.target, request.backup_id)
        await self.ops.store.forget_verified(request.backup_id)
        log.info("backup deleted", extra={"backup_id": request.backup_id, "by": request.actor})
        return DeleteResponse(backup_id=request.backup_id, parts_deleted=removed, snapshots_deleted=snapshots)

    async def delete_snapshots(self, backup_id: str) -> builtins.list[str]:
        """Delete a backup's VolumeSnapshots before its archive, so that a backup whose snapshots
        could not be deleted stays listed (and deletable again) instead of leaving them behind."""
        if self.snapshotter is None:
            return []
        deleted = await self.snapshotter.delete(backup_id)
        if deleted:
            log.info("volume snapshots deleted", extra={"backup_id": backup_id, "snapshots": deleted})
        return deleted

    async def retention_plan(self) -> RetentionPlan:
        infos = [
            BackupInfo(m.backup_id, m.created_at, await self.ops.store.verified_at(m.backup_id))
            for m in await list_manifests(self.target)
        ]
        in_use = [op.backup_id for op in await self.ops.store.all() if op.state not in TERMINAL_STATES]
        return plan_retention(infos, self.retention, datetime.now(UTC), in_use)

    async def apply_retention(self) -> builtins.list[str]:
        """Delete what the retention policy does not keep; returns the deleted backup ids."""
        plan = await self.retention_plan()
        deleted = []
        for backup_id in plan.delete:
            try:
                await self.delete_snapshots(backup_id)
            except (ApiException, *NETWORK_ERRORS) as exc:
                log.warning(  # kept until the next retention run succeeds in deleting them
                    "backup kept: its volume snapshots could not be deleted",
                    extra={"backup_id": backup_id, "error": api_message(exc)},
                )
                continue
            await delete_backup(self.target, backup_id)
            await self.ops.store.forget_verified(backup_id)
            log.info("backup removed by retention", extra={"backup_id": backup_id})
            deleted.append(backup_id)
        return deleted

    async def prune(self, request: PruneRequest) -> PruneResponse:
        if request.dry_run:
            plan = await self.retention_plan()
            return PruneResponse(keep=plan.keep, delete=plan.delete, deleted=False)
        deleted = await self.apply_retention()
        plan = await self.retention_plan()
        return PruneResponse(keep=plan.keep, delete=deleted, deleted=True)

    async def schedule_info(self, request: ScheduleRequest) -> ScheduleResponse:
        slots: builtins.list[datetime] = []
        if self.schedule:
            for slot in iter_slots(self.schedule, self.schedule_timezone, datetime.now(UTC)):
                if len(slots) >= request.slots:
                    break
                slots.append(slot)
        policy = self.retention
        return ScheduleResponse(
            target=self.target.url,
            schedule=self.schedule,
            timezone=self.schedule_timezone,
            next_slots=slots,
            retention={
                "keep_last": policy.keep_last,
                "keep_daily": policy.keep_daily,
                "keep_weekly": policy.keep_weekly,
                "keep_monthly": policy.keep_monthly,
                "max_age_days": policy.max_age_days,
            },
        )
