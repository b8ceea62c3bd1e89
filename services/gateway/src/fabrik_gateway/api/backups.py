"""`/api/v1/backups`, `/api/v1/restores`: backups of every stream, KV bucket and object store, their
verification and restore, answered by the backup service over NATS request/reply
(`fabrik_gateway.backups`; docs/backup.md, docs/disaster-recovery.md).

A backup spans every project, so every route needs a role held everywhere (a role bound to projects
is not enough): reading backups, operations and the schedule needs viewer; verify (reads the
archive, a deep verify starts a scratch server) and a retention dry run need maintainer; create,
restore, cancel, delete and applying retention need admin. Backup, verify and restore answer 202
at once with the operation in `requested`; follow it with `GET /backups/operations/{id}`.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any, Final, Literal, TypeVar

import msgspec
from litestar import Controller, Request, delete, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody, Parameter

from fabrik_common import backup_rpc as rpc
from fabrik_gateway.api.params import QueryErrors, int_param
from fabrik_gateway.api.runs import BAD_QUERY, problem_spec
from fabrik_gateway.audit import DETAILS_KEY, TARGET_KEY
from fabrik_gateway.auth import Principal, require_role
from fabrik_gateway.auth.guard import api_guard
from fabrik_gateway.backups import ask
from fabrik_gateway.gateway import Gateway
from fabrik_gateway.problems import invalid, not_found

T = TypeVar("T")

BACKUP_ID_RULE: Final = "must be 1-80 letters, digits, `-` or `_`, starting with a letter or digit"
_BACKUP_ID: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,79}$")
OPERATION_ID_RULE: Final = "must be an operation id (letters and digits)"
_OPERATION_ID: Final = re.compile(r"^[A-Za-z0-9_-]{1,80}$")

BackupIdBody = Annotated[str, msgspec.Meta(pattern=_BACKUP_ID.pattern, description=BACKUP_ID_RULE)]
StreamName = Annotated[str, msgspec.Meta(pattern=r"^[^.*>\s]{1,255}$", description="A stream name")]
ReplaceName = Annotated[
    str, msgspec.Meta(pattern=r"^([^.*>\s]{1,255}|\*)$", description="A stream name, or `*` for all")
]
Deadline = Annotated[
    float,
    msgspec.Meta(gt=0, le=7 * 24 * 3600, description="Seconds; past it the operation is failed"),
]

UNAVAILABLE = {
    503: problem_spec(
        "No backup service is answering (none running), or the gateway is not connected to NATS; see "
        "`Retry-After`"
    ),
    504: problem_spec("The backup service did not answer within `FABRIK_BACKUP_TIMEOUT_SECONDS`"),
    502: problem_spec("The backup service failed, or answered something the gateway cannot read"),
}
NOT_FOUND = {404: problem_spec("No such backup or operation")}
INVALID_BODY = {400: problem_spec("Invalid body or path parameter, each field named in `errors`")}


# ------------------------------------------------------------------------------------------------
# bodies


class CreateBackupBody(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    backup_id: BackupIdBody | None = None
    """Name the backup yourself (e.g. `before-upgrade`); naming an incomplete backup resumes it.
    Default: a time-sortable id such as `20261129T201500Z-1a2b3c4d`."""
    streams: list[StreamName] | None = None
    """Only these streams (default: every stream)."""
    deadline_seconds: Deadline | None = None
    """Default: the backup service's `FABRIK_BACKUP_DEADLINE_SECONDS` (6 h)."""


