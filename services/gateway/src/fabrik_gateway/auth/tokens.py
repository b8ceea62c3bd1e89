"""API tokens of service accounts: `fbk_<id>_<secret>`, stored hashed in the `tokens` bucket.

The secret is 32 random bytes, shown once when the token is created; the bucket keeps its
SHA-256 (a slow hash adds nothing for a random 256-bit secret, and every request checks one).
A token has a role, either in every project or only in the projects it lists, an optional expiry,
and is revoked by marking it (the record stays, for the audit trail). Every replica keeps the
records in memory from a watch of the bucket, and reads one it has not seen yet (created on
another replica a moment ago) from the bucket. `last_used_at` is written at most once per
interval, with a revision check so that it never overwrites a revocation.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import secrets
import time
from datetime import datetime, timedelta
from typing import Final

import msgspec
import nats.errors
import nats.js.errors
from nats.js.kv import KeyValue

from fabrik_common.ids import is_ulid, new_ulid, utcnow
from fabrik_gateway.auth.jwt import AuthError
from fabrik_gateway.auth.principal import Principal, Role

log = logging.getLogger(__name__)

TOKEN_PREFIX: Final = "fbk_"  # noqa: S105 - the prefix, not a secret
KEY_PREFIX: Final = "api."
_DELETES: Final = ("DEL", "PURGE")


class ApiToken(msgspec.Struct, frozen=True, kw_only=True):
    """A token's record (the value under `api.<token_id>`)."""

    token_id: str
    name: str
    role: Role
    projects: list[str] | None = None
    """None: the role holds in every project."""
    secret_sha256: str
    created_by: str
    created_at: datetime
    expires_at: datetime | None = None
    revoked_at: datetime | None = None
    revoked_by: str | None = None
    last_used_at: datetime | None = None

    def principal(self) -> Principal:
        roles = {p: self.role for p in self.projects} if self.projects is not None else {}
        return Principal(
            subject=f"token:{self.token_id}",
            role=self.role if self.projects is None else None,
            project_roles=roles,
            authenticated=True,
            kind="token",
            token_id=self.token_id,
            name=self.name,
        )

    def active(self, now: datetime) -> bool:
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > now)


_decode = msgspec.json.Decoder(ApiToken)


def looks_like_api_token(text: str) -> bool:
    return text.startswith(TOKEN_PREFIX)


