"""The `fabrik` run commands against the real gateway (and scheduler and executor) over a real NATS.

The CLI runs as an operator runs it: `python -m fabrik_cli ...` in a subprocess, talking HTTP to a
gateway started with `ServiceProcess`, with its own empty data directory so that no local stack of
the machine is found.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from fabrik_common.natsserver import free_port
from fabrik_common.testing import ServiceProcess

ROOT = Path(__file__).resolve().parents[2]
HELLO = ROOT / "examples" / "hello"
UNKNOWN_RUN = "01JDXKZ0000000000000000000"


class Cli:
    """`fabrik` as a subprocess, pointed at one API."""

    def __init__(self, api: str, home: Path) -> None:
        self.api = api
        home.mkdir(parents=True, exist_ok=True)
        self.env = {
            **os.environ,
            "FABRIK_API_URL": api,
            "FABRIK_HOME": str(home),  # no state file here: the URL comes from FABRIK_API_URL
        }

    def __call__(self, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "fabrik_cli", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env,
            cwd=ROOT,
        )

    def json(self, *args: str) -> Any:
        """The command with `-o json` (before a `--`), its stdout decoded."""
        cut = args.index("--") if "--" in args else len(args)
        result = self(*args[:cut], "-o", "json", *args[cut:])
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def wait_for_state(self, run_id: str, states: set[str], timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            run: dict[str, Any] = self.json("runs", "show", run_id)
            if run["state"] in states:
                return run
            assert time.monotonic() < deadline, f"run {run_id} still {run['state']}, wanted {states}"
            time.sleep(0.2)


def _service(module: str, env: dict[str, str], tmp_path: Path) -> ServiceProcess:
    name = module.removeprefix("fabrik_")
    return ServiceProcess(module, env, log_path=tmp_path / f"{name}.log")


def _start(procs: list[ServiceProcess]) -> None:
    for proc in procs:
        proc.start_process()
    for proc in procs:
        proc.wait_ready(60)


# As `fabrik up` runs it; the CLI's credentials are tested in test_cli_auth.py.
ANONYMOUS_ADMIN = {"FABRIK_ANONYMOUS_ROLE": "admin"}


@pytest.fixture
def gateway_only(nats_url: str, tmp_path: Path) -> Iterator[Cli]:
    gateway = _service("fabrik_gateway", {"FABRIK_NATS_URL": nats_url, **ANONYMOUS_ADMIN}, tmp_path)
    try:
        _start([gateway])
        yield Cli(gateway.base_url, tmp_path / "cli-home")
    finally:
        gateway.kill()


@pytest.fixture
def platform(nats_url: str, tmp_path: Path) -> Iterator[Cli]:
    """Gateway, scheduler and executor (local backend): enough for runs end to end."""
    common = {"FABRIK_NATS_URL": nats_url}
    procs = [
        _service("fabrik_gateway", {**common, **ANONYMOUS_ADMIN}, tmp_path),
        _service("fabrik_scheduler", common, tmp_path),
        _service("fabrik_executor", {**common, "FABRIK_DATA_DIR": str(tmp_path / "data")}, tmp_path),
    ]
    try:
        _start(procs)
        yield Cli(procs[0].base_url, tmp_path / "cli-home")
    finally:
        for proc in procs:
            proc.kill()


def _hello_args(*extra: str, steps: int = 4, step_seconds: float = 0.1) -> list[str]:
    return [
        "run",
        "--project",
        "demo",
        "--spec",
        str(HELLO / "spec.json"),
        "--repo",
        str(HELLO),
        "--env-var",
        f"HELLO_STEPS={steps}",
        "--env-var",
        f"HELLO_STEP_SECONDS={step_seconds}",
        "--label",
        "example=hello",
        *extra,
        "--",
        sys.executable,
        "workload.py",
    ]


# --------------------------------------------------------------------------------------------
# Offline


def test_spec_validate_valid_and_invalid(tmp_path: Path) -> None:
    cli = Cli(f"http://127.0.0.1:{free_port()}", tmp_path / "home")

    ok = cli("spec", "validate", str(HELLO / "spec.json"))
    assert ok.returncode == 0, ok.stderr
    assert "valid spec" in ok.stdout

    spec = json.loads((HELLO / "spec.json").read_text())
    del spec["title"]
    spec["goals"] = "one goal"
    spec["nonGoal"] = []
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(spec))
    result = cli("spec", "validate", str(bad))
    assert result.returncode == 2
    lines = result.stdout.splitlines()
    assert "  title: is required" in lines
    assert any(line.startswith("  goals: must be an array") for line in lines)
    assert "  nonGoal: is not a known field" in lines

    report = json.loads(cli("spec", "validate", str(bad), "-o", "json").stdout)
    assert report["valid"] is False
    assert {e["field"] for e in report["errors"]} == {"title", "goals", "nonGoal"}

    todo = tmp_path / "todo.yaml"
    todo.write_text(
        "v: 1\nid: t\ntdd: true\ndod: [tests pass]\n"
        "tasks:\n  - {id: a, do: x, verify: y}\n  - {id: a, do: z, verify: w}\n"
    )
    result = cli("spec", "validate", "--todo", str(todo))
    assert result.returncode == 2
    assert "tasks[1].id: duplicates the id of tasks[0]" in result.stdout


def test_unreachable_api_says_how_to_start_the_stack(tmp_path: Path) -> None:
    cli = Cli(f"http://127.0.0.1:{free_port()}", tmp_path / "home")
    result = cli("runs", "list")
    assert result.returncode == 1
    assert "cannot reach the Fabrik API" in result.stderr
    assert "connection refused" in result.stderr
    assert "fabrik up" in result.stderr
    assert "Traceback" not in result.stderr


def test_invalid_spec_is_rejected_before_anything_is_sent(tmp_path: Path) -> None:
    cli = Cli(f"http://127.0.0.1:{free_port()}", tmp_path / "home")  # nothing listens
    bad = tmp_path / "spec.json"
    bad.write_text(json.dumps({"v": 1, "id": "x"}))
    result = cli("run", "--project", "demo", "--spec", str(bad), "--", "true")
    assert result.returncode == 2
    assert "spec.title: is required" in result.stderr
    assert "cannot reach" not in result.stderr


# --------------------------------------------------------------------------------------------
# Gateway only


@pytest.mark.slow
def test_bad_input_is_named_and_exits_2(gateway_only: Cli) -> None:
    cli = gateway_only
    result = cli("run", "--project", "Bad_Project", "--", "true")
    assert result.returncode == 2, result.stderr
    assert "project: must be a DNS-1123 label" in result.stderr
    assert "422" in result.stderr

    result = cli(
        "run",
        "--project",
        "demo",
        "--cpu",
        "lots",
        "--memory",
        "1Gi",
        "--env-var",
        "FABRIK_X=1",
        "--",
        "true",
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert any(line.startswith("  resources.cpu: ") and line.endswith("(--cpu)") for line in lines)
    assert any(
        line.startswith("  workload.env.FABRIK_X: ") and line.endswith("(--env-var)") for line in lines
    )

    # nothing was created by the rejected requests
    page = cli.json("runs", "list")
    assert page["items"] == []
    assert page["next_cursor"] is None


@pytest.mark.slow
def test_unknown_run_and_read_commands(gateway_only: Cli) -> None:
    cli = gateway_only
    result = cli("runs", "show", UNKNOWN_RUN)
    assert result.returncode == 1
    assert "404" in result.stderr
    assert UNKNOWN_RUN in result.stderr

    queue = cli.json("queue")
    assert queue["items"] == []
    assert yaml.safe_load(cli("queue", "-o", "yaml").stdout) == queue
    assert cli("queue").returncode == 0

    result = cli("runs", "list", "--state", "running", "--label", "a=b", "--all")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("RUN ID")


@pytest.mark.slow
def test_submit_prints_the_run_id_and_json_is_the_apis(gateway_only: Cli) -> None:
    cli = gateway_only
    result = cli("run", "--project", "demo", "--label", "k=v", "--", "true")
    assert result.returncode == 0, result.stderr
    run_id = result.stdout.strip()
    assert len(run_id) == 26

    created = cli.json("run", "--project", "demo", "--idempotency-key", "same-1", "--", "true")
    again = cli.json("run", "--project", "demo", "--idempotency-key", "same-1", "--", "true")
    assert again["run_id"] == created["run_id"]

    shown = cli.json("runs", "show", run_id)
    assert shown["run_id"] == run_id
    assert shown["labels"] == {"k": "v"}
    listed = cli.json("runs", "list", "--project", "demo", "--label", "k=v")
    assert [r["run_id"] for r in listed["items"]] == [run_id]

    table = cli("runs", "show", run_id)
    assert table.returncode == 0, table.stderr
    assert "k=v" in table.stdout
    assert "demo" in table.stdout


# --------------------------------------------------------------------------------------------
# Gateway, scheduler and executor


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_hello_run_wait_succeeds_and_show_logs_cancel(platform: Cli) -> None:
    cli = platform
    result = cli(*_hello_args("--wait"))
    assert result.returncode == 0, result.stderr
    run_id = result.stdout.splitlines()[0]
    assert f"run {run_id} succeeded" in result.stderr

    shown = cli("runs", "show", run_id)
    assert shown.returncode == 0, shown.stderr
    assert "succeeded" in shown.stdout
    assert "4/4" in shown.stdout
    assert "example=hello" in shown.stdout

    run = cli.json("runs", "show", run_id)
    assert run["state"] == "succeeded"
    assert run["exit_code"] == 0
    assert run["progress"]["finished"] == run["progress"]["total"] == 4
    assert yaml.safe_load(cli("runs", "show", run_id, "-o", "yaml").stdout) == run

    logs = cli("logs", run_id)
    assert logs.returncode == 0, logs.stderr
    assert "hello: wrote hello.txt" in logs.stdout
    assert "step 4/4: verify" in logs.stdout
    tail = cli("logs", run_id, "--tail", "1", "-o", "json")
    assert len(json.loads(tail.stdout)["lines"]) == 1

    listed = cli.json("runs", "list", "--project", "demo", "--state", "succeeded")
    assert run_id in [r["run_id"] for r in listed["items"]]
    events = cli.json("runs", "events", run_id)
    assert any(item["type"] == "run.finished" for item in events["items"])

    cancel = cli("cancel", run_id)
    assert cancel.returncode == 1
    first = cancel.stderr.splitlines()[0]
    assert first.startswith("Error: ")
    assert "(409)" in first
    assert "succeeded" in first  # the API's detail: why it cannot be cancelled


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_failing_workload_wait_exits_1(platform: Cli) -> None:
    cli = platform
    result = cli("run", "--project", "demo", "--wait", "--", sys.executable, "-c", "import sys; sys.exit(3)")
    assert result.returncode == 1, result.stderr
    run_id = result.stdout.splitlines()[0]
    assert f"run {run_id} failed" in result.stderr
    assert "exit code 3" in result.stderr
    run = cli.json("runs", "show", run_id)
    assert run["state"] == "failed"
    assert run["exit_code"] == 3


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_follow_streams_the_log_until_the_end(platform: Cli) -> None:
    cli = platform
    result = cli(*_hello_args("--follow"))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    run_id = lines[0]
    for step in range(1, 5):
        assert any(line.startswith(f"step {step}/4") for line in lines), result.stdout
    assert "hello: wrote hello.txt" in lines
    assert len([line for line in lines if line.startswith("step 1/4")]) == 1  # nothing twice
    assert f"run {run_id} succeeded" in result.stderr

    final = cli(*_hello_args("--follow", "-o", "json"))
    assert final.returncode == 0, final.stderr
    assert json.loads(final.stdout)["state"] == "succeeded"  # stdout: only the document


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_cancel_then_resume_continues_and_succeeds(platform: Cli) -> None:
    cli = platform
    # 30 s: long enough that the cancel lands mid-way even when every CLI start takes seconds on a
    # loaded machine (12 s was not); the resumed attempt runs only what is left.
    result = cli(*_hello_args(steps=100, step_seconds=0.3))
    assert result.returncode == 0, result.stderr
    run_id = result.stdout.strip()
    cli.wait_for_state(run_id, {"running"})
    time.sleep(1.5)

    cancel = cli("cancel", run_id, "--wait")
    assert cancel.returncode == 0, cancel.stderr
    assert f"cancel requested for run {run_id}" in cancel.stdout
    assert f"run {run_id} cancelled" in cancel.stderr
    again = cli("cancel", run_id)
    assert again.returncode == 1
    assert "409" in again.stderr

    resume = cli("resume", run_id, "--wait")
    assert resume.returncode == 0, resume.stderr
    assert f"run {run_id} succeeded" in resume.stderr
    run = cli.json("runs", "show", run_id)
    assert run["state"] == "succeeded"
    assert run["attempt"] == 2
    logs = cli("logs", run_id).stdout
    assert "hello: attempt 2 resumes after step" in logs


# --------------------------------------------------------------------------------------------
# Through `fabrik up`: the API URL comes from the local stack's state file


def _free_ports(count: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_up_run_down_finds_the_api_by_itself(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    services = ("llm-proxy", "scheduler", "executor", "optimizer", "backup")
    nats, monitor, gateway, *others = _free_ports(3 + len(services))
    args = ["up", "--port", str(gateway), "--nats-port", str(nats), "--nats-monitor-port", str(monitor)]
    for name, port in zip(services, others, strict=True):
        args += ["--service-port", f"{name}={port}"]
    env = {k: v for k, v in os.environ.items() if k not in ("FABRIK_API_URL", "XDG_DATA_HOME")}
    env["FABRIK_HOME"] = str(data_dir)
    with (tmp_path / "up.out").open("wb") as out:
        up = subprocess.Popen(
            [sys.executable, "-m", "fabrik_cli", *args], stdout=out, stderr=subprocess.STDOUT, env=env
        )
    try:
        deadline = time.monotonic() + 90
        while b"Fabrik local stack is up" not in (tmp_path / "up.out").read_bytes():
            assert up.poll() is None, (tmp_path / "up.out").read_text()
            assert time.monotonic() < deadline, "the stack did not come up"
            time.sleep(0.2)

        cli = Cli("unused", tmp_path / "unused")
        cli.env = env  # no FABRIK_API_URL: the gateway's URL is read from <data>/stack.json
        result = cli(*_hello_args("--wait"))
        assert result.returncode == 0, result.stderr
        run_id = result.stdout.splitlines()[0]
        assert cli.json("runs", "show", run_id)["state"] == "succeeded"

        down = cli("down")
        assert down.returncode == 0, down.stderr
        assert up.wait(60) == 0
        gone = cli("runs", "list")
        assert gone.returncode == 1
        assert "fabrik up" in gone.stderr
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGTERM)
            up.wait(60)
