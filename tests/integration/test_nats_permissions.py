"""The NATS users of the umbrella chart, enforced by a real nats-server.

The permission lists are read from `charts/fabrik/values.yaml` (`nats.config.merge.authorization`,
what the official NATS chart merges into `nats.conf`), turned into a server configuration with
real passwords, and every service runs as a child process connected as its own user, as the
chart connects it. A run goes through the whole path (gateway, scheduler, executor with the local
backend), an LLM call through the llm-proxy, the optimizer and backup answer their RPCs through
the gateway, and the server must log no permission violation meanwhile. Then each user is tried
on something its service must not do: delete or purge a stream, write another service's bucket,
steal another service's durable consumer, read every event on the core subjects.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest
import yaml
from nats.js import api

from fabrik_common.ids import new_ulid
from fabrik_common.natsserver import NatsServer, nats_server_binary
from fabrik_common.runkeys import issue_run_key
from fabrik_common.testing import ServiceProcess

ROOT = Path(__file__).resolve().parents[2]
HELLO = ROOT / "examples" / "hello"
SERVICES = ("gateway", "scheduler", "executor", "backup", "llm-proxy", "optimizer")
FAST = {
    "FABRIK_DISPATCH_INTERVAL_SECONDS": "0.2",
    "FABRIK_SNAPSHOT_INTERVAL_SECONDS": "0.5",
    "FABRIK_REAPER_INTERVAL_SECONDS": "1",
    "FABRIK_SHUTDOWN_GRACE_SECONDS": "3",
}
VIOLATION = " Violation - "  # the server logs "Publish Violation - ..." and "Subscription Violation - ..."

pytestmark = pytest.mark.slow


def chart_users() -> list[dict[str, Any]]:
    values = yaml.safe_load((ROOT / "charts" / "fabrik" / "values.yaml").read_text())
    users: list[dict[str, Any]] = values["nats"]["config"]["merge"]["authorization"]["users"]
    return users


def server_config(passwords: dict[str, str]) -> dict[str, Any]:
    """The chart's users with the passwords the NATS pod would read from its environment."""
    users = []
    for user in chart_users():
        variable = user["password"].removeprefix("<< $").removesuffix(" >>")
        users.append({**user, "password": passwords[variable]})
    return {"authorization": {"users": users}}


class AuthorizingNatsServer(NatsServer):
    """`NatsServer` with a configuration file (the authorization block) besides its flags."""

    def __init__(self, store_dir: Path, config: dict[str, Any]) -> None:
        super().__init__(store_dir)
        self.config_file = store_dir.parent / "nats.conf"
        self.config_file.parent.mkdir(parents=True, exist_ok=True)
        # nats.conf accepts JSON; it is what the chart writes too.
        self.config_file.write_text(json.dumps(config, indent=2))

    def _start_once(self, timeout: float) -> None:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        args = [
            nats_server_binary(),
            "--config",
            str(self.config_file),
            "--jetstream",
            "--store_dir",
            str(self.store_dir),
            "--addr",
            self.host,
            "--port",
            str(self.port),
            "--http_port",
            str(self.monitor_port),
            "--server_name",
            self.server_name,
        ]
        with self.log_file.open("ab") as log:
            self._proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_healthy(timeout)

    def url_for(self, user: str, password: str) -> str:
        return f"nats://{user}:{password}@{self.host}:{self.port}"


