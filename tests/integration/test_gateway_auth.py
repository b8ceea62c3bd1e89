"""Authentication and roles at the gateway, over a real NATS server with the real gateway service:
every route refuses callers without credentials, bearer JWTs are verified (HS256, and RS256/ES256
from a local OIDC issuer), API tokens are created, used and revoked, roles are enforced per
project, and every state-changing request lands in the audit trail."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
import msgspec
import nats
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from fabrik_common.events import RunParameters
from fabrik_common.ids import new_ulid, utcnow
from fabrik_common.runs import TEMPLATES, RunRecord
from fabrik_common.service import Service
from fabrik_common.testing import running_service
from fabrik_gateway.app import build
from fabrik_gateway.auth.jwt import mint_hs256
from fabrik_gateway.gateway import Gateway
from fabrik_gateway.settings import GatewaySettings

SECRET = "an-hs256-secret-of-at-least-32-bytes!"
ENV_KEY = "JCmzPt8s6HzH6W92h7boi4BiICpj42hwIxaqVW52nIA="


class OidcIssuer:
    def __init__(self) -> None:
        self.rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ec_key = ec.generate_private_key(ec.SECP256R1())
        self.requests: list[str] = []
        self._runner: web.AppRunner | None = None
        self.url = ""

    def jwks(self) -> dict[str, Any]:
        rsa_jwk = json.loads(RSAAlgorithm.to_jwk(self.rsa_key.public_key()))
        ec_jwk = json.loads(ECAlgorithm.to_jwk(self.ec_key.public_key()))
        rsa_jwk.update(kid="rsa-1", use="sig", alg="RS256")
        ec_jwk.update(kid="ec-1", use="sig", alg="ES256")
        return {"keys": [rsa_jwk, ec_jwk]}

    @property
    def rsa_public_pem(self) -> bytes:
        return self.rsa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def token(
        self,
        subject: str = "alice@example.com",
        roles: object = "viewer",
        *,
        alg: str = "RS256",
        audience: str = "fabrik",
        issuer: str | None = None,
        lifetime: float = 600,
        not_before: float | None = None,
        **claims: Any,
    ) -> str:
        now = int(time.time())
        payload: dict[str, Any] = {
            "sub": subject,
            "aud": audience,
            "iss": issuer if issuer is not None else self.url,
            "iat": now,
            "exp": now + int(lifetime),
            "fabrik_roles": roles,
            **claims,
        }
        if not_before is not None:
            payload["nbf"] = int(not_before)
        key: Any = self.rsa_key if alg == "RS256" else self.ec_key
        kid = "rsa-1" if alg == "RS256" else "ec-1"
        return jwt.encode(payload, key, algorithm=alg, headers={"kid": kid})

    async def __aenter__(self) -> OidcIssuer:
        app = web.Application()

        async def discovery(request: web.Request) -> web.Response:
            self.requests.append(request.path)
            return web.json_response({"issuer": self.url, "jwks_uri": f"{self.url}/keys"})

        async def keys(request: web.Request) -> web.Response:
            self.requests.append(request.path)
            return web.json_response(self.jwks())

        app.router.add_get("/.well-known/openid-configuration", discovery)
        app.router.add_get("/keys", keys)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@dataclass
class Stack:
    http: httpx.AsyncClient
    service: Service[Gateway]
    issuer: OidcIssuer

    def hs(self, roles: object, subject: str = "hs-user", **claims: Any) -> dict[str, str]:
        return bearer(mint_hs256(SECRET, subject, roles, **claims))

    def rs(self, roles: object, subject: str = "rs-user", **kwargs: Any) -> dict[str, str]:
        return bearer(self.issuer.token(subject, roles, **kwargs))

    async def put_run(self, project: str, state: str = "running") -> str:
        now = utcnow()
        record = RunRecord(
            run_id=new_ulid(),
            project=project,
            env="dev",
            params=RunParameters(resources=TEMPLATES["default"]),
            state=state,  # type: ignore[arg-type]
            created_at=now,
            state_entered_at=now,
            revision=1,
        )
        nc = await nats.connect(self.service.settings.nats_url)
        try:
            kv = await nc.jetstream().key_value("runs")
            await kv.put(record.run_id, msgspec.json.encode(record))
        finally:
            await nc.close()
        deadline = time.monotonic() + 10
        while self.service.state.readmodel.get(record.run_id) is None:
            assert time.monotonic() < deadline, "run record not loaded"
            await asyncio.sleep(0.02)
        return record.run_id


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@contextlib.asynccontextmanager
async def serving(settings: GatewaySettings) -> AsyncIterator[tuple[Service[Gateway], httpx.AsyncClient]]:
    """The real gateway, started and ready, and a client for it."""
    service = build(settings)
    async with (
        running_service(service),
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{service.http.port}", timeout=20) as http,
    ):
        deadline = time.monotonic() + 15
        while (await http.get("/readyz")).status_code != 200:
            assert time.monotonic() < deadline, "gateway not ready"
            await asyncio.sleep(0.05)
        yield service, http


@pytest.fixture
async def stack(nats_url: str) -> AsyncIterator[Stack]:
    async with OidcIssuer() as issuer:
        settings = GatewaySettings(
            nats_url=nats_url,
            http_port=0,
            log_format="text",
            anonymous_role="none",
            jwt_hs256_secret=SECRET,
            oidc_issuer=issuer.url,
            env_encryption_key=ENV_KEY,
            rate_limit_per_minute=100000,
            rate_limit_burst=100000,
        )
        async with serving(settings) as (service, http):
            yield Stack(http=http, service=service, issuer=issuer)


def problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    return body


def operations(document: dict[str, Any]) -> list[tuple[str, str]]:
    """(method, concrete path) of every API operation in the OpenAPI document."""
    values = {
        "run_id": new_ulid(),
        "project": "demo",
        "env": "dev",
        "token_id": new_ulid(),
        "schedule_id": new_ulid(),
        "experiment_id": new_ulid(),
        "candidate_id": "0" * 20,
        "backup_id": new_ulid(),
        "operation_id": new_ulid(),
    }
    out = []
    for path, item in document["paths"].items():
        if not path.startswith("/api/v1/"):
            continue
        for method in item:
            if method in ("get", "post", "put", "patch", "delete"):
                out.append((method.upper(), path.format(**values)))
    return out


# ------------------------------------------------------------------------------------------------


async def test_every_route_without_credentials_is_401(stack: Stack) -> None:
    document = (await stack.http.get("/api/v1/openapi.json")).json()
    assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    ops = operations(document)
    assert len(ops) >= 15
    for method, path in ops:
        response = await stack.http.request(method, path, json={})
        body = problem(response, 401)
        assert "Authorization: Bearer" in body["detail"], (method, path)
        assert response.headers["www-authenticate"].startswith("Bearer")
        # A malformed header is refused the same way, never treated as anonymous.
        response = await stack.http.request(method, path, json={}, headers={"Authorization": "Basic eDp5"})
        problem(response, 401)


async def test_jwts_that_must_be_refused(stack: Stack) -> None:
    issuer = stack.issuer
    now = time.time()
    cases: dict[str, str] = {
        "expired": issuer.token(lifetime=-120),
        "not yet valid": issuer.token(not_before=now + 600),
        "wrong audience": issuer.token(audience="someone-else"),
        "wrong issuer": issuer.token(issuer="https://evil.example.com"),
        "hs256 expired": mint_hs256(SECRET, "u", "admin", ttl_seconds=-120),
        "hs256 wrong secret": mint_hs256("another-secret-of-at-least-32-bytes!!", "u", "admin"),
        "hs256 wrong audience": mint_hs256(SECRET, "u", "admin", audience="other"),
        "no sub": jwt.encode({"aud": "fabrik", "exp": int(now) + 60, "fabrik_roles": "admin"}, SECRET),
    }
    # alg none: an unsigned token claiming admin.
    header = base64.urlsafe_b64encode(json.dumps({"alg": "none", "typ": "JWT"}).encode()).rstrip(b"=")
    claims = {
        "sub": "mallory",
        "aud": "fabrik",
        "exp": int(now) + 600,
        "fabrik_roles": "admin",
        "iss": issuer.url,
    }
    payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=")
    cases["alg none"] = f"{header.decode()}.{payload.decode()}."
    # Key confusion: HS256 "signed" with the issuer's public RSA key as the shared secret.
    hs_header = base64.urlsafe_b64encode(json.dumps({"alg": "HS256", "typ": "JWT"}).encode()).rstrip(b"=")
    signing_input = f"{hs_header.decode()}.{payload.decode()}"
    mac = hmac.new(issuer.rsa_public_pem, signing_input.encode(), hashlib.sha256).digest()
    cases["hs/rs confusion"] = f"{signing_input}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"
    # Tampered: a valid token whose payload was changed to claim admin.
    good = issuer.token("alice", "viewer").split(".")
    forged = dict(json.loads(base64.urlsafe_b64decode(good[1] + "==")), fabrik_roles="admin")
    good[1] = base64.urlsafe_b64encode(json.dumps(forged).encode()).rstrip(b"=").decode()
    cases["tampered signature"] = ".".join(good)
    cases["garbage"] = "not-a-token"
    for name, token in cases.items():
        response = await stack.http.get("/api/v1/runs", headers=bearer(token))
        body = problem(response, 401)
        assert body["detail"], name
    # ...while the genuine articles are let in.
    for headers in (stack.rs("viewer"), stack.rs("viewer", alg="ES256"), stack.hs("viewer")):
        assert (await stack.http.get("/api/v1/runs", headers=headers)).status_code == 200


async def test_roles_are_enforced(stack: Stack) -> None:
    run_id = await stack.put_run("demo", state="failed")
    viewer = stack.rs("viewer")
    developer = stack.rs({"demo": "developer"})
    submit = {"project": "demo", "workload": {"command": ["true"]}}
    refused = [
        ("POST", "/api/v1/runs", submit),
        ("POST", f"/api/v1/runs/{run_id}/resume", None),
        ("POST", f"/api/v1/runs/{run_id}/cancel", None),
        ("PUT", "/api/v1/projects/demo/envs/dev", {"values": {"A": "1"}}),
        ("POST", "/api/v1/tokens", {"name": "x", "role": "viewer"}),
        ("GET", "/api/v1/tokens", None),
        ("GET", "/api/v1/audit", None),
    ]
    for method, path, body in refused:
        detail = problem(await stack.http.request(method, path, json=body, headers=viewer), 403)["detail"]
        assert "role" in detail, (method, path)
    # A developer in demo submits and resumes there, but not in another project, nor manages tokens.
    assert (await stack.http.post("/api/v1/runs", json=submit, headers=developer)).status_code == 201
    assert (await stack.http.post(f"/api/v1/runs/{run_id}/resume", headers=developer)).status_code == 202
    other = {**submit, "project": "other"}
    assert (
        "in project other"
        in problem(await stack.http.post("/api/v1/runs", json=other, headers=developer), 403)["detail"]
    )
    problem(await stack.http.get("/api/v1/tokens", headers=developer), 403)
    # Protected environments need a maintainer; a developer writes the others.
    env = {"values": {"A": "1"}}
    assert (
        await stack.http.put("/api/v1/projects/demo/envs/dev", json=env, headers=developer)
    ).status_code in (
        200,
        201,
    )
    problem(
        await stack.http.put(
            "/api/v1/projects/demo/envs/prod", json={**env, "confirm": True}, headers=developer
        ),
        403,
    )
    maintainer = stack.hs({"demo": "maintainer"})
    response = await stack.http.put(
        "/api/v1/projects/demo/envs/prod", json={**env, "confirm": True}, headers=maintainer
    )
    assert response.status_code in (200, 201), response.text


async def test_a_principal_of_project_a_cannot_see_project_b(stack: Stack) -> None:
    run_a = await stack.put_run("proj-a")
    run_b = await stack.put_run("proj-b")
    scoped = stack.hs(["proj-a:viewer"], subject="scoped")
    listed = (await stack.http.get("/api/v1/runs", headers=scoped)).json()
    assert [r["run_id"] for r in listed["items"]] == [run_a]
    assert (await stack.http.get("/api/v1/runs?project=proj-b", headers=scoped)).json()["items"] == []
    for path in (f"/api/v1/runs/{run_b}", f"/api/v1/runs/{run_b}/logs", f"/api/v1/runs/{run_b}/events"):
        problem(await stack.http.get(path, headers=scoped), 404)
    for path in (f"/api/v1/runs/{run_a}", f"/api/v1/runs/{run_a}/logs", f"/api/v1/runs/{run_a}/events"):
        assert (await stack.http.get(path, headers=scoped)).status_code == 200, path
    projects = (await stack.http.get("/api/v1/projects", headers=scoped)).json()["items"]
    assert [p["project"] for p in projects] == ["proj-a"]
    problem(await stack.http.get("/api/v1/projects/proj-b/envs", headers=scoped), 403)
    # Someone with a role everywhere sees both.
    everyone = (await stack.http.get("/api/v1/runs", headers=stack.hs("viewer"))).json()["items"]
    assert {r["run_id"] for r in everyone} == {run_a, run_b}


async def test_api_tokens_are_shown_once_used_scoped_and_revoked(stack: Stack) -> None:
    admin = stack.hs("admin", subject="root")
    response = await stack.http.post(
        "/api/v1/tokens", json={"name": "ci", "role": "developer", "projects": ["proj-a"]}, headers=admin
    )
    assert response.status_code == 201, response.text
    created = response.json()
    secret = created["token"]
    assert secret.startswith("fbk_") and created["created_by"] == "root" and created["projects"] == ["proj-a"]
    # Stored hashed: the bucket never holds the secret.
    nc = await nats.connect(stack.service.settings.nats_url)
    try:
        kv = await nc.jetstream().key_value("tokens")
        stored = (await kv.get(f"api.{created['token_id']}")).value or b""
    finally:
        await nc.close()
    assert (
        secret.encode() not in stored and secret.removeprefix("fbk_").partition("_")[2].encode() not in stored
    )
    listed = (await stack.http.get("/api/v1/tokens", headers=admin)).json()["items"]
    assert [t["token_id"] for t in listed] == [created["token_id"]] and "token" not in listed[0]

    me = (await stack.http.get("/api/v1/whoami", headers=bearer(secret))).json()
    assert me["kind"] == "token" and me["role"] is None and me["project_roles"] == {"proj-a": "developer"}
    submit = {"project": "proj-a", "workload": {"command": ["true"]}}
    assert (await stack.http.post("/api/v1/runs", json=submit, headers=bearer(secret))).status_code == 201
    problem(
        await stack.http.post("/api/v1/runs", json={**submit, "project": "proj-b"}, headers=bearer(secret)),
        403,
    )
    deadline = time.monotonic() + 10
    while True:
        shown = (await stack.http.get(f"/api/v1/tokens/{created['token_id']}", headers=admin)).json()
        if shown["last_used_at"] is not None:
            break
        assert time.monotonic() < deadline, "last use not recorded"
        await asyncio.sleep(0.05)

    # A wrong secret for a real id, and a malformed token, are refused.
    wrong = secret[:-4] + ("AAAA" if not secret.endswith("AAAA") else "BBBB")
    problem(await stack.http.get("/api/v1/runs", headers=bearer(wrong)), 401)
    problem(await stack.http.get("/api/v1/runs", headers=bearer("fbk_nonsense")), 401)

    revoked = await stack.http.delete(f"/api/v1/tokens/{created['token_id']}", headers=admin)
    assert revoked.status_code == 200 and revoked.json()["revoked_by"] == "root"
    assert "revoked" in problem(await stack.http.get("/api/v1/runs", headers=bearer(secret)), 401)["detail"]
    problem(await stack.http.delete(f"/api/v1/tokens/{new_ulid()}", headers=admin), 404)


async def test_every_state_change_is_audited_and_admins_read_the_trail(stack: Stack) -> None:
    since = utcnow().isoformat()
    admin = stack.hs("admin", subject="auditor")
    developer = stack.hs({"demo": "developer"}, subject="dev-1")
    submitted = await stack.http.post(
        "/api/v1/runs", json={"project": "demo", "workload": {"command": ["true"]}}, headers=developer
    )
    assert submitted.status_code == 201
    run_id = submitted.json()["run_id"]
    problem(
        await stack.http.post("/api/v1/tokens", json={"name": "x", "role": "admin"}, headers=developer), 403
    )
    problem(await stack.http.post("/api/v1/runs", json={}), 401)

    async def trail(**params: str) -> list[dict[str, Any]]:
        response = await stack.http.get("/api/v1/audit", params={"since": since, **params}, headers=admin)
        assert response.status_code == 200, response.text
        items: list[dict[str, Any]] = response.json()["items"]
        return items

    deadline = time.monotonic() + 10
    while len(await trail()) < 3:
        assert time.monotonic() < deadline, await trail()
        await asyncio.sleep(0.05)
    items = await trail()
    submit = next(i for i in items if i["action"] == "run.submit")
    assert submit["actor"] == "dev-1" and submit["role"] == "developer" and submit["result"] == "ok"
    assert submit["target"] == f"run:{run_id}" and submit["project"] == "demo"
    denied = next(i for i in items if i["action"] == "token.create")
    assert denied["actor"] == "dev-1" and denied["result"] == "denied" and denied["details"]["status"] == 403
    anonymous = next(i for i in items if i["actor"].startswith("anonymous@"))
    assert anonymous["result"] == "denied" and anonymous["details"]["status"] == 401
    assert [i["action"] for i in await trail(actor="dev-1", result="denied")] == ["token.create"]
    page = (
        await stack.http.get("/api/v1/audit", params={"since": since, "limit": "1"}, headers=admin)
    ).json()
    assert len(page["items"]) == 1 and page["next_cursor"]
    rest = (
        await stack.http.get("/api/v1/audit", params={"after": page["next_cursor"]}, headers=admin)
    ).json()["items"]
    assert page["items"][0]["seq"] < rest[0]["seq"]
    bad = problem(await stack.http.get("/api/v1/audit?since=yesterday&limit=0", headers=admin), 400)
    assert {e["field"] for e in bad["errors"]} == {"since", "limit"}


async def test_anonymous_access_only_where_configured(nats_url: str) -> None:
    settings = GatewaySettings(nats_url=nats_url, http_port=0, log_format="text", anonymous_role="viewer")
    async with serving(settings) as (_, http):
        me = (await http.get("/api/v1/whoami")).json()
        assert me == {
            "subject": "anonymous",
            "kind": "anonymous",
            "authenticated": False,
            "name": "",
            "role": "viewer",
            "project_roles": {},
            "token_id": None,
        }
        detail = problem(
            await http.post("/api/v1/runs", json={"project": "demo", "workload": {"command": ["true"]}}),
            403,
        )["detail"]
        assert "FABRIK_ANONYMOUS_ROLE" in detail
        # A credential that does not verify is refused, never downgraded to anonymous.
        problem(await http.get("/api/v1/runs", headers=bearer("garbage")), 401)


async def test_rate_limit_headers_and_cors(nats_url: str) -> None:
    settings = GatewaySettings(
        nats_url=nats_url,
        http_port=0,
        log_format="text",
        jwt_hs256_secret=SECRET,
        rate_limit_per_minute=60,
        rate_limit_burst=5,
        cors_allow_origins="https://dash.example.com",
    )
    async with serving(settings) as (_, http):
        alice, bob = (
            bearer(mint_hs256(SECRET, "alice", "viewer")),
            bearer(mint_hs256(SECRET, "bob", "viewer")),
        )
        statuses = [(await http.get("/api/v1/projects", headers=alice)).status_code for _ in range(8)]
        assert statuses[:5] == [200] * 5 and statuses[-1] == 429
        limited = await http.get("/api/v1/projects", headers=alice)
        assert problem(limited, 429) and int(limited.headers["retry-after"]) >= 1
        # Another caller has its own budget.
        ok = await http.get("/api/v1/projects", headers=bob)
        assert ok.status_code == 200
        for name, value in {
            "x-content-type-options": "nosniff",
            "x-frame-options": "DENY",
            "referrer-policy": "no-referrer",
            "cache-control": "no-store",
        }.items():
            assert ok.headers[name] == value
        assert "default-src 'none'" in ok.headers["content-security-policy"]
        preflight = await http.options(
            "/api/v1/runs",
            headers={
                "Origin": "https://dash.example.com",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization",
            },
        )
        assert preflight.headers["access-control-allow-origin"] == "https://dash.example.com"
        other = await http.get("/api/v1/projects", headers={**bob, "Origin": "https://evil.example.com"})
        assert "access-control-allow-origin" not in other.headers


async def test_cors_is_off_by_default(stack: Stack) -> None:
    response = await stack.http.get(
        "/api/v1/projects", headers={**stack.hs("viewer"), "Origin": "https://dash.example.com"}
    )
    assert response.status_code == 200 and "access-control-allow-origin" not in response.headers
