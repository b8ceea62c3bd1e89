"""Authentication of every `/api/v1` connection, and the request rate of each caller.

`api_guard` is the Litestar guard of every API controller (and of the live stream): it reads
`Authorization: Bearer <credential>` — an API token (`fbk_...`) or a JWT — or, for a WebSocket or
an event stream (which browsers open without headers), the `access_token` query parameter; it
stores the principal in the connection's state (the `principal` dependency returns it), and
then charges the caller's rate bucket. No credential: the anonymous principal with the configured
role, or 401 when anonymous access is off. A credential that does not verify is always a 401,
never a fall-back to anonymous.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Final

from litestar.connection import ASGIConnection
from litestar.enums import ScopeType
from litestar.handlers.base import BaseRouteHandler

from fabrik_gateway.auth.jwt import AuthError, JwtSettings, JwtVerifier
from fabrik_gateway.auth.principal import (
    ANONYMOUS_ROLE_VARIABLE,
    PRINCIPAL_STATE_KEY,
    AnonymousRole,
    Principal,
    anonymous,
)
from fabrik_gateway.auth.tokens import TokenStore, looks_like_api_token
from fabrik_gateway.problems import ProblemError

QUERY_TOKEN_PARAMETER: Final = "access_token"  # noqa: S105 - a parameter name
MAX_TRACKED_CALLERS: Final = 100_000
CHALLENGE: Final = {"WWW-Authenticate": 'Bearer realm="fabrik"'}


def unauthorized(detail: str) -> ProblemError:
    return ProblemError(401, detail, slug="unauthorized", title="Authentication required", headers=CHALLENGE)


@dataclass
class _Bucket:
    tokens: float
    at: float


class RateLimiter:
    """A token bucket per caller, in this replica: `per_minute` sustained, `burst` at once."""

    def __init__(self, per_minute: int, burst: int) -> None:
        self.rate = per_minute / 60.0
        self.burst = float(burst)
        self.buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def charge(self, caller: str, now: float | None = None) -> float:
        """0 when the request may go; else the seconds until it could."""
        now = time.monotonic() if now is None else now
        bucket = self.buckets.pop(caller, None)
        if bucket is None:
            bucket = _Bucket(self.burst, now)
        else:
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.at) * self.rate)
            bucket.at = now
        self.buckets[caller] = bucket
        if len(self.buckets) > MAX_TRACKED_CALLERS:
            self.buckets.popitem(last=False)
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / self.rate


class Authenticator:
    def __init__(
        self,
        *,
        anonymous_role: AnonymousRole,
        jwt: JwtSettings,
        tokens: TokenStore,
        limiter: RateLimiter,
    ) -> None:
        self.anonymous = anonymous(anonymous_role)
        self.jwt = JwtVerifier(jwt) if jwt.enabled else None
        self.tokens = tokens
        self.limiter = limiter

    async def principal(self, credential: str | None) -> Principal:
        if credential is None:
            if self.anonymous.role is None:
                raise unauthorized(
                    "authentication is required: send `Authorization: Bearer <token>` with an API token or a "
                    f"JWT (anonymous access is off: {ANONYMOUS_ROLE_VARIABLE}=none)"
                )
            return self.anonymous
        if not looks_like_api_token(credential) and self.jwt is None:
            raise unauthorized(
                "bearer JWTs are not accepted by this gateway (no HS256 secret, no OIDC issuer)"
            )
        try:
            if looks_like_api_token(credential):
                return await self.tokens.authenticate(credential)
            assert self.jwt is not None
            return await self.jwt.verify(credential)
        except AuthError as exc:
            raise unauthorized(str(exc)) from None

    def charge(self, principal: Principal, client: str) -> None:
        caller = principal.subject if principal.authenticated else f"{principal.subject}@{client}"
        wait = self.limiter.charge(caller)
        if wait > 0:
            raise ProblemError(
                429,
                f"too many requests from {principal.subject}; retry in {math.ceil(wait)} s",
                slug="rate-limited",
                title="Too many requests",
                headers={"Retry-After": str(math.ceil(wait))},
            )


def credential_of(connection: ASGIConnection[Any, Any, Any, Any]) -> str | None:
    header = connection.headers.get("authorization")
    if header is not None:
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise unauthorized("the Authorization header must be `Bearer <token>`")
        return value.strip()
    streaming = connection.scope[
        "type"
    ] == ScopeType.WEBSOCKET or "text/event-stream" in connection.headers.get("accept", "")
    if streaming:
        token = connection.query_params.get(QUERY_TOKEN_PARAMETER)
        if token:
            return str(token)
    return None


async def api_guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    gateway = connection.app.state.gateway
    authenticator: Authenticator = gateway.auth
    principal = await authenticator.principal(credential_of(connection))
    connection.scope.setdefault("state", {})[PRINCIPAL_STATE_KEY] = principal
    if principal.highest_role is None:
        raise ProblemError(
            403,
            f"{principal.subject} has no role in any project",
            slug="forbidden",
            title="Forbidden",
        )
    client = connection.client.host if connection.client is not None else "unknown"
    authenticator.charge(principal, client)
