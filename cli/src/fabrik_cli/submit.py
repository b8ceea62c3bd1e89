"""Building the body of `POST /api/v1/runs` from `fabrik run`'s flags, and reading spec/todo files.

Spec and todo files are validated here, before anything is sent, with the same validators the
gateway uses (`fabrik_common.specs`), so a bad file is reported with every invalid field at once
and without a round trip. Files are JSON; `.yaml`/`.yml` files are read as YAML.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from fabrik_cli.errors import UsageError, field_lines
from fabrik_common.specs import FieldError, SpecValidationError, validate_spec, validate_todo

DocumentKind = Literal["spec", "todo"]


# --------------------------------------------------------------------------------------------
# Files


def read_document(path: Path, what: str) -> Any:
    """Decoded JSON (or YAML for `.yaml`/`.yml`) of `path`; `-` reads standard input."""
    try:
        raw = sys.stdin.read() if str(path) == "-" else path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read the {what} file {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise UsageError(f"the {what} file {path} is not UTF-8 text: {exc}") from exc
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            return yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise UsageError(f"the {what} file {path} is not valid YAML", [str(exc)]) from exc
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise UsageError(
            f"the {what} file {path} is not valid JSON",
            [f"line {exc.lineno}, column {exc.colno}: {exc.msg}"],
        ) from exc


def document_errors(document: Any, kind: DocumentKind) -> list[FieldError]:
    """Every `(field, rule)` by which `document` breaks the spec or todo schema; [] when valid."""
    try:
        if kind == "todo":
            validate_todo(document)
        else:
            validate_spec(document)
    except SpecValidationError as exc:
        return list(exc.errors)
    return []


def load_valid_document(path: Path, kind: DocumentKind, *, prefix: str = "") -> Any:
    """The document of `path`, or a UsageError listing every invalid field (prefixed by `prefix`)."""
    document = read_document(path, kind)
    errors = document_errors(document, kind)
    if errors:
        named = [(_prefixed(prefix, f), rule) for f, rule in errors]
        raise UsageError(f"invalid {kind} in {path} ({len(errors)} error(s))", field_lines(named))
    return document


def _prefixed(prefix: str, field_path: str) -> str:
    if not prefix:
        return field_path
    if field_path == "$":
        return prefix
    return f"{prefix}{field_path}" if field_path.startswith("[") else f"{prefix}.{field_path}"


# --------------------------------------------------------------------------------------------
# KEY=VALUE options


def parse_pairs(
    values: Sequence[str], option: str, *, environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """`KEY=VALUE` strings as a dict (later ones win). With `environ`, a bare `KEY` takes its
    value from it, as `docker run -e KEY` does."""
    pairs: dict[str, str] = {}
    for value in values:
        key, sep, val = value.partition("=")
        key = key.strip()
        if not key:
            raise UsageError(f"{option} {value!r}: the key is empty; use KEY=VALUE")
        if not sep:
            if environ is None:
                raise UsageError(f"{option} {value!r} is not KEY=VALUE")
            if key not in environ:
                raise UsageError(f"{option} {key}: no value given and ${key} is not set; use {key}=VALUE")
            val = environ[key]
        pairs[key] = val
    return pairs


# --------------------------------------------------------------------------------------------
# The request


@dataclass
class RunOptions:
    """What `fabrik run` was given; None/empty means "not given, let the API default it"."""

    project: str
    env: str | None = None
    spec_file: Path | None = None
    spec_path: str | None = None
    todo_file: Path | None = None
    repo: str | None = None
    ref: str | None = None
    image: str | None = None
    command: list[str] = field(default_factory=list)
    env_vars: list[str] = field(default_factory=list)
    cpu: str | None = None
    memory: str | None = None
    template: str | None = None
    timeout_seconds: int | None = None
    priority: str | None = None
    budget_usd: float | None = None
    labels: list[str] = field(default_factory=list)


def resolve_repo(repo: str, cwd: Path) -> str:
    """A repository URL as given, or, for an existing local directory, its absolute path (the
    local executor copies it; a relative path would be resolved against its own directory)."""
    if "://" in repo or repo.startswith("git@"):
        return repo
    path = (cwd / Path(repo).expanduser()) if not Path(repo).expanduser().is_absolute() else Path(repo)
    if path.expanduser().is_dir():
        return str(path.expanduser().resolve())
    return repo


def build_run_request(
    opts: RunOptions, *, cwd: Path | None = None, environ: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The JSON body of `POST /runs`; raises UsageError for conflicting or invalid options."""
    env = os.environ if environ is None else environ
    if opts.spec_file is not None and opts.spec_path is not None:
        raise UsageError("give either --spec FILE (sent inline) or --spec-path PATH (in the repository)")
    if opts.template is not None and (opts.cpu is not None or opts.memory is not None):
        raise UsageError("give either --template or --cpu/--memory, not both")
    if opts.ref is not None and opts.repo is None:
        raise UsageError("--ref needs --repo")
    if (opts.cpu is None) != (opts.memory is None):
        raise UsageError(
            "--cpu and --memory go together (each is both the request and the limit); "
            "or use --template (default: 500m/1Gi requested, 2/4Gi limits)"
        )

    body: dict[str, Any] = {"project": opts.project}
    if opts.env is not None:
        body["env"] = opts.env
    if opts.spec_file is not None:
        body["spec"] = load_valid_document(opts.spec_file, "spec", prefix="spec")
    if opts.spec_path is not None:
        body["spec_path"] = opts.spec_path
    if opts.todo_file is not None:
        body["todo"] = load_valid_document(opts.todo_file, "todo", prefix="todo")
    if opts.repo is not None:
        repo: dict[str, str] = {"url": resolve_repo(opts.repo, cwd or Path.cwd())}
        if opts.ref is not None:
            repo["ref"] = opts.ref
        body["repo"] = repo
    workload: dict[str, Any] = {}
    if opts.image is not None:
        workload["image"] = opts.image
    if opts.command:
        workload["command"] = list(opts.command)
    if opts.env_vars:
        workload["env"] = parse_pairs(opts.env_vars, "--env-var", environ=env)
    if workload:
        body["workload"] = workload
    if opts.cpu is not None and opts.memory is not None:
        body["resources"] = {"cpu": opts.cpu, "memory": opts.memory}
    if opts.template is not None:
        body["template"] = opts.template
    if opts.timeout_seconds is not None:
        body["timeout_seconds"] = opts.timeout_seconds
    if opts.priority is not None:
        body["priority"] = opts.priority
    if opts.budget_usd is not None:
        body["budget_usd"] = opts.budget_usd
    if opts.labels:
        body["labels"] = parse_pairs(opts.labels, "--label")
    return body


# The option of `fabrik run` behind each field of the request body (for error messages).
FIELD_FLAGS: dict[str, str] = {
    "project": "--project",
    "env": "--env",
    "spec": "--spec",
    "spec_path": "--spec-path",
    "todo": "--todo",
    "repo": "--repo",
    "repo.url": "--repo",
    "repo.ref": "--ref",
    "workload.image": "--image",
    "workload.command": "--command",
    "workload.env": "--env-var",
    "resources": "--cpu/--memory",
    "resources.cpu": "--cpu",
    "resources.memory": "--memory",
    "template": "--template",
    "timeout_seconds": "--timeout",
    "priority": "--priority",
    "budget_usd": "--budget",
    "labels": "--label",
    "Idempotency-Key": "--idempotency-key",
}


def flag_for(field_path: str) -> str | None:
    """`workload.env.FOO` → `--env-var`, `spec.goals[2]` → `--spec`, ...; None if unknown."""
    path = field_path
    while path:
        if path in FIELD_FLAGS:
            return FIELD_FLAGS[path]
        cut = max(path.rfind("."), path.rfind("["))
        path = path[:cut] if cut > 0 else ""
    return None
