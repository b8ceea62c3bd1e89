"""`fabrik init` writes the gateway, the token, the project and the output format; the other
commands use them, against a real gateway (anonymous access off), scheduler and executor over a
real NATS. Flags and FABRIK_* variables still come first.

The CLI runs as an operator runs it: `python -m fabrik_cli ...` in a subprocess, with its own
empty home and configuration directory, and no FABRIK_API_URL or FABRIK_TOKEN.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from fabrik_common.natsserver import free_port, port_is_free
from fabrik_common.testing import ServiceProcess
from fabrik_gateway.auth.jwt import mint_hs256

ROOT = Path(__file__).resolve().parents[2]
HELLO = ROOT / "examples" / "hello"
SECRET = "integration-test-hs256-secret-0123456789"
# the local stack's ports that `fabrik init --target local` checks before it writes anything
LOCAL_PORTS = (4222, 8080, 8081, 9101, 9102, 9103, 9104)

pytestmark = pytest.mark.slow


def free_port_base() -> int:
    for base in range(32000, 50000, 41):
        if all(port_is_free(p + base) for p in LOCAL_PORTS):
            return base
    raise RuntimeError("no free port range")


class Cli:
    def __init__(self, home: Path) -> None:
        self.home = home
        home.mkdir(parents=True, exist_ok=True)
        drop = {"FABRIK_API_URL", "FABRIK_TOKEN", "FABRIK_PROJECT", "FABRIK_OUTPUT"}
        self.env = {k: v for k, v in os.environ.items() if k not in drop}
        self.env.update(FABRIK_HOME=str(home), HOME=str(home), XDG_CONFIG_HOME=str(home / "xdg"))

    def __call__(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "fabrik_cli", *args],
            capture_output=True,
            text=True,
            timeout=120,
            env={**self.env, **env},
            cwd=ROOT,
            input="",
        )


@pytest.fixture
def gateway_url(nats_url: str, tmp_path: Path) -> Iterator[str]:
    common = {"FABRIK_NATS_URL": nats_url, "FABRIK_DISPATCH_INTERVAL_SECONDS": "0.2"}
    procs = [
        ServiceProcess(
            "fabrik_gateway",
            {**common, "FABRIK_ANONYMOUS_ROLE": "none", "FABRIK_JWT_HS256_SECRET": SECRET},
            log_path=tmp_path / "gateway.log",
        ),
        ServiceProcess("fabrik_scheduler", common, log_path=tmp_path / "scheduler.log"),
        ServiceProcess(
            "fabrik_executor",
            {**common, "FABRIK_DATA_DIR": str(tmp_path / "executor")},
            log_path=tmp_path / "executor.log",
        ),
    ]
    try:
        for proc in procs:
            proc.start_process()
        for proc in procs:
            proc.wait_ready(60)
        yield procs[0].base_url
    finally:
        for proc in procs:
            proc.kill()


def test_commands_use_what_init_wrote(gateway_url: str, tmp_path: Path) -> None:
    cli = Cli(tmp_path / "home")
    token = mint_hs256(SECRET, "dev@example.com", "developer")
    init = cli(
        "init",
        "--non-interactive",
        "--target",
        "local",
        "--port-base",
        str(free_port_base()),
        "--project",
        "shop",
        "--api",
        gateway_url,
        "--token",
        token,
        "--output",
        "json",
    )
    assert init.returncode == 0, init.stdout + init.stderr
    config = yaml.safe_load((cli.home / "config.yaml").read_text())
    assert (config["api_url"], config["project"], config["output"]) == (gateway_url, "shop", "json")
    assert token not in init.stdout + (cli.home / "config.yaml").read_text()

    # no --api, no token, no --project: the run goes to the configured gateway as the configured
    # user, in the configured project
    run = cli(
        "run",
        "--spec",
        str(HELLO / "spec.json"),
        "--repo",
        str(HELLO),
        "--env-var",
        "HELLO_STEPS=2",
        "--env-var",
        "HELLO_STEP_SECONDS=0.1",
        "--wait",
        "--",
        sys.executable,
        "workload.py",
    )
    assert run.returncode == 0, run.stderr
    finished = json.loads(run.stdout)  # the configured output format
    assert (finished["project"], finished["state"]) == ("shop", "succeeded")
    run_id = finished["run_id"]

    listed = cli("runs", "list")  # JSON: the configured output format
    assert listed.returncode == 0, listed.stderr
    runs = json.loads(listed.stdout)
    items = runs["items"] if isinstance(runs, dict) else runs
    mine = next(r for r in items if r["run_id"] == run_id)
    assert mine["project"] == "shop" and mine["state"] == "succeeded"

    # flags and variables come first
    table = cli("runs", "list", "-o", "table")
    assert table.returncode == 0 and table.stdout.startswith("RUN ID"), table.stderr
    assert cli("runs", "list", FABRIK_OUTPUT="yaml").stdout.lstrip().startswith(("items:", "-", "next"))
    refused = cli("runs", "list", FABRIK_TOKEN="not-a-token")
    assert refused.returncode == 1 and "401" in refused.stderr and "FABRIK_TOKEN" in refused.stderr
    elsewhere = f"http://127.0.0.1:{free_port()}"
    unreachable = cli("runs", "list", FABRIK_API_URL=elsewhere)
    assert unreachable.returncode == 1 and elsewhere in unreachable.stderr
    other = cli("runs", "list", "--project", "other")
    assert other.returncode == 0 and run_id not in other.stdout

    # without the token the gateway refuses: it really was the configured token that was sent
    (cli.home / "token").write_text("")
    empty = cli("runs", "list")
    assert empty.returncode == 1 and "token file" in empty.stderr and "is empty" in empty.stderr
