"""The environment a local workload starts with.

Clean, not inherited: a workload sees only what is listed here, in increasing precedence:

1. basics: `PATH` (the executor's, or `FABRIK_WORKLOAD_PATH`), `HOME` = the workspace, `LANG`,
   `PYTHONUNBUFFERED=1` (so Python workloads stream their output instead of buffering it);
2. the project environment of the run's project and env, read from the encrypted store (KV bucket
   `envs`, written by the gateway: `fabrik env set ...`) when the run is dispatched;
3. `workload.env` of the run;
4. the LLM endpoints: `OPENAI_BASE_URL=<llm-proxy>/v1`, `ANTHROPIC_BASE_URL=<llm-proxy>`;
5. the run-scoped LLM key from the `RunKeyProvider` hook (none yet: a later issue signs one);
6. the run's metadata: `FABRIK_RUN_ID`, `FABRIK_PROJECT`, `FABRIK_ENV`, `FABRIK_ATTEMPT`,
   `FABRIK_WORKSPACE`, `FABRIK_SPEC_FILE` / `FABRIK_TODO_FILE` (when there is one).

Keys starting `FABRIK_` or `SMITHERS_` are reserved (DESIGN §3): the gateway refuses them in a
project environment; in `workload.env` they are skipped with a warning, which the executor also
writes into the run's log.

The project env files `<data>/executor/env/<project>/<env>.env` of earlier versions are no longer
read; `legacy_env_files` finds them so that the executor can say how to import them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

from nats.js import JetStreamContext

from fabrik_common.envs import EnvCipher, EnvStoreError, is_reserved, read_env
from fabrik_common.events import RunDispatched
from fabrik_common.experiments import harness_file_for, is_configuration_variable

RESERVED_PREFIXES = ("FABRIK_", "SMITHERS_")
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

__all__ = [
    "DEFAULT_PATH",
    "EmptyEnvSource",
    "NoRunKey",
    "ProjectEnvError",
    "ProjectEnvSource",
    "RunKeyProvider",
    "StoreEnvSource",
    "build_env",
    "is_reserved",
    "legacy_env_files",
    "llm_endpoint_env",
]


class ProjectEnvError(Exception):
    """The run's project environment exists but cannot be used (no key, wrong key, corrupt): the
    attempt fails with this message rather than start without its variables."""


class ProjectEnvSource(Protocol):
    """Where the project environment of a run comes from."""

    async def load(self, project: str, env: str) -> dict[str, str]:
        """The variables ({} when the environment was never set). Raises `ProjectEnvError` for a
        permanent problem; NATS errors (worth a retry: the dispatch is redelivered) propagate."""
        ...


class StoreEnvSource:
    """The encrypted `envs` KV bucket (`fabrik_common.envs.read_env`)."""

    def __init__(self, js: Callable[[], JetStreamContext], cipher: EnvCipher | None) -> None:
        self._js = js
        self.cipher = cipher

    async def load(self, project: str, env: str) -> dict[str, str]:
        try:
            return await read_env(self._js(), project, env, self.cipher)
        except EnvStoreError as exc:
            raise ProjectEnvError(str(exc)) from exc


class EmptyEnvSource:
    """No project environments (tests, tools)."""

    def __init__(self, values: Mapping[tuple[str, str], Mapping[str, str]] | None = None) -> None:
        self.values = {k: dict(v) for k, v in (values or {}).items()}

    async def load(self, project: str, env: str) -> dict[str, str]:
        return dict(self.values.get((project, env), {}))


def legacy_env_files(root: Path) -> list[Path]:
    """Project env files of earlier versions under `<root>/env/` (no longer read)."""
    directory = root / "env"
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob("*/*.env") if p.is_file())


class RunKeyProvider(Protocol):
    """Hook for the run-scoped LLM key (signed: run, project, budget, expiry).

    A later issue implements it (the llm-proxy verifies the key); it returns the variables that
    carry the key, e.g. `OPENAI_API_KEY`, `ANTHROPIC_API_KEY` and `FABRIK_LLM_KEY`.
    """

    def llm_key_env(self, dispatch: RunDispatched) -> dict[str, str]: ...


class NoRunKey:
    """No run-scoped key yet: the llm-proxy's offline/echo provider needs none."""

    def llm_key_env(self, dispatch: RunDispatched) -> dict[str, str]:
        return {}


def llm_endpoint_env(llm_proxy_url: str) -> dict[str, str]:
    base = llm_proxy_url.rstrip("/")
    return {"OPENAI_BASE_URL": f"{base}/v1", "ANTHROPIC_BASE_URL": base}


def build_env(
    dispatch: RunDispatched,
    *,
    workspace: Path,
    project_env: Mapping[str, str],
    llm_proxy_url: str,
    run_key_env: Mapping[str, str] | None = None,
    spec_file: Path | None = None,
    todo_file: Path | None = None,
    path: str | None = None,
    host_env: Mapping[str, str] | None = None,
) -> tuple[dict[str, str], list[str]]:
    """The workload's environment and the warnings about what was left out."""
    host = os.environ if host_env is None else host_env
    warnings: list[str] = []
    env: dict[str, str] = {
        "PATH": path or host.get("PATH") or DEFAULT_PATH,
        "HOME": str(workspace),
        "LANG": host.get("LANG") or "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
    }
    for key, value in project_env.items():
        if is_reserved(key):
            warnings.append(f"project env: {key} is reserved (FABRIK_*, SMITHERS_*), skipped")
            continue
        env[key] = value
    for key, value in dispatch.params.workload.env.items():
        if is_reserved(key) and not is_configuration_variable(key):
            warnings.append(f"workload.env: {key} is reserved (FABRIK_*, SMITHERS_*), skipped")
            continue
        if not _KEY.match(key):
            warnings.append(f"workload.env: {key!r} is not a valid variable name, skipped")
            continue
        env[key] = value
    env.update(llm_endpoint_env(llm_proxy_url))
    env.update(run_key_env or {})
    env.update(
        {
            "FABRIK_RUN_ID": dispatch.run_id,
            "FABRIK_PROJECT": dispatch.project,
            "FABRIK_ENV": dispatch.env,
            "FABRIK_ATTEMPT": str(dispatch.attempt),
            "FABRIK_WORKSPACE": str(workspace),
        }
    )
    if spec_file is not None:
        env["FABRIK_SPEC_FILE"] = str(spec_file)
    if dispatch.params.spec_path:
        env["FABRIK_SPEC_HARNESS_FILE"] = str(workspace / harness_file_for(dispatch.params.spec_path))
    if todo_file is not None:
        env["FABRIK_TODO_FILE"] = str(todo_file)
    return env, warnings
