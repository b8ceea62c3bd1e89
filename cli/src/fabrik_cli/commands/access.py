"""`fabrik login|logout|whoami`, `fabrik token create|list|show|revoke`, `fabrik audit`: the
caller's credentials (stored by `fabrik_cli.credentials`), API tokens and the audit trail, over
`fabrik_cli.client` (HTTP) and `output` (rendering)."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import click

from fabrik_cli.client import ApiClient, ApiError, QueryValue, resolve_api_target
from fabrik_cli.commands.common import api_option, emit, err, open_client, out, output_option
from fabrik_cli.credentials import (
    ENV_TOKEN,
    Credential,
    CredentialStore,
    StoredCredential,
    jwt_expiry,
    now_text,
)
from fabrik_cli.errors import CliError, UsageError
from fabrik_cli.output import (
    OutputFormat,
    audit_table,
    format_projects,
    format_roles,
    format_time,
    token_detail,
    tokens_table,
    whoami_detail,
)

ROLES = ("viewer", "developer", "maintainer", "admin")
AUDIT_RESULTS = ("ok", "denied", "failed")
TOKEN_FIELD_FLAGS = {
    "name": "NAME",
    "role": "--role",
    "projects": "--project",
    "expires_in_days": "--expires-in-days",
}
_API_TOKEN = re.compile(r"^fbk_([0-9A-Za-z]{26})_")
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|m|h|d|w)$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def _stdin_is_terminal() -> bool:
    return sys.stdin.isatty()


# --------------------------------------------------------------------------------------------
# fabrik login | logout | whoami


def _read_token(token: str | None) -> str:
    """The credential from --token, stdin (`-`, or when stdin is not a terminal), or a prompt."""
    if token is None and _stdin_is_terminal():
        token = click.prompt("API token or JWT", hide_input=True, err=True)
    elif token is None or token == "-":  # noqa: S105 - `-` means stdin
        token = sys.stdin.read()
    text = (token or "").strip()
    if not text:
        raise UsageError("no token given: pass --token TOKEN, pipe it on stdin, or type it when asked")
    if any(c.isspace() for c in text):
        raise UsageError("the token must be one word (an API token `fbk_...` or a JWT), without spaces")
    return text


def _credential_line(credential: Credential | None) -> str:
    return credential.describe() if credential is not None else "none (anonymous)"


@click.command()
@click.option(
    "--token",
    default=None,
    metavar="TOKEN",
    help="The API token (`fbk_...`) or JWT; `-` reads it from stdin. [default: stdin when it is "
    "not a terminal, else asked for without echo]. On the command line it lands in your shell history.",
)
@api_option
@output_option
def login(token: str | None, api: str | None, output: str) -> None:
    """Check a credential against the API (`GET /whoami`) and store it for that API.

    Later commands to the same API send it (unless $FABRIK_TOKEN is set, which wins). Nothing is
    stored when the API refuses the credential.

    \b
    Examples:
      fabrik login --api https://fabrik.example.com          # asks for the token
      pass show fabrik/ci | fabrik login --api https://fabrik.example.com
    """
    target = resolve_api_target(api, os.environ)
    secret = _read_token(token)
    with ApiClient(target, credential=Credential(secret, "option")) as client:
        try:
            me = client.whoami()
        except ApiError as exc:
            if exc.status != 401:
                raise
            raise CliError(
                f"the API at {target.url} refused the credential: {exc.detail or exc.title or exc.status}",
                [
                    "nothing was stored; use an API token (`fbk_...`, from `fabrik token create`) "
                    "or a JWT this gateway accepts"
                ],
            ) from None
    if not isinstance(me, Mapping) or not me.get("authenticated"):
        raise CliError(
            f"the API at {target.url} did not accept the credential as a login; nothing was stored"
        )
    store = CredentialStore.default(os.environ)
    store.save(
        target.url,
        StoredCredential(
            token=secret,
            subject=str(me.get("subject") or ""),
            kind=str(me.get("kind") or ""),
            name=str(me.get("name") or ""),
            saved_at=now_text(),
        ),
    )
    roles = format_roles(me.get("role"), me.get("project_roles"))
    emit(
        me,
        output,
        lambda d: f"logged in to {target.url} as {d.get('subject')} ({d.get('kind')}): {roles}",
    )
    err(f"credential stored in {store.path} (mode 0600)")
    expires = jwt_expiry(secret)
    if expires is not None:
        err(f"this JWT expires {format_time(expires.isoformat(), datetime.now(UTC))}; log in again then")
    if os.environ.get(ENV_TOKEN):
        err(f"note: ${ENV_TOKEN} is set and wins over the stored credential; unset it to use this login")


@click.command()
@click.option("--all", "all_apis", is_flag=True, help="Forget the credentials of every API.")
@api_option
def logout(all_apis: bool, api: str | None) -> None:
    """Forget the credential `fabrik login` stored for the API (nothing is sent to the API).

    An API token stays valid until it is revoked (`fabrik token revoke ID`).
    """
    store = CredentialStore.default(os.environ)
    if all_apis:
        urls = store.clear()
        out(f"logged out of {', '.join(urls)}" if urls else f"not logged in to any API ({store.path})")
    else:
        target = resolve_api_target(api, os.environ)
        stored = store.get(target.url)
        if store.remove(target.url):
            out(f"logged out of {target.url} (its credential was removed from {store.path})")
            if stored is not None and stored.kind == "token":
                err("(an API token stays valid until it is revoked: `fabrik token revoke ID`)")
        else:
            out(f"not logged in to {target.url}: nothing stored in {store.path}")
    if os.environ.get(ENV_TOKEN):
        err(f"note: ${ENV_TOKEN} is still set, and commands still send it")


@click.command()
@api_option
@output_option
def whoami(api: str | None, output: str) -> None:
    """Who the API takes you for: subject, kind, roles, and which credential was sent."""
    with open_client(api) as client:
        data = client.whoami()
        url, credential = client.target.url, client.credential
    emit(data, output, lambda d: whoami_detail(d, api=url, credential=_credential_line(credential)))


# --------------------------------------------------------------------------------------------
# fabrik token create | list | show | revoke


def _token_flag(field: str) -> str | None:
    name = re.split(r"[.\[]", field.removeprefix("$.").removeprefix("body."), maxsplit=1)[0]
    return TOKEN_FIELD_FLAGS.get(name)


def _token_id(text: str) -> str:
    """A token id, also taken from the token itself (`fbk_<id>_<secret>`)."""
    match = _API_TOKEN.match(text.strip())
    return (match.group(1) if match else text.strip()).upper()


def _split_projects(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(p.strip() for value in values for p in value.split(",") if p.strip()))


@click.group("token")
def token_group() -> None:
    """API tokens for service accounts and CI (admins only): create, list, show, revoke."""


@token_group.command("create")
@click.argument("name")
@click.option("--role", "-r", type=click.Choice(ROLES), required=True, help="The token's role.")
@click.option(
    "--project",
    "-p",
    "projects",
    multiple=True,
    metavar="PROJECT",
    callback=_split_projects,
    help="The role holds only in this project (repeatable or comma-separated). [default: every project]",
)
@click.option(
    "--expires-in-days",
    type=click.IntRange(1, 3650),
    default=None,
    metavar="DAYS",
    help="Expire after this many days. [default: never; revoke it when it is no longer needed]",
)
@api_option
@output_option
def token_create(
    name: str,
    role: str,
    projects: tuple[str, ...],
    expires_in_days: int | None,
    api: str | None,
    output: str,
) -> None:
    """Create an API token NAME; print its secret, which is shown this once.

    stdout holds only the secret (or, with -o json|yaml, the API's answer, secret included), so
    `TOKEN=$(fabrik token create ci --role developer -p demo)` captures it.
    """
    body: dict[str, Any] = {"name": name, "role": role}
    if projects:
        body["projects"] = list(projects)
    if expires_in_days is not None:
        body["expires_in_days"] = expires_in_days
    with open_client(api) as client:
        try:
            created = client.create_token(body)
        except ApiError as exc:
            exc.name_flags(_token_flag)
            raise
    if not isinstance(created, Mapping) or not isinstance(created.get("token"), str):
        raise CliError("the API answered without the token's secret")
    emit(created, output, lambda d: str(d["token"]))
    where = format_projects(created.get("projects"))
    scope = "every project" if where == "all" else where
    expires = created.get("expires_at")
    until = format_time(expires, datetime.now(UTC)) if expires else "never"
    err(
        f"created API token {created.get('token_id')} ({created.get('name')}): {created.get('role')} in "
        f"{scope}, expires {until}"
    )
    err(
        "This is the only time the secret is shown: store it now (a CI secret; or `fabrik login "
        "--token -` with it on stdin). Send it as `Authorization: Bearer <token>` or in $FABRIK_TOKEN."
    )


@token_group.command("list")
@api_option
@output_option
def token_list(api: str | None, output: str) -> None:
    """Every API token (active, expired and revoked), newest first; secrets are never shown."""
    with open_client(api) as client:
        data = client.list_tokens()
    emit(data, output, tokens_table)


@token_group.command("show")
@click.argument("token_id")
@api_option
@output_option
def token_show(token_id: str, api: str | None, output: str) -> None:
    """One API token: role, projects, status, creation, expiry, last use."""
    with open_client(api) as client:
        data = client.get_token(_token_id(token_id))
    emit(data, output, token_detail)


@token_group.command("revoke")
@click.argument("token_id")
@api_option
@output_option
def token_revoke(token_id: str, api: str | None, output: str) -> None:
    """Revoke an API token at once (TOKEN_ID, or the token itself); revoking twice is harmless."""
    with open_client(api) as client:
        data = client.revoke_token(_token_id(token_id))

    def line(d: Any) -> str:
        if not isinstance(d, Mapping):
            return f"revoked API token {token_id}"
        when = format_time(d.get("revoked_at"), datetime.now(UTC))
        who = d.get("revoked_by")
        return f"API token {d.get('token_id')} ({d.get('name')}) is revoked: since {when}, by {who}"

    emit(data, output, line)


# --------------------------------------------------------------------------------------------
# fabrik audit


def parse_when(value: str, now: datetime | None = None) -> str:
    """An RFC 3339 UTC time (`...Z`) from `2026-01-31T12:00:00Z`, a local `2026-01-31 12:00` or
    `2026-01-31`, or an age: `90s`, `15m`, `2h`, `7d`, `2w` ago."""
    text = value.strip()
    match = _DURATION.match(text)
    if match:
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
        when = (now or datetime.now(UTC)) - timedelta(seconds=seconds)
    else:
        try:
            when = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
        except ValueError:
            raise click.BadParameter(
                f"{value!r} is neither a time (2026-01-31T12:00:00Z, 2026-01-31 12:00 local time, "
                "2026-01-31) nor an age (90s, 15m, 2h, 7d, 2w)"
            ) from None
        if when.tzinfo is None:
            when = when.astimezone()  # a time without an offset is local time
    return when.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _time_option(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    return parse_when(value) if value else None


@click.command()
@click.option(
    "--actor", default=None, help="Only this actor (a JWT subject, `token:<id>`, `anonymous`, ...)."
)
@click.option("--project", "-p", default=None, help="Only this project.")
@click.option("--action", default=None, help="Only this action, e.g. `run.submit`, `token.create`.")
@click.option("--result", type=click.Choice(AUDIT_RESULTS), default=None, help="Only this result.")
@click.option(
    "--since",
    default=None,
    metavar="WHEN",
    callback=_time_option,
    help="Only events at or after: a time (2026-01-31T12:00:00Z; without an offset, local time) or an "
    "age (15m, 2h, 7d).",
)
@click.option(
    "--until", default=None, metavar="WHEN", callback=_time_option, help="Only events before (as --since)."
)
@click.option(
    "--after", default=None, metavar="CURSOR", help="Continue after a previous page (its `next_cursor`)."
)
@click.option(
    "--limit", type=click.IntRange(min=1), default=None, help="Events per page. [default (API): 100]"
)
@click.option("--all", "all_pages", is_flag=True, help="Follow the cursors: every matching event.")
@api_option
@output_option
def audit(
    actor: str | None,
    project: str | None,
    action: str | None,
    result: str | None,
    since: str | None,
    until: str | None,
    after: str | None,
    limit: int | None,
    all_pages: bool,
    api: str | None,
    output: str,
) -> None:
    """The audit trail (admins only): state-changing requests, oldest first, filtered.

    With --all and -o json the pages are merged into one `{"items": [...], "next_cursor": null}`.

    \b
    Examples:
      fabrik audit --since 1d --action token.create
      fabrik audit --actor token:01JDXKZ0000000000000000000 --all -o json | jq .
      fabrik audit --result denied --since 2026-01-31
    """
    params: list[tuple[str, QueryValue]] = [
        ("actor", actor),
        ("project", project),
        ("action", action),
        ("result", result),
        ("since", since),
        ("until", until),
    ]
    with open_client(api) as client:
        if all_pages:
            items: list[Any] = []
            for page in client.iter_audit_pages(params, after=after, limit=limit):
                items.extend(page.get("items") or [])
            data: Any = {"items": items, "next_cursor": None}
        else:
            data = client.audit(params, after=after, limit=limit)
    emit(data, output, audit_table)
    if OutputFormat(output) is OutputFormat.TABLE and isinstance(data, Mapping) and data.get("next_cursor"):
        err(f"(more audit events may follow: add --all, or --after {data['next_cursor']})")
