"""The new-run form (`n`): its fields, the live project check, the request body, and where the
API's field errors go.

The body is built as `fabrik run` builds it (`fabrik_cli.submit.build_run_request`): empty fields
are not sent, so the API's defaults apply; a local repository directory is sent as its absolute
path; the command is split as a shell would split it.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fabrik_cli.submit import RunOptions, build_run_request
from fabrik_common.ids import DNS1123_RULE, is_dns1123_label

FIELDS: tuple[str, ...] = ("project", "env", "spec_path", "repo", "ref", "command", "priority")
GENERAL = "general"
"""Where errors go that belong to no field of the form."""
PRIORITIES: tuple[str, ...] = ("low", "normal", "high")

# request field (or its first part) -> form field
_FIELD_OF: dict[str, str] = {
    "project": "project",
    "env": "env",
    "spec_path": "spec_path",
    "spec": "spec_path",
    "repo": "repo",
    "repo.url": "repo",
    "repo.ref": "ref",
    "workload.command": "command",
    "workload.args": "command",
    "workload": "command",
    "priority": "priority",
}


def project_error(value: str) -> str | None:
    """The live check of the project field: required, a DNS-1123 label."""
    name = value.strip()
    if not name:
        return "required"
    if not is_dns1123_label(name):
        return DNS1123_RULE
    return None


def label_error(value: str) -> str | None:
    """The env field: empty (the API's default) or a DNS-1123 label."""
    name = value.strip()
    if name and not is_dns1123_label(name):
        return DNS1123_RULE
    return None


def form_field(request_field: str) -> str:
    """The form field an API error about `request_field` belongs to (`repo.url` → `repo`)."""
    path = request_field
    while path:
        if path in _FIELD_OF:
            return _FIELD_OF[path]
        cut = max(path.rfind("."), path.rfind("["))
        path = path[:cut] if cut > 0 else ""
    return GENERAL


def errors_by_field(errors: Sequence[tuple[str, str]]) -> dict[str, list[str]]:
    """The API's `(field, rule)` pairs grouped by form field; a rule of a nested field keeps its
    name (`repo.ref: ...`)."""
    grouped: dict[str, list[str]] = {}
    for request_field, rule in errors:
        target = form_field(request_field)
        shown = rule if request_field in (target, "$") else f"{request_field}: {rule}"
        grouped.setdefault(target, []).append(shown)
    return grouped


@dataclass(frozen=True)
class NewRun:
    """What the form holds (strings as typed)."""

    project: str
    env: str = ""
    spec_path: str = ""
    repo: str = ""
    ref: str = ""
    command: str = ""
    priority: str = ""

    @classmethod
    def from_values(cls, values: Mapping[str, str]) -> NewRun:
        return cls(**{name: values.get(name, "") for name in FIELDS})

    def local_errors(self) -> dict[str, str]:
        """What is wrong before anything is sent."""
        errors: dict[str, str] = {}
        if (problem := project_error(self.project)) is not None:
            errors["project"] = problem
        if (problem := label_error(self.env)) is not None:
            errors["env"] = problem
        if self.ref.strip() and not self.repo.strip():
            errors["ref"] = "needs a repository"
        if self.priority and self.priority not in PRIORITIES:
            errors["priority"] = f"one of {', '.join(PRIORITIES)}"
        try:
            shlex.split(self.command)
        except ValueError as exc:
            errors["command"] = f"cannot be split into words: {exc}"
        return errors

    def body(self, cwd: Path | None = None) -> dict[str, Any]:
        """The body of `POST /api/v1/runs`; call after `local_errors()` found nothing."""
        options = RunOptions(
            project=self.project.strip(),
            env=self.env.strip() or None,
            spec_path=self.spec_path.strip() or None,
            repo=self.repo.strip() or None,
            ref=self.ref.strip() or None,
            command=shlex.split(self.command),
            priority=self.priority or None,
        )
        return build_run_request(options, cwd=cwd)
