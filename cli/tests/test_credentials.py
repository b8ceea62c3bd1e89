"""The credentials `fabrik login` stores (file modes, one per API, precedence), the 401/403 hints,
and the access commands' wiring against a scripted API (no network)."""

from __future__ import annotations

import base64
import json
import os
import stat
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner, Result

from fabrik_cli.client import ApiClient, ApiError, ApiTarget
from fabrik_cli.commands import access as access_commands
from fabrik_cli.credentials import (
    Credential,
    CredentialsError,
    CredentialStore,
    StoredCredential,
    api_key,
    credentials_file,
    jwt_expiry,
    resolve_credential,
)
from fabrik_cli.main import cli

API = "http://api.test"
GOOD = "fbk_01jdxkz0000000000000000000_s3cret"
ADMIN = "fbk_01jdxkz0000000000000000001_admin"


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --------------------------------------------------------------------------------------------
# Where the file is, and the key of an API


def test_file_location_follows_fabrik_home_then_xdg_then_home(tmp_path: Path) -> None:
    assert credentials_file({"FABRIK_HOME": str(tmp_path / "fh"), "XDG_CONFIG_HOME": "/x"}) == (
        tmp_path / "fh" / "credentials.json"
    )
    assert credentials_file({"XDG_CONFIG_HOME": str(tmp_path / "xdg"), "HOME": "/h"}) == (
        tmp_path / "xdg" / "fabrik" / "credentials.json"
    )
    assert credentials_file({"HOME": str(tmp_path)}) == tmp_path / ".config" / "fabrik" / "credentials.json"


@pytest.mark.parametrize(
    ("url", "key"),
    [
        ("http://127.0.0.1:8080", "http://127.0.0.1:8080"),
        ("HTTP://Fabrik.Example.COM:443/api/v1/", "http://fabrik.example.com:443"),
        ("https://fabrik.example.com:443/api/v1", "https://fabrik.example.com"),
        ("http://host:80/", "http://host"),
        ("host:9080", "http://host:9080"),
        ("https://example.com/fabrik/api/v1", "https://example.com/fabrik"),
        ("http://[::1]:8080", "http://[::1]:8080"),
    ],
)
def test_api_key_normalizes(url: str, key: str) -> None:
    assert api_key(url) == key


# --------------------------------------------------------------------------------------------
# The store


def test_save_creates_private_file_and_directory(tmp_path: Path) -> None:
    store = CredentialStore(tmp_path / "config" / "fabrik" / "credentials.json")
    store.save(API, StoredCredential(token=GOOD, subject="token:X", kind="token", name="ci"))
    assert mode(store.path) == 0o600
    assert mode(store.path.parent) == 0o700
    data = json.loads(store.path.read_text())
    assert data["version"] == 1
    assert data["apis"][API]["token"] == GOOD
    assert store.get(API + "/api/v1/") == StoredCredential(
        token=GOOD, subject="token:X", kind="token", name="ci"
    )
    # no temporary files are left behind
    assert [p.name for p in store.path.parent.iterdir()] == ["credentials.json"]


def test_rewrite_keeps_mode_even_under_a_permissive_umask(tmp_path: Path) -> None:
    store = CredentialStore(tmp_path / "credentials.json")
    old = os.umask(0)
    try:
        store.save(API, StoredCredential(token="a"))
        store.save("http://other.test", StoredCredential(token="b"))
    finally:
        os.umask(old)
    assert mode(store.path) == 0o600


def test_one_credential_per_api(tmp_path: Path) -> None:
    store = CredentialStore(tmp_path / "credentials.json")
    store.save("http://a.test", StoredCredential(token="token-a"))
    store.save("http://b.test:9080", StoredCredential(token="token-b"))
    store.save("http://a.test/api/v1", StoredCredential(token="token-a2"))  # replaces a's
    assert {k: v.token for k, v in store.all().items()} == {
        "http://a.test": "token-a2",
        "http://b.test:9080": "token-b",
    }
    assert store.get("http://b.test") is None  # another port is another API
    assert store.remove("http://a.test") is True
    assert store.remove("http://a.test") is False
    assert store.get("http://a.test") is None
    assert store.get("http://b.test:9080") is not None
    assert store.clear() == ["http://b.test:9080"]
    assert not store.path.exists()
    assert store.all() == {}


def test_broken_file_is_a_clear_error(tmp_path: Path) -> None:
    store = CredentialStore(tmp_path / "credentials.json")
    store.path.write_text("{not json")
    with pytest.raises(CredentialsError) as caught:
        store.get(API)
    assert str(store.path) in caught.value.render()
    assert "fabrik login" in caught.value.render()


def test_loose_permissions_are_reported(tmp_path: Path) -> None:
    store = CredentialStore(tmp_path / "credentials.json")
    store.save(API, StoredCredential(token="t"))
    assert store.loose_permissions() is None
    store.path.chmod(0o644)
    warning = store.loose_permissions()
    assert warning is not None
    assert "chmod 600" in warning


