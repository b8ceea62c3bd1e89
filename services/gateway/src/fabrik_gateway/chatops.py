"""A run asked for in chat: what the GitHub comment `/fabrik run [spec] [--opts]` and the Slack
command `/fabrik run <project> <spec> [--opts]` share (docs/chatops.md).

- the spec reference: a path is used as is, a bare id means `.fabrik/specs/<id>.json`;
- the options (`--env`, `--priority`, `--timeout`, `--budget`, `--template`, `--cpu`, `--memory`,
  `--label`; Slack adds `--repo` and `--ref`), how they are written (`--name value` or
  `--name=value`) and read (`--timeout 1h30m`, `--budget $5`, `--label key=value`);
- the `POST /api/v1/runs` body they ask for (validated afterwards like any submit);
- the option a rejected field of that body came from (`timeout_seconds` -> `--timeout`).

Each integration keeps its own surface syntax (which words are the spec and the project, the other
commands) and its own way of reporting a problem: a problem here is a `ChatError` whose message is
for a person (option names in backticks, which both GitHub and Slack show as code), turned into a
reply comment by GitHub and into a usage answer by Slack.

Nothing here imports the rest of the gateway (`settings.py` imports `github.config`, which uses it).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

SPEC_DIR: Final = ".fabrik/specs"
SPEC_SUFFIXES: Final = (".json", ".yaml", ".yml", ".md")
SPEC_RULE: Final = (
    "a spec id (letters, digits, '.', '_' and '-', meaning `.fabrik/specs/<id>.json`) or a relative "
    "path in the repository (`specs/feature.json`: with a `/` or a .json, .yaml, .yml or .md suffix; "
    "no leading `/`, no `..`, no `\\`)"
)
_SPEC_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
# `3600`, `90s`, `30m`, `2h`, `1d`, `1h30m`, `1d 2h` (a number without a unit is seconds)
_DURATION = re.compile(
    r"^(?:(\d{1,9})\s*d)?\s*(?:(\d{1,9})\s*h)?\s*(?:(\d{1,9})\s*m)?\s*(?:(\d{1,9})\s*s?)?$"
)
_UNITS: Final = (86400, 3600, 60, 1)
_T = TypeVar("_T")


class ChatError(ValueError):
    """A run asked for in chat that cannot be asked of the gateway; the message says why."""


# ------------------------------------------------------------------------------------------------
# The spec


def spec_path(spec: str) -> str | None:
    """Where a spec reference points in the run's repository, None when it is neither form: a
    path (with a `/` or a spec suffix; relative, no `..` component, no backslash) as is, an id as
    `.fabrik/specs/<id>.json`."""
    if "/" in spec or spec.lower().endswith(SPEC_SUFFIXES):
        if spec.startswith("/") or "\\" in spec or ".." in spec.split("/"):
            return None
        return spec
    return f"{SPEC_DIR}/{spec}.json" if _SPEC_ID.match(spec) else None


def check_spec(spec: str) -> str:
    """The repository path of a spec reference; raises `ChatError` naming both forms."""
    path = spec_path(spec)
    if path is None:
        raise ChatError(f"`{spec}` is not a spec id or a spec path: give {SPEC_RULE}")
    return path


# ------------------------------------------------------------------------------------------------
# The options


@dataclass(frozen=True)
class Option:
    name: str
    """Without the dashes: `timeout` is written `--timeout`."""
    field: str
    """The field of the submit body it sets (dotted when nested: `resources.cpu`)."""
    metavar: str
    """What a value looks like, for usage lines."""
    help: str
    repeatable: bool = False

    @property
    def flag(self) -> str:
        return f"--{self.name}"


def _options(*options: Option) -> dict[str, Option]:
    return {option.name: option for option in options}


OPTIONS: Final = _options(
    Option("env", "env", "ENV", "the project environment (default `dev`)"),
    Option("priority", "priority", "low|normal|high", "`low`, `normal` or `high`"),
    Option(
        "timeout",
        "timeout_seconds",
        "30m",
        "seconds, or a duration like `90s`, `30m`, `2h`, `1d`, `1h30m` (at most 24h)",
    ),
    Option("budget", "budget_usd", "USD", "LLM budget in USD, e.g. `5`, `2.50` or `$5`"),
    Option("template", "template", "NAME", "resource template: `default` or `high-cpu`"),
    Option("cpu", "resources.cpu", "2", "CPU of the workload, e.g. `2` or `500m` (with `--memory`)"),
    Option("memory", "resources.memory", "4Gi", "memory of the workload, e.g. `4Gi` (with `--cpu`)"),
    Option("label", "labels", "key=value", "`key=value`, repeatable", repeatable=True),
)
"""The options of `/fabrik run` on GitHub and on Slack."""

REPO_OPTIONS: Final = _options(
    Option("repo", "repo.url", "URL", "the run's git repository (a local path for the local backend)"),
    Option("ref", "repo.ref", "REF", "the branch, tag or commit to run on (default `HEAD`)"),
)
"""Where the run's code comes from: Slack only (on GitHub it is the commented repository's commit)."""


def synopsis(options: Mapping[str, Option]) -> str:
    """The options for a usage line: `[--env ENV] [--priority low|normal|high] ...`."""
    return " ".join(
        f"[{option.flag} {option.metavar}]" + ("..." if option.repeatable else "")
        for option in options.values()
    )


def split_options(
    words: Sequence[str], options: Mapping[str, Option]
) -> tuple[list[str], dict[str, list[str]]]:
    """The words that are not options, and the values of each option given (`--name value` or
    `--name=value`, the name in any case). Raises `ChatError` for an unknown option, one without a
    value and one given twice that is not repeatable."""
    positional: list[str] = []
    values: dict[str, list[str]] = {}
    i = 0
    while i < len(words):
        word = words[i]
        i += 1
        if not word.startswith("--"):
            positional.append(word)
            continue
        raw_name, eq, value = word[2:].partition("=")
        name = raw_name.lower()
        option = options.get(name)
        if option is None:
            known = ", ".join(f"`{o.flag}`" for o in options.values())
            raise ChatError(f"unknown option `--{raw_name}`; the options are {known}")
        if not eq:
            if i >= len(words) or words[i].startswith("--"):
                raise ChatError(f"`{option.flag}` needs a value: {option.help}")
            value = words[i]
            i += 1
        if name in values and not option.repeatable:
            raise ChatError(f"`{option.flag}` is given twice")
        values.setdefault(name, []).append(value)
    return positional, values


def parse_duration(text: str) -> int:
    """Seconds from `3600`, `90s`, `30m`, `2h`, `1d`, `1h30m`; raises `ChatError`. No upper bound
    here: the submit's validation has one, and names `--timeout` when it is exceeded."""
    match = _DURATION.match(text.strip().lower())
    if match is None or not any(match.groups()):
        raise ChatError(
            f"`--timeout {text}` must be seconds or a duration like `90s`, `30m`, `2h`, `1d`, `1h30m`"
        )
    return sum(int(group) * unit for group, unit in zip(match.groups(), _UNITS, strict=True) if group)


