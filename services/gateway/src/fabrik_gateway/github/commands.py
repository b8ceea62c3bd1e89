"""`/fabrik run [spec] [--key value]...` in an issue or pull-request comment, and the submit body
(`POST /api/v1/runs` shape) it asks for.

The command is the first line of the comment whose first word is `/fabrik` (lines inside fenced
code blocks and quotes do not count). Words are split like a shell does (`--label "a=b c"`).

`spec` names the spec the run works from, a file in the repository, and the options are those of
every run asked for in chat (`fabrik_gateway.chatops`, docs/chatops.md): a path (`specs/login.json`)
is used as is, a bare id (`login`) means `.fabrik/specs/<id>.json`. Without one,
`FABRIK_GITHUB_DEFAULT_SPEC` applies. The repository and the commit are those of the comment
(there is no `--repo` or `--ref` here).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Any, Final

from fabrik_gateway import chatops
from fabrik_gateway.chatops import OPTIONS, ChatError, RunOptions, check_spec, read_options, split_options
from fabrik_gateway.chatops import parse_duration as parse_duration

COMMAND: Final = "/fabrik"
USAGE: Final = f"`{COMMAND} run [spec] {chatops.synopsis(OPTIONS)}`"
POSITIONAL: Final = {"spec_path": "spec", "project": "project"}
"""Fields of a rejected submit that the command sets without an option."""
spec_path_for: Final = check_spec
"""The repository path of a spec reference (`chatops.check_spec`)."""


class CommandError(ChatError):
    """A `/fabrik` comment that cannot be run; the message says why, for a reply comment."""


@dataclass(frozen=True)
class RunCommand(RunOptions):
    spec: str | None = None
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
    try:
        positional, values = split_options(words[2:], OPTIONS)
    except ChatError as exc:
        raise CommandError(f"{exc}. Usage: {USAGE}") from None
    if len(positional) > 1:
        raise CommandError(
            f"`{positional[1]}`: only one spec can be given (already `{positional[0]}`). Usage: {USAGE}"
        )
    spec = positional[0] if positional else None
    try:
        if spec is not None:
            check_spec(spec)
        options = read_options(values)
    except ChatError as exc:
        raise CommandError(str(exc)) from None
    return RunCommand(**vars(options), spec=spec, line=" ".join(words))


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
    try:
        return chatops.submit_body(
            command, project=project, spec=spec, repo_url=repo_url, ref=ref, labels=labels
        )
    except ChatError as exc:
        raise CommandError(str(exc)) from None


def option_for_field(field_name: str) -> str:
    """How a field of a rejected submit is called in the command (`timeout_seconds` -> `--timeout`)."""
    return chatops.option_for_field(field_name, OPTIONS.values(), POSITIONAL)
