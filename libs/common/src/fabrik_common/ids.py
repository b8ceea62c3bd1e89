"""Identifiers: ULIDs for runs and events, DNS-1123 labels for projects and environments."""

from __future__ import annotations

import hashlib
import re
from datetime import UTC, datetime

from ulid import ULID

DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1123_RULE = (
    "must be a DNS-1123 label: lowercase letters, digits and '-', "
    "start and end alphanumeric, at most 63 characters"
)
_ULID_TEXT = re.compile(r"^[0-9A-HJKMNP-TV-Za-hjkmnp-tv-z]{26}$")


def new_ulid() -> str:
    """A new ULID in its canonical upper-case text form."""
    return str(ULID())


def derived_ulid(seed: str) -> str:
    """A ULID-shaped id that is a function of `seed`, for events that must keep their id when they
    are produced again (a webhook's retries, a redelivered command's effects): JetStream's
    duplicate window then stores them once. Its time part is zero: it is not a time."""
    digest = hashlib.sha256(seed.encode()).digest()
    return str(ULID.from_bytes(bytes(6) + digest[:10]))


def is_ulid(value: str) -> bool:
    return bool(_ULID_TEXT.match(value)) and value[0] in "01234567"


def ulid_time(value: str) -> datetime:
    """The creation time encoded in a ULID."""
    return ULID.from_str(value.upper()).datetime.astimezone(UTC)


def k8s_name(run_id: str) -> str:
    """A run id as it appears in Kubernetes object names (lowercase)."""
    return run_id.lower()


def is_dns1123_label(value: str) -> bool:
    return len(value) <= 63 and bool(DNS1123_LABEL.match(value))


def utcnow() -> datetime:
    return datetime.now(UTC)
