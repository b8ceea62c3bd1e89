"""The `fabrik` command: a click group; each area's subcommands live in `fabrik_cli.commands`."""

from __future__ import annotations

import click

from fabrik_cli.commands.stack import down, status, up


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="fabrik-cli", prog_name="fabrik")
def cli() -> None:
    """Fabrik: autonomous coding-agent runs, locally and on Kubernetes."""


cli.add_command(up)
cli.add_command(down)
cli.add_command(status)
