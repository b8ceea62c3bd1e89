"""The backup service's request/reply contract over NATS: subjects, typed requests and responses.

The gateway and the CLI ask the backup service to create, list, verify, restore, cancel and delete
backups with core NATS request/reply on `fabrik.rpc.backup.*` (outside every stream). Replicas
answer in the queue group `backup`. Backup, verify and restore are long operations: the reply
comes at once with the operation in state `requested`; its progress is in `get`/`list` and in
`backup.state_changed` events. A response is the request's response type or `RpcError`.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal, TypeVar

import msgspec

from fabrik_common.events import BackupOperation, BackupState, UtcDatetime

PREFIX = "fabrik.rpc.backup"
CREATE = f"{PREFIX}.create"
LIST = f"{PREFIX}.list"
GET = f"{PREFIX}.get"
VERIFY = f"{PREFIX}.verify"
RESTORE = f"{PREFIX}.restore"
CANCEL = f"{PREFIX}.cancel"
DELETE = f"{PREFIX}.delete"
PRUNE = f"{PREFIX}.prune"
SCHEDULE = f"{PREFIX}.schedule"
SUBJECTS: tuple[str, ...] = (CREATE, LIST, GET, VERIFY, RESTORE, CANCEL, DELETE, PRUNE, SCHEDULE)
QUEUE_GROUP = "backup"

TERMINAL_STATES: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
BackupId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,79}$")]
StreamName = Annotated[str, msgspec.Meta(pattern=r"^[^.*>\s]{1,255}$")]
DeadlineSeconds = Annotated[float, msgspec.Meta(gt=0, le=7 * 24 * 3600)]


class _Struct(msgspec.Struct, frozen=True, kw_only=True):
    pass


class RpcError(_Struct, frozen=True, kw_only=True, tag_field="kind", tag="error"):
    """A request the backup service could not serve; `status` is the HTTP status a gateway answers."""

    status: int
    rule: str
    message: str
    field: str | None = None


class Operation(_Struct, frozen=True, kw_only=True):
    """A backup, verify or restore operation and where its state machine is:
    requested → running → succeeded | failed | cancelled (cancelling while a cancel takes effect).
    Past `deadline` a non-terminal operation is failed."""

    operation_id: str
    operation: BackupOperation
    state: BackupState
    backup_id: str
    target: str
    options: dict[str, object] = msgspec.field(default_factory=dict)
    requested_by: str = ""
    requested_at: UtcDatetime
    started_at: UtcDatetime | None = None
    finished_at: UtcDatetime | None = None
    deadline: UtcDatetime
    heartbeat_at: UtcDatetime | None = None
    owner: str | None = None
    attempts: int = 0
    message: str = ""
    bytes_done: int = 0
    parts_done: int = 0
    result: dict[str, object] = msgspec.field(default_factory=dict)


class OperationResponse(_Struct, frozen=True, kw_only=True, tag_field="kind", tag="operation"):
    operation: Operation


class CreateRequest(_Struct, frozen=True, kw_only=True):
    """Back up every stream (or `streams`). Naming the `backup_id` of an interrupted backup
    resumes it."""

    backup_id: BackupId | None = None
    streams: list[StreamName] | None = None
    deadline_seconds: DeadlineSeconds | None = None
    actor: str = ""


class VerifyRequest(_Struct, frozen=True, kw_only=True):
    backup_id: BackupId
    deep: bool = False
    deadline_seconds: DeadlineSeconds | None = None
    actor: str = ""


class RestoreRequest(_Struct, frozen=True, kw_only=True):
    """Restore `backup_id`, or the latest complete backup taken at or before `at` (point in time).
    Streams that exist with messages are replaced only when listed in `replace` (`["*"]`: all)."""

    backup_id: BackupId | None = None
    at: UtcDatetime | None = None
    streams: list[StreamName] | None = None
    replace: list[str] = msgspec.field(default_factory=list)
    deadline_seconds: DeadlineSeconds | None = None
    actor: str = ""


class CancelRequest(_Struct, frozen=True, kw_only=True):
    operation_id: str
    actor: str = ""


class GetRequest(_Struct, frozen=True, kw_only=True):
    operation_id: str


class ListRequest(_Struct, frozen=True, kw_only=True):
    operations: int = 50
    """How many of the latest operations to include."""


VolumeSnapshotState = Literal["ready", "failed", "skipped", "timed_out"]
VolumeSnapshotsStatus = Literal["taken", "off", "unavailable", "error"]


class VolumeSnapshotResult(_Struct, frozen=True, kw_only=True):
    """One run workspace PVC (`data-fabrik-<run>`) and its CSI VolumeSnapshot for a backup."""

    pvc: str
    snapshot: str = ""
    """The VolumeSnapshot's name in the runs namespace; empty when none was created (skipped)."""
    snapshot_class: str = ""
    storage_class: str = ""
    state: VolumeSnapshotState
    reason: str = ""
    """Why it was skipped, failed or timed out."""
    restore_size: str = ""
    """The snapshot's `status.restoreSize` (a quantity such as `10Gi`) once known."""