# --------------------------------------------------------------------------------------------
# Precedence: $FABRIK_TOKEN > stored for this API > none


def test_precedence_env_then_stored_then_none(tmp_path: Path) -> None:
    env = {"FABRIK_HOME": str(tmp_path)}
    assert resolve_credential(API, env) is None
    CredentialStore.default(env).save(API, StoredCredential(token="stored"))
    found = resolve_credential(API + "/api/v1", env)
    assert found == Credential("stored", "file", tmp_path / "credentials.json")
    assert resolve_credential("http://other.test", env) is None
    assert resolve_credential(API, {**env, "FABRIK_TOKEN": "from-env"}) == Credential("from-env", "env")
    # an empty variable does not count
    assert resolve_credential(API, {**env, "FABRIK_TOKEN": ""}) == found


def test_env_token_wins_even_over_a_broken_file(tmp_path: Path) -> None:
    (tmp_path / "credentials.json").write_text("[]")
    env = {"FABRIK_HOME": str(tmp_path)}
    assert resolve_credential(API, {**env, "FABRIK_TOKEN": "x"}) == Credential("x", "env")
    with pytest.raises(CredentialsError):
        resolve_credential(API, env)


def _sent_authorization(env: dict[str, str]) -> str | None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"items": [], "next_cursor": None})

    client = ApiClient.from_env(None, {**env, "FABRIK_API_URL": API})
    client._http._transport = httpx.MockTransport(handler)
    with client:
        client.list_runs()
    sent: str | None = seen[0].headers.get("Authorization")
    return sent


def test_client_sends_the_credential_by_precedence(tmp_path: Path) -> None:
    env = {"FABRIK_HOME": str(tmp_path)}
    assert _sent_authorization(env) is None
    CredentialStore.default(env).save(API, StoredCredential(token="stored"))
    assert _sent_authorization(env) == "Bearer stored"
    assert _sent_authorization({**env, "FABRIK_TOKEN": "env"}) == "Bearer env"


# --------------------------------------------------------------------------------------------
# Hints on 401 and 403


def _error_for(status: int, credential: Credential | None, source: str = "$FABRIK_API_URL") -> str:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            status,
            json={
                "title": "Authentication required",
                "status": status,
                "detail": "the API token has been revoked",
            },
            headers={"content-type": "application/problem+json"},
        )

    client = ApiClient(ApiTarget(API, source), credential=credential, transport=httpx.MockTransport(handler))
    with client, pytest.raises(ApiError) as caught:
        client.list_runs()
    return caught.value.render()


def test_unauthorized_hints_depend_on_where_the_credential_came_from(tmp_path: Path) -> None:
    anonymous = _error_for(401, None)
    assert "the API token has been revoked" in anonymous
    assert "fabrik login" in anonymous
    assert "$FABRIK_TOKEN" in anonymous
    assert f"fabrik login --api {API}" in _error_for(401, None, source="--api")

    env = _error_for(401, Credential("t", "env"))
    assert "the token in $FABRIK_TOKEN was refused" in env

    stored = _error_for(401, Credential("t", "file", tmp_path / "credentials.json"))
    assert "stored by `fabrik login`" in stored
    assert "log in again with `fabrik login`" in stored

    forbidden = _error_for(403, Credential("t", "file", tmp_path / "credentials.json"))
    assert "fabrik whoami" in forbidden
    assert "fabrik login" in _error_for(403, None)


def test_jwt_expiry_is_read_without_verifying() -> None:
    exp = int(time.time()) + 3600
    payload = base64.urlsafe_b64encode(json.dumps({"sub": "a", "exp": exp}).encode()).rstrip(b"=").decode()
    assert jwt_expiry(f"eyJhbGciOiJIUzI1NiJ9.{payload}.sig") == datetime.fromtimestamp(exp, UTC)
    assert jwt_expiry(GOOD) is None
    assert jwt_expiry("a.b.c") is None


# --------------------------------------------------------------------------------------------
# The commands, against a scripted gateway