@dataclass
class Stack:
    nats: AuthorizingNatsServer
    passwords: dict[str, str]
    run_key_secret: str
    services: dict[str, ServiceProcess] = field(default_factory=dict)
    refusals_tried: bool = False

    def password(self, service: str) -> str:
        return self.passwords["PASS_" + service.upper().replace("-", "_")]

    def url(self, service: str) -> str:
        return self.nats.url_for(f"fabrik-{service}", self.password(service))

    def log_size(self) -> int:
        return self.nats.log_file.stat().st_size

    def violations(self, since: int = 0) -> list[str]:
        with self.nats.log_file.open("rb") as log:
            log.seek(since)
            text = log.read().decode(errors="replace")
        return [line for line in text.splitlines() if VIOLATION in line]

    def logs(self) -> str:
        parts = [f"--- nats\n{self.nats.log_file.read_text(errors='replace')[-4000:]}"]
        for name, proc in self.services.items():
            if proc.log_path is not None and proc.log_path.exists():
                parts.append(f"--- {name}\n{proc.log_path.read_text(errors='replace')[-3000:]}")
        return "\n".join(parts)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("nats-permissions")
    variables = {u["password"].removeprefix("<< $").removesuffix(" >>") for u in chart_users()}
    passwords = {v: secrets.token_urlsafe(24) for v in variables}
    server = AuthorizingNatsServer(root / "nats" / "store", server_config(passwords))
    server.start()
    s = Stack(server, passwords, secrets.token_hex(32))
    try:
        for service in SERVICES:
            module = "fabrik_" + service.replace("-", "_")
            s.services[service] = ServiceProcess(
                module,
                {
                    "FABRIK_NATS_URL": s.url(service),
                    "FABRIK_RUN_KEY_SECRET": s.run_key_secret,
                    "FABRIK_ANONYMOUS_ROLE": "admin",
                    "FABRIK_DATA_DIR": str(root / service),
                    "FABRIK_INSTANCE_ID": f"test-{service}",
                    "PYTHONUNBUFFERED": "1",
                    **FAST,
                },
                log_path=root / f"{service}.log",
            )
        proxy = s.services["llm-proxy"]
        for name, proc in s.services.items():
            if name != "llm-proxy":
                proc.env["FABRIK_LLM_PROXY_URL"] = proxy.base_url
            proc.start_process()
        for proc in s.services.values():
            proc.wait_ready(90)
        yield s
    finally:
        for proc in s.services.values():
            proc.kill()
        server.stop()


def cli(stack: Stack, home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FABRIK_API_URL": stack.services["gateway"].base_url, "FABRIK_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "fabrik_cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=ROOT,
    )


def test_every_service_works_under_its_own_user(stack: Stack, tmp_path: Path) -> None:
    # from the start: the services' own start (topology, consumers, leases) is part of the check,
    # while the refusals of the other test (same server, any order) must not count
    since = 0 if not stack.refusals_tried else stack.log_size()
    # the run path: gateway -> scheduler -> executor (local) -> scheduler -> gateway
    hello = [
        "run",
        "--project",
        "demo",
        "--spec",
        str(HELLO / "spec.json"),
        "--repo",
        str(HELLO),
        "--env-var",
        "HELLO_STEPS=3",
        "--env-var",
        "HELLO_STEP_SECONDS=0.1",
        "--wait",
        "--",
        sys.executable,
        "workload.py",
    ]
    run = cli(stack, tmp_path, *hello)
    assert run.returncode == 0, run.stderr + stack.logs()
    run_id = run.stdout.split()[0]
    listed = cli(stack, tmp_path, "runs", "list", "-o", "json")
    assert listed.returncode == 0, listed.stderr
    assert run_id in listed.stdout
    logs = cli(stack, tmp_path, "logs", run_id)
    assert logs.returncode == 0, logs.stderr

    # an LLM call under a run key: the llm-proxy publishes its usage, the optimizer books it
    key = issue_run_key(
        stack.run_key_secret.encode(),
        run_id=new_ulid(),
        project="demo",
        budget_usd=5.0,
        expires_at=datetime.now(UTC) + timedelta(hours=1),
    )
    proxy = stack.services["llm-proxy"].base_url
    chat = httpx.post(
        f"{proxy}/v1/chat/completions",
        json={"model": "gpt-4o", "messages": [{"role": "user", "content": "ping"}]},
        headers={"Authorization": f"Bearer {key}"},
        timeout=30,
    )
    assert chat.status_code == 200, chat.text

    # RPCs the gateway makes to the optimizer and the backup service, and its own buckets
    gateway = stack.services["gateway"].base_url
    with httpx.Client(base_url=gateway, timeout=30) as http:
        for path in (
            "/api/v1/costs",
            "/api/v1/budgets",
            "/api/v1/experiments",
            "/api/v1/backups",
            "/api/v1/queue",
            "/api/v1/schedules",
            "/api/v1/audit",
        ):
            response = http.get(path)
            assert response.status_code == 200, f"{path}: {response.status_code} {response.text}"
        token = http.post("/api/v1/tokens", json={"name": "ci", "role": "viewer"})
        assert token.status_code in (200, 201), token.text
        events = http.get("/api/v1/runs/" + run_id + "/events")
        assert events.status_code == 200, events.text

    # Every durable consumer has processed and acked everything: an ack the server dropped would
    # leave it pending.
    unsettled = asyncio.run(_unsettled_consumers(stack))
    assert unsettled == {}, unsettled
    assert "LLM" in asyncio.run(_streams_with_messages(stack))
    assert stack.violations(since) == [], stack.logs()