class VolumeSnapshots(_Struct, frozen=True, kw_only=True):
    """The volume snapshots taken with a backup. `status`: `taken` (see each volume's state),
    `off` (disabled by `FABRIK_BACKUP_VOLUME_SNAPSHOTS=off`), `unavailable` (not on Kubernetes),
    `error` (the Kubernetes API could not be used: `message` says why)."""

    status: VolumeSnapshotsStatus
    message: str = ""
    namespace: str = ""
    volumes: list[VolumeSnapshotResult] = msgspec.field(default_factory=list)


class BackupSummary(_Struct, frozen=True, kw_only=True):
    backup_id: str
    created_at: UtcDatetime
    completed_at: UtcDatetime | None
    streams: int
    messages: int
    data_bytes: int
    stored_bytes: int
    parts: int
    verified_at: UtcDatetime | None = None
    volume_snapshots: VolumeSnapshots | None = None
    """None: the backup predates volume snapshots."""


class ListResponse(_Struct, frozen=True, kw_only=True, tag_field="kind", tag="backups"):
    target: str
    backups: list[BackupSummary]
    operations: list[Operation]


class DeleteRequest(_Struct, frozen=True, kw_only=True):
    backup_id: BackupId
    actor: str = ""


class DeleteResponse(_Struct, frozen=True, kw_only=True, tag_field="kind", tag="deleted"):
    backup_id: str
    parts_deleted: int
    snapshots_deleted: list[str] = msgspec.field(default_factory=list)
    """The backup's VolumeSnapshots that were deleted with it."""


class PruneRequest(_Struct, frozen=True, kw_only=True):
    """Apply the retention policy now; `dry_run` only reports what it would delete."""

    dry_run: bool = True
    actor: str = ""


class PruneResponse(_Struct, frozen=True, kw_only=True, tag_field="kind", tag="pruned"):
    keep: dict[str, list[str]]
    """Backup id → the rules that keep it (last, daily, weekly, monthly, last verified, in use)."""
    delete: list[str]
    deleted: bool


class ScheduleRequest(_Struct, frozen=True, kw_only=True):
    """The backup schedule and retention policy in force (settings of the backup service)."""

    slots: Annotated[int, msgspec.Meta(ge=0, le=100)] = 5
    """How many of the next slots to include."""


class ScheduleResponse(_Struct, frozen=True, kw_only=True, tag_field="kind", tag="schedule"):
    target: str
    schedule: str
    """`FABRIK_BACKUP_SCHEDULE` (five-field cron); empty: no scheduled backups."""
    timezone: str
    next_slots: list[UtcDatetime]
    retention: dict[str, float]
    """`keep_last`, `keep_daily`, `keep_weekly`, `keep_monthly`, `max_age_days` (all 0: off)."""


R = TypeVar("R")
_PATH = re.compile(r" - at `\$\.?([^`]*)`$")


def encode(message: msgspec.Struct) -> bytes:
    return msgspec.json.encode(message)


def decode_request(data: bytes, request_type: type[R]) -> R | RpcError:
    """A request body (empty means all defaults) as `request_type`, or the RpcError saying why not."""
    try:
        return msgspec.json.decode(data or b"{}", type=request_type)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        text = str(exc)
        match = _PATH.search(text)
        field = (match.group(1) or None) if match else None
        rule = _PATH.sub("", text)
        return RpcError(status=400, rule=rule, message=f"{field}: {rule}" if field else rule, field=field)


def decode_response(data: bytes, response_type: type[R]) -> R | RpcError:
    result: R | RpcError = msgspec.json.decode(data, type=response_type | RpcError)
    return result
