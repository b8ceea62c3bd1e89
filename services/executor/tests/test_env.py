"""The workload's environment: sources of the project environment, reserved keys, precedence."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest

from fabrik_common.envs import EnvKeyMissingError
from fabrik_common.events import Resources, RunDispatched, RunParameters, Workload
from fabrik_executor.env import (
    EmptyEnvSource,
    ProjectEnvError,
    StoreEnvSource,
    build_env,
    legacy_env_files,
)
from fabrik_executor.local_backend import LaunchError, check_executable, resolve_argv

RUN = "01JABCDEFGHJKMNPQRSTVWXYZ0"


def dispatch(env: dict[str, str] | None = None, command: tuple[str, ...] = ()) -> RunDispatched:
    return RunDispatched(
        run_id=RUN,
        project="demo",
        env="dev",
        attempt=2,
        params=RunParameters(
            workload=Workload(command=command, env=env or {}),
            resources=Resources(cpu_request="1", memory_request="1Gi", cpu_limit="1", memory_limit="1Gi"),
        ),
        deadline=datetime(2030, 1, 1, tzinfo=UTC),
    )


def test_legacy_env_files_are_found_not_read(tmp_path: Path) -> None:
    assert legacy_env_files(tmp_path) == []
    path = tmp_path / "env" / "demo" / "dev.env"
    path.parent.mkdir(parents=True)
    path.write_text("A=1\n")
    assert legacy_env_files(tmp_path) == [path]


async def test_empty_env_source() -> None:
    source = EmptyEnvSource({("demo", "dev"): {"A": "1"}})
    assert await source.load("demo", "dev") == {"A": "1"}
    assert await source.load("demo", "prod") == {}


async def test_store_errors_become_project_env_errors() -> None:
    class NoStore:
        async def key_value(self, bucket: str) -> Any:
            raise EnvKeyMissingError("no key")

    source = StoreEnvSource(lambda: NoStore(), None)  # type: ignore[arg-type, return-value]
    with pytest.raises(ProjectEnvError, match="no key"):
        await source.load("demo", "dev")


def test_build_env_is_clean_and_ordered(tmp_path: Path) -> None:
    host = {
        "PATH": "/host/bin",
        "LANG": "de_DE.UTF-8",
        "SECRET_OF_THE_EXECUTOR": "nope",
        "FABRIK_NATS_URL": "x",
    }
    env, warnings = build_env(
        dispatch({"SHARED": "workload", "FABRIK_ATTEMPT": "99", "OWN": "1"}),
        workspace=tmp_path,
        project_env={"SHARED": "project", "PROJECT_ONLY": "p", "OPENAI_BASE_URL": "http://elsewhere"},
        llm_proxy_url="http://127.0.0.1:8081/",
        run_key_env={"OPENAI_API_KEY": "run-scoped"},
        spec_file=tmp_path / ".fabrik" / "spec.json",
        host_env=host,
    )
    assert env == {
        "PATH": "/host/bin",
        "HOME": str(tmp_path),
        "LANG": "de_DE.UTF-8",
        "PYTHONUNBUFFERED": "1",
        "SHARED": "workload",
        "PROJECT_ONLY": "p",
        "OWN": "1",
        "OPENAI_BASE_URL": "http://127.0.0.1:8081/v1",
        "ANTHROPIC_BASE_URL": "http://127.0.0.1:8081",
        "OPENAI_API_KEY": "run-scoped",
        "FABRIK_RUN_ID": RUN,
        "FABRIK_PROJECT": "demo",
        "FABRIK_ENV": "dev",
        "FABRIK_ATTEMPT": "2",
        "FABRIK_WORKSPACE": str(tmp_path),
        "FABRIK_SPEC_FILE": str(tmp_path / ".fabrik" / "spec.json"),
    }
    assert warnings == ["workload.env: FABRIK_ATTEMPT is reserved (FABRIK_*, SMITHERS_*), skipped"]


def test_build_env_path_override(tmp_path: Path) -> None:
    env, _ = build_env(
        dispatch(),
        workspace=tmp_path,
        project_env={},
        llm_proxy_url="http://p",
        path="/only/here",
        host_env={},
    )
    assert env["PATH"] == "/only/here"
    assert env["LANG"] == "C.UTF-8"


def test_command_resolution(tmp_path: Path) -> None:
    assert resolve_argv(Workload(command=("python",), args=("x.py",)), ()) == ["python", "x.py"]
    assert resolve_argv(Workload(args=("--fast",)), ("agent", "run")) == ["agent", "run", "--fast"]
    with pytest.raises(LaunchError, match="no command"):
        resolve_argv(Workload(), ())
    check_executable("sh", cwd=tmp_path, path="/usr/bin:/bin")
    with pytest.raises(LaunchError, match="command not found: nope-xyz"):
        check_executable("nope-xyz", cwd=tmp_path, path="/usr/bin:/bin")
    (tmp_path / "script.sh").write_text("#!/bin/sh\n")
    with pytest.raises(LaunchError, match="not executable"):
        check_executable("./script.sh", cwd=tmp_path, path="")
    (tmp_path / "script.sh").chmod(0o755)
    check_executable("./script.sh", cwd=tmp_path, path="")


def test_run_configuration_variables_and_the_harness_file(tmp_path: Path) -> None:
    run = dispatch({"FABRIK_MODEL": "gpt-big", "FABRIK_HARNESS_DEPTH": "3", "FABRIK_HARNESS_x-y": "1"})
    run = msgspec.structs.replace(
        run, params=msgspec.structs.replace(run.params, spec_path="specs/login.json")
    )
    env, warnings = build_env(run, workspace=tmp_path, project_env={}, llm_proxy_url="http://p", host_env={})
    assert env["FABRIK_MODEL"] == "gpt-big" and env["FABRIK_HARNESS_DEPTH"] == "3"
    assert "FABRIK_HARNESS_x-y" not in env
    assert warnings == ["workload.env: FABRIK_HARNESS_x-y is reserved (FABRIK_*, SMITHERS_*), skipped"]
    assert env["FABRIK_SPEC_HARNESS_FILE"] == str(tmp_path / "specs" / "login.harness.json")
