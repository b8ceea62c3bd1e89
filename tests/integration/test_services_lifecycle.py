"""Every service starts as its own process, waits for NATS, serves health and metrics, stops on SIGTERM."""

from __future__ import annotations

import asyncio
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from fabrik_common.natsserver import NatsServer
from fabrik_common.testing import ServiceProcess

SERVICES = ["gateway", "scheduler", "executor", "backup", "llm_proxy", "optimizer"]


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.mark.parametrize("service", SERVICES)
def test_service_waits_for_nats_then_serves_and_stops_cleanly(service: str, tmp_path: Path) -> None:
    nats = NatsServer(tmp_path / "nats")  # port chosen, not started yet
    proc = ServiceProcess(
        f"fabrik_{service}",
        {"FABRIK_NATS_URL": nats.url, "FABRIK_LOG_FORMAT": "json", "FABRIK_DATA_DIR": str(tmp_path / "data")},
        log_path=tmp_path / f"{service}.log",
    )
    assert proc.proc is None
    try:
        proc.start_process()
        # Alive but not ready while NATS is unreachable: liveness and readiness differ.
        deadline = time.monotonic() + 20
        while True:
            try:
                status, body = get(f"{proc.base_url}/healthz")
                break
            except (urllib.error.URLError, OSError):
                assert time.monotonic() < deadline, "healthz never answered"
                time.sleep(0.05)
        assert status == 200
        status, body = get(f"{proc.base_url}/readyz")
        assert status == 503
        assert b'"nats":false' in body

        nats.start()
        proc.wait_ready(30)
        status, body = get(f"{proc.base_url}/metrics")
        assert status == 200
        assert b"fabrik_nats_connected 1.0" in body

        assert proc.terminate(30) == 0
        log = (tmp_path / f"{service}.log").read_text()
        assert '"msg":"service stopped"' in log
        assert "Traceback" not in log
    finally:
        proc.kill()
        nats.stop()


async def test_all_six_services_share_one_server(nats_url: str, tmp_path: Path) -> None:
    procs = [
        ServiceProcess(
            f"fabrik_{s}",
            {"FABRIK_NATS_URL": nats_url, "FABRIK_DATA_DIR": str(tmp_path / "data")},
            log_path=tmp_path / f"{s}.log",
        )
        for s in SERVICES
    ]
    try:
        for proc in procs:
            proc.start_process()
        await asyncio.gather(*(asyncio.to_thread(p.wait_ready, 30) for p in procs))
        codes = await asyncio.gather(*(asyncio.to_thread(p.terminate, 30) for p in procs))
        assert codes == [0] * len(SERVICES)
    finally:
        for proc in procs:
            proc.kill()