class FakeGateway:
    """Just enough of `/whoami`, `/tokens` and `/audit`, with token checks."""

    def __init__(self) -> None:
        token_id = "01JDXKZ0000000000000000000"
        self.principals: dict[str, dict[str, Any]] = {
            GOOD: {"subject": f"token:{token_id}", "kind": "token", "name": "ci", "role": None},
            ADMIN: {"subject": "admin@example.com", "kind": "jwt", "name": "", "role": "admin"},
        }
        self.principals[GOOD].update(project_roles={"demo": "developer"}, token_id=token_id)
        self.principals[ADMIN].update(project_roles={}, token_id=None)
        self.requests: list[httpx.Request] = []
        self.audit_pages = {
            None: {"items": [self._event(1, "token.create")], "next_cursor": "1"},
            "1": {"items": [self._event(2, "token.revoke")], "next_cursor": None},
        }

    @staticmethod
    def _event(seq: int, action: str) -> dict[str, Any]:
        return {
            "seq": seq,
            "event_id": f"E{seq}",
            "occurred_at": "2026-01-31T12:00:00Z",
            "actor": "admin@example.com",
            "role": "admin",
            "action": action,
            "target": "token:01JDXKZ0000000000000000000",
            "project": None,
            "result": "ok",
            "details": {"status": 201},
        }

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        auth = request.headers.get("Authorization", "")
        principal = self.principals.get(auth.removeprefix("Bearer "))
        if principal is None:
            return httpx.Response(
                401,
                json={
                    "title": "Authentication required",
                    "status": 401,
                    "detail": "the API token is not valid",
                },
            )
        path = request.url.path.removeprefix("/api/v1")
        if path == "/whoami":
            return httpx.Response(200, json={**principal, "authenticated": True})
        if path == "/tokens" and request.method == "POST":
            body = json.loads(request.content)
            if body.get("projects") == ["Bad"]:
                return httpx.Response(
                    422,
                    json={
                        "title": "Validation failed",
                        "status": 422,
                        "errors": [{"field": "projects[0]", "rule": "must be a DNS-1123 label"}],
                    },
                )
            return httpx.Response(201, json={**self._token(body), "token": "fbk_01new_secretvalue"})
        if path == "/tokens":
            return httpx.Response(200, json={"items": [self._token({"name": "ci", "role": "developer"})]})
        if path.startswith("/tokens/") and request.method == "DELETE":
            revoked = {**self._token({"name": "ci", "role": "developer"}), "token_id": path.split("/")[-1]}
            return httpx.Response(
                200, json={**revoked, "revoked_at": "2026-01-31T12:00:00Z", "revoked_by": "x"}
            )
        if path == "/audit":
            return httpx.Response(200, json=self.audit_pages[request.url.params.get("after")])
        return httpx.Response(404, json={"title": "Not found", "status": 404})

    @staticmethod
    def _token(body: dict[str, Any]) -> dict[str, Any]:
        return {
            "token_id": "01JDXKZ0000000000000000002",
            "name": body["name"],
            "role": body["role"],
            "projects": body.get("projects"),
            "created_by": "admin@example.com",
            "created_at": "2026-01-31T12:00:00Z",
            "expires_at": None,
            "revoked_at": None,
            "revoked_by": None,
            "last_used_at": None,
        }


@pytest.fixture
def gateway(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> FakeGateway:
    fake = FakeGateway()
    transport = httpx.MockTransport(fake)

    class ScriptedClient(ApiClient):
        def __init__(self, target: ApiTarget, **kwargs: Any) -> None:
            super().__init__(target, transport=transport, sleep=lambda s: None, **kwargs)

    monkeypatch.setattr(access_commands, "ApiClient", ScriptedClient)
    monkeypatch.setattr(access_commands, "open_client", lambda api: ScriptedClient.from_env(api, os.environ))
    monkeypatch.setenv("FABRIK_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FABRIK_API_URL", API)
    monkeypatch.delenv("FABRIK_TOKEN", raising=False)
    return fake


def invoke(*args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), input=input)


def test_login_stores_verified_credential_and_whoami_uses_it(gateway: FakeGateway, tmp_path: Path) -> None:
    result = invoke("login", "--token", GOOD)
    assert result.exit_code == 0, result.output
    assert "logged in to http://api.test as token:01JDXKZ0000000000000000000" in result.stdout
    assert "developer in demo" in result.stdout
    file = tmp_path / "home" / "credentials.json"
    assert str(file) in result.stderr
    assert mode(file) == 0o600
    assert gateway.requests[-1].headers["Authorization"] == f"Bearer {GOOD}"

    me = invoke("whoami")
    assert me.exit_code == 0, me.output
    assert "token:01JDXKZ0000000000000000000" in me.stdout
    assert "developer in demo" in me.stdout
    assert "stored by `fabrik login`" in me.stdout
    assert json.loads(invoke("whoami", "-o", "json").stdout)["kind"] == "token"

    out = invoke("logout")
    assert out.exit_code == 0
    assert "logged out of http://api.test" in out.stdout
    assert "revoke" in out.stderr
    refused = invoke("whoami")
    assert refused.exit_code == 1
    assert "fabrik login" in refused.stderr
    assert "not logged in" in invoke("logout").stdout