async def _admin(stack: Stack) -> Any:
    return await nats.connect(stack.nats.url_for("fabrik-admin", stack.passwords["PASS_ADMIN"]))


async def _unsettled_consumers(stack: Stack, timeout: float = 20.0) -> dict[str, tuple[int, int]]:
    nc = await _admin(stack)
    try:
        js = nc.jetstream()
        deadline = time.monotonic() + timeout
        while True:
            unsettled: dict[str, tuple[int, int]] = {}
            for stream in ("RUNS", "LLM", "INGEST", "OPS"):
                for info in await js.consumers_info(stream):
                    if info.config.durable_name and (info.num_pending or info.num_ack_pending):
                        unsettled[f"{stream}/{info.name}"] = (
                            info.num_pending or 0,
                            info.num_ack_pending or 0,
                        )
            if not unsettled or time.monotonic() > deadline:
                return unsettled
            await asyncio.sleep(0.5)
    finally:
        await nc.close()


async def _streams_with_messages(stack: Stack) -> set[str]:
    nc = await _admin(stack)
    try:
        return {
            i.config.name for i in await nc.jetstream().streams_info() if i.state.messages and i.config.name
        }
    finally:
        await nc.close()


async def _refused(service: str, stack: Stack, action: Any) -> None:
    """Runs `action(nc, js)` as the service's user: it fails, and the server says why."""
    stack.refusals_tried = True
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    nc = await nats.connect(stack.url(service), error_cb=on_error, allow_reconnect=False)
    try:
        js = nc.jetstream(timeout=2)
        with pytest.raises(Exception):  # noqa: B017, PT011 - a timeout or a permission error, by client path
            await action(nc, js)
        await asyncio.sleep(0.3)
    finally:
        await nc.close()
    assert any("permissions violation" in e.lower() for e in errors), (service, errors)


async def test_what_a_service_must_not_do_is_refused(stack: Stack) -> None:
    async def delete_runs(nc: Any, js: Any) -> None:
        await js.delete_stream("RUNS")

    async def purge_logs(nc: Any, js: Any) -> None:
        await js.purge_stream("LOGS")

    async def write_runs_bucket(nc: Any, js: Any) -> None:
        kv = await js.key_value("runs")
        await kv.put("01JX2Y3Z4A5B6C7D8E9F0G1H2J", b"{}")

    async def write_config_bucket(nc: Any, js: Any) -> None:
        kv = await js.key_value("config")
        await kv.put("defaults", b"{}")

    async def steal_dispatches(nc: Any, js: Any) -> None:
        sub = await js.pull_subscribe_bind("executor-dispatched", "RUNS")
        await sub.fetch(1, timeout=1)

    async def forge_a_finished_run(nc: Any, js: Any) -> None:
        await js.publish("fabrik.runs.finished.01JX2Y3Z4A5B6C7D8E9F0G1H2J", b"{}")

    async def snoop_on_events(nc: Any, js: Any) -> None:
        await nc.subscribe("fabrik.>")
        await nc.flush(timeout=1)
        await asyncio.sleep(0.5)
        raise RuntimeError("the subscription was sent; the server answers asynchronously")

    async def capture_replies_in_a_stream(nc: Any, js: Any) -> None:
        await js.add_stream(api.StreamConfig(name="SNOOP", subjects=["_INBOX.>"]))

    cases = [
        ("llm-proxy", delete_runs),
        ("gateway", delete_runs),
        ("executor", purge_logs),
        ("llm-proxy", write_runs_bucket),
        ("gateway", write_runs_bucket),
        ("executor", write_config_bucket),
        ("gateway", steal_dispatches),
        ("llm-proxy", forge_a_finished_run),
        ("scheduler", forge_a_finished_run),
        ("executor", snoop_on_events),
        ("optimizer", capture_replies_in_a_stream),
    ]
    for service, action in cases:
        await _refused(service, stack, action)
    # nothing of the above happened
    admin = await _admin(stack)
    try:
        js = admin.jetstream()
        await js.stream_info("RUNS")
        assert "SNOOP" not in {s.config.name for s in await js.streams_info()}
    finally:
        await admin.close()
