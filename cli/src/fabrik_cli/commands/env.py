"""`fabrik env`: project environments through the gateway (`/api/v1/projects/{p}/envs`).

    fabrik env set KEY=VAL ... [--from-file .env] [--replace] [--unset KEY]   merge by default
    fabrik env ls                     key names of one environment
    fabrik env envs                   a project's environments
    fabrik env pull [FILE]            dotenv (file mode 0600); values hidden on a terminal unless --reveal
    fabrik env run -- CMD ...         run CMD here with the environment's variables
    fabrik env diff --from A --to B   key names only: added, removed, changed
    fabrik env promote --from A --to B   previews the diff, asks unless --yes
    fabrik env delete                 asks unless --yes

Protected environments (`prod`, `production`, `live`) ask before any write (`--yes` skips the
question) and need the maintainer role on the gateway. docs/environments.md.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import click

from fabrik_cli.client import ApiClient
from fabrik_cli.commands.common import api_option, err, open_client, out, output_option, project_required
from fabrik_cli.errors import CliError, UsageError
from fabrik_cli.output import OutputFormat, dump, format_time, render_table
from fabrik_cli.userconfig import ENV_PROJECT, default_project
from fabrik_common.envs import (
    DotenvEntry,
    DotenvError,
    format_dotenv,
    is_protected,
    key_problem,
    name_problem,
    parse_dotenv_entries,
)

F = TypeVar("F", bound=Callable[..., Any])


ENV_ENV = "FABRIK_ENV"
DEFAULT_ENV = "dev"
HIDDEN = "********"


# --------------------------------------------------------------------------------------------
# Options


def project_option(func: F) -> F:
    option = click.option(
        "--project",
        "-p",
        callback=project_required,
        envvar=ENV_PROJECT,
        show_envvar=True,
        default=default_project,
        show_default="config.yaml's `project`",
        help="Project (a DNS-1123 label).",
    )
    return option(func)


def env_option(func: F) -> F:
    option = click.option(
        "--env",
        "-e",
        "env",
        default=DEFAULT_ENV,
        show_default=True,
        envvar=ENV_ENV,
        show_envvar=True,
        help="Environment of the project (a DNS-1123 label).",
    )
    return option(func)


def yes_option(func: F) -> F:
    option = click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
    return option(func)


def _check_names(**names: str) -> None:
    lines = [f"{flag}: {rule}" for flag, value in names.items() if (rule := name_problem(value)) is not None]
    if lines:
        raise UsageError("invalid name", [f"--{line}" for line in lines])


def env_path(project: str, env: str | None = None, *rest: str) -> str:
    parts = ["/projects", quote(project, safe=""), "envs"]
    if env is not None:
        parts.append(quote(env, safe=""))
    return "/".join([*parts, *rest])


def _confirm(question: str, yes: bool) -> None:
    """Ask on the terminal unless `--yes`; no (or no answer) stops with exit 1, nothing written."""
    if yes:
        return
    if not click.confirm(question, default=False, err=True):
        raise CliError("not confirmed; nothing was changed (use --yes to skip the question)")


def _stdout_is_terminal() -> bool:
    return sys.stdout.isatty()


def _keys(items: Sequence[str]) -> str:
    return ", ".join(items)


def _summary_of_changes(changes: Mapping[str, Any]) -> str:
    parts = []
    for name in ("added", "changed", "removed"):
        keys = [str(k) for k in changes.get(name) or []]
        if keys:
            parts.append(f"{len(keys)} {name} ({_keys(keys)})")
    return ", ".join(parts) if parts else "no change"


@click.group("env")
def env_group() -> None:
    """Project environments: the variables a project's runs start with.

    Values are stored encrypted and never shown unless asked for (`pull --reveal`, a file, a pipe).
    `prod`, `production` and `live` are protected: writes ask for confirmation (`--yes` skips it)
    and need the maintainer role.
    """


# --------------------------------------------------------------------------------------------
# set


def _from_args(assignments: Sequence[str], environ: Mapping[str, str]) -> dict[str, str]:
    values: dict[str, str] = {}
    problems: list[str] = []
    for item in assignments:
        key, sep, value = item.partition("=")
        if not sep:
            if key in environ:
                value = environ[key]
            else:
                problems.append(f"{key}: no '=' and no such variable in your environment (use KEY=VALUE)")
                continue
        if (rule := key_problem(key)) is not None:
            problems.append(f"{key}: {rule}")
            continue
        values[key] = value
    if problems:
        raise UsageError("invalid KEY=VALUE argument(s)", problems)
    return values


def read_dotenv_file(path: str) -> list[DotenvEntry]:
    """Entries of a dotenv file (`-`: stdin), each key checked; every problem with its line."""
    source = "<stdin>" if path == "-" else path
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {source}: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        entries = parse_dotenv_entries(text, source=source)
    except DotenvError as exc:
        raise UsageError(f"{source} is not a valid dotenv file", exc.lines()) from None
    problems = [
        f"{source}:{entry.line}: {entry.key} {rule}"
        for entry in entries
        if (rule := key_problem(entry.key)) is not None
    ]
    if problems:
        raise UsageError(f"{source} has keys that cannot be set", problems)
    return entries


@env_group.command("set")
@click.argument("assignments", nargs=-1, metavar="[KEY=VALUE]...")
@click.option(
    "--from-file",
    "-f",
    "from_file",
    metavar="FILE",
    default=None,
    help="Read KEY=VALUE lines from a dotenv file (`-`: stdin); arguments override it.",
)
@click.option("--replace", is_flag=True, help="The environment becomes exactly these values.")
@click.option("--unset", "unset", multiple=True, metavar="KEY", help="Remove KEY (repeatable).")
@project_option
@env_option
@yes_option
@api_option
@output_option
def set_cmd(
    assignments: tuple[str, ...],
    from_file: str | None,
    replace: bool,
    unset: tuple[str, ...],
    project: str,
    env: str,
    yes: bool,
    api: str | None,
    output: str,
) -> None:
    """Set variables: merged into the environment (created if needed).

    \b
    A bare KEY takes its value from your environment (keeps secrets out of shell history).
    Examples:
      fabrik env set -p demo DATABASE_URL=postgres://... LOG_LEVEL=debug
      fabrik env set -p demo -e staging --from-file .env.staging
      fabrik env set -p demo --unset OLD_KEY
      fabrik env set -p demo -e prod --replace --from-file prod.env --yes
    """
    _check_names(project=project, env=env)
    values: dict[str, str] = {}
    if from_file is not None:
        values.update({e.key: e.value for e in read_dotenv_file(from_file)})
    values.update(_from_args(assignments, os.environ))
    unset_problems = [f"--unset {key}: {rule}" for key in unset if (rule := key_problem(key)) is not None]
    if unset_problems:
        raise UsageError("invalid --unset key(s)", unset_problems)
    if replace and unset:
        raise UsageError("--unset cannot be combined with --replace (a replace drops every key not given)")
    both = sorted(set(values) & set(unset))
    if both:
        raise UsageError(f"set and unset at once: {_keys(both)}")
    if not values and not unset and not replace:
        raise UsageError("nothing to set: give KEY=VALUE arguments, --from-file or --unset")
    if is_protected(env):
        what = f"replace it with {len(values)} variable(s)" if replace else _describe_merge(values, unset)
        _confirm(f"{project}/{env} is a protected environment: {what}?", yes)
    body: dict[str, Any] = {"values": values, "unset": list(unset), "replace": replace}
    if is_protected(env):
        body["confirm"] = True
    with open_client(api) as client:
        result = client.request("PUT", env_path(project, env), json_body=body)
    _print_write(result, output)


def _describe_merge(values: Mapping[str, str], unset: Sequence[str]) -> str:
    parts = []
    if values:
        parts.append(f"set {_keys(sorted(values))}")
    if unset:
        parts.append(f"unset {_keys(sorted(unset))}")
    return " and ".join(parts)


def _print_write(result: Any, output: str) -> None:
    fmt = OutputFormat(output)
    if fmt is not OutputFormat.TABLE:
        out(dump(result, fmt))
        return
    if not isinstance(result, Mapping):
        raise CliError(f"unexpected answer: {result!r}")
    where = f"{result.get('project')}/{result.get('env')}"
    created = " (created)" if result.get("created") else ""
    changes = result.get("changes") if isinstance(result.get("changes"), Mapping) else {}
    out(
        f"{where}{created}: {_summary_of_changes(changes or {})}; "
        f"{len(result.get('keys') or [])} key(s), revision {result.get('revision')}"
    )


# --------------------------------------------------------------------------------------------
# ls, envs


@env_group.command("ls")
@project_option
@env_option
@api_option
@output_option
def ls_cmd(project: str, env: str, api: str | None, output: str) -> None:
    """Key names of an environment (never values)."""
    _check_names(project=project, env=env)
    with open_client(api) as client:
        view = client.request("GET", env_path(project, env))
    fmt = OutputFormat(output)
    if fmt is not OutputFormat.TABLE:
        out(dump(view, fmt))
        return
    err(_describe_view(view))
    for key in view.get("keys") or []:
        out(str(key))


def _describe_view(view: Mapping[str, Any]) -> str:
    protected = " (protected)" if view.get("protected") else ""
    when = format_time(view.get("updated_at"), datetime.now().astimezone())
    return (
        f"{view.get('project')}/{view.get('env')}{protected}: {len(view.get('keys') or [])} key(s), "
        f"revision {view.get('revision')}, updated {when} by {view.get('updated_by')}"
    )


@env_group.command("envs")
@project_option
@api_option
@output_option
def envs_cmd(project: str, api: str | None, output: str) -> None:
    """A project's environments: key counts, revisions, last changes."""
    _check_names(project=project)
    with open_client(api) as client:
        listing = client.request("GET", env_path(project))
    fmt = OutputFormat(output)
    if fmt is not OutputFormat.TABLE:
        out(dump(listing, fmt))
        return
    items = listing.get("items") or []
    if not items:
        err(
            f"project {project} has no environments yet "
            f"(set one with `fabrik env set -p {project} KEY=VALUE`)"
        )
        return
    now = datetime.now().astimezone()
    out(
        render_table(
            ["ENV", "KEYS", "REVISION", "UPDATED", "BY"],
            [
                [
                    str(item.get("env")) + (" (protected)" if item.get("protected") else ""),
                    str(item.get("keys")),
                    str(item.get("revision")),
                    format_time(item.get("updated_at"), now),
                    str(item.get("updated_by")),
                ]
                for item in items
            ],
        )
    )


