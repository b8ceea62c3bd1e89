"""The authentication pieces that need no server: roles claims, principals, the rate limiter,
HS256 verification and API token shapes."""

from __future__ import annotations

import pytest

from fabrik_gateway.auth import Principal, require_role
from fabrik_gateway.auth.guard import RateLimiter
from fabrik_gateway.auth.jwt import AuthError, JwtSettings, JwtVerifier, mint_hs256, parse_roles
from fabrik_gateway.auth.tokens import split_token
from fabrik_gateway.problems import ProblemError

SECRET = b"0123456789abcdef0123456789abcdef"


def settings(**overrides: object) -> JwtSettings:
    values: dict[str, object] = {
        "hs256_secret": SECRET,
        "oidc_issuer": "",
        "oidc_jwks_url": "",
        "hs256_issuer": "",
        "audience": "fabrik",
        "roles_claim": "fabrik_roles",
        "leeway_seconds": 0.0,
        "jwks_refresh_seconds": 300.0,
        **overrides,
    }
    return JwtSettings(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("claim", "everywhere", "per_project"),
    [
        ("developer", "developer", {}),
        ("root", None, {}),
        (["viewer", "proj-a:maintainer", "proj-a:viewer", "other-group"], "viewer", {"proj-a": "maintainer"}),
        ({"*": "viewer", "proj-b": "admin", "proj-c": "nonsense"}, "viewer", {"proj-b": "admin"}),
        (42, None, {}),
        (None, None, {}),
    ],
)
def test_roles_claim_shapes(claim: object, everywhere: str | None, per_project: dict[str, str]) -> None:
    assert parse_roles(claim) == (everywhere, per_project)


def test_a_principal_role_is_the_higher_of_everywhere_and_project() -> None:
    principal = Principal(subject="p", role="viewer", project_roles={"a": "maintainer"}, authenticated=True)
    assert principal.role_in("a") == "maintainer" and principal.role_in("b") == "viewer"
    assert principal.has_role("developer", "a") and not principal.has_role("developer", "b")
    assert principal.visible_projects is None
    scoped = Principal(subject="s", role=None, project_roles={"a": "developer"}, authenticated=True)
    assert scoped.can_see("a") and not scoped.can_see("b") and scoped.visible_projects == frozenset({"a"})
    with pytest.raises(ProblemError) as refused:
        require_role(scoped, "developer", "submit runs", "b")
    assert refused.value.status == 403 and "in project b" in str(refused.value.detail)


def test_rate_limiter_allows_the_burst_then_the_rate() -> None:
    limiter = RateLimiter(per_minute=60, burst=3)
    assert [limiter.charge("a", now=0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.charge("a", now=0.0) == pytest.approx(1.0)
    assert limiter.charge("b", now=0.0) == 0.0
    assert limiter.charge("a", now=1.0) == 0.0


async def test_hs256_verification() -> None:
    verifier = JwtVerifier(settings())
    principal = await verifier.verify(mint_hs256(SECRET, "alice", {"proj": "developer"}, name="Alice"))
    assert principal.subject == "alice" and principal.project_roles == {"proj": "developer"}
    assert principal.kind == "jwt" and principal.name == "Alice" and principal.authenticated
    for token, reason in [
        (mint_hs256(SECRET, "a", "admin", ttl_seconds=-10), "expired"),
        (mint_hs256(SECRET, "a", "admin", audience="x"), "audience"),
        (mint_hs256(b"x" * 32, "a", "admin"), "signature"),
    ]:
        with pytest.raises(AuthError, match=reason):
            await verifier.verify(token)
    with pytest.raises(AuthError, match="not accepted"):
        await JwtVerifier(settings(hs256_secret=b"")).verify(mint_hs256(SECRET, "a", "admin"))


def test_api_token_shape() -> None:
    token_id, secret = split_token("fbk_01jq0m9f7xk2v8r6t5s4n3p2q1_" + "s" * 43)
    assert token_id == "01JQ0M9F7XK2V8R6T5S4N3P2Q1" and secret == "s" * 43
    for bad in ("fbk_", "fbk_notaulid_" + "s" * 43, "fbk_01jq0m9f7xk2v8r6t5s4n3p2q1_short"):
        with pytest.raises(AuthError, match="malformed"):
            split_token(bad)
