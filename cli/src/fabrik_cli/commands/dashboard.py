"""`fabrik dashboard`: the live terminal dashboard (`fabrik_cli.dashboard`)."""

from __future__ import annotations

import click

from fabrik_cli.commands.common import api_option, open_client


@click.command()
@api_option
@click.option(
    "--filter",
    "filter_text",
    default="",
    metavar="TEXT",
    help="Start with this filter, e.g. 'project:demo state:active' (the `/` key changes it).",
)
def dashboard(api: str | None, filter_text: str) -> None:
    """A live terminal dashboard of runs: open one, follow its log, cancel, resume, start runs.

    Uses the same API and credential as the other commands (--api, $FABRIK_API_URL, $FABRIK_TOKEN,
    `fabrik login`). Press ? in the dashboard for its keys.
    """
    from fabrik_cli.dashboard.api import DashboardApi
    from fabrik_cli.dashboard.app import DashboardApp

    client = open_client(api)
    try:
        DashboardApp(DashboardApi(client), initial_filter=filter_text).run()
    finally:
        client.close()