# --------------------------------------------------------------------------------------------
# pull, run


def _reveal(client: ApiClient, project: str, env: str) -> Mapping[str, Any]:
    view = client.request("GET", env_path(project, env), params=[("reveal", "true")])
    if not isinstance(view, Mapping) or not isinstance(view.get("values"), Mapping):
        raise CliError(f"the API answered without values: {view!r}")
    return view


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path` with mode 0600, atomically (a temporary file in the same directory)."""
    directory = path.parent if str(path.parent) else Path()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=directory)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    os.chmod(path, 0o600)


@env_group.command("pull")
@click.argument("file", required=False, metavar="[FILE]")
@click.option("--reveal", is_flag=True, help="Show values on a terminal too.")
@project_option
@env_option
@api_option
def pull_cmd(file: str | None, reveal: bool, project: str, env: str, api: str | None) -> None:
    """Write the environment as a dotenv file (mode 0600), or print it.

    Without FILE (or with `-`) it goes to stdout: on a terminal the values are hidden unless
    --reveal is given; into a pipe or a redirect they are written as they are.
    """
    _check_names(project=project, env=env)
    to_stdout = file is None or file == "-"
    with open_client(api) as client:
        if to_stdout and _stdout_is_terminal() and not reveal:
            view = client.request("GET", env_path(project, env))
            err(f"# {_describe_view(view)}; values hidden on a terminal: add --reveal, or pull into a FILE")
            for key in view.get("keys") or []:
                out(f"{key}={HIDDEN}")
            return
        view = _reveal(client, project, env)
    values = {str(k): str(v) for k, v in view["values"].items()}
    header = [f"fabrik env pull: project {project}, env {env}, revision {view.get('revision')}"]
    text = format_dotenv(values, header=header)
    if to_stdout:
        click.echo(text, nl=False)
        return
    assert file is not None
    try:
        write_private(Path(file), text)
    except OSError as exc:
        raise CliError(f"cannot write {file}: {exc.strerror or exc}") from None
    err(f"wrote {len(values)} variable(s) of {project}/{env} to {file} (mode 0600)")


@env_group.command("run", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED, metavar="-- COMMAND...")
@project_option
@env_option
@api_option
def run_cmd(command: tuple[str, ...], project: str, env: str, api: str | None) -> None:
    """Run COMMAND here with the environment's variables added to yours (theirs win).

    The exit code is COMMAND's. Example: fabrik env run -p demo -e staging -- ./manage.py migrate
    """
    _check_names(project=project, env=env)
    with open_client(api) as client:
        view = _reveal(client, project, env)
    child_env = {**os.environ, **{str(k): str(v) for k, v in view["values"].items()}}
    sys.exit(run_with_env(list(command), child_env))


def run_with_env(argv: list[str], environ: Mapping[str, str]) -> int:
    """Run `argv` and wait; Ctrl-C reaches it too (same process group). Returns its exit code
    (128 + N when a signal N ended it, as shells do)."""
    try:
        proc = subprocess.Popen(argv, env=dict(environ))
    except OSError as exc:
        raise CliError(f"cannot run {argv[0]}: {exc.strerror or exc}") from None
    while True:
        try:
            code = proc.wait()
            break
        except KeyboardInterrupt:
            continue  # the child got the SIGINT as well; wait for it to end
    if code < 0:
        return 128 + (-code)
    return code


# --------------------------------------------------------------------------------------------
# diff, promote


def _diff_lines(diff: Mapping[str, Any], *, source: str, target: str) -> list[str]:
    lines = [f"  + {k}   (in {source}, not in {target})" for k in diff.get("added") or []]
    lines += [f"  - {k}   (in {target}, not in {source})" for k in diff.get("removed") or []]
    lines += [f"  ~ {k}   (different values)" for k in diff.get("changed") or []]
    unchanged = diff.get("unchanged") or 0
    if unchanged:
        lines.append(f"  {unchanged} key(s) unchanged")
    return lines


def _has_changes(diff: Mapping[str, Any]) -> bool:
    return bool(diff.get("added") or diff.get("removed") or diff.get("changed"))


@env_group.command("diff")
@click.option("--from", "source", required=True, metavar="ENV", help="The environment copied from.")
@click.option("--to", "target", required=True, metavar="ENV", help="The environment compared with it.")
@click.option("--exit-code", is_flag=True, help="Exit 1 when the environments differ (as `git diff`).")
@project_option
@api_option
@output_option
def diff_cmd(source: str, target: str, exit_code: bool, project: str, api: str | None, output: str) -> None:
    """Key names that differ: what TO would undergo if FROM were promoted onto it.

    `+` only in FROM (would be added to TO), `-` only in TO (would be removed), `~` different
    values. Values are never shown.
    """
    _check_names(project=project, **{"from": source, "to": target})
    with open_client(api) as client:
        diff = client.request(
            "GET", env_path(project, None, "diff"), params=[("from", source), ("to", target)]
        )
    fmt = OutputFormat(output)
    if fmt is not OutputFormat.TABLE:
        out(dump(diff, fmt))
    else:
        out(f"{project}: {source} -> {target}")
        lines = _diff_lines(diff, source=source, target=target)
        out(
            "\n".join(lines)
            if _has_changes(diff)
            else "  no differences" + (f"\n{lines[-1]}" if lines else "")
        )
    if exit_code and _has_changes(diff):
        sys.exit(1)


@env_group.command("promote")
@click.option("--from", "source", required=True, metavar="ENV", help="The environment to copy.")
@click.option("--to", "target", required=True, metavar="ENV", help="The environment that becomes a copy.")
@click.option("--merge", is_flag=True, help="Set FROM's keys in TO and keep TO's other keys.")
@project_option
@yes_option
@api_option
@output_option
def promote_cmd(
    source: str, target: str, merge: bool, project: str, yes: bool, api: str | None, output: str
) -> None:
    """Copy FROM's variables onto TO: shows what changes (key names), asks, then applies.

    TO becomes a copy of FROM (keys only in TO are removed) unless --merge.
    """
    _check_names(project=project, **{"from": source, "to": target})
    body: dict[str, Any] = {"from": source, "to": target, "merge": merge}
    fmt = OutputFormat(output)
    with open_client(api) as client:
        preview = client.request(
            "POST", env_path(project, None, "promote"), json_body={**body, "confirm": False}
        )
        diff = preview.get("diff") or {}
        stream = err if fmt is not OutputFormat.TABLE else out
        stream(f"promote {project}/{source} -> {target} ({'merge' if merge else 'replace'}):")
        if not _has_changes(diff):
            stream(f"  nothing to promote: {target} already has {source}'s values")
            if fmt is not OutputFormat.TABLE:
                out(dump(preview, fmt))
            return
        stream("\n".join(_diff_lines(diff, source=source, target=target)))
        protected = " (a protected environment)" if is_protected(target) else ""
        _confirm(f"Apply these changes to {project}/{target}{protected}?", yes)
        body.update(
            confirm=True, from_revision=diff.get("from_revision"), to_revision=diff.get("to_revision")
        )
        result = client.request("POST", env_path(project, None, "promote"), json_body=body)
    if fmt is not OutputFormat.TABLE:
        out(dump(result, fmt))
        return
    out(f"promoted {project}/{source} to {target}: revision {result.get('revision')}")


# --------------------------------------------------------------------------------------------
# delete


@env_group.command("delete")
@project_option
@env_option
@yes_option
@api_option
@output_option
def delete_cmd(project: str, env: str, yes: bool, api: str | None, output: str) -> None:
    """Delete an environment and all its variables (asks unless --yes)."""
    _check_names(project=project, env=env)
    protected = " (a protected environment)" if is_protected(env) else ""
    _confirm(f"Delete {project}/{env}{protected} and all its variables?", yes)
    params = [("confirm", "true")] if is_protected(env) else []
    with open_client(api) as client:
        result = client.request("DELETE", env_path(project, env), params=params)
    fmt = OutputFormat(output)
    if fmt is not OutputFormat.TABLE:
        out(dump(result, fmt))
        return
    out(f"deleted {project}/{env} ({len(result.get('removed') or [])} key(s))")