def test_login_reads_stdin_and_refuses_bad_tokens(gateway: FakeGateway, tmp_path: Path) -> None:
    result = invoke("login", input=f"{GOOD}\n")
    assert result.exit_code == 0, result.output
    assert GOOD not in result.output

    bad = invoke("login", "--token", "fbk_01jdxkz0000000000000000000_wrong")
    assert bad.exit_code == 1
    assert "refused the credential: the API token is not valid" in bad.stderr
    assert "nothing was stored" in bad.stderr
    store = CredentialStore(tmp_path / "home" / "credentials.json")
    stored = store.get(API)
    assert stored is not None
    assert (stored.token, stored.subject, stored.kind, stored.name) == (
        GOOD,
        "token:01JDXKZ0000000000000000000",
        "token",
        "ci",
    )
    assert stored.saved_at.endswith("Z")

    assert invoke("login", input="\n").exit_code == 2
    assert invoke("login", "--token", "two words").exit_code == 2


def test_login_warns_when_fabrik_token_overrides(
    gateway: FakeGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FABRIK_TOKEN", ADMIN)
    result = invoke("login", "--token", GOOD)
    assert result.exit_code == 0, result.output
    assert "$FABRIK_TOKEN is set" in result.stderr
    # the login checked the given token, not $FABRIK_TOKEN
    assert gateway.requests[-1].headers["Authorization"] == f"Bearer {GOOD}"
    me = invoke("whoami")
    assert "admin@example.com" in me.stdout
    assert "$FABRIK_TOKEN" in me.stdout


def test_token_create_prints_only_the_secret(gateway: FakeGateway, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FABRIK_TOKEN", ADMIN)
    result = invoke("token", "create", "ci", "--role", "developer", "-p", "demo,web", "--project", "demo")
    assert result.exit_code == 0, result.output
    assert result.stdout == "fbk_01new_secretvalue\n"
    assert "only time the secret is shown" in result.stderr
    assert json.loads(gateway.requests[-1].content) == {
        "name": "ci",
        "role": "developer",
        "projects": ["demo", "web"],
    }
    as_json = json.loads(invoke("token", "create", "ci", "--role", "admin", "-o", "json").stdout)
    assert as_json["token"] == "fbk_01new_secretvalue"
    assert json.loads(gateway.requests[-1].content) == {"name": "ci", "role": "admin"}

    bad = invoke("token", "create", "ci", "--role", "viewer", "-p", "Bad")
    assert bad.exit_code == 2
    assert "projects[0]: must be a DNS-1123 label (--project)" in bad.stderr
    assert invoke("token", "create", "ci", "--role", "owner").exit_code == 2


def test_token_list_and_revoke(gateway: FakeGateway, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FABRIK_TOKEN", ADMIN)
    listed = invoke("token", "list")
    assert listed.exit_code == 0, listed.output
    header, row = listed.stdout.splitlines()
    assert header.split()[:4] == ["TOKEN", "ID", "NAME", "ROLE"]
    assert row.split()[:5] == ["01JDXKZ0000000000000000002", "ci", "developer", "all", "active"]

    revoked = invoke("token", "revoke", "fbk_01jdxkz0000000000000000009_secret")
    assert revoked.exit_code == 0, revoked.output
    assert gateway.requests[-1].method == "DELETE"
    assert gateway.requests[-1].url.path == "/api/v1/tokens/01JDXKZ0000000000000000009"
    assert "is revoked" in revoked.stdout


def test_audit_pages_and_time_filters(gateway: FakeGateway, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FABRIK_TOKEN", ADMIN)
    first = invoke("audit", "--action", "token.create", "--since", "2026-01-31T12:00:00+01:00")
    assert first.exit_code == 0, first.output
    assert "token.create" in first.stdout
    assert "--after 1" in first.stderr
    params = gateway.requests[-1].url.params
    assert params["action"] == "token.create"
    assert params["since"] == "2026-01-31T11:00:00Z"
    assert "actor" not in params

    merged = json.loads(invoke("audit", "--all", "-o", "json").stdout)
    assert [e["action"] for e in merged["items"]] == ["token.create", "token.revoke"]
    assert merged["next_cursor"] is None

    assert invoke("audit", "--since", "yesterday-ish").exit_code == 2
    assert invoke("audit", "--result", "maybe").exit_code == 2


def test_parse_when_accepts_ages_and_local_times() -> None:
    now = datetime(2026, 1, 31, 12, 0, tzinfo=UTC)
    assert access_commands.parse_when("2h", now) == "2026-01-31T10:00:00Z"
    assert access_commands.parse_when("7d", now) == "2026-01-24T12:00:00Z"
    assert access_commands.parse_when("2026-01-31T12:00:00Z") == "2026-01-31T12:00:00Z"
    local = datetime(2026, 1, 31, 12, 0).astimezone()
    assert access_commands.parse_when("2026-01-31 12:00") == (
        local.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    )
    assert access_commands.parse_when("90s", now) == (now - timedelta(seconds=90)).isoformat().replace(
        "+00:00", "Z"
    )
