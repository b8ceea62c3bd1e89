"""Bearer JWTs: HS256 with a shared secret, or RS256/ES256 signed by an OIDC issuer (its JWKS).

The algorithm in a token's header only chooses among keys that are configured for it: HS256
tokens are checked with the shared secret alone, RS256/ES256 tokens with the issuer's keys of the
matching type alone (an RSA key for RS256, a P-256 key for ES256, and a key's own `alg` when it
names one). So `alg: none` and key confusion (an HS256 token "signed" with the issuer's public
key) are refused before any signature is looked at. Audience, issuer, expiry and not-before are
always checked; `exp` and `sub` are required.

Roles come from one claim (setting `jwt_roles_claim`, default `fabrik_roles`): a role (for every
project), a list of `role` and `project:role` strings (what OIDC group claims can carry), or an
object `{"<project>" or "*": role}`. Entries that are none of these are ignored: an identity
provider's claim can hold other groups.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import httpx
import jwt

from fabrik_gateway.auth.principal import ROLES, Principal, Role, higher_role

log = logging.getLogger(__name__)

HS256: Final = "HS256"
ASYMMETRIC: Final = {"RS256": "RSA", "ES256": "EC"}
MIN_SECRET_BYTES: Final = 32
UNKNOWN_KID_REFETCH_SECONDS: Final = 10.0


class AuthError(Exception):
    """A credential that must be refused (401); the message says why, never the credential."""


def parse_roles(claim: object) -> tuple[Role | None, dict[str, Role]]:
    """(role in every project, roles per project) from a roles claim; see the module doc."""
    everywhere: Role | None = None
    per_project: dict[str, Role] = {}

    def grant(project: str | None, role: object) -> None:
        nonlocal everywhere
        if not isinstance(role, str) or role not in ROLES:
            return
        if project is None or project == "*":
            everywhere = higher_role(everywhere, role)
        else:
            per_project[project] = higher_role(per_project.get(project), role)  # type: ignore[assignment]

    if isinstance(claim, str):
        grant(None, claim)
    elif isinstance(claim, list):
        for item in claim:
            if isinstance(item, str):
                project, _, role = item.rpartition(":")
                grant(project or None, role)
    elif isinstance(claim, Mapping):
        for project, role in claim.items():
            if isinstance(project, str):
                grant(project, role)
    return everywhere, per_project


@dataclass(frozen=True)
class JwtSettings:
    hs256_secret: bytes
    oidc_issuer: str
    oidc_jwks_url: str
    hs256_issuer: str
    audience: str
    roles_claim: str
    leeway_seconds: float
    jwks_refresh_seconds: float

    @property
    def enabled(self) -> bool:
        return bool(self.hs256_secret or self.oidc_issuer)


class JwksCache:
    """The issuer's signing keys by `kid`, fetched when stale or when a token names an unknown kid
    (at most once per `UNKNOWN_KID_REFETCH_SECONDS`, so forged kids cannot hammer the issuer)."""

    def __init__(self, issuer: str, jwks_url: str, refresh_seconds: float, http: httpx.AsyncClient) -> None:
        self.issuer = issuer.rstrip("/")
        self.jwks_url = jwks_url
        self.refresh_seconds = refresh_seconds
        self.http = http
        self.keys: list[jwt.PyJWK] = []
        self.fetched_at = float("-inf")
        self._lock = asyncio.Lock()

    async def candidates(self, kid: str | None, alg: str) -> list[jwt.PyJWK]:
        now = time.monotonic()
        if now - self.fetched_at > self.refresh_seconds:
            await self._refresh(now)
        found = self._matching(kid, alg)
        if not found and kid is not None and now - self.fetched_at > UNKNOWN_KID_REFETCH_SECONDS:
            await self._refresh(now)
            found = self._matching(kid, alg)
        return found

    def _matching(self, kid: str | None, alg: str) -> list[jwt.PyJWK]:
        kty = ASYMMETRIC[alg]
        out = []
        for key in self.keys:
            data = key._jwk_data
            if data.get("kty") != kty or data.get("use", "sig") != "sig":
                continue
            if data.get("alg") not in (None, alg):
                continue
            if alg == "ES256" and data.get("crv") != "P-256":
                continue
            if kid is not None and key.key_id != kid:
                continue
            out.append(key)
        return out

    async def _refresh(self, now: float) -> None:
        async with self._lock:
            if time.monotonic() - self.fetched_at < 1.0:
                return  # another request just fetched them
            try:
                url = self.jwks_url or await self._discover()
                response = await self.http.get(url)
                response.raise_for_status()
                keys = []
                for data in response.json().get("keys", []):
                    try:
                        keys.append(jwt.PyJWK(data))
                    except (jwt.PyJWKError, jwt.InvalidKeyError) as exc:
                        log.warning("JWKS key skipped", extra={"kid": data.get("kid"), "error": str(exc)})
                self.keys = keys
                self.fetched_at = now
            except (httpx.HTTPError, ValueError) as exc:
                # Keep the keys we have: an issuer outage must not log everybody out.
                log.warning("JWKS could not be fetched", extra={"issuer": self.issuer, "error": str(exc)})
                self.fetched_at = max(
                    self.fetched_at, now - self.refresh_seconds + UNKNOWN_KID_REFETCH_SECONDS
                )

    async def _discover(self) -> str:
        response = await self.http.get(f"{self.issuer}/.well-known/openid-configuration")
        response.raise_for_status()
        url = response.json().get("jwks_uri")
        if not isinstance(url, str) or not url:
            raise ValueError("the issuer's openid-configuration has no jwks_uri")
        self.jwks_url = url
        return url


VERIFIED_CACHE_SIZE: Final = 10_000
VERIFIED_CACHE_SECONDS: Final = 60.0


class JwtVerifier:
    """Verifies bearer JWTs. A token verified once is remembered (by its exact text) for up to a
    minute and never past its `exp`: a client sends the same token with every request, and
    verifying its signature again each time was a third of a list request's CPU."""

    def __init__(self, settings: JwtSettings, http: httpx.AsyncClient | None = None) -> None:
        self.settings = settings
        self._verified: OrderedDict[str, tuple[float, Principal]] = OrderedDict()
        self.jwks = (
            JwksCache(
                settings.oidc_issuer,
                settings.oidc_jwks_url,
                settings.jwks_refresh_seconds,
                http or httpx.AsyncClient(timeout=5.0),
            )
            if settings.oidc_issuer
            else None
        )

    async def verify(self, token: str) -> Principal:
        now = time.time()
        cached = self._verified.get(token)
        if cached is not None:
            if cached[0] > now:
                return cached[1]
            del self._verified[token]
        principal, expires = await self._verify(token)
        self._verified[token] = (min(expires, now + VERIFIED_CACHE_SECONDS), principal)
        if len(self._verified) > VERIFIED_CACHE_SIZE:
            self._verified.popitem(last=False)
        return principal

    async def _verify(self, token: str) -> tuple[Principal, float]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.DecodeError:
            raise AuthError("the bearer token is not a JWT (nor a Fabrik API token)") from None
        alg = header.get("alg")
        if alg == HS256:
            if not self.settings.hs256_secret:
                raise AuthError("HS256 tokens are not accepted by this gateway")
            claims = self._decode(
                token, self.settings.hs256_secret, HS256, self.settings.hs256_issuer or None
            )
            return self._principal(claims), float(claims["exp"])
        if alg in ASYMMETRIC:
            if self.jwks is None:
                raise AuthError(f"{alg} tokens are not accepted by this gateway (no OIDC issuer configured)")
            kid = header.get("kid")
            keys = await self.jwks.candidates(kid if isinstance(kid, str) else None, alg)
            if not keys:
                raise AuthError("the token's signing key is not one of the issuer's keys")
            last: AuthError | None = None
            for key in keys:
                try:
                    claims = self._decode(token, key.key, alg, self.settings.oidc_issuer)
                except AuthError as exc:
                    last = exc
                    continue
                return self._principal(claims), float(claims["exp"])
            assert last is not None
            raise last
        raise AuthError(f"the token's algorithm {alg!r} is not accepted (HS256, RS256 or ES256)")

    def _decode(self, token: str, key: Any, alg: str, issuer: str | None) -> dict[str, Any]:
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=self.settings.audience,
                issuer=issuer,
                leeway=self.settings.leeway_seconds,
                options={"require": ["exp", "sub"], "verify_iss": issuer is not None},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("the bearer token has expired") from None
        except jwt.ImmatureSignatureError:
            raise AuthError("the bearer token is not valid yet (nbf/iat in the future)") from None
        except jwt.InvalidAudienceError:
            raise AuthError(
                f"the bearer token is not for this audience (aud must include {self.settings.audience!r})"
            ) from None
        except jwt.InvalidIssuerError:
            raise AuthError("the bearer token's issuer is not trusted") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError(f"the bearer token lacks the {exc.claim!r} claim") from None
        except jwt.InvalidSignatureError:
            raise AuthError("the bearer token's signature is invalid") from None
        except (jwt.InvalidTokenError, jwt.InvalidKeyError) as exc:
            raise AuthError(f"the bearer token is invalid ({type(exc).__name__})") from None
        return claims

    def _principal(self, claims: Mapping[str, Any]) -> Principal:
        subject = claims["sub"]
        if not isinstance(subject, str) or not subject:
            raise AuthError("the bearer token's 'sub' claim must be a non-empty string")
        role, project_roles = parse_roles(claims.get(self.settings.roles_claim))
        name = next(
            (v for k in ("name", "email", "preferred_username") if isinstance(v := claims.get(k), str)), ""
        )
        return Principal(
            subject=subject,
            role=role,
            project_roles=project_roles,
            authenticated=True,
            kind="jwt",
            name=name,
        )


def mint_hs256(
    secret: str | bytes,
    subject: str,
    roles: object,
    *,
    ttl_seconds: float = 3600.0,
    audience: str = "fabrik",
    roles_claim: str = "fabrik_roles",
    **claims: Any,
) -> str:
    """An HS256 token as this gateway accepts it (for tests, benchmarks and scripts)."""
    now = int(time.time())
    payload: dict[str, Any] = {
        "sub": subject,
        "aud": audience,
        "iat": now,
        "exp": now + int(ttl_seconds),
        roles_claim: roles,
        **claims,
    }
    return jwt.encode(payload, secret.encode() if isinstance(secret, str) else secret, algorithm=HS256)
