"""Configuration of the executor service, from `FABRIK_*` environment variables."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from fabrik_common.settings import CommonSettings, Port, PositiveFloat, PositiveInt


class ExecutorSettings(CommonSettings, frozen=True, kw_only=True):
    http_port: Port = 9102
    backend: Literal["local"] = "local"
    """Where workloads run; `kubernetes` comes with its own backend."""
    data_dir: str = ""
    """Fabrik's data directory (`fabrik up` sets it); the executor keeps its files in `<data_dir>/executor`.
    Empty: `$FABRIK_HOME`, else `$XDG_DATA_HOME/fabrik`, else `~/.local/share/fabrik`."""
    default_command: tuple[str, ...] = ()
    """The workload command (JSON list) for runs that do not name one."""
    llm_proxy_url: str = "http://127.0.0.1:8081"
    cancel_grace_seconds: PositiveFloat = 10.0
    """Time between SIGTERM and SIGKILL when a workload is cancelled or passes its deadline."""
    cancel_memory_seconds: PositiveFloat = 3600.0
    """How long a cancel for a run not hosted here is remembered (it stops that run's next dispatch)."""
    enforce_memory_limit: bool = True
    """Apply `resources.memory_limit` as RLIMIT_AS to local workloads."""
    workload_path: str = ""
    """PATH of local workloads; empty: the executor's own PATH."""
    clone_timeout_seconds: PositiveFloat = 600.0
    poll_interval_seconds: PositiveFloat = 0.05
    """How often each running attempt's output, exit and deadline are checked."""
    log_flush_seconds: PositiveFloat = 0.1
    log_batch_lines: PositiveInt = 200
    progress_interval_seconds: PositiveFloat = 0.5
    """Minimum time between two RunProgress events of a run (0.5 s: at most 2 per second)."""
    retention_days: PositiveFloat = 7.0
    """Finished runs' workspaces and state are deleted this long after their last attempt ended."""

    def executor_dir(self) -> Path:
        return resolve_data_dir(self.data_dir) / "executor"


def resolve_data_dir(configured: str) -> Path:
    if configured:
        return Path(configured).expanduser()
    if os.environ.get("FABRIK_HOME"):
        return Path(os.environ["FABRIK_HOME"]).expanduser()
    if os.environ.get("XDG_DATA_HOME"):
        return Path(os.environ["XDG_DATA_HOME"]).expanduser() / "fabrik"
    return Path.home() / ".local" / "share" / "fabrik"
