"""Who is calling: run-scoped keys (signed, verified without a lookup) and operator keys (hashed).

A run key (`fk-run-...`, see `fabrik_common.runkeys`) is checked by its HMAC, its expiry and
the revocation set, which a watch on the `tokens` bucket (`revoked.key.<id>`,
`revoked.run.<run_id>`) keeps in memory; verified claims are cached per key text, so the hot
path is a dict lookup plus two set lookups. Operator keys are configured as SHA-256 hex
digests with an id, an optional project attribution and an optional admin right (for
`/admin/*`); the key itself is never stored or logged.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import msgspec
import yaml
from nats.js.kv import KeyValue

from fabrik_common import kvwatch
from fabrik_common.ids import is_dns1123_label, is_ulid
from fabrik_common.runkeys import RevocationSet, RunKeyClaims, RunKeyError, is_run_key, verify_run_key

log = logging.getLogger(__name__)

CLAIMS_CACHE_SIZE = 10_000


@dataclass(frozen=True, slots=True)
class Caller:
    kind: Literal["run", "operator"]
    key_id: str
    project: str | None
    run_id: str | None = None
    budget_usd: float | None = None
    expires_at: float | None = None
    admin: bool = False


class AuthError(Exception):
    def __init__(self, message: str, status: int = 401) -> None:
        super().__init__(message)
        self.status = status


Sha256Hex = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-fA-F]{64}$")]


class OperatorKey(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    id: str
    sha256: Sha256Hex
    project: str | None = None
    admin: bool = False

    def __post_init__(self) -> None:
        if self.project is not None and not is_dns1123_label(self.project):
            raise ValueError(f"operator key {self.id}: project {self.project!r} is not a DNS-1123 label")


def parse_operator_keys(text: str, source: str) -> dict[str, OperatorKey]:
    data = yaml.safe_load(text) if text.strip() else []
    try:
        keys = msgspec.convert(data or [], list[OperatorKey])
    except (msgspec.ValidationError, ValueError) as exc:
        raise ValueError(f"{source}: {exc}") from exc
    return {k.sha256.lower(): k for k in keys}


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class Authenticator:
    def __init__(
        self,
        run_key_secret: bytes | None,
        operator_keys: dict[str, OperatorKey] | None = None,
        operator_keys_file: str = "",
    ) -> None:
        self.secret = run_key_secret
        self.revocations = RevocationSet()
        self._operator = operator_keys or {}
        self._operator_file = Path(operator_keys_file) if operator_keys_file else None
        self._operator_stamp: tuple[int, int, int] | None = None
        self._claims: dict[str, RunKeyClaims] = {}
        self.reload_operator_keys()

    def reload_operator_keys(self) -> bool:
        if self._operator_file is None:
            return False
        try:
            st = self._operator_file.stat()
        except OSError as exc:
            log.warning(
                "operator keys file unreadable", extra={"file": str(self._operator_file), "error": str(exc)}
            )
            return False
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp == self._operator_stamp:
            return False
        try:
            keys = parse_operator_keys(self._operator_file.read_text(), str(self._operator_file))
        except (OSError, ValueError, yaml.YAMLError) as exc:
            log.error("operator keys file invalid; keeping the previous keys", extra={"error": str(exc)})  # noqa: TRY400
            self._operator_stamp = stamp
            return False
        self._operator = keys
        self._operator_stamp = stamp
        log.info("operator keys loaded", extra={"count": len(keys)})
        return True

    def authenticate(self, key: str) -> Caller:
        if not key:
            raise AuthError("missing API key: send `Authorization: Bearer <key>` or `x-api-key: <key>`")
        if is_run_key(key):
            return self._run_caller(key)
        op = self._operator.get(hash_key(key))
        if op is None:
            raise AuthError("invalid API key")
        if op.id in self.revocations.key_ids:
            raise AuthError("API key revoked")
        return Caller("operator", op.id, op.project, admin=op.admin)

    def _run_caller(self, key: str) -> Caller:
        claims = self._claims.get(key)
        if claims is None:
            if self.secret is None:
                raise AuthError("run keys are not accepted: no run key secret is configured")
            try:
                claims = verify_run_key(self.secret, key)
            except RunKeyError as exc:
                raise AuthError(f"invalid run key ({exc.reason}): {exc}") from exc
            if not is_dns1123_label(claims.project) or not is_ulid(claims.run_id):
                raise AuthError("invalid run key: its run id or project is not valid")
            if len(self._claims) >= CLAIMS_CACHE_SIZE:
                self._claims.clear()
            self._claims[key] = claims
        elif time.time() >= claims.expires_unix:
            self._claims.pop(key, None)
            raise AuthError(f"invalid run key (expired): run key expired at {claims.expires_at.isoformat()}")
        if self.revocations.is_revoked(claims.key_id, claims.run_id):
            raise AuthError("run key revoked")
        return Caller(
            "run",
            claims.key_id,
            claims.project,
            run_id=claims.run_id,
            budget_usd=claims.budget_usd,
            expires_at=float(claims.expires_unix),
        )

    def _observe_revocation(self, key: str, value: bytes | None, revision: int) -> None:
        self.revocations.apply(key, deleted=value is None)

    async def load_revocations(self, kv: KeyValue) -> None:
        """The current revocations, before serving (the watch then keeps them current)."""
        await kvwatch.load(kv, "revoked.>", self._observe_revocation)

    async def watch_revocations(self, kv: KeyValue) -> None:
        await kvwatch.follow(kv, "revoked.>", self._observe_revocation)
