"""A whole local platform for tests that drive it from outside (a browser, a terminal UI): a real
NATS server and the services as `python -m fabrik_<name>` child processes, each with its own data
directory and log file under one root, configured as `fabrik up` configures them.

Load it by path (the tests are not a package):

    spec = importlib.util.spec_from_file_location("fabrik_test_platform", SUPPORT / "platform.py")
"""

from __future__ import annotations

import secrets
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fabrik_common.natsserver import NatsServer
from fabrik_common.testing import ServiceProcess

ALL_SERVICES: tuple[str, ...] = ("gateway", "scheduler", "executor", "optimizer", "llm_proxy")

# What `fabrik up` sets, sped up for tests: quick dispatch, snapshots and cancellation.
FAST: dict[str, str] = {
    "FABRIK_DISPATCH_INTERVAL_SECONDS": "0.2",
    "FABRIK_SNAPSHOT_INTERVAL_SECONDS": "0.5",
    "FABRIK_REAPER_INTERVAL_SECONDS": "1",
    "FABRIK_CANCEL_GRACE_SECONDS": "3",
    "FABRIK_SHUTDOWN_GRACE_SECONDS": "3",
}


@dataclass
class Platform:
    root: Path
    nats: NatsServer
    services: dict[str, ServiceProcess] = field(default_factory=dict)

    @property
    def gateway_url(self) -> str:
        return self.services["gateway"].base_url

    def logs(self) -> str:
        """Every service's log, for a failing test's report."""
        parts = []
        for name, proc in self.services.items():
            if proc.log_path is not None and proc.log_path.exists():
                parts.append(f"--- {name}\n{proc.log_path.read_text(errors='replace')[-4000:]}")
        return "\n".join(parts)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM to every service at once, SIGKILL to those still running after `grace`."""
        running = [p.proc for p in self.services.values() if p.proc is not None and p.proc.poll() is None]
        for proc in running:
            proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in running:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.nats.stop()


def start_platform(
    root: Path,
    services: Sequence[str] = ALL_SERVICES,
    *,
    anonymous_role: str = "admin",
    env: Mapping[str, str] | None = None,
    extra: Mapping[str, tuple[str, Mapping[str, str]]] | None = None,
    ready_timeout: float = 60.0,
) -> Platform:
    """NATS and `services` (started together, then waited for), anonymous callers with
    `anonymous_role` on the gateway as under `fabrik up`. `extra`: more instances, by key, as
    (service, environment overrides), e.g. `{"gateway-locked": ("gateway", {...})}`."""
    root.mkdir(parents=True, exist_ok=True)
    nats = NatsServer(root / "nats")
    nats.start()
    platform = Platform(root, nats)
    common = {
        "FABRIK_NATS_URL": nats.url,
        "FABRIK_RUN_KEY_SECRET": secrets.token_hex(32),
        "FABRIK_ANONYMOUS_ROLE": anonymous_role,
        "PYTHONUNBUFFERED": "1",
        **FAST,
        **(env or {}),
    }
    try:
        ports: dict[str, ServiceProcess] = {}
        instances = {name: (name, {}) for name in services} | dict(extra or {})
        for key, (name, overrides) in instances.items():
            ports[key] = ServiceProcess(
                f"fabrik_{name}",
                {
                    **common,
                    "FABRIK_DATA_DIR": str(root / key),
                    "FABRIK_INSTANCE_ID": f"test-{key}",
                    **overrides,
                },
                log_path=root / f"{key}.log",
            )
        proxy = ports.get("llm_proxy")
        for name, proc in ports.items():
            if proxy is not None:
                proc.env["FABRIK_LLM_PROXY_URL"] = proxy.base_url
            platform.services[name] = proc
            proc.start_process()
        for proc in ports.values():
            proc.wait_ready(ready_timeout)
    except BaseException:
        platform.stop()
        raise
    return platform
