"""`fabrik login|logout|whoami`, `fabrik token ...` and `fabrik audit` against a real gateway (over
a real NATS) that authenticates every request: anonymous access off, HS256 JWTs and API tokens.

The CLI runs as an operator runs it (`python -m fabrik_cli ...` in a subprocess) with its own
empty home, so neither a local stack nor a stored credential of the machine is found.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fabrik_common.testing import ServiceProcess
from fabrik_gateway.auth.jwt import mint_hs256

ROOT = Path(__file__).resolve().parents[2]
SECRET = "integration-test-hs256-secret-0123456789"
ADMIN = "admin@example.com"


class Cli:
    """`fabrik` as a subprocess with a temporary home; `token=` sets $FABRIK_TOKEN for one call."""

    def __init__(self, api: str, home: Path) -> None:
        self.home = home
        home.mkdir(parents=True, exist_ok=True)
        self.env = {k: v for k, v in os.environ.items() if k != "FABRIK_TOKEN"}
        self.env.update(
            FABRIK_API_URL=api,
            FABRIK_HOME=str(home),
            HOME=str(home),
            XDG_CONFIG_HOME=str(home / "config"),
        )

    def __call__(
        self, *args: str, token: str | None = None, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        env = dict(self.env)
        if token is not None:
            env["FABRIK_TOKEN"] = token
        return subprocess.run(
            [sys.executable, "-m", "fabrik_cli", *args],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            cwd=ROOT,
            input=stdin if stdin is not None else "",
        )

    def json(self, *args: str, token: str | None = None) -> Any:
        result = self(*args, "-o", "json", token=token)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)


@pytest.fixture
def gateway(nats_url: str, tmp_path: Path) -> Iterator[Cli]:
    env = {
        "FABRIK_NATS_URL": nats_url,
        "FABRIK_ANONYMOUS_ROLE": "none",
        "FABRIK_JWT_HS256_SECRET": SECRET,
    }
    proc = ServiceProcess("fabrik_gateway", env, log_path=tmp_path / "gateway.log")
    try:
        proc.start(ready_timeout=60)
        yield Cli(proc.base_url, tmp_path / "cli-home")
    finally:
        proc.kill()


def _audit_rows(cli: Cli, admin: str, token_id: str, wanted: set[str]) -> dict[str, list[str]]:
    """`fabrik audit` rows of the token by action, once the wanted ones are in (the gateway records
    audit events asynchronously)."""
    deadline = time.monotonic() + 20
    while True:
        result = cli("audit", "--actor", ADMIN, "--all", token=admin)
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert lines[0].split() == [
            "TIME",
            "ACTOR",
            "ROLE",
            "ACTION",
            "TARGET",
            "PROJECT",
            "RESULT",
            "DETAILS",
        ]
        rows = {r[4]: r for line in lines[1:] if f"token:{token_id}" in (r := line.split())}
        if wanted <= set(rows) or time.monotonic() > deadline:
            return rows
        time.sleep(0.3)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_login_token_lifecycle_and_audit(gateway: Cli) -> None:
    cli = gateway
    admin = mint_hs256(SECRET, ADMIN, "admin")

    # Anonymous access is off: a clear way out.
    anonymous = cli("runs", "list")
    assert anonymous.returncode == 1
    assert "(401)" in anonymous.stderr
    assert "fabrik login" in anonymous.stderr
    assert "$FABRIK_TOKEN" in anonymous.stderr
    assert "Traceback" not in anonymous.stderr

    # An admin (a JWT in $FABRIK_TOKEN) makes a project-bound token for CI: stdout is the secret.
    created = cli("token", "create", "ci", "--role", "developer", "--project", "demo", token=admin)
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip()
    assert secret.startswith("fbk_")
    assert "only time the secret is shown" in created.stderr
    token_id = secret.split("_")[1].upper()

    # Log in with it (from stdin, as a script would), without $FABRIK_TOKEN.
    login = cli("login", stdin=secret + "\n")
    assert login.returncode == 0, login.stderr
    assert f"as token:{token_id}" in login.stdout
    assert "developer in demo" in login.stdout
    stored = cli.home / "credentials.json"
    assert stat.S_IMODE(stored.stat().st_mode) == 0o600
    assert secret not in login.stdout + login.stderr

    whoami = cli("whoami")
    assert whoami.returncode == 0, whoami.stderr
    assert f"token:{token_id}" in whoami.stdout
    assert "developer in demo" in whoami.stdout
    assert "stored by `fabrik login`" in whoami.stdout

    runs = cli("runs", "list")
    assert runs.returncode == 0, runs.stderr
    assert runs.stdout.startswith("RUN ID")

    # A developer may not manage tokens.
    forbidden = cli("token", "list")
    assert forbidden.returncode == 1
    assert "(403)" in forbidden.stderr
    assert "fabrik whoami" in forbidden.stderr

    listed = cli.json("token", "list", token=admin)
    mine = next(t for t in listed["items"] if t["token_id"] == token_id)
    assert (mine["name"], mine["role"], mine["projects"], mine["revoked_at"]) == (
        "ci",
        "developer",
        ["demo"],
        None,
    )

    # Revoked: the stored credential is refused at once, with the way back.
    revoked = cli("token", "revoke", token_id, token=admin)
    assert revoked.returncode == 0, revoked.stderr
    assert f"API token {token_id} (ci) is revoked" in revoked.stdout
    refused = cli("runs", "list")
    assert refused.returncode == 1
    assert "(401)" in refused.stderr
    assert "has been revoked" in refused.stderr
    assert "log in again with `fabrik login`" in refused.stderr

    # The audit trail has both, by the admin.
    rows = _audit_rows(cli, admin, token_id, {"token.create", "token.revoke"})
    assert set(rows) >= {"token.create", "token.revoke"}, rows
    for row in rows.values():
        assert (row[2], row[3], row[7]) == (ADMIN, "admin", "ok"), row

    out = cli("logout")
    assert out.returncode == 0, out.stderr
    assert "logged out of" in out.stdout
    assert json.loads(stored.read_text())["apis"] == {}
