"""Backups through the gateway's REST API and the CLI, answered by the REAL backup service over a
real NATS server (request/reply, `fabrik_common.backup_rpc`), archiving to a `dir://` target.

The backup service and the gateway run in this process against one NATS server (the CLI as a
subprocess); requests carry HS256 JWTs minted for the roles each case needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest
from nats.aio.msg import Msg

from fabrik_backup.app import build as build_backup
from fabrik_backup.settings import BackupSettings
from fabrik_cli.commands.backup import backups_table
from fabrik_common import backup_rpc as rpc
from fabrik_common.service import Service
from fabrik_common.testing import running_service
from fabrik_gateway.app import build as build_gateway
from fabrik_gateway.auth.jwt import mint_hs256
from fabrik_gateway.gateway import Gateway
from fabrik_gateway.settings import GatewaySettings

SECRET = "backups-api-test-hs256-secret-0123456789"
ROOT = Path(__file__).resolve().parents[2]
SCRATCH = "SCRATCH"


def token(roles: object, subject: str = "someone") -> str:
    return mint_hs256(SECRET, subject, roles)


def bearer(roles: object, subject: str = "someone") -> dict[str, str]:
    return {"Authorization": f"Bearer {token(roles, subject)}"}


ADMIN = bearer("admin", "root@example.com")
VIEWER = bearer("viewer", "viewer@example.com")
MAINTAINER = bearer("maintainer", "maint@example.com")


def problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    return body


def fields(body: dict[str, Any]) -> set[str]:
    return {e["field"].removeprefix("$.").removeprefix("body.") for e in body.get("errors") or []}


def gateway_settings(nats_url: str, **extra: Any) -> GatewaySettings:
    return GatewaySettings(
        nats_url=nats_url,
        http_port=0,
        log_format="text",
        anonymous_role="none",
        jwt_hs256_secret=SECRET,
        rate_limit_per_minute=100000,
        rate_limit_burst=100000,
        **extra,
    )


@contextlib.asynccontextmanager
async def serving(settings: GatewaySettings) -> AsyncIterator[tuple[Service[Gateway], httpx.AsyncClient]]:
    service = build_gateway(settings)
    async with (
        running_service(service),
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{service.http.port}", timeout=30) as http,
    ):
        deadline = time.monotonic() + 15
        while (await http.get("/readyz")).status_code != 200:
            assert time.monotonic() < deadline, "gateway not ready"
            await asyncio.sleep(0.05)
        yield service, http


@dataclass
class Stack:
    http: httpx.AsyncClient
    api: str
    archives: Path
    nats_url: str


@pytest.fixture
async def stack(nats_url: str, tmp_path: Path) -> AsyncIterator[Stack]:
    archives = tmp_path / "archives"
    backup_settings = BackupSettings(
        nats_url=nats_url,
        http_port=0,
        log_format="text",
        instance_id="backup-test",
        backup_target=f"dir://{archives}",
        backup_heartbeat_seconds=0.2,
        backup_stale_seconds=2.0,
        backup_schedule="0 3 1 1 *",  # far from now: shown, never fired during the test
    )
    async with (
        running_service(build_backup(backup_settings)),
        serving(gateway_settings(nats_url)) as (service, http),
    ):
        yield Stack(
            http=http, api=f"http://127.0.0.1:{service.http.port}", archives=archives, nats_url=nats_url
        )


async def scratch_stream(url: str, messages: int) -> None:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await js.delete_stream(SCRATCH)
        await js.add_stream(name=SCRATCH, subjects=["scratch.>"])
        for i in range(messages):
            await js.publish(f"scratch.{i % 7}", f"message {i}".encode(), headers={"N": str(i)})
    finally:
        await nc.close()


async def stream_state(url: str) -> tuple[int, int, list[bytes]]:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        info = await js.stream_info(SCRATCH)
        first = await js.get_msg(SCRATCH, 1)
        last = await js.get_msg(SCRATCH, info.state.last_seq)
        return info.state.messages, info.state.last_seq, [first.data or b"", last.data or b""]
    finally:
        await nc.close()


async def finished(http: httpx.AsyncClient, op_id: str, within: float = 20.0) -> dict[str, Any]:
    deadline = time.monotonic() + within
    while True:
        response = await http.get(f"/api/v1/backups/operations/{op_id}", headers=VIEWER)
        assert response.status_code == 200, response.text
        op: dict[str, Any] = response.json()
        if op["terminal"]:
            return op
        assert time.monotonic() < deadline, f"{op_id} still {op['state']}"
        await asyncio.sleep(0.1)


async def started(response: httpx.Response) -> str:
    assert response.status_code == 202, response.text
    op = response.json()
    assert op["state"] == "requested" and not op["terminal"]
    return str(op["operation_id"])


# ------------------------------------------------------------------------------------------------


async def test_create_list_verify_restore_cancel_delete(stack: Stack) -> None:
    http = stack.http
    await scratch_stream(stack.nats_url, 100)

    # Roles: a viewer reads but may not start a backup; a project-bound admin is not enough.
    problem(await http.post("/api/v1/backups", json={}, headers=VIEWER), 403)
    problem(await http.post("/api/v1/backups", json={}, headers=bearer(["demo:admin"])), 403)
    problem(await http.get("/api/v1/backups"), 401)

    # Bad input names the field.
    assert "deadline_seconds" in fields(
        problem(await http.post("/api/v1/backups", json={"deadline_seconds": -1}, headers=ADMIN), 422)
    )
    assert "backup_id" in fields(
        problem(await http.post("/api/v1/backups", json={"backup_id": "no/slash"}, headers=ADMIN), 422)
    )
    assert "operations" in fields(
        problem(await http.get("/api/v1/backups?operations=x", headers=VIEWER), 400)
    )

    # Create, and follow the operation to its end.
    op_id = await started(await http.post("/api/v1/backups", json={"backup_id": "api-1"}, headers=ADMIN))
    op = await finished(http, op_id)
    assert op["state"] == "succeeded", op
    assert op["operation"] == "backup" and op["requested_by"] == "root@example.com"
    assert op["result"]["messages"] >= 100
    assert (stack.archives / "api-1" / "manifest.json").is_file()

    # List: the backup with its times and sizes, not verified yet.
    listing = (await http.get("/api/v1/backups", headers=VIEWER)).json()
    assert listing["target"] == f"dir://{stack.archives}"
    (entry,) = [b for b in listing["backups"] if b["backup_id"] == "api-1"]
    assert entry["complete"] and entry["state"] == "complete"
    assert entry["messages"] >= 100 and entry["stored_bytes"] > 0 and entry["created_at"]
    assert entry["verified_at"] is None
    assert op_id in {o["operation_id"] for o in listing["operations"]}
    detail = (await http.get("/api/v1/backups/api-1", headers=VIEWER)).json()
    assert [o["operation_id"] for o in detail["history"]] == [op_id]
    problem(await http.get("/api/v1/backups/nope", headers=VIEWER), 404)
    assert "backup_id" in fields(problem(await http.get("/api/v1/backups/bad%20id", headers=VIEWER), 400))

    # Verify (maintainers): recorded as the backup's verified_at.
    problem(await http.post("/api/v1/backups/api-1/verify", json={}, headers=VIEWER), 403)
    assert "backup_id" in fields(
        problem(await http.post("/api/v1/backups/nope/verify", json={}, headers=MAINTAINER), 404)
    )
    verify = await finished(
        http, await started(await http.post("/api/v1/backups/api-1/verify", json={}, headers=MAINTAINER))
    )
    assert verify["state"] == "succeeded" and verify["result"]["deep"] is False, verify
    listing = (await http.get("/api/v1/backups", headers=VIEWER)).json()
    (entry,) = [b for b in listing["backups"] if b["backup_id"] == "api-1"]
    assert entry["verified_at"] is not None

    # Restore into the same NATS: the scratch stream moved on; without `replace` it is refused.
    await scratch_stream(stack.nats_url, 130)
    problem(
        await http.post("/api/v1/backups/api-1/restore", json={"streams": [SCRATCH]}, headers=MAINTAINER), 403
    )
    refused = await finished(
        http,
        await started(
            await http.post("/api/v1/backups/api-1/restore", json={"streams": [SCRATCH]}, headers=ADMIN)
        ),
    )
    assert refused["state"] == "failed" and SCRATCH in refused["message"], refused
    restored = await finished(
        http,
        await started(
            await http.post(
                "/api/v1/backups/api-1/restore",
                json={"streams": [SCRATCH], "replace": [SCRATCH]},
                headers=ADMIN,
            )
        ),
    )
    assert restored["state"] == "succeeded", restored
    assert await stream_state(stack.nats_url) == (100, 100, [b"message 0", b"message 99"])

    # Point in time: exactly one of backup_id and at; nothing before the first backup.
    assert "backup_id" in fields(problem(await http.post("/api/v1/restores", json={}, headers=ADMIN), 422))
    assert "at" in fields(
        problem(await http.post("/api/v1/restores", json={"at": "2000-01-01T00:00:00Z"}, headers=ADMIN), 404)
    )
    assert "replace[0]" in fields(
        problem(
            await http.post(
                "/api/v1/restores", json={"backup_id": "api-1", "replace": ["a.b"]}, headers=ADMIN
            ),
            422,
        )
    )

    # Cancel (admins): a deep verify starts a scratch server, so it is still going when cancelled.
    deep_id = await started(
        await http.post("/api/v1/backups/api-1/verify", json={"deep": True}, headers=MAINTAINER)
    )
    problem(await http.post(f"/api/v1/backups/operations/{deep_id}/cancel", headers=VIEWER), 403)
    cancel = await http.post(f"/api/v1/backups/operations/{deep_id}/cancel", headers=ADMIN)
    assert cancel.status_code == 200, cancel.text
    assert cancel.json()["state"] in ("cancelling", "cancelled")
    assert (await finished(http, deep_id))["state"] == "cancelled"
    problem(await http.post("/api/v1/backups/operations/nope/cancel", headers=ADMIN), 404)
    states = (await http.get("/api/v1/backups/operations", headers=VIEWER)).json()["operations"]
    assert [o["state"] for o in states][-1] == "cancelled"

    # Schedule: a setting of the backup service, shown with its next slots.
    schedule = (await http.get("/api/v1/backups/schedule", headers=VIEWER)).json()
    assert schedule["schedule"] == "0 3 1 1 *" and schedule["timezone"] == "UTC"
    assert len(schedule["next_slots"]) == 5 and schedule["next_slots"][0].endswith("-01-01T03:00:00Z")

    # Prune dry run keeps the verified backup; delete (admins) removes it.
    prune = (await http.post("/api/v1/backups/prune", json={}, headers=MAINTAINER)).json()
    assert prune["deleted"] is False and prune["delete"] == []
    problem(await http.post("/api/v1/backups/prune", json={"dry_run": False}, headers=MAINTAINER), 403)
    problem(await http.delete("/api/v1/backups/api-1", headers=VIEWER), 403)
    deleted = await http.delete("/api/v1/backups/api-1", headers=ADMIN)
    assert deleted.status_code == 200, deleted.text
    assert deleted.json()["backup_id"] == "api-1" and deleted.json()["parts_deleted"] > 1
    assert not (stack.archives / "api-1").exists() or not any((stack.archives / "api-1").rglob("*.*"))
    listing = (await http.get("/api/v1/backups", headers=VIEWER)).json()
    assert "api-1" not in {b["backup_id"] for b in listing["backups"]}
    problem(await http.delete("/api/v1/backups/api-1", headers=ADMIN), 404)

    # Mutations are audited with the backup as the target.
    audit = (await http.get("/api/v1/audit", params={"action": "backup.delete"}, headers=ADMIN)).json()
    records = audit.get("items") or audit.get("events") or []
    assert any(r["target"] == "backup:api-1" and r["result"] == "ok" for r in records), audit


async def test_unavailable_and_timeout(nats_url: str) -> None:
    async with serving(gateway_settings(nats_url, backup_timeout_seconds=0.5)) as (_, http):
        body = problem(await http.get("/api/v1/backups", headers=VIEWER), 503)
        assert "backup service" in body["detail"]
        assert (await http.get("/api/v1/backups", headers=VIEWER)).headers["retry-after"]
        problem(await http.post("/api/v1/backups", json={}, headers=ADMIN), 503)

        # A backup service that takes the request and never answers: 504.
        nc = await nats.connect(nats_url)
        seen: list[str] = []

        async def silent(msg: Msg) -> None:
            seen.append(msg.subject)

        try:
            await nc.subscribe(rpc.LIST, queue=rpc.QUEUE_GROUP, cb=silent)
            await nc.flush()
            body = problem(await http.get("/api/v1/backups", headers=VIEWER), 504)
            assert "FABRIK_BACKUP_TIMEOUT_SECONDS" in body["detail"]
            assert seen == [rpc.LIST]
        finally:
            await nc.close()


def cli(api: str, home: Path, *args: str, roles: object = "admin") -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "FABRIK_TOKEN"}
    env.update(
        FABRIK_API_URL=api,
        FABRIK_HOME=str(home),
        HOME=str(home),
        XDG_CONFIG_HOME=str(home / "config"),
        FABRIK_TOKEN=token(roles, "cli@example.com"),
    )
    return subprocess.run(
        [sys.executable, "-m", "fabrik_cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=ROOT,
        input="",
        check=False,
    )


async def test_cli_round_trip(stack: Stack, tmp_path: Path) -> None:
    await scratch_stream(stack.nats_url, 20)
    home = tmp_path / "home"
    home.mkdir()

    created = await asyncio.to_thread(cli, stack.api, home, "backup", "create", "--id", "cli-1", "--wait")
    assert created.returncode == 0, created.stderr
    assert "succeeded" in created.stdout and "backup" in created.stderr  # progress on stderr

    listed = await asyncio.to_thread(cli, stack.api, home, "backup", "list", "--json", roles="viewer")
    assert listed.returncode == 0, listed.stderr
    backups = json.loads(listed.stdout)["backups"]
    assert [b["backup_id"] for b in backups if b["complete"]] == ["cli-1"]
    table = backups_table(json.loads(listed.stdout))
    assert "cli-1" in table and "complete" in table and "never" in table, table

    refused = await asyncio.to_thread(cli, stack.api, home, "backup", "create", roles="viewer")
    assert refused.returncode == 1 and "403" in refused.stderr

    schedule = await asyncio.to_thread(cli, stack.api, home, "backup", "schedule", "show", roles="viewer")
    assert schedule.returncode == 0 and "0 3 1 1 *" in schedule.stdout
    assert "FABRIK_BACKUP_SCHEDULE" in schedule.stdout
