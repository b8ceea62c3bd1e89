"""`/fabrik run [spec] [--key value]...` in an issue or pull-request comment, and the submit body
(`POST /api/v1/runs` shape) it asks for.

The command is the first line of the comment whose first word is `/fabrik` (lines inside fenced
code blocks and quotes do not count). Words are split like a shell does (`--label "a=b c"`).

`spec` names the spec the run works from, a file in the repository: a path (`specs/login.json`,
anything with a `/` or a `.json`/`.yaml`/`.yml`/`.md` suffix) is used as is (`spec_path`); a bare id
(`login`) means `.fabrik/specs/<id>.json`. Without one, `FABRIK_GITHUB_DEFAULT_SPEC` applies.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from typing import Any, Final

COMMAND: Final = "/fabrik"
SPEC_DIR: Final = ".fabrik/specs"
SPEC_SUFFIXES: Final = (".json", ".yaml", ".yml", ".md")

OPTIONS: Final[dict[str, str]] = {
    "--env": "the project environment (default `dev`)",
    "--priority": "`low`, `normal` or `high`",
    "--timeout": "seconds, or a duration like `90m`, `2h`, `1h30m` (at most 24h)",
    "--budget": "LLM budget in USD, e.g. `5` or `2.50`",
    "--template": "resource template: `default` or `high-cpu`",
    "--label": "`key=value`, repeatable",
}
USAGE: Final = (
    "`/fabrik run [spec] [--env ENV] [--priority low|normal|high] [--timeout 1h] [--budget USD] "
    "[--template NAME] [--label key=value]...`"
)
_SPEC_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_DURATION = re.compile(r"^(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s?)?$")


class CommandError(ValueError):
    """A `/fabrik` comment that cannot be run; the message says why, for a reply comment."""


@dataclass(frozen=True)
class RunCommand:
    spec: str | None = None
    env: str | None = None
    priority: str | None = None
    timeout_seconds: int | None = None
    budget_usd: float | None = None
    template: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    line: str = f"{COMMAND} run"
    """The command as written (for messages)."""


def find_command_line(text: str | None) -> str | None:
    """The first line whose first word is `/fabrik`, outside fenced code blocks; None if none."""
    fenced = False
    for raw in (text or "").splitlines():
        line = raw.strip()
        if line.startswith(("```", "~~~")):
            fenced = not fenced
            continue
        if fenced:
            continue
        words = line.split(None, 1)
        if words and words[0] == COMMAND:
            return line
    return None


def parse_command(line: str) -> RunCommand:
    """A `/fabrik run ...` line; raises `CommandError` naming what is wrong."""
    try:
        words = shlex.split(line)
    except ValueError as exc:
        raise CommandError(f"cannot read the command: {exc}. Usage: {USAGE}") from None
    if not words or words[0] != COMMAND:
        raise CommandError(f"not a {COMMAND} command. Usage: {USAGE}")
    if len(words) < 2 or words[1] != "run":
        what = f"`{words[1]}` is not a command" if len(words) > 1 else "a command is missing"
        raise CommandError(f"{what}: the only command is `run`. Usage: {USAGE}")
    spec: str | None = None
    values: dict[str, str] = {}
    labels: dict[str, str] = {}
    rest = words[2:]
    i = 0
    while i < len(rest):
        word = rest[i]
        i += 1
        if not word.startswith("--"):
            if spec is not None:
                raise CommandError(f"`{word}`: only one spec can be given (already `{spec}`). Usage: {USAGE}")
            spec = word
            continue
        name, eq, value = word.partition("=")
        if name not in OPTIONS:
            known = ", ".join(f"`{o}`" for o in OPTIONS)
            raise CommandError(f"unknown option `{name}`; the options are {known}. Usage: {USAGE}")
        if not eq:
            if i >= len(rest) or rest[i].startswith("--"):
                raise CommandError(f"`{name}` needs a value: {OPTIONS[name]}")
            value = rest[i]
            i += 1
        if name == "--label":
            key, has_eq, label_value = value.partition("=")
            if not has_eq or not key:
                raise CommandError(f"`--label {value}` must be `key=value`")
            labels[key] = label_value
            continue
        if name in values:
            raise CommandError(f"`{name}` is given twice")
        values[name] = value
    return RunCommand(
        spec=check_spec(spec) if spec is not None else None,
        env=values.get("--env"),
        priority=values.get("--priority"),
        timeout_seconds=parse_duration(values["--timeout"]) if "--timeout" in values else None,
        budget_usd=parse_budget(values["--budget"]) if "--budget" in values else None,
        template=values.get("--template"),
        labels=labels,
        line=" ".join(words),
    )


def parse_duration(text: str) -> int:
    match = _DURATION.match(text.strip().lower())
    if not text.strip() or match is None or not any(match.groups()):
        raise CommandError(f"`--timeout {text}` must be seconds or a duration like `90m`, `2h`, `1h30m`")
    hours, minutes, seconds = (int(g) if g else 0 for g in match.groups())
    return hours * 3600 + minutes * 60 + seconds


def parse_budget(text: str) -> float:
    try:
        value = float(text.strip().removeprefix("$"))
    except ValueError:
        raise CommandError(f"`--budget {text}` must be an amount in USD, e.g. `5` or `2.50`") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise CommandError(f"`--budget {text}` must be an amount in USD, e.g. `5` or `2.50`")
    return value


def check_spec(spec: str) -> str:
    if is_spec_path(spec) or _SPEC_ID.match(spec):
        return spec
    raise CommandError(
        f"`{spec}` is not a spec: give a path in the repository (`specs/feature.json`) or a spec id "
        f"(letters, digits, '.', '_' and '-', meaning `{SPEC_DIR}/<id>.json`)"
    )


def is_spec_path(spec: str) -> bool:
    return "/" in spec or spec.lower().endswith(SPEC_SUFFIXES)


def spec_path_for(spec: str) -> str:
    """The repository path of a spec reference: a path as is, an id under `.fabrik/specs/`."""
    return spec if is_spec_path(spec) else f"{SPEC_DIR}/{spec}.json"


def submit_body(
    command: RunCommand,
    *,
    project: str,
    repo_url: str,
    ref: str,
    default_spec: str,
    labels: dict[str, str],
) -> dict[str, Any]:
    """The `POST /api/v1/runs` body a command asks for (validated afterwards like any submit).
    Raises `CommandError` when there is no spec at all. `labels` (Fabrik's own, naming the
    origin) win over the command's."""
    spec = command.spec or default_spec or None
    if spec is None:
        raise CommandError(
            f"no spec: name one (`{COMMAND} run <spec>`), or ask the operator to set "
            "FABRIK_GITHUB_DEFAULT_SPEC"
        )
    body: dict[str, Any] = {
        "project": project,
        "spec_path": spec_path_for(spec),
        "repo": {"url": repo_url, "ref": ref},
        "labels": {**command.labels, **labels},
    }
    if command.env is not None:
        body["env"] = command.env
    if command.priority is not None:
        body["priority"] = command.priority
    if command.timeout_seconds is not None:
        body["timeout_seconds"] = command.timeout_seconds
    if command.budget_usd is not None:
        body["budget_usd"] = command.budget_usd
    if command.template is not None:
        body["template"] = command.template
    return body


_FIELD_OPTIONS: Final = {
    "env": "--env",
    "priority": "--priority",
    "timeout_seconds": "--timeout",
    "budget_usd": "--budget",
    "template": "--template",
    "spec_path": "spec",
    "project": "project",
}


def option_for_field(field_name: str) -> str:
    """How a field of a rejected submit is called in the command (`timeout_seconds` -> `--timeout`)."""
    if field_name.startswith("labels"):
        return "--label" + field_name.removeprefix("labels").replace(".", " ", 1)
    return _FIELD_OPTIONS.get(field_name, field_name)
