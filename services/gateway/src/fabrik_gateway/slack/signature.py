"""Verification of Slack's request signatures (the `v0` scheme), as plain functions.

Slack signs every request it sends to an app: `X-Slack-Signature` is `v0=` followed by the hex
HMAC-SHA256, keyed with the app's signing secret, of `v0:<X-Slack-Request-Timestamp>:<raw body>`.
A request is accepted only when the signature matches (compared in constant time) and the
timestamp is within five minutes of our clock, in either direction, so that a captured request
cannot be replayed later.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Mapping
from typing import Final

VERSION: Final = "v0"
SIGNATURE_HEADER: Final = "X-Slack-Signature"
TIMESTAMP_HEADER: Final = "X-Slack-Request-Timestamp"
RETRY_NUM_HEADER: Final = "X-Slack-Retry-Num"
RETRY_REASON_HEADER: Final = "X-Slack-Retry-Reason"
MAX_SKEW_SECONDS: Final = 300.0


class SignatureError(Exception):
    """The request is not from Slack, or too old or too new: `reason` says which (safe to show)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def compute_signature(secret: str, timestamp: str, body: bytes) -> str:
    """The `X-Slack-Signature` value Slack sends for `body` at `timestamp`."""
    base = f"{VERSION}:{timestamp}:".encode() + body
    digest = hmac.new(secret.encode(), base, hashlib.sha256).hexdigest()
    return f"{VERSION}={digest}"


def signed_headers(secret: str, body: bytes, timestamp: float | None = None) -> dict[str, str]:
    """The two headers Slack would send with `body` (for tests and the Slack double)."""
    ts = str(int(time.time() if timestamp is None else timestamp))
    return {TIMESTAMP_HEADER: ts, SIGNATURE_HEADER: compute_signature(secret, ts, body)}


def verify(
    secret: str,
    timestamp: str | None,
    signature: str | None,
    body: bytes,
    *,
    now: float | None = None,
    max_skew: float = MAX_SKEW_SECONDS,
) -> None:
    """Raise `SignatureError` unless `signature` is Slack's for `body` at a current `timestamp`.

    The timestamp is checked before the signature (cheap, and a stale request is refused the same
    way whether or not it was once genuine)."""
    if not secret:
        raise SignatureError("no signing secret is configured")
    if not timestamp:
        raise SignatureError(f"the {TIMESTAMP_HEADER} header is missing")
    if not signature:
        raise SignatureError(f"the {SIGNATURE_HEADER} header is missing")
    try:
        sent_at = int(timestamp.strip())
    except ValueError:
        raise SignatureError(f"the {TIMESTAMP_HEADER} header is not a Unix time in seconds") from None
    current = time.time() if now is None else now
    if sent_at < current - max_skew:
        raise SignatureError(f"the request is too old (more than {int(max_skew)} s): possibly a replay")
    if sent_at > current + max_skew:
        raise SignatureError(f"the request is from the future (more than {int(max_skew)} s ahead)")
    expected = compute_signature(secret, timestamp.strip(), body)
    if not hmac.compare_digest(expected.encode(), signature.strip().encode()):
        raise SignatureError("the signature does not match (wrong signing secret, or the body was altered)")


def verify_headers(secret: str, headers: Mapping[str, str], body: bytes, *, now: float | None = None) -> None:
    """`verify` with the values taken from (case-insensitive) request headers."""
    verify(secret, headers.get(TIMESTAMP_HEADER), headers.get(SIGNATURE_HEADER), body, now=now)