class VerifyBody(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    deep: bool = False
    """Also restore into a scratch NATS server and compare message by message."""
    deadline_seconds: Deadline | None = None


class RestoreBody(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    streams: list[StreamName] | None = None
    """Only these streams of the archive (default: all)."""
    replace: list[ReplaceName] = []
    """Streams that exist with messages and may be deleted and restored (`["*"]`: all); any other
    such stream makes the restore fail."""
    deadline_seconds: Deadline | None = None


class PointInTimeRestoreBody(RestoreBody, frozen=True, kw_only=True, forbid_unknown_fields=True):
    backup_id: BackupIdBody | None = None
    """This backup; or give `at`."""
    at: datetime | None = None
    """The latest complete backup captured at or before this time (RFC 3339 with offset)."""


class PruneBody(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    dry_run: bool = True
    """Only report what the retention policy would delete (default)."""


# ------------------------------------------------------------------------------------------------
# answers


class OperationView(msgspec.Struct, kw_only=True):
    """A backup, verify or restore operation: requested → running → succeeded | failed |
    cancelled (cancelling while a cancel takes effect). Past `deadline` it is failed."""

    operation_id: str
    operation: Literal["backup", "verify", "restore"]
    state: Literal["requested", "running", "cancelling", "succeeded", "failed", "cancelled"]
    terminal: bool
    backup_id: str
    target: str
    options: dict[str, Any]
    requested_by: str
    requested_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    deadline: datetime
    heartbeat_at: datetime | None
    owner: str | None
    attempts: int
    message: str
    """Why it failed or was cancelled, or the warnings of a success (a volume snapshot that failed
    or timed out; an alert is raised too); empty otherwise."""
    bytes_done: int
    parts_done: int
    result: dict[str, Any]
    """Backup: streams, messages, bytes, parts, pruned, `volume_snapshots` (counts per state),
    `warnings`; verify: parts, messages, deep, compared;
    restore: per stream its messages, whether it was skipped, conditions dropped."""


class VolumeSnapshotView(msgspec.Struct, kw_only=True):
    """A run workspace PVC (`data-fabrik-<run>`) and its CSI VolumeSnapshot taken with the backup."""

    pvc: str
    snapshot: str
    """The VolumeSnapshot in the runs namespace (restore: a PVC with it as `dataSource`); empty
    when skipped."""
    snapshot_class: str
    storage_class: str
    state: Literal["ready", "failed", "skipped", "timed_out"]
    reason: str
    """Why it was skipped (e.g. the storage class supports no snapshots), failed or timed out."""
    restore_size: str
    """`status.restoreSize`: the smallest size of a PVC restored from it."""


class VolumeSnapshotsView(msgspec.Struct, kw_only=True):
    """The run workspaces' volume snapshots of a backup."""

    status: Literal["taken", "off", "unavailable", "error"]
    """`taken` (each volume has its state), `off` (`FABRIK_BACKUP_VOLUME_SNAPSHOTS=off`),
    `unavailable` (the backup service is not on Kubernetes), `error` (the Kubernetes API failed)."""
    message: str
    namespace: str
    volumes: list[VolumeSnapshotView]


class BackupView(msgspec.Struct, kw_only=True):
    """A backup on the target: complete (a manifest: listed, verifiable, restorable), or incomplete
    (a backup operation that has not finished, or ended without a manifest; `POST /backups` with its
    `backup_id` resumes it)."""

    backup_id: str
    complete: bool
    state: str
    """`complete`, else the state of its latest backup operation (`running`, `failed`, ...)."""
    created_at: datetime | None
    """When the backup captured the server's state (the point in time it restores to)."""
    completed_at: datetime | None
    streams: int | None
    messages: int | None
    data_bytes: int | None
    """Message bytes (payload, headers, subject)."""
    stored_bytes: int | None
    """Compressed, on the target."""
    parts: int | None
    verified_at: datetime | None
    """The last successful verify."""
    operation_id: str | None = None
    """The latest backup operation of an incomplete backup."""
    message: str = ""
    volume_snapshots: VolumeSnapshotsView | None = None
    """The run workspaces' CSI VolumeSnapshots taken with it; null for an incomplete backup or one
    taken before volume snapshots existed."""


class BackupList(msgspec.Struct, kw_only=True):
    target: str
    backups: list[BackupView]
    """Complete backups oldest first, then incomplete ones."""
    operations: list[OperationView]
    """The latest operations, oldest first."""


class BackupDetail(BackupView, kw_only=True):
    history: list[OperationView]
    """The operations on this backup among the latest ones, oldest first."""


class OperationList(msgspec.Struct, kw_only=True):
    operations: list[OperationView]


class DeletedView(msgspec.Struct, kw_only=True):
    backup_id: str
    parts_deleted: int
    snapshots_deleted: list[str] = []
    """The backup's VolumeSnapshots deleted with it."""


class PruneView(msgspec.Struct, kw_only=True):
    keep: dict[str, list[str]]
    """Backup id → the rules keeping it (last, daily, weekly, monthly, last verified, in use)."""
    delete: list[str]
    """Dry run: what would be deleted; otherwise what was deleted."""
    deleted: bool


class BackupScheduleView(msgspec.Struct, kw_only=True):
    target: str
    schedule: str
    """`FABRIK_BACKUP_SCHEDULE` of the backup service (five-field cron); empty: no scheduled backups.
    Change it in the backup service's environment (Helm value, compose file, `fabrik up`'s
    environment) and restart it."""
    timezone: str
    next_slots: list[datetime]
    retention: dict[str, float]


# ------------------------------------------------------------------------------------------------


def convert(answer: msgspec.Struct, view_type: type[T], **extra: Any) -> T:
    data: dict[str, Any] = msgspec.to_builtins(answer)
    data.pop("kind", None)
    data.update(extra)
    return msgspec.convert(data, view_type)


def op_view(op: rpc.Operation) -> OperationView:
    return convert(op, OperationView, terminal=op.state in rpc.TERMINAL_STATES)


def backup_views(answer: rpc.ListResponse) -> list[BackupView]:
    complete = [
        convert(b, BackupView, complete=True, state="complete", operation_id=None, message="")
        for b in answer.backups
    ]
    names = {b.backup_id for b in answer.backups}
    latest: dict[str, rpc.Operation] = {}
    for op in answer.operations:
        if op.operation == "backup" and op.backup_id not in names:
            latest[op.backup_id] = op
    incomplete = [
        BackupView(
            backup_id=op.backup_id,
            complete=False,
            state=op.state,
            created_at=None,
            completed_at=None,
            streams=None,
            messages=None,
            data_bytes=None,
            stored_bytes=op.bytes_done,
            parts=op.parts_done,
            verified_at=None,
            operation_id=op.operation_id,
            message=op.message,
        )
        for op in latest.values()
        if op.state != "succeeded"  # succeeded and then deleted (or pruned): gone, not incomplete
    ]
    return complete + incomplete


def _backup_id(value: str, field: str = "backup_id") -> str:
    if not _BACKUP_ID.match(value):
        raise invalid([(field, BACKUP_ID_RULE)], status=400, detail=f"{field}: {BACKUP_ID_RULE}")
    return value


def _operation_id(value: str) -> str:
    if not _OPERATION_ID.match(value):
        raise invalid([("operation_id", OPERATION_ID_RULE)], status=400, detail=OPERATION_ID_RULE)
    return value


def _everywhere(principal: Principal, role: Literal["viewer", "maintainer", "admin"], action: str) -> None:
    require_role(principal, role, action)


class BackupsController(Controller):
    path = "/api/v1"
    tags = ["backups"]
    guards = [api_guard]

    async def _list(self, gateway: Gateway, operations: int) -> rpc.ListResponse:
        return await ask(
            gateway.bus.nc,
            rpc.LIST,
            rpc.ListRequest(operations=operations),
            rpc.ListResponse,
            seconds=gateway.settings.backup_timeout_seconds,
        )

    @post(
        "/backups",
        status_code=202,
        summary="Start a backup",
        description=(
            "Admins. Backs up every stream, KV bucket and object store (or `streams`) to the backup "
            "service's target (`FABRIK_BACKUP_TARGET`; the API cannot choose another). Answers at once "
            "with the operation in `requested`. Naming an incomplete backup's `backup_id` resumes it; "
            "409 while a backup of that id runs."
        ),
        opt={"audit_action": "backup.create"},
        responses={**INVALID_BODY, 409: problem_spec("A backup of that id is running"), **UNAVAILABLE},
    )
    async def create(
        self,
        request: Request[Any, Any, Any],
        gateway: NamedDependency[Gateway],
        principal: NamedDependency[Principal],
        data: JSONBody[CreateBackupBody | None] = None,
    ) -> OperationView:
        body = data or CreateBackupBody()
        request.state[TARGET_KEY] = f"backup:{body.backup_id or 'new'}"
        request.state[DETAILS_KEY] = {"streams": body.streams, "deadline_seconds": body.deadline_seconds}
        _everywhere(principal, "admin", "start a backup")
        answer = await ask(
            gateway.bus.nc,
            rpc.CREATE,
            rpc.CreateRequest(
                backup_id=body.backup_id,
                streams=body.streams,
                deadline_seconds=body.deadline_seconds,
                actor=principal.subject,
            ),
            rpc.OperationResponse,
            seconds=gateway.settings.backup_timeout_seconds,
            invalid_status=422,
        )
        request.state[TARGET_KEY] = f"backup:{answer.operation.backup_id}"
        return op_view(answer.operation)

    @get(
        "/backups",
        summary="Backups and operations",
        description=(
            "Every complete backup on the target (oldest first: capture time, sizes, last verification, "
            "the run workspaces' volume snapshots), incomplete backups (a backup operation without a "
            "manifest), and the latest operations."
        ),
        responses={**BAD_QUERY, **UNAVAILABLE},
    )
    async def list_backups(
        self,
        gateway: NamedDependency[Gateway],
        principal: NamedDependency[Principal],
        operations: Annotated[
            str | None,
            Parameter(
                description="How many of the latest operations (default 50, at most 1000)",
                schema_extra={"oneOf": None, "type": "integer", "minimum": 0, "maximum": 1000},
            ),
        ] = None,
    ) -> BackupList:
        errors = QueryErrors()
        count = int_param(errors, "operations", operations, default=50, minimum=0, maximum=1000)
        errors.raise_if_any()
        assert count is not None
        _everywhere(principal, "viewer", "list backups")
        answer = await self._list(gateway, count)
        return BackupList(
            target=answer.target,
            backups=backup_views(answer),
            operations=[op_view(op) for op in answer.operations] if count else [],
        )

    @get(
        "/backups/operations",
        summary="Backup operations",
        description="The latest backup, verify and restore operations with their states, oldest first.",
        responses={**BAD_QUERY, **UNAVAILABLE},
    )
    async def list_operations(
        self,
        gateway: NamedDependency[Gateway],
        principal: NamedDependency[Principal],
        limit: Annotated[
            str | None,
            Parameter(
                description="How many of the latest (default 50, at most 1000)",
                schema_extra={"oneOf": None, "type": "integer", "minimum": 1, "maximum": 1000},
            ),
        ] = None,
    ) -> OperationList:
        errors = QueryErrors()
        count = int_param(errors, "limit", limit, default=50, minimum=1, maximum=1000)
        errors.raise_if_any()
        assert count is not None
        _everywhere(principal, "viewer", "list backup operations")
        answer = await self._list(gateway, count)
        return OperationList(operations=[op_view(op) for op in answer.operations])

    @get(
        "/backups/operations/{operation_id:str}",
        summary="A backup operation",
        description="Its state, progress (`bytes_done`, `parts_done`), result or failure message.",
        responses={**INVALID_BODY, **NOT_FOUND, **UNAVAILABLE},
    )
    async def get_operation(
        self,
        gateway: NamedDependency[Gateway],
        principal: NamedDependency[Principal],
        operation_id: FromPath[str],
    ) -> OperationView:
        _operation_id(operation_id)
        _everywhere(principal, "viewer", "read backup operations")
        answer = await ask(
            gateway.bus.nc,
            rpc.GET,
            rpc.GetRequest(operation_id=operation_id),
            rpc.OperationResponse,
            seconds=gateway.settings.backup_timeout_seconds,
        )
        return op_view(answer.operation)

    @post(
        "/backups/operations/{operation_id:str}/cancel",
        status_code=200,
        summary="Cancel a backup operation",
        description=(
            "Admins. A running operation becomes `cancelling` and then `cancelled` once its owner stops "
            "(within the heartbeat, 2 s); a `requested` one is cancelled at once; a finished one is "
            "answered as it is."
        ),
        opt={"audit_action": "backup.cancel"},
        responses={**INVALID_BODY, **NOT_FOUND, **UNAVAILABLE},
    )
    async def cancel(
        self,
        request: Request[Any, Any, Any],
        gateway: NamedDependency[Gateway],
        principal: NamedDependency[Principal],
        operation_id: FromPath[str],
    ) -> OperationView:
        request.state[TARGET_KEY] = f"backup-operation:{operation_id}"
        _operation_id(operation_id)
        _everywhere(principal, "admin", "cancel a backup operation")
        answer = await ask(
            gateway.bus.nc,
            rpc.CANCEL,
            rpc.CancelRequest(operation_id=operation_id, actor=principal.subject),
            rpc.OperationResponse,
            seconds=gateway.settings.backup_timeout_seconds,
        )
        return op_view(answer.operation)

    @get(
        "/backups/schedule",
        summary="Backup schedule and retention",
        description=(
            "The backup service's `FABRIK_BACKUP_SCHEDULE` (cron) and time zone, the next slots, and the "
            "retention policy. These are settings of the backup service: change them in its environment "
            "and restart it."
        ),
        responses=UNAVAILABLE,
    )
    async def schedule(
        self, gateway: NamedDependency[Gateway], principal: NamedDependency[Principal]
    ) -> BackupScheduleView:
        _everywhere(principal, "viewer", "read the backup schedule")
        answer = await ask(
            gateway.bus.nc,
            rpc.SCHEDULE,
            rpc.ScheduleRequest(),
            rpc.ScheduleResponse,
            seconds=gateway.settings.backup_timeout_seconds,
        )
        return convert(answer, BackupScheduleView)

    @post(
        "/backups/prune",
        status_code=200,
        summary="Apply the retention policy",
        description=(
            "With `dry_run` (the default; maintainers) what the policy keeps (and why) and what it would "
            "delete; without (admins) it deletes them. The newest verified backup is never deleted."
        ),
        opt={"audit_action": "backup.prune"},
        responses={**INVALID_BODY, **UNAVAILABLE},
    )
    async def prune(
        self,
        request: Request[Any, Any, Any],
        gateway: NamedDependency[Gateway],
        principal: NamedDependency[Principal],
        data: JSONBody[PruneBody | None] = None,
    ) -> PruneView:
        body = data or PruneBody()
        request.state[TARGET_KEY] = "backups"
        request.state[DETAILS_KEY] = {"dry_run": body.dry_run}
        if body.dry_run:
            _everywhere(principal, "maintainer", "preview the backup retention")
        else:
            _everywhere(principal, "admin", "delete backups by retention")
        answer = await ask(
            gateway.bus.nc,
            rpc.PRUNE,
            rpc.PruneRequest(dry_run=body.dry_run, actor=principal.subject),
            rpc.PruneResponse,
            seconds=gateway.settings.backup_timeout_seconds,
        )
        return convert(answer, PruneView)

    @get(
        "/backups/{backup_id:str}",
        summary="A backup",
        description="One backup (complete or incomplete) with the latest operations on it.",
        responses={**INVALID_BODY, **NOT_FOUND, **UNAVAILABLE},
    )
    async def get_backup(
        self,
        gateway: NamedDependency[Gateway],
        principal: NamedDependency[Principal],
        backup_id: FromPath[str],
    ) -> BackupDetail:
        _backup_id(backup_id)
        _everywhere(principal, "viewer", "read backups")
        answer = await self._list(gateway, 1000)
        found = next((b for b in backup_views(answer) if b.backup_id == backup_id), None)
        if found is None:
            raise not_found(f"backup {backup_id}")
        history = [op_view(op) for op in answer.operations if op.backup_id == backup_id]
        return BackupDetail(**{f: getattr(found, f) for f in found.__struct_fields__}, history=history)

    @post(
        "/backups/{backup_id:str}/verify",
        status_code=202,
        summary="Verify a backup",
        description=(
            "Maintainers. Reads every part back and checks sizes and SHA-256 against the manifest; "
            "`deep` also restores it into a scratch NATS server and compares message by message. "
            "A success is recorded as the backup's `verified_at`. 404 without a complete backup."
        ),
        opt={"audit_action": "backup.verify"},
        responses={**INVALID_BODY, **NOT_FOUND, **UNAVAILABLE},
    )
    async def verify(
        self,
        request: Request[Any, Any, Any],
        gateway: NamedDependency[Gateway],
        principal: NamedDependency[Principal],
        backup_id: FromPath[str],
        data: JSONBody[VerifyBody | None] = None,
    ) -> OperationView:
        body = data or VerifyBody()
        request.state[TARGET_KEY] = f"backup:{backup_id}"
        request.state[DETAILS_KEY] = {"deep": body.deep}
        _backup_id(backup_id)
        _everywhere(principal, "maintainer", "verify a backup")
        answer = await ask(
            gateway.bus.nc,
            rpc.VERIFY,
            rpc.VerifyRequest(
                backup_id=backup_id,
                deep=body.deep,
                deadline_seconds=body.deadline_seconds,
                actor=principal.subject,
            ),
            rpc.OperationResponse,
            seconds=gateway.settings.backup_timeout_seconds,
            invalid_status=422,
        )
        return op_view(answer.operation)

    async def _restore(
        self,
        request: Request[Any, Any, Any],
        gateway: Gateway,
        principal: Principal,
        rpc_request: rpc.RestoreRequest,
    ) -> OperationView:
        request.state[TARGET_KEY] = f"backup:{rpc_request.backup_id or 'at'}"
        request.state[DETAILS_KEY] = {
            "at": rpc_request.at.isoformat() if rpc_request.at else None,
            "streams": rpc_request.streams,
            "replace": rpc_request.replace,
        }
        _everywhere(principal, "admin", "restore a backup")
        answer = await ask(
            gateway.bus.nc,
            rpc.RESTORE,
            rpc_request,
            rpc.OperationResponse,
            seconds=gateway.settings.backup_timeout_seconds,
            invalid_status=422,
        )
        request.state[TARGET_KEY] = f"backup:{answer.operation.backup_id}"
        return op_view(answer.operation)

    @post(
        "/backups/{backup_id:str}/restore",
        status_code=202,
        summary="Restore a backup",
        description=(
            "Admins. Restores the archive into this NATS: streams that do not exist or hold no messages "
            'are restored; one that holds messages only when named in `replace` (`["*"]`: all), else '
            "the restore fails naming it. Sequence numbers and KV revisions are reproduced exactly."
        ),
        opt={"audit_action": "backup.restore"},
        responses={**INVALID_BODY, **NOT_FOUND, 409: problem_spec("Another restore runs"), **UNAVAILABLE},
    )
    async def restore(
        self,
        request: Request[Any, Any, Any],
        gateway: NamedDependency[Gateway],
        principal: NamedDependency[Principal],
        backup_id: FromPath[str],
        data: JSONBody[RestoreBody | None] = None,
    ) -> OperationView:
        body = data or RestoreBody()
        _backup_id(backup_id)
        return await self._restore(
            request,
            gateway,
            principal,
            rpc.RestoreRequest(
                backup_id=backup_id,
                streams=body.streams,
                replace=list(body.replace),
                deadline_seconds=body.deadline_seconds,
                actor=principal.subject,
            ),
        )

    @post(
        "/restores",
        status_code=202,
        summary="Restore a backup, or the state at a point in time",
        description=(
            "Admins. As `POST /backups/{backup_id}/restore`, choosing the backup by `backup_id` or by "
            "`at`: the latest complete backup captured at or before that time. Exactly one of the two."
        ),
        opt={"audit_action": "backup.restore"},
        responses={
            **INVALID_BODY,
            422: problem_spec("Neither or both of `backup_id` and `at`"),
            **NOT_FOUND,
            409: problem_spec("Another restore runs"),
            **UNAVAILABLE,
        },
    )
    async def point_in_time_restore(
        self,
        request: Request[Any, Any, Any],
        gateway: NamedDependency[Gateway],
        principal: NamedDependency[Principal],
        data: JSONBody[PointInTimeRestoreBody],
    ) -> OperationView:
        if (data.backup_id is None) == (data.at is None):
            raise invalid([("backup_id", "give exactly one of backup_id and at")])
        if data.at is not None and data.at.tzinfo is None:
            raise invalid([("at", "must carry a UTC offset (`Z` or `+hh:mm`)")])
        return await self._restore(
            request,
            gateway,
            principal,
            rpc.RestoreRequest(
                backup_id=data.backup_id,
                at=data.at.astimezone(UTC) if data.at is not None else None,
                streams=data.streams,
                replace=list(data.replace),
                deadline_seconds=data.deadline_seconds,
                actor=principal.subject,
            ),
        )

    @delete(
        "/backups/{backup_id:str}",
        status_code=200,
        summary="Delete a backup",
        description=(
            "Admins. Removes the backup's volume snapshots, then the archive (its manifest first, so it "
            "is never half listed), complete or incomplete. 409 while an operation uses it; 502 when "
            "the snapshots cannot be deleted (the backup is kept)."
        ),
        opt={"audit_action": "backup.delete"},
        responses={**INVALID_BODY, **NOT_FOUND, 409: problem_spec("An operation uses it"), **UNAVAILABLE},
    )
    async def delete_backup(
        self,
        request: Request[Any, Any, Any],
        gateway: NamedDependency[Gateway],
        principal: NamedDependency[Principal],
        backup_id: FromPath[str],
    ) -> DeletedView:
        request.state[TARGET_KEY] = f"backup:{backup_id}"
        _backup_id(backup_id)
        _everywhere(principal, "admin", "delete a backup")
        answer = await ask(
            gateway.bus.nc,
            rpc.DELETE,
            rpc.DeleteRequest(backup_id=backup_id, actor=principal.subject),
            rpc.DeleteResponse,
            seconds=gateway.settings.backup_timeout_seconds,
        )
        return convert(answer, DeletedView)
