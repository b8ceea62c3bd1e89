"""A service process ends within its shutdown deadline even when its shutdown hangs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request

from fabrik_common.natsserver import free_port
from fabrik_common.service import SHUTDOWN_DEADLINE_EXIT_CODE

HANGING_SERVICE = textwrap.dedent(
    """
    import asyncio
    from fabrik_common.service import Service, run_service
    from fabrik_common.settings import CommonSettings

    async def start(service):
        return {"started": True}

    async def hang_forever(state):
        await asyncio.Event().wait()  # a shutdown step that never returns

    run_service(CommonSettings, lambda s: Service("hang", s, on_start=start, on_stop=hang_forever), "hang")
    """
)


def test_a_hanging_shutdown_ends_at_the_deadline_with_the_stacks(nats_url: str) -> None:
    port = free_port("127.0.0.1")
    env = {
        **os.environ,
        "FABRIK_NATS_URL": nats_url,
        "FABRIK_HTTP_PORT": str(port),
        "FABRIK_SHUTDOWN_DEADLINE_SECONDS": "1.5",
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", HANGING_SERVICE], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, proc.communicate()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):
                    break
            except OSError:
                assert time.monotonic() < deadline, "the service did not start"
                time.sleep(0.1)
        stopped = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=20)
        took = time.monotonic() - stopped
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == SHUTDOWN_DEADLINE_EXIT_CODE
    assert 1.4 <= took < 10
    text = stderr.decode(errors="replace")
    assert "shutdown did not finish in time" in text
    assert "hang_forever" in text or "Thread 0x" in text  # the stacks, to find what hung
