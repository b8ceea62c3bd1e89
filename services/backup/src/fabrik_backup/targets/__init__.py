"""Archive targets: `dir:///path`, `s3://bucket/prefix`, `nats://object-store-name`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from nats.aio.client import Client

from fabrik_backup.targets.base import PartNotFoundError, Target, TargetError
from fabrik_backup.targets.local import DirectoryTarget
from fabrik_backup.targets.natsobj import NatsObjectStoreTarget
from fabrik_backup.targets.s3 import S3Target

__all__ = [
    "DirectoryTarget",
    "NatsObjectStoreTarget",
    "PartNotFoundError",
    "S3Options",
    "S3Target",
    "Target",
    "TargetError",
    "open_target",
    "validate_target_url",
]


@dataclass(frozen=True)
class S3Options:
    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None


def validate_target_url(url: str) -> str | None:
    """None when `url` names a target, else the rule it breaks."""
    parts = urlsplit(url)
    if parts.scheme == "dir":
        return None if parts.path.startswith("/") else "dir:// needs an absolute path (dir:///var/backups)"
    if parts.scheme == "s3":
        return None if len(parts.netloc) >= 3 else "s3:// needs a bucket name (s3://bucket/prefix)"
    if parts.scheme == "nats":
        name = parts.netloc
        if name and all(c.isalnum() or c in "-_" for c in name) and not parts.path.strip("/"):
            return None
        return "nats:// needs an object store name of letters, digits, '-' and '_' (nats://backups)"
    return "must start with dir://, s3:// or nats://"


def open_target(
    url: str, *, nc: Client | None = None, s3: S3Options | None = None, replicas: int = 1
) -> Target:
    problem = validate_target_url(url)
    if problem is not None:
        raise TargetError(f"target {url!r}: {problem}")
    parts = urlsplit(url)
    if parts.scheme == "dir":
        return DirectoryTarget(Path(parts.path))
    if parts.scheme == "s3":
        options = s3 or S3Options()
        return S3Target(
            parts.netloc,
            parts.path,
            endpoint_url=options.endpoint_url,
            region=options.region,
            access_key_id=options.access_key_id,
            secret_access_key=options.secret_access_key,
        )
    if nc is None:
        raise TargetError(f"target {url!r}: a NATS connection is needed")
    return NatsObjectStoreTarget(nc, parts.netloc, replicas=replicas)
