"""A run's workspace: `<data>/workspaces/<run_id>/`, prepared by the first attempt, reused by the next.

Preparing means: the repository fetched at `repo.ref` (a URL is cloned with `git clone` and
checked out at the ref; a local path to a git repository is cloned the same way, so what runs is
what is committed at that ref; a local directory that is not a git repository is copied as it
is, and then only `HEAD` is accepted as ref), or an empty directory when the run has no
repository. A marker `<data>/runs/<run_id>/workspace.json` records that it is complete: a later
attempt reuses the workspace as the workload left it (its checkpoints included), and a
workspace left half-prepared by a crash is wiped and prepared again.

Every attempt (re)writes the run's inline spec and todo to `<workspace>/.fabrik/spec.json` and
`todo.json`; `.fabrik/` is added to the clone's `.git/info/exclude` so it never shows as a change.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from fabrik_common.events import RepoRef, RunDispatched
from fabrik_common.ids import utcnow

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_SCP_LIKE = re.compile(r"^[^/\s]+@[^/\s:]+:")


class WorkspaceError(Exception):
    """The workspace could not be prepared (the attempt fails with reason infra_error)."""


@dataclass(frozen=True)
class PreparedWorkspace:
    path: Path
    spec_file: Path | None
    todo_file: Path | None
    reused: bool
    notes: tuple[str, ...] = ()


def workspace_dir(root: Path, run_id: str) -> Path:
    return root / "workspaces" / run_id


def marker_file(root: Path, run_id: str) -> Path:
    return root / "runs" / run_id / "workspace.json"


def prepare_workspace(
    root: Path, dispatch: RunDispatched, *, clone_timeout: float = 600.0
) -> PreparedWorkspace:
    """Blocking (git, file copies): call it from a thread."""
    path = workspace_dir(root, dispatch.run_id)
    marker = marker_file(root, dispatch.run_id)
    notes: list[str] = []
    reused = marker.exists() and path.is_dir()
    if not reused:
        if path.exists():
            shutil.rmtree(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        repo = dispatch.params.repo
        if repo is None:
            path.mkdir()
            commit = None
        else:
            commit = fetch_repo(repo, path, timeout=clone_timeout)
            notes.append(
                f"workspace prepared from {repo.url} at {repo.ref}" + (f" ({commit})" if commit else "")
            )
        marker.parent.mkdir(parents=True, exist_ok=True)
        tmp = marker.with_suffix(".tmp")
        tmp.write_text(
            json.dumps(
                {
                    "prepared_at": utcnow().isoformat(),
                    "attempt": dispatch.attempt,
                    "repo": repo.url if repo else None,
                    "ref": repo.ref if repo else None,
                    "commit": commit,
                }
            )
        )
        tmp.replace(marker)
    else:
        notes.append(f"workspace reused from an earlier attempt: {path}")

    fabrik_dir = path / ".fabrik"
    spec_file: Path | None = None
    todo_file: Path | None = None
    params = dispatch.params
    if params.spec is not None or params.todo is not None:
        fabrik_dir.mkdir(exist_ok=True)
        _exclude_from_git(path)
    if params.spec is not None:
        spec_file = fabrik_dir / "spec.json"
        spec_file.write_text(json.dumps(params.spec, indent=2, ensure_ascii=False) + "\n")
    elif params.spec_path:
        spec_file = (path / params.spec_path).resolve()
        if not spec_file.is_relative_to(path.resolve()):
            raise WorkspaceError(f"spec_path {params.spec_path!r} points outside the workspace")
        if not spec_file.is_file():
            notes.append(f"spec_path {params.spec_path!r} does not exist in the workspace")
    if params.todo is not None:
        todo_file = fabrik_dir / "todo.json"
        todo_file.write_text(json.dumps(params.todo, indent=2, ensure_ascii=False) + "\n")
    return PreparedWorkspace(path, spec_file, todo_file, reused, tuple(notes))


def is_local_path(url: str) -> bool:
    return not (_URL.match(url) or _SCP_LIKE.match(url))


def fetch_repo(repo: RepoRef, dest: Path, *, timeout: float) -> str | None:
    """Clone (or copy) `repo` into `dest` (which must not exist) at its ref; the commit, if git."""
    url = repo.url.strip()
    if not url or url.startswith("-"):
        raise WorkspaceError(f"invalid repository {repo.url!r}")
    ref = (repo.ref or "HEAD").strip()
    if ref.startswith("-"):
        raise WorkspaceError(f"invalid ref {repo.ref!r}")
    if is_local_path(url):
        source = Path(url).expanduser()
        if not source.exists():
            raise WorkspaceError(f"repository path {url} does not exist")
        if not _is_git_repo(source):
            if ref != "HEAD":
                raise WorkspaceError(f"{url} is not a git repository, so ref {ref!r} cannot be checked out")
            try:
                shutil.copytree(source, dest, symlinks=True)
            except (OSError, shutil.Error) as exc:
                raise WorkspaceError(f"copying {url} failed: {exc}") from exc
            return None
        url = str(source.resolve())
    _git(["clone", "--quiet", "--", url, str(dest)], cwd=None, timeout=timeout, what=f"git clone {repo.url}")
    if ref != "HEAD":
        _git(["checkout", "--quiet", ref], cwd=dest, timeout=timeout, what=f"git checkout {ref}")
    head = _git(["rev-parse", "HEAD"], cwd=dest, timeout=60, what="git rev-parse HEAD")
    return head.strip() or None


def _is_git_repo(path: Path) -> bool:
    if (path / ".git").exists():
        return True
    try:
        out = subprocess.run(
            ["git", "-C", str(path), "rev-parse", "--is-bare-repository"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and out.stdout.strip() == "true"


def _git(args: list[str], *, cwd: Path | None, timeout: float, what: str) -> str:
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "/bin/true"}
    try:
        out = subprocess.run(
            ["git", *args],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            check=False,
        )
    except FileNotFoundError as exc:
        raise WorkspaceError(f"{what} failed: git is not installed") from exc
    except subprocess.TimeoutExpired as exc:
        raise WorkspaceError(f"{what} timed out after {timeout:g} s") from exc
    if out.returncode != 0:
        lines = [line for line in out.stderr.strip().splitlines() if line.strip()]
        detail = lines[-1] if lines else f"exit code {out.returncode}"
        raise WorkspaceError(f"{what} failed: {detail}")
    return out.stdout


def _exclude_from_git(path: Path) -> None:
    info = path / ".git" / "info"
    if not info.is_dir():
        return
    exclude = info / "exclude"
    try:
        text = exclude.read_text() if exclude.exists() else ""
        if ".fabrik/" not in text.split():
            exclude.write_text(text + ("" if text.endswith("\n") or not text else "\n") + ".fabrik/\n")
    except OSError:
        pass
