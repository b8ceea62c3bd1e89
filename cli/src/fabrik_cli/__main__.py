"""`python -m fabrik_cli ...` is the `fabrik` command."""

from fabrik_cli.main import cli

cli(prog_name="fabrik")
