"""Runs end to end over real processes: NATS, gateway, scheduler, executor; and chaos on each of them.

Everything here is the real thing: a nats-server, the services as their own processes, the hello
workload as a process of the local executor backend, and HTTP calls to the gateway.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest

from fabrik_common.natsserver import NatsServer, free_port
from fabrik_common.testing import ServiceProcess
from fabrik_gateway.auth.jwt import mint_hs256

ROOT = Path(__file__).resolve().parents[2]
HELLO = ROOT / "examples" / "hello"
SPEC = HELLO / "spec.json"
TERMINAL = {"succeeded", "failed", "cancelled", "timed_out", "budget_exceeded"}
JWT_SECRET = "e2e-secret-of-at-least-32-bytes-long!"


def api_client() -> httpx.Client:
    token = mint_hs256(JWT_SECRET, "ci@example.com", {"demo": "developer"}, ttl_seconds=3600)
    return httpx.Client(timeout=10, headers={"Authorization": f"Bearer {token}"})


@dataclass
class Stack:
    """NATS plus the three services a run needs, each a process the test can kill."""

    tmp: Path
    nats: NatsServer
    env: dict[str, str]
    services: dict[str, ServiceProcess] = field(default_factory=dict)

    def start(self, name: str, *, instance: str | None = None, key: str | None = None) -> ServiceProcess:
        key = key or name
        env = dict(self.env)
        env["FABRIK_INSTANCE_ID"] = instance or f"e2e-{key}"
        proc = ServiceProcess(f"fabrik_{name}", env, log_path=self.tmp / f"{key}.log")
        proc.start(ready_timeout=40)
        self.services[key] = proc
        return proc

    @property
    def api(self) -> str:
        return f"{self.services['gateway'].base_url}/api/v1"

    def stop_all(self) -> None:
        for proc in self.services.values():
            proc.kill()


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    nats = NatsServer(tmp_path / "nats")
    nats.start()
    env = {
        "FABRIK_NATS_URL": nats.url,
        "FABRIK_DATA_DIR": str(tmp_path / "executor"),
        "FABRIK_LOG_FORMAT": "json",
        "FABRIK_LEASE_TTL_SECONDS": "3",
        "FABRIK_DISPATCH_INTERVAL_SECONDS": "0.2",
        "FABRIK_REAPER_INTERVAL_SECONDS": "1",
        "FABRIK_SNAPSHOT_INTERVAL_SECONDS": "0.5",
        "FABRIK_CANCEL_GRACE_SECONDS": "3",
        "FABRIK_SHUTDOWN_GRACE_SECONDS": "5",
        # A real credential, as a CI job would hold: a developer in the runs' project.
        "FABRIK_JWT_HS256_SECRET": JWT_SECRET,
    }
    s = Stack(tmp_path, nats, env)
    try:
        yield s
    finally:
        s.stop_all()
        nats.stop()


def hello_command(steps: int = 6, step_seconds: float = 0.3) -> dict[str, Any]:
    return {
        "command": [sys.executable, str(HELLO / "workload.py")],
        "env": {"HELLO_STEPS": str(steps), "HELLO_STEP_SECONDS": str(step_seconds)},
    }


def submit(client: httpx.Client, api: str, **body: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {"project": "demo", "spec": json.loads(SPEC.read_text()), **body}
    response = client.post(f"{api}/runs", json=payload)
    assert response.status_code == 201, response.text
    run: dict[str, Any] = response.json()
    return run


def get_run(client: httpx.Client, api: str, run_id: str) -> dict[str, Any]:
    response = client.get(f"{api}/runs/{run_id}")
    assert response.status_code == 200, response.text
    run: dict[str, Any] = response.json()
    return run


def wait_for(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (httpx.HTTPError, AssertionError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


def wait_state(
    client: httpx.Client, api: str, run_id: str, states: set[str], timeout: float = 60
) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        run = get_run(client, api, run_id)
        return run if run["state"] in states else None

    result: dict[str, Any] = wait_for(check, timeout, f"run {run_id} to reach {sorted(states)}")
    return result


def events_of(client: httpx.Client, api: str, run_id: str) -> list[dict[str, Any]]:
    response = client.get(f"{api}/runs/{run_id}/events")
    assert response.status_code == 200, response.text
    body = response.json()
    items: list[dict[str, Any]] = body["items"] if isinstance(body, dict) else body
    return [item.get("event", item) for item in items]


def log_texts(client: httpx.Client, api: str, run_id: str) -> list[str]:
    response = client.get(f"{api}/runs/{run_id}/logs")
    assert response.status_code == 200, response.text
    body = response.json()
    lines = body["lines"] if isinstance(body, dict) else body
    return [line["text"] for line in lines]


def test_submit_progress_logs_cancel_resume_over_real_processes(stack: Stack) -> None:
    for name in ("gateway", "scheduler", "executor"):
        stack.start(name)
    with api_client() as client:
        first = submit(client, stack.api, workload=hello_command(steps=6, step_seconds=0.3))
        run_id = first["run_id"]
        assert first["state"] == "queued"

        seen_progress = wait_for(
            lambda: (get_run(client, stack.api, run_id)["progress"] or {}).get("finished"),
            30,
            "progress of the first run",
        )
        assert seen_progress >= 1
        done = wait_state(client, stack.api, run_id, TERMINAL)
        assert done["state"] == "succeeded", done
        assert done["exit_code"] == 0
        assert done["progress"]["finished"] == done["progress"]["total"] == 6
        texts = log_texts(client, stack.api, run_id)
        assert any("hello" in t.lower() for t in texts)
        kinds = [e["type"] for e in events_of(client, stack.api, run_id)]
        for kind in ("run.requested", "run.queued", "run.dispatched", "run.started", "run.finished"):
            assert kind in kinds
        assert kinds.index("run.started") < kinds.index("run.finished")

        # A second run, cancelled mid-way, then resumed: it continues from its checkpoint.
        second = submit(client, stack.api, workload=hello_command(steps=8, step_seconds=0.5))
        second_id = second["run_id"]
        wait_for(
            lambda: ((get_run(client, stack.api, second_id)["progress"] or {}).get("finished") or 0) >= 2,
            30,
            "the second run to make progress",
        )
        assert client.post(f"{stack.api}/runs/{second_id}/cancel").status_code == 202
        cancelled = wait_state(client, stack.api, second_id, TERMINAL)
        assert cancelled["state"] == "cancelled", cancelled
        assert client.post(f"{stack.api}/runs/{second_id}/cancel").status_code == 409

        assert client.post(f"{stack.api}/runs/{second_id}/resume").status_code == 202
        # The read model still shows attempt 1's end until the scheduler has taken the resume.
        resumed = wait_for(
            lambda: (
                (r := get_run(client, stack.api, second_id))["attempt"] == 2 and r["state"] in TERMINAL and r
            ),
            60,
            "attempt 2 to end",
        )
        assert resumed["state"] == "succeeded", resumed
        assert client.post(f"{stack.api}/runs/{second_id}/resume").status_code == 409
        texts = log_texts(client, stack.api, second_id)
        assert any("resum" in t.lower() for t in texts), texts[-10:]


def test_executor_killed_mid_run_reattaches_and_finishes(stack: Stack) -> None:
    for name in ("gateway", "scheduler", "executor"):
        stack.start(name)
    with api_client() as client:
        run = submit(client, stack.api, workload=hello_command(steps=10, step_seconds=0.4))
        run_id = run["run_id"]
        wait_state(client, stack.api, run_id, {"running"}, timeout=30)
        os.kill(stack.services["executor"].proc.pid, signal.SIGKILL)  # type: ignore[union-attr]
        stack.services["executor"].proc.wait()  # type: ignore[union-attr]
        time.sleep(1.0)
        stack.start("executor", key="executor-2")
        done = wait_state(client, stack.api, run_id, TERMINAL, timeout=60)
        assert done["state"] == "succeeded", done
        assert done["attempt"] == 1
        finished = [e for e in events_of(client, stack.api, run_id) if e["type"] == "run.finished"]
        assert len(finished) == 1


def test_scheduler_leader_killed_with_standby_running(stack: Stack) -> None:
    stack.start("gateway")
    stack.start("executor")
    stack.start("scheduler", instance="leader", key="scheduler-a")
    time.sleep(1.0)
    stack.start("scheduler", instance="standby", key="scheduler-b")
    with api_client() as client:
        runs = [
            submit(client, stack.api, workload=hello_command(steps=3, step_seconds=0.3)) for _ in range(6)
        ]
        wait_for(
            lambda: any(get_run(client, stack.api, r["run_id"])["state"] != "queued" for r in runs),
            30,
            "a first dispatch",
        )
        leader = stack.services["scheduler-a"]
        os.kill(leader.proc.pid, signal.SIGKILL)  # type: ignore[union-attr]
        more = [
            submit(client, stack.api, workload=hello_command(steps=2, step_seconds=0.2)) for _ in range(3)
        ]
        for r in runs + more:
            done = wait_state(client, stack.api, r["run_id"], TERMINAL, timeout=90)
            assert done["state"] == "succeeded", done
        for r in runs + more:
            dispatches = Counter(
                e.get("attempt")
                for e in events_of(client, stack.api, r["run_id"])
                if e["type"] == "run.dispatched"
            )
            assert dispatches == {1: 1}, (r["run_id"], dispatches)


def test_nats_restart_mid_flight_loses_nothing(stack: Stack) -> None:
    for name in ("gateway", "scheduler", "executor"):
        stack.start(name)
    with api_client() as client:
        runs = [
            submit(client, stack.api, workload=hello_command(steps=8, step_seconds=0.4)) for _ in range(3)
        ]
        wait_for(
            lambda: all(get_run(client, stack.api, r["run_id"])["state"] == "running" for r in runs),
            40,
            "every run to be running",
        )
        stack.nats.restart()
        late = submit_when_ready(client, stack.api)
        for r in [*runs, late]:
            done = wait_state(client, stack.api, r["run_id"], TERMINAL, timeout=90)
            assert done["state"] == "succeeded", done
            finished = [e for e in events_of(client, stack.api, r["run_id"]) if e["type"] == "run.finished"]
            assert len(finished) == 1


def submit_when_ready(client: httpx.Client, api: str) -> dict[str, Any]:
    """After a NATS restart the gateway answers 503 until it is connected again: retry like a client."""
    payload = {"project": "demo", "spec": json.loads(SPEC.read_text()), "workload": hello_command(2, 0.2)}

    def attempt() -> dict[str, Any] | None:
        response = client.post(f"{api}/runs", json=payload, headers={"Idempotency-Key": "after-restart"})
        if response.status_code in (200, 201):
            run: dict[str, Any] = response.json()
            return run
        assert response.status_code == 503, response.text
        return None

    result: dict[str, Any] = wait_for(attempt, 30, "the gateway to accept runs again")
    return result


def test_fabrik_up_and_down_run_hello(tmp_path: Path) -> None:
    """The laptop path: `fabrik up`, a run through the CLI with --wait, `fabrik down`."""
    ports = {
        name: free_port() for name in ("gateway", "llm-proxy", "scheduler", "executor", "optimizer", "backup")
    }
    args = [sys.executable, "-m", "fabrik_cli", "up", "--data-dir", str(tmp_path / "data")]
    args += ["--nats-port", str(free_port()), "--port", str(ports["gateway"])]
    for name, port in ports.items():
        if name != "gateway":
            args += ["--service-port", f"{name}={port}"]
    env = {**os.environ, "FABRIK_HOME": str(tmp_path / "data")}
    up = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        api = f"http://127.0.0.1:{ports['gateway']}"
        wait_for(
            lambda: httpx.get(f"{api}/readyz", timeout=2).status_code == 200, 60, "the gateway of fabrik up"
        )
        cli = [sys.executable, "-m", "fabrik_cli"]
        cli_env = {**env, "FABRIK_API_URL": api}
        result = subprocess.run(
            [
                *cli,
                "run",
                "--project",
                "demo",
                "--spec",
                str(SPEC),
                "--wait",
                "-o",
                "json",
                "--env-var",
                "HELLO_STEP_SECONDS=0.1",
                "--",
                sys.executable,
                str(HELLO / "workload.py"),
            ],
            env=cli_env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        # The workload's one LLM call went through this stack's llm-proxy with the run's own key
        # (answered offline by echo) and is accounted on the run.
        run = json.loads(result.stdout)
        assert run["state"] == "succeeded"
        assert run["tokens"]["input"] > 0
        assert run["tokens"]["output"] > 0
        assert run["cost_usd"] == 0.0  # echo's price
        down = subprocess.run(
            [*cli, "down", "--data-dir", str(tmp_path / "data")],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert down.returncode == 0, down.stdout + down.stderr
        assert up.wait(30) == 0
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()


def test_run_configuration_defaults_reach_the_workload(stack: Stack) -> None:
    """Model and harness values of the run configuration (what a rollout writes to the `config`
    bucket) arrive in the workload's environment through the real scheduler and executor."""
    for name in ("gateway", "scheduler", "executor"):
        stack.start(name)

    async def roll_out() -> None:
        # What the optimizer writes when a model and a harness experiment have shipped.
        client = await nats.connect(stack.nats.url)
        try:
            kv = await client.jetstream().key_value("config")
            defaults = {"overrides": {"model": "gpt-rolled-out", "harness.depth": 3}, "revision": 1}
            await kv.put("defaults", json.dumps(defaults).encode())
        finally:
            await client.close()

    asyncio.run(roll_out())
    show = (
        "import os; print('config', os.environ.get('FABRIK_MODEL'), os.environ.get('FABRIK_HARNESS_DEPTH'))"
    )
    with api_client() as client:
        run = submit(client, stack.api, workload={"command": [sys.executable, "-c", show]})
        done = wait_state(client, stack.api, run["run_id"], {"succeeded", "failed"})
        assert done["state"] == "succeeded", done
        texts = log_texts(client, stack.api, run["run_id"])
    assert "config gpt-rolled-out 3" in texts, texts