def split_token(text: str) -> tuple[str, str]:
    """(token id, secret) of `fbk_<id>_<secret>`; AuthError when it is not that shape."""
    body = text.removeprefix(TOKEN_PREFIX)
    token_id, sep, secret = body.partition("_")
    if not sep or not is_ulid(token_id) or len(secret) < 32:
        raise AuthError("the API token is malformed (expected fbk_<id>_<secret>)")
    return token_id.upper(), secret


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class TokenStore:
    def __init__(self, last_used_interval_seconds: float = 60.0) -> None:
        self.last_used_interval_seconds = last_used_interval_seconds
        self.tokens: dict[str, ApiToken] = {}
        self._kv: KeyValue | None = None
        self._last_written: dict[str, float] = {}
        self._touches: set[asyncio.Task[None]] = set()

    def attach(self, kv: KeyValue) -> None:
        self._kv = kv

    @property
    def kv(self) -> KeyValue:
        if self._kv is None:
            raise AuthError("API tokens cannot be checked yet: the gateway is not connected to NATS")
        return self._kv

    # ------------------------------------------------------------------ the watch (background)

    async def watch(self) -> None:
        watcher = await self.kv.watch(f"{KEY_PREFIX}>")
        try:
            async for entry in watcher:
                if entry is None:
                    continue
                token_id = entry.key.removeprefix(KEY_PREFIX)
                if entry.operation in _DELETES:
                    self.tokens.pop(token_id, None)
                    continue
                try:
                    self.tokens[token_id] = _decode.decode(entry.value or b"")
                except msgspec.DecodeError as exc:
                    log.warning(
                        "undecodable API token record skipped", extra={"key": entry.key, "error": str(exc)}
                    )
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()  # type: ignore[no-untyped-call]

    # ------------------------------------------------------------------ authentication

    async def authenticate(self, text: str) -> Principal:
        token_id, secret = split_token(text)
        record = self.tokens.get(token_id) or await self._read(token_id)
        if record is None or not hmac.compare_digest(record.secret_sha256, hash_secret(secret)):
            raise AuthError("the API token is not valid")
        now = utcnow()
        if record.revoked_at is not None:
            raise AuthError("the API token has been revoked")
        if record.expires_at is not None and record.expires_at <= now:
            raise AuthError("the API token has expired")
        self._touch(record)
        return record.principal()

    async def _read(self, token_id: str) -> ApiToken | None:
        try:
            entry = await self.kv.get(f"{KEY_PREFIX}{token_id}")
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return None
        except (nats.errors.Error, TimeoutError) as exc:
            raise AuthError("API tokens cannot be checked right now; retry") from exc
        record = _decode.decode(entry.value or b"")
        self.tokens[token_id] = record
        return record

    def _touch(self, record: ApiToken) -> None:
        now = time.monotonic()
        last = self._last_written.get(record.token_id)
        if last is not None and now - last < self.last_used_interval_seconds:
            return
        self._last_written[record.token_id] = now
        task = asyncio.create_task(self._write_last_used(record.token_id))
        self._touches.add(task)
        task.add_done_callback(self._touches.discard)

    async def _write_last_used(self, token_id: str) -> None:
        key = f"{KEY_PREFIX}{token_id}"
        try:
            entry = await self.kv.get(key)
            record = _decode.decode(entry.value or b"")
            updated = msgspec.structs.replace(record, last_used_at=utcnow())
            await self.kv.update(key, msgspec.json.encode(updated), last=entry.revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            pass  # changed meanwhile (revoked, or another replica wrote it): the next use retries
        except (nats.errors.Error, TimeoutError, msgspec.DecodeError, AuthError) as exc:
            log.warning(
                "last use of an API token not recorded", extra={"token_id": token_id, "error": str(exc)}
            )

    # ------------------------------------------------------------------ management

    async def create(
        self,
        *,
        name: str,
        role: Role,
        projects: list[str] | None,
        expires_in_days: int | None,
        created_by: str,
    ) -> tuple[ApiToken, str]:
        """A new token and its secret text (`fbk_<id>_<secret>`: the only time it exists)."""
        token_id = new_ulid()
        secret = secrets.token_urlsafe(32)
        now = utcnow()
        record = ApiToken(
            token_id=token_id,
            name=name,
            role=role,
            projects=sorted(set(projects)) if projects is not None else None,
            secret_sha256=hash_secret(secret),
            created_by=created_by,
            created_at=now,
            expires_at=now + timedelta(days=expires_in_days) if expires_in_days is not None else None,
        )
        await self.kv.create(f"{KEY_PREFIX}{token_id}", msgspec.json.encode(record))
        self.tokens[token_id] = record
        return record, f"{TOKEN_PREFIX}{token_id.lower()}_{secret}"

    async def revoke(self, token_id: str, revoked_by: str) -> ApiToken | None:
        """Mark the token revoked (idempotent); None when there is no such token."""
        key = f"{KEY_PREFIX}{token_id}"
        for _ in range(5):
            try:
                entry = await self.kv.get(key)
            except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
                return None
            record = _decode.decode(entry.value or b"")
            if record.revoked_at is not None:
                self.tokens[token_id] = record
                return record
            revoked = msgspec.structs.replace(record, revoked_at=utcnow(), revoked_by=revoked_by)
            try:
                await self.kv.update(key, msgspec.json.encode(revoked), last=entry.revision)
            except nats.js.errors.KeyWrongLastSequenceError:
                continue
            self.tokens[token_id] = revoked
            return revoked
        raise AuthError("the token changed while it was being revoked; retry")

    async def get(self, token_id: str) -> ApiToken | None:
        return self.tokens.get(token_id) or await self._read(token_id)

    def all(self) -> list[ApiToken]:
        return sorted(self.tokens.values(), key=lambda t: t.token_id, reverse=True)

    async def close(self) -> None:
        for task in list(self._touches):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(task, 1.0)
