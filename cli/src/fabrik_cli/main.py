"""The `fabrik` command: a click group; each area's subcommands live in `fabrik_cli.commands`."""

from __future__ import annotations

from typing import Any

import click

from fabrik_cli.commands.access import audit, login, logout, token_group, whoami
from fabrik_cli.commands.analytics import analytics_group, budget_group, cost_group
from fabrik_cli.commands.backup import backup_group
from fabrik_cli.commands.dashboard import dashboard
from fabrik_cli.commands.doctor import doctor
from fabrik_cli.commands.env import env_group
from fabrik_cli.commands.infra import infra_group
from fabrik_cli.commands.init import init
from fabrik_cli.commands.migrate import export_command, import_command
from fabrik_cli.commands.optimizer import optimizer_group
from fabrik_cli.commands.runs import cancel, logs, projects, queue, resume, run, runs
from fabrik_cli.commands.schedule import schedule_group
from fabrik_cli.commands.spec import spec
from fabrik_cli.commands.stack import down, status, up
from fabrik_cli.errors import CliError


class FabrikGroup(click.Group):
    """Reports a `CliError` from any subcommand as `Error: ...` on stderr with its exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except CliError as exc:
            click.echo(exc.render(), err=True)
            ctx.exit(exc.exit_code)


@click.group(
    cls=FabrikGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100}
)
@click.version_option(package_name="fabrik-cli", prog_name="fabrik")
def cli() -> None:
    """Fabrik: autonomous coding-agent runs, locally and on Kubernetes."""


# the local stack
cli.add_command(up)
cli.add_command(down)
cli.add_command(status)
# runs
cli.add_command(run)
cli.add_command(runs)
cli.add_command(logs)
cli.add_command(cancel)
cli.add_command(resume)
cli.add_command(queue)
cli.add_command(projects)
cli.add_command(dashboard)
cli.add_command(spec)
# cron schedules
cli.add_command(schedule_group)
# environments
cli.add_command(env_group)
# access: credentials, API tokens, the audit trail
cli.add_command(login)
cli.add_command(logout)
cli.add_command(whoami)
cli.add_command(token_group)
cli.add_command(audit)
# costs, budgets, run analytics (answered by the optimizer through the gateway)
cli.add_command(cost_group)
cli.add_command(budget_group)
cli.add_command(analytics_group)
# experiments on run configuration, rollouts, the optimizer's pause and history
cli.add_command(optimizer_group)
# backups (answered by the backup service through the gateway)
cli.add_command(backup_group)
# migration: portable NDJSON and Smithers databases
cli.add_command(import_command)
cli.add_command(export_command)
# checks
cli.add_command(doctor)
# Hetzner Cloud clusters
cli.add_command(infra_group)
# onboarding
cli.add_command(init)
