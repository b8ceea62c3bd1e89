"""Options and helpers shared by the commands that talk to the API."""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar

import click

from fabrik_cli.client import ENV_API_URL, ApiClient
from fabrik_cli.output import FORMATS, OutputFormat, dump
from fabrik_cli.userconfig import ENV_OUTPUT, default_output

F = TypeVar("F", bound=Callable[..., Any])


def api_option(func: F) -> F:
    option = click.option(
        "--api",
        metavar="URL",
        default=None,
        help=(
            f"Gateway URL. [default: ${ENV_API_URL}, else config.yaml's `api_url`, else the local "
            "stack's, else http://127.0.0.1:8080]"
        ),
    )
    return option(func)


def project_required(ctx: click.Context, param: click.Parameter, value: str | None) -> str:
    """The `--project` callback of commands that need one: the flag, $FABRIK_PROJECT or config.yaml's
    `project` (a callable default), else the usual missing-option error."""
    if not value:
        raise click.MissingParameter(ctx=ctx, param=param)
    return value


def output_option(func: F) -> F:
    option = click.option(
        "-o",
        "--output",
        "output",
        type=click.Choice(FORMATS),
        default=default_output,
        envvar=ENV_OUTPUT,
        show_envvar=True,
        show_default="config.yaml's `output`, else table",
        help="Output format: a table for people, or the API's JSON (or YAML) for scripts.",
    )
    return option(func)


def open_client(api: str | None) -> ApiClient:
    return ApiClient.from_env(api, os.environ)


def out(text: str) -> None:
    click.echo(text)


def err(text: str) -> None:
    click.echo(text, err=True)


def status_line(text: str) -> None:
    """A progress line on stderr, with the local time: `14:02:11 running: ...`."""
    err(f"{datetime.now().astimezone():%H:%M:%S} {text}")


def emit(data: Any, output: str, table: Callable[[Any], str]) -> None:
    """The API's answer as json/yaml, or `table(data)` for people."""
    fmt = OutputFormat(output)
    out(table(data) if fmt is OutputFormat.TABLE else dump(data, fmt))
