"""The images' Dockerfiles, checked without a Docker engine: every stage's base pinned by digest,
the final stage non-root with a health check on the service's port, COPY sources that exist, and
each service image holding only its own package's locked dependencies."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fabrik_backup.settings import BackupSettings
from fabrik_common.settings import CommonSettings
from fabrik_executor.settings import ExecutorSettings
from fabrik_gateway.settings import GatewaySettings
from fabrik_llm_proxy.settings import LlmProxySettings
from fabrik_optimizer.settings import OptimizerSettings
from fabrik_scheduler.settings import SchedulerSettings

REPO = Path(__file__).resolve().parents[2]
SERVICES: dict[str, tuple[str, type[CommonSettings]]] = {
    # directory: (package and entry point, settings)
    "gateway": ("fabrik-gateway", GatewaySettings),
    "scheduler": ("fabrik-scheduler", SchedulerSettings),
    "executor": ("fabrik-executor", ExecutorSettings),
    "backup": ("fabrik-backup", BackupSettings),
    "llm_proxy": ("fabrik-llm-proxy", LlmProxySettings),
    "optimizer": ("fabrik-optimizer", OptimizerSettings),
}
DOCKERFILES = [REPO / "services" / name / "Dockerfile" for name in SERVICES] + [
    REPO / "images" / "runtime" / "Dockerfile"
]
PINNED = re.compile(r"^[a-z0-9./_-]+(:[A-Za-z0-9._-]+)?@sha256:[a-f0-9]{64}$")


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def parse_dockerfile(text: str) -> list[Stage]:
    """Instructions grouped by stage: line continuations joined, comments and parser directives dropped."""
    stages: list[Stage] = []
    logical = ""
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not logical and (not stripped or stripped.startswith("#")):
            continue
        if logical and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if not logical:
            start = number
        if stripped.endswith("\\"):
            logical += stripped[:-1].rstrip() + " "
            continue
        logical += stripped
        keyword, _, args = logical.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            parts = [p for p in args.split() if not p.startswith("--")]
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(base=parts[0], name=name))
        elif not stages:
            raise AssertionError(f"line {start}: {keyword} before the first FROM")
        else:
            stages[-1].instructions.append(Instruction(keyword, args.strip(), start))
        logical = ""
    return stages


def copy_sources(instruction: Instruction) -> list[str]:
    """The context paths of a COPY (none when it copies from a stage or another image)."""
    words = shlex.split(instruction.args)
    if any(w.startswith("--from=") for w in words):
        return []
    words = [w for w in words if not w.startswith("--")]
    return words[:-1]


def dockerignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    return any(
        fnmatch.fnmatch(path, p) or fnmatch.fnmatch(path, p.removeprefix("**/")) or path.startswith(p + "/")
        for p in patterns
    )


def test_every_service_has_a_dockerfile_and_there_is_a_runtime_image() -> None:
    for path in DOCKERFILES:
        assert path.is_file(), path


@pytest.mark.parametrize("path", DOCKERFILES, ids=[str(p.relative_to(REPO)) for p in DOCKERFILES])
def test_dockerfile_structure(path: Path) -> None:
    stages = parse_dockerfile(path.read_text())
    assert len(stages) >= 2, "multi-stage: a builder and a slim runtime"
    names = {s.name for s in stages if s.name}
    for stage in stages:
        assert PINNED.match(stage.base), f"{stage.base!r} is not pinned by digest"
        assert ":latest" not in stage.base
        for instruction in stage.all("COPY") + stage.all("ADD"):
            assert instruction.keyword == "COPY", f"line {instruction.line}: ADD fetches or unpacks; use COPY"
            source_stage = re.search(r"--from=(\S+)", instruction.args)
            if source_stage:
                assert source_stage.group(1) in names, f"line {instruction.line}: unknown stage"
            for source in copy_sources(instruction):
                assert (REPO / source).exists(), (
                    f"line {instruction.line}: COPY {source}: not in the repository"
                )
                assert not ignored(source.rstrip("/"), dockerignore_patterns()), (
                    f"line {instruction.line}: {source} is excluded by .dockerignore"
                )
    final = stages[-1]
    users = final.all("USER")
    assert users, "the final stage sets USER"
    user = users[-1].args.split(":")[0]
    assert user.isdigit(), "a numeric user (runAsNonRoot can only verify numbers)"
    assert int(user) != 0
    assert not re.search(r":latest\b", path.read_text())


@pytest.mark.parametrize("service", SERVICES)
def test_service_image(service: str) -> None:
    package, settings = SERVICES[service]
    path = REPO / "services" / service / "Dockerfile"
    text = path.read_text()
    stages = parse_dockerfile(text)
    builder, final = stages[0], stages[-1]
    # only this package's locked runtime dependencies, installed non-editable
    syncs = [i.args for i in builder.all("RUN") if "uv sync" in i.args]
    assert syncs, "the builder installs with uv from uv.lock"
    for sync in syncs:
        for flag in ("--frozen", "--no-dev", "--no-editable", f"--package {package}"):
            assert flag in sync, f"{sync!r} lacks {flag}"
    copied = {src for i in builder.all("COPY") for src in copy_sources(i)}
    assert "uv.lock" in copied
    assert f"services/{service}/src" in copied
    other_sources = {f"services/{s}/src" for s in SERVICES if s != service} | {"cli/src"}
    assert not copied & other_sources, f"other packages' sources in the image: {copied & other_sources}"
    # the runtime stage takes the environment from the builder, not the build tools
    final_copies = [i.args for i in final.all("COPY")]
    assert any("--from=builder /app/.venv /app/.venv" in c for c in final_copies)
    assert not any("uv" in i.args.split() or "pip install" in i.args for i in final.all("RUN"))
    # health check on the service's own port
    port = settings().http_port
    checks = final.all("HEALTHCHECK")
    assert len(checks) == 1
    cmd = checks[0].args.split("CMD", 1)[1].strip()
    argv = json.loads(cmd)
    assert "/healthz" in argv[-1] and f"'{port}'" in argv[-1]
    envs = " ".join(i.args for i in final.all("ENV"))
    assert f"FABRIK_HTTP_PORT={port}" in envs
    assert "FABRIK_HTTP_HOST=0.0.0.0" in envs
    assert f"EXPOSE {port}" in text
    assert final.all("ENTRYPOINT")[-1].args == json.dumps([package])
    # read-only root: bytecode is compiled at build time and never written at run time
    assert "PYTHONDONTWRITEBYTECODE=1" in envs
    assert "UV_COMPILE_BYTECODE=1" in " ".join(i.args for i in builder.all("ENV"))


def test_runtime_image() -> None:
    stages = parse_dockerfile((REPO / "images" / "runtime" / "Dockerfile").read_text())
    final = stages[-1]
    assert final.all("USER")[-1].args == "1000:1000", "runs execute as uid/gid 1000 (docs/kubernetes.md)"
    runs = " ".join(i.args for i in final.all("RUN"))
    assert "git" in runs.split()
    assert "/wheels/*.whl" in runs
    assert any("libs/runtime" in src for i in stages[0].all("COPY") for src in copy_sources(i))
    assert [i.args for i in final.all("HEALTHCHECK")] == ["NONE"]
    assert [i.args for i in final.all("WORKDIR")] == ["/workspace"]


def test_the_parser_catches_what_the_checks_are_for() -> None:
    bad = parse_dockerfile(
        "# syntax=docker/dockerfile:1\n"
        "FROM python:3.11-slim AS builder\n"
        "RUN echo \\\n  hi\n"
        "FROM python:latest\n"
        "USER root\n"
    )
    assert [s.base for s in bad] == ["python:3.11-slim", "python:latest"]
    assert not PINNED.match(bad[0].base)
    assert bad[0].instructions[0].args == "echo hi"
    assert copy_sources(Instruction("COPY", "--chown=1:1 a b /dst/", 1)) == ["a", "b"]
    assert copy_sources(Instruction("COPY", "--from=builder /app /app", 1)) == []
    assert ignored("services/gateway/tests", dockerignore_patterns())
    assert not ignored("services/gateway/src", dockerignore_patterns())
