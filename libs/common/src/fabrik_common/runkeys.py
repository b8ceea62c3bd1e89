"""Run-scoped LLM keys: signed claims (run, project, budget, expiry) verified without a lookup.

The executor issues one key per run attempt and hands it to the workload as its LLM API key; the
llm-proxy verifies it with the same secret. Format::

    fk-run-<base64url(JSON claims)>.<base64url(HMAC-SHA256(secret, "fk-run-" + claims segment))>

(base64url without padding). The signature covers the prefix and the exact claims text as sent,
so verification never re-encodes anything, and the comparison is constant-time. Keys cannot be
changed without the secret, carry their own expiry, and are revoked by id or by run through the
`tokens` KV bucket (keys `revoked.key.<key_id>` and `revoked.run.<run_id>`), which verifiers keep
in memory through a watch so that verification stays lookup-free.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import msgspec

from fabrik_common.ids import new_ulid, utcnow

RUN_KEY_PREFIX = "fk-run-"
CLAIMS_VERSION = 1
MIN_SECRET_BYTES = 16
# `tokens` KV bucket: a key present under one of these names is revoked (value: JSON, see `revoke`).
REVOCATION_BUCKET = "tokens"
REVOKED_KEY_PREFIX = "revoked.key."
REVOKED_RUN_PREFIX = "revoked.run."

RunKeyErrorReason = Literal["malformed", "bad_signature", "expired"]


class RunKeyError(ValueError):
    """A run key that must be refused; `reason` says why (never includes the key itself)."""

    def __init__(self, reason: RunKeyErrorReason, message: str) -> None:
        super().__init__(message)
        self.reason: RunKeyErrorReason = reason


class RunKeyClaims(msgspec.Struct, frozen=True, kw_only=True):
    """What a run key says about its holder (short names on the wire keep keys short)."""

    version: int = msgspec.field(default=CLAIMS_VERSION, name="v")
    key_id: str = msgspec.field(name="kid")
    run_id: str = msgspec.field(name="run")
    project: str = msgspec.field(name="prj")
    budget_usd: float | None = msgspec.field(default=None, name="bud")
    issued_unix: int = msgspec.field(name="iat")
    expires_unix: int = msgspec.field(name="exp")

    @property
    def expires_at(self) -> datetime:
        return datetime.fromtimestamp(self.expires_unix, UTC)

    @property
    def issued_at(self) -> datetime:
        return datetime.fromtimestamp(self.issued_unix, UTC)


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(RunKeyClaims)


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    if not text or any(c not in _B64URL_ALPHABET for c in text):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


_B64URL_ALPHABET = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def _signature(secret: bytes, signed: str) -> bytes:
    return hmac.new(secret, signed.encode("ascii"), hashlib.sha256).digest()


def _check_secret(secret: bytes) -> None:
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"the run key secret must be at least {MIN_SECRET_BYTES} bytes")


def issue_run_key(
    secret: bytes,
    *,
    run_id: str,
    project: str,
    budget_usd: float | None,
    expires_at: datetime,
    key_id: str | None = None,
) -> str:
    """A signed key for one run. `key_id` (default: a new ULID) is what revocation and usage name."""
    _check_secret(secret)
    if expires_at.tzinfo is None:
        raise ValueError("expires_at must be timezone-aware")
    if budget_usd is not None and budget_usd < 0:
        raise ValueError("budget_usd must be >= 0")
    claims = RunKeyClaims(
        key_id=key_id or new_ulid(),
        run_id=run_id,
        project=project,
        budget_usd=budget_usd,
        issued_unix=int(utcnow().timestamp()),
        expires_unix=int(expires_at.timestamp()),
    )
    payload = _b64encode(_encoder.encode(claims))
    signed = RUN_KEY_PREFIX + payload
    return f"{signed}.{_b64encode(_signature(secret, signed))}"


def is_run_key(key: str) -> bool:
    return key.startswith(RUN_KEY_PREFIX)


def verify_run_key(secret: bytes, key: str, *, now: float | None = None) -> RunKeyClaims:
    """The claims of a valid, unexpired key; `RunKeyError` (malformed, bad_signature, expired) otherwise.

    Revocation is not checked here: it needs the revocation set (see `RevocationSet`).
    """
    if not key.startswith(RUN_KEY_PREFIX) or key.count(".") != 1:
        raise RunKeyError("malformed", "malformed run key")
    signed, _, sig_text = key.rpartition(".")
    try:
        sig = _b64decode(sig_text)
        payload = _b64decode(signed[len(RUN_KEY_PREFIX) :])
    except (ValueError, binascii.Error) as exc:
        raise RunKeyError("malformed", "malformed run key") from exc
    if not hmac.compare_digest(sig, _signature(secret, signed)):
        raise RunKeyError("bad_signature", "run key signature does not verify")
    try:
        claims = _decoder.decode(payload)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        # Signed by us but unreadable: a claims version this verifier does not know.
        raise RunKeyError("malformed", "run key claims are not readable") from exc
    if claims.version != CLAIMS_VERSION:
        raise RunKeyError("malformed", f"run key claims version {claims.version} is not supported")
    current = utcnow().timestamp() if now is None else now
    if current >= claims.expires_unix:
        raise RunKeyError("expired", f"run key expired at {claims.expires_at.isoformat()}")
    return claims


def load_run_key_secret(value: str = "", file: str = "") -> bytes | None:
    """The secret from its setting or file (file wins; surrounding whitespace is stripped)."""
    text = Path(file).read_text() if file else value
    secret = text.strip().encode()
    if not secret:
        return None
    _check_secret(secret)
    return secret


def generate_run_key_secret() -> str:
    """A fresh random secret (for a local stack that has none configured)."""
    return _b64encode(os.urandom(32))


def revocation_key(*, key_id: str | None = None, run_id: str | None = None) -> str:
    """The `tokens` KV key whose presence revokes one key id or every key of a run."""
    if (key_id is None) == (run_id is None):
        raise ValueError("give exactly one of key_id or run_id")
    return REVOKED_KEY_PREFIX + key_id if key_id is not None else REVOKED_RUN_PREFIX + str(run_id)


class Revocation(msgspec.Struct, frozen=True, kw_only=True):
    revoked_at: datetime
    reason: str = ""
    by: str = ""


def revocation_value(reason: str = "", by: str = "") -> bytes:
    return _encoder.encode(Revocation(revoked_at=utcnow(), reason=reason, by=by))


class RevocationSet:
    """Revoked key ids and run ids in memory, fed from the `tokens` bucket's `revoked.>` keys."""

    def __init__(self) -> None:
        self.key_ids: set[str] = set()
        self.run_ids: set[str] = set()

    def apply(self, kv_key: str, deleted: bool) -> None:
        """One KV entry (or its deletion) under `revoked.`; other keys are ignored."""
        if kv_key.startswith(REVOKED_KEY_PREFIX):
            target, ident = self.key_ids, kv_key[len(REVOKED_KEY_PREFIX) :]
        elif kv_key.startswith(REVOKED_RUN_PREFIX):
            target, ident = self.run_ids, kv_key[len(REVOKED_RUN_PREFIX) :]
        else:
            return
        if deleted:
            target.discard(ident)
        else:
            target.add(ident)

    def is_revoked(self, key_id: str, run_id: str | None = None) -> bool:
        return key_id in self.key_ids or (run_id is not None and run_id in self.run_ids)