def parse_budget(text: str) -> float:
    """USD from `5`, `2.50`, `$5`; raises `ChatError`."""
    try:
        value = float(text.strip().removeprefix("$"))
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise ChatError(f"`--budget {text}` must be an amount in USD, e.g. `5`, `2.50` or `$5`")
    return value


def parse_label(text: str) -> tuple[str, str]:
    """`key=value` (surrounding spaces dropped); raises `ChatError`."""
    key, eq, value = text.partition("=")
    if not eq or not key.strip():
        raise ChatError(f"`--label {text}` must be `key=value`")
    return key.strip(), value.strip()


@dataclass(frozen=True)
class RunOptions:
    """The options of a run asked for in chat, read (None: not given)."""

    env: str | None = None
    priority: str | None = None
    timeout_seconds: int | str | None = None
    """A str only from `read_options(strict=False)`: the text given, which is not a duration."""
    budget_usd: float | str | None = None
    """A str only from `read_options(strict=False)`: the text given, which is not an amount."""
    template: str | None = None
    cpu: str | None = None
    memory: str | None = None
    labels: dict[str, str] = field(default_factory=dict)


def read_options(values: Mapping[str, Sequence[str]], *, strict: bool = True) -> RunOptions:
    """The options `split_options` found, read. A `--label` that is not `key=value` raises
    `ChatError`, and so does a `--timeout` or `--budget` that cannot be read when `strict`;
    otherwise that one is kept as given, for the submit's validation to name with the other
    invalid fields (Slack reports every problem of a command at once)."""
    last = {name: given[-1] for name, given in values.items() if given}
    return RunOptions(
        env=last.get("env"),
        priority=last.get("priority"),
        timeout_seconds=_read(last.get("timeout"), parse_duration, strict=strict),
        budget_usd=_read(last.get("budget"), parse_budget, strict=strict),
        template=last.get("template"),
        cpu=last.get("cpu"),
        memory=last.get("memory"),
        labels=dict(parse_label(pair) for pair in values.get("label", ())),
    )


def _read(text: str | None, parse: Callable[[str], _T], *, strict: bool) -> _T | str | None:
    if text is None:
        return None
    try:
        return parse(text)
    except ChatError:
        if strict:
            raise
        return text


# ------------------------------------------------------------------------------------------------
# The submit, and what a refusal of it means in the command


def submit_body(
    options: RunOptions,
    *,
    project: str,
    spec: str,
    repo_url: str,
    ref: str | None = None,
    labels: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The `POST /api/v1/runs` body of a run asked for in chat (validated afterwards like any
    submit). `labels` (the integration's own, naming the origin) win over the command's. Raises
    `ChatError` when `spec` is not a spec reference."""
    repo: dict[str, str] = {"url": repo_url}
    if ref is not None:
        repo["ref"] = ref
    body: dict[str, Any] = {"project": project, "spec_path": check_spec(spec), "repo": repo}
    for name, value in (
        ("env", options.env),
        ("priority", options.priority),
        ("timeout_seconds", options.timeout_seconds),
        ("budget_usd", options.budget_usd),
        ("template", options.template),
    ):
        if value is not None:
            body[name] = value
    resources = {
        name: value for name, value in (("cpu", options.cpu), ("memory", options.memory)) if value is not None
    }
    if resources:
        body["resources"] = resources
    all_labels = {**options.labels, **(labels or {})}
    if all_labels:
        body["labels"] = all_labels
    return body


def option_for_field(field_name: str, options: Iterable[Option], positional: Mapping[str, str]) -> str:
    """What set a field of a rejected submit in the command: `timeout_seconds` -> `--timeout`,
    `labels.x` -> `--label x`, `resources` -> `--cpu/--memory`, a field in `positional` -> the word
    it names (`spec_path` -> `<spec>`); a field nothing in the command sets keeps its name."""
    if field_name in positional:
        return positional[field_name]
    by_field = {option.field: option.flag for option in options}
    head, _, rest = field_name.partition(".")
    if head == "labels" and "labels" in by_field:
        return f"{by_field['labels']} {rest}" if rest else by_field["labels"]
    if field_name in by_field:
        return by_field[field_name]
    head = head.split("[", 1)[0]
    if head in positional:
        return positional[head]
    if head in by_field:
        return by_field[head]
    within = [flag for name, flag in by_field.items() if name.startswith(f"{head}.")]
    return "/".join(within) if within else field_name
