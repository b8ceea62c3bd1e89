"""Workspace preparation without git servers: local directories and repositories."""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest

from fabrik_common.events import RepoRef, Resources, RunDispatched, RunParameters
from fabrik_executor.settings import ExecutorSettings
from fabrik_executor.workspace import WorkspaceError, is_local_path, prepare_workspace

RUN = "01JABCDEFGHJKMNPQRSTVWXYZ0"


def dispatch(repo: RepoRef | None = None, attempt: int = 1, **params: object) -> RunDispatched:
    return RunDispatched(
        run_id=RUN,
        project="demo",
        env="dev",
        attempt=attempt,
        params=RunParameters(
            repo=repo,
            resources=Resources(cpu_request="1", memory_request="1Gi", cpu_limit="1", memory_limit="1Gi"),
            **params,  # type: ignore[arg-type]
        ),
        deadline=datetime(2030, 1, 1, tzinfo=UTC),
    )


def test_url_kinds() -> None:
    assert is_local_path("/srv/repo") and is_local_path("./repo") and is_local_path("~/r")
    assert not is_local_path("https://github.com/a/b.git")
    assert not is_local_path("git@github.com:a/b.git")
    assert not is_local_path("file:///srv/repo")


def test_empty_workspace_with_spec_and_todo_then_reused(tmp_path: Path) -> None:
    spec = {"v": 1, "id": "s"}
    first = prepare_workspace(tmp_path, dispatch(spec=spec, todo={"v": 1, "id": "t"}))
    assert first.path == tmp_path / "workspaces" / RUN
    assert not first.reused
    assert first.spec_file == first.path / ".fabrik" / "spec.json"
    assert first.todo_file is not None and first.todo_file.exists()
    (first.path / "checkpoint").write_text("3")
    second = prepare_workspace(tmp_path, dispatch(attempt=2, spec=spec))
    assert second.reused
    assert (second.path / "checkpoint").read_text() == "3"


def test_half_prepared_workspace_is_wiped(tmp_path: Path) -> None:
    leftover = tmp_path / "workspaces" / RUN
    leftover.mkdir(parents=True)
    (leftover / "partial").write_text("x")
    prepared = prepare_workspace(tmp_path, dispatch())
    assert list(prepared.path.iterdir()) == []


def test_local_directory_is_copied_and_refuses_a_ref(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "a.txt").write_text("a")
    prepared = prepare_workspace(tmp_path / "data", dispatch(RepoRef(url=str(source))))
    assert (prepared.path / "a.txt").read_text() == "a"
    with pytest.raises(WorkspaceError, match="not a git repository"):
        prepare_workspace(tmp_path / "other", dispatch(RepoRef(url=str(source), ref="main")))


def test_git_clone_at_a_ref_and_exclude(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-C", str(repo)]
    subprocess.run(["git", "init", "-q", "-b", "main", str(repo)], check=True)
    (repo / "f").write_text("1")
    subprocess.run([*git, "add", "f"], check=True)
    subprocess.run([*git, "commit", "-qm", "1"], check=True)
    subprocess.run([*git, "branch", "one"], check=True)
    (repo / "f").write_text("2")
    subprocess.run([*git, "commit", "-qam", "2"], check=True)
    prepared = prepare_workspace(
        tmp_path / "data", dispatch(RepoRef(url=str(repo), ref="one"), spec={"v": 1})
    )
    assert (prepared.path / "f").read_text() == "1"
    assert ".fabrik/" in (prepared.path / ".git" / "info" / "exclude").read_text()
    status = subprocess.run(
        ["git", "-C", str(prepared.path), "status", "--porcelain"], capture_output=True, text=True
    )
    assert status.stdout == ""


def test_default_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("FABRIK_HOME", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert ExecutorSettings().executor_dir() == tmp_path / "fabrik" / "executor"
    monkeypatch.setenv("FABRIK_HOME", str(tmp_path / "home"))
    assert ExecutorSettings().executor_dir() == tmp_path / "home" / "executor"
    assert ExecutorSettings(data_dir=str(tmp_path / "d")).executor_dir() == tmp_path / "d" / "executor"


def test_default_command_from_the_environment() -> None:
    from fabrik_common.settings import load_settings

    settings = load_settings(ExecutorSettings, {"FABRIK_DEFAULT_COMMAND": '["python", "-m", "agent"]'})
    assert settings.default_command == ("python", "-m", "agent")
