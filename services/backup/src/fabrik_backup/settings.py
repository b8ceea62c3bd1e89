"""Configuration of the backup service, from `FABRIK_*` environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import msgspec

from fabrik_backup.retention import RetentionPolicy
from fabrik_backup.schedule import cron_problem
from fabrik_backup.targets import S3Options, validate_target_url
from fabrik_common.settings import CommonSettings, Port, PositiveFloat, PositiveInt

NonNegInt = Annotated[int, msgspec.Meta(ge=0)]
NonNegFloat = Annotated[float, msgspec.Meta(ge=0)]


class BackupSettings(CommonSettings, frozen=True, kw_only=True):
    http_port: Port = 9104
    backup_target: str = "nats://backups"
    """Where archives go: `dir:///path`, `s3://bucket/prefix` or `nats://<object store>`."""
    backup_s3_endpoint_url: str = ""
    """An S3-compatible endpoint (MinIO, Hetzner Object Storage); empty: AWS."""
    backup_s3_region: str = ""
    backup_s3_access_key_id: str = ""
    backup_s3_access_key_id_file: str = ""
    backup_s3_secret_access_key: str = ""
    backup_s3_secret_access_key_file: str = ""
    """Credentials (a file wins over the value); none: the AWS default chain (AWS_* variables,
    shared credentials file, instance role)."""
    backup_exclude_streams: list[str] = []
    """Streams never backed up (besides the `backups` KV bucket and a `nats://` target's store)."""
    backup_chunk_messages: PositiveInt = 20_000
    backup_chunk_bytes: PositiveInt = 8 << 20
    backup_deadline_seconds: PositiveFloat = 6 * 3600.0
    verify_deadline_seconds: PositiveFloat = 2 * 3600.0
    restore_deadline_seconds: PositiveFloat = 6 * 3600.0
    backup_keep_last: NonNegInt = 0
    backup_keep_daily: NonNegInt = 0
    backup_keep_weekly: NonNegInt = 0
    backup_keep_monthly: NonNegInt = 0
    backup_max_age_days: NonNegFloat = 0.0
    """Retention, applied after every successful backup (all 0: keep everything). The newest
    verified backup is never deleted."""
    backup_schedule: str = ""
    """Cron expression (five fields) of scheduled backups, e.g. `0 3 * * *`; empty: none."""
    backup_schedule_timezone: str = "UTC"
    backup_volume_snapshots: Literal["auto", "on", "off"] = "auto"
    """CSI VolumeSnapshots of run workspaces (`data-fabrik-*` PVCs) with every backup. auto: when
    a cluster is configured (in-cluster, `FABRIK_BACKUP_K8S_API_URL`, a kubeconfig named in
    `FABRIK_BACKUP_K8S_KUBECONFIG` or `$KUBECONFIG`); on: also through `~/.kube/config`; off: never."""
    backup_volume_snapshot_namespace: str = "fabrik-runs"
    """The runs namespace, where the workspace PVCs (and so their snapshots) live."""
    backup_volume_snapshot_timeout_seconds: PositiveFloat = 600.0
    """How long a backup waits for its snapshots to be ready to use (then: `timed_out`)."""
    backup_k8s_api_url: str = ""
    """A plain API URL without credentials (`kubectl proxy`, a test double)."""
    backup_k8s_kubeconfig: str = ""
    backup_k8s_context: str = ""
    backup_heartbeat_seconds: PositiveFloat = 2.0
    backup_stale_seconds: PositiveFloat = 15.0
    """An operation whose owner has not written a heartbeat for this long is taken over."""

    def __post_init__(self) -> None:
        problem = validate_target_url(self.backup_target)
        if problem is not None:
            raise ValueError(f"FABRIK_BACKUP_TARGET={self.backup_target!r}: {problem}")
        if self.backup_schedule:
            cron = cron_problem(self.backup_schedule, self.backup_schedule_timezone)
            if cron is not None:
                raise ValueError(f"FABRIK_BACKUP_SCHEDULE / FABRIK_BACKUP_SCHEDULE_TIMEZONE: {cron}")

    def retention(self) -> RetentionPolicy:
        return RetentionPolicy(
            keep_last=self.backup_keep_last,
            keep_daily=self.backup_keep_daily,
            keep_weekly=self.backup_keep_weekly,
            keep_monthly=self.backup_keep_monthly,
            max_age_days=self.backup_max_age_days,
        )

    def s3_options(self) -> S3Options:
        def secret(value: str, file: str) -> str | None:
            if file:
                return Path(file).expanduser().read_text().strip()
            return value or None

        return S3Options(
            endpoint_url=self.backup_s3_endpoint_url or None,
            region=self.backup_s3_region or None,
            access_key_id=secret(self.backup_s3_access_key_id, self.backup_s3_access_key_id_file),
            secret_access_key=secret(self.backup_s3_secret_access_key, self.backup_s3_secret_access_key_file),
        )
