"""`fabrik up` / `down` / `status` as an operator runs them: real processes, real NATS, free ports."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fabrik_cli.local import StackError, default_data_dir, plan_ports
from fabrik_common.natsserver import free_port, port_is_free

SERVICES = ("gateway", "llm-proxy", "scheduler", "executor", "optimizer", "backup")
READY_TIMEOUT = 30.0
GRACE = 20.0


def _distinct_free_ports(count: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


def _http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            response.read()
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return 0


def _http_body(url: str) -> str:
    with urllib.request.urlopen(url, timeout=2) as response:
        return str(response.read().decode())


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"


def _wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fabrik_cli", *args], capture_output=True, text=True, timeout=timeout
    )


class Up:
    """One `fabrik up` subprocess on a temporary data directory and free ports."""

    def __init__(self, tmp_path: Path) -> None:
        self.data_dir = tmp_path / "data"
        nats, monitor, *service_ports = _distinct_free_ports(2 + len(SERVICES))
        self.nats_port = nats
        self.monitor_port = monitor
        self.ports = dict(zip(SERVICES, service_ports, strict=True))
        self.output_path = tmp_path / "up.out"
        self.seen_pids: set[int] = set()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def state_file(self) -> Path:
        return self.data_dir / "stack.json"

    def args(self) -> list[str]:
        args = [
            "up",
            "--data-dir",
            str(self.data_dir),
            "--port",
            str(self.ports["gateway"]),
            "--nats-port",
            str(self.nats_port),
            "--nats-monitor-port",
            str(self.monitor_port),
            "--ready-timeout",
            str(READY_TIMEOUT),
        ]
        for name in SERVICES[1:]:
            args += ["--service-port", f"{name}={self.ports[name]}"]
        return args

    def all_ports(self) -> list[int]:
        return [self.nats_port, self.monitor_port, *self.ports.values()]

    def start(self) -> Up:
        with self.output_path.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fabrik_cli", *self.args()], stdout=out, stderr=subprocess.STDOUT
            )
        return self

    def output(self) -> str:
        return self.output_path.read_text(errors="replace")

    def state(self) -> dict[str, Any] | None:
        try:
            state: dict[str, Any] = json.loads(self.state_file.read_text())
        except (FileNotFoundError, ValueError):
            return None
        for comp in [state["nats"], *state["services"].values()]:
            if comp["pid"]:
                self.seen_pids.add(comp["pid"])
        return state

    def wait_running(self, timeout: float = READY_TIMEOUT + 10) -> dict[str, Any]:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"fabrik up exited with {self.proc.returncode}:\n{self.output()}")
            state = self.state()
            if state is not None and state["status"] == "running":
                return state
            if time.monotonic() > deadline:
                raise AssertionError(f"stack not running after {timeout}s:\n{self.output()}")
            time.sleep(0.1)

    def component_pids(self, state: dict[str, Any]) -> list[int]:
        return [state["nats"]["pid"], *(s["pid"] for s in state["services"].values())]

    def cleanup(self) -> None:
        """Whatever a failed test left behind: nothing may outlive it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(GRACE + 10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.state()
        for pid in self.seen_pids:
            if not _gone(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


@pytest.fixture
def make_up(tmp_path: Path) -> Iterator[Callable[[], Up]]:
    made: list[Up] = []

    def make() -> Up:
        up = Up(tmp_path / f"stack{len(made)}")
        up.output_path.parent.mkdir(parents=True, exist_ok=True)
        made.append(up)
        return up

    yield make
    for up in made:
        up.cleanup()


def _assert_all_stopped(up: Up, pids: list[int]) -> None:
    _wait_for(lambda: all(_gone(p) for p in pids), 5, "every component process to exit")
    busy = [p for p in up.all_ports() if not port_is_free(p)]
    assert not busy, f"ports still in use: {busy}"
    assert not up.state_file.exists()


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_up_starts_every_service_and_sigint_stops_everything(make_up: Callable[[], Up]) -> None:
    up = make_up().start()
    state = up.wait_running()

    for name in SERVICES:
        svc = state["services"][name]
        assert svc["port"] == up.ports[name]
        base = f"http://127.0.0.1:{up.ports[name]}"
        assert _http_status(f"{base}/readyz") == 200, name
        assert _http_status(f"{base}/healthz") == 200, name
        assert "fabrik_nats_connected 1.0" in _http_body(f"{base}/metrics"), name
        assert Path(svc["log"]).is_file()
    assert _http_status(f"http://127.0.0.1:{up.monitor_port}/healthz") == 200
    assert up.proc is not None
    assert state["pid"] == up.proc.pid
    summary = up.output()
    assert f"http://127.0.0.1:{up.ports['gateway']}" in summary
    assert f"nats://127.0.0.1:{up.nats_port}" in summary
    assert str(up.data_dir / "logs") in summary

    status = _cli("status", "--data-dir", str(up.data_dir), timeout=30)
    assert status.returncode == 0, status.stdout + status.stderr
    for name in ("nats", *SERVICES):
        assert any(line.split()[:2] == ["ok", name] for line in status.stdout.splitlines()), name

    pids = up.component_pids(state)
    t0 = time.monotonic()
    up.proc.send_signal(signal.SIGINT)
    assert up.proc.wait(GRACE + 10) == 0, up.output()
    assert time.monotonic() - t0 < GRACE
    _assert_all_stopped(up, pids)

    after = _cli("status", "--data-dir", str(up.data_dir), timeout=30)
    assert after.returncode == 3
    assert "no local stack running" in after.stdout


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_down_stops_a_running_up_and_a_second_up_is_refused(make_up: Callable[[], Up]) -> None:
    up = make_up().start()
    state = up.wait_running()

    second = _cli(*up.args(), timeout=30)
    assert second.returncode != 0
    assert "already running" in second.stderr
    assert str(state["pid"]) in second.stderr
    assert up.proc is not None and up.proc.poll() is None
    assert up.state_file.exists()

    down = _cli("down", "--data-dir", str(up.data_dir))
    assert down.returncode == 0, down.stdout + down.stderr
    assert "stopped the local stack" in down.stdout
    assert up.proc.wait(10) == 0, up.output()
    _assert_all_stopped(up, up.component_pids(state))

    again = _cli("down", "--data-dir", str(up.data_dir))
    assert again.returncode == 0
    assert "no local stack running" in again.stdout


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_busy_port_is_named_and_nothing_starts(make_up: Callable[[], Up]) -> None:
    up = make_up()
    taken = up.ports["scheduler"]
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as squatter:
        squatter.bind(("127.0.0.1", taken))
        squatter.listen()
        result = _cli(*up.args(), timeout=30)

    assert result.returncode != 0
    assert f"port {taken}" in result.stderr
    assert "scheduler" in result.stderr
    assert "--service-port scheduler=PORT" in result.stderr
    assert not up.state_file.exists()
    assert not (up.data_dir / "logs" / "nats.log").exists(), "NATS must not have been started"
    busy = [p for p in up.all_ports() if p != taken and not port_is_free(p)]
    assert not busy, f"ports in use after a refused start: {busy}"


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_a_killed_service_is_restarted_and_ready_again(make_up: Callable[[], Up]) -> None:
    up = make_up().start()
    state = up.wait_running()
    victim = state["services"]["scheduler"]["pid"]
    others = {n: s["pid"] for n, s in state["services"].items() if n != "scheduler"}

    os.kill(victim, signal.SIGKILL)

    def restarted() -> bool:
        current = up.state()
        if current is None:
            return False
        sched = current["services"]["scheduler"]
        return (
            sched["pid"] not in (None, victim)
            and sched["restarts"] == 1
            and _http_status(f"http://127.0.0.1:{up.ports['scheduler']}/readyz") == 200
        )

    _wait_for(restarted, 20, "the scheduler to be restarted and ready")
    output = up.output()
    assert "scheduler was killed by SIGKILL" in output
    current = up.state()
    assert current is not None
    assert {n: s["pid"] for n, s in current["services"].items() if n != "scheduler"} == others

    assert up.proc is not None
    up.proc.send_signal(signal.SIGINT)
    assert up.proc.wait(GRACE + 10) == 0, up.output()
    _assert_all_stopped(up, [*up.component_pids(current), victim])


def test_ports_shift_with_port_base_and_explicit_ports_win() -> None:
    plan = plan_ports(port_base=1000, gateway_port=18080, service_ports={"llm_proxy": 18081})
    assert plan.nats == 5222
    assert plan.services == {
        "gateway": 18080,
        "llm-proxy": 18081,
        "scheduler": 10101,
        "executor": 10102,
        "optimizer": 10103,
        "backup": 10104,
    }
    assert plan.nats_monitor not in {plan.nats, *plan.services.values()}
    with pytest.raises(StackError, match="port 9101 is wanted by both"):
        plan_ports(gateway_port=9101)
    with pytest.raises(StackError, match="unknown service 'nope'"):
        plan_ports(service_ports={"nope": 1234})


def test_default_data_dir_precedence() -> None:
    assert default_data_dir({"FABRIK_HOME": "/a", "XDG_DATA_HOME": "/b", "HOME": "/h"}) == Path("/a")
    assert default_data_dir({"XDG_DATA_HOME": "/b", "HOME": "/h"}) == Path("/b/fabrik")
    assert default_data_dir({"HOME": "/h"}) == Path("/h/.local/share/fabrik")


def test_version() -> None:
    result = _cli("--version", timeout=30)
    assert result.returncode == 0
    assert result.stdout.startswith("fabrik, version ")
