"""`fabrik up`, `fabrik down`, `fabrik status`: the local stack (logic in `fabrik_cli.local`)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from fabrik_cli.local import (
    DEFAULT_READY_TIMEOUT,
    DEFAULT_STOP_GRACE,
    SERVICES,
    LocalStack,
    StackConfig,
    StackError,
    default_data_dir,
    format_health,
    plan_ports,
    stack_health,
    stop_stack,
)

F = TypeVar("F", bound=Callable[..., Any])

PORT = click.IntRange(1, 65535)
EXIT_NOT_RUNNING = 3


def data_dir_option(func: F) -> F:
    option = click.option(
        "--data-dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help="Where the stack keeps its data, logs and state. "
        "[default: $FABRIK_HOME, else $XDG_DATA_HOME/fabrik, else ~/.local/share/fabrik]",
    )
    return option(func)


def resolve_data_dir(data_dir: Path | None) -> Path:
    return (data_dir or default_data_dir()).expanduser().absolute()


def parse_service_ports(values: tuple[str, ...]) -> dict[str, int]:
    ports: dict[str, int] = {}
    for value in values:
        name, sep, port = value.partition("=")
        if not sep or not port.strip().isdigit():
            raise click.BadParameter(f"{value!r} is not NAME=PORT", param_hint="--service-port")
        ports[name.strip()] = int(port)
    return ports


_DEFAULTS = ", ".join(f"{s.name} {s.default_port}" for s in SERVICES)


@click.command()
@data_dir_option
@click.option(
    "--port", type=PORT, default=None, help="Port of the gateway (API and dashboard). [default: 8080]"
)
@click.option("--nats-port", type=PORT, default=None, help="Port of NATS clients. [default: 4222]")
@click.option(
    "--nats-monitor-port",
    type=PORT,
    default=None,
    help="Port of the NATS monitoring endpoint. [default: a free port]",
)
@click.option(
    "--port-base",
    type=click.IntRange(0, 56431),
    default=0,
    show_default=True,
    help="Shift every default port by N (e.g. 1000: NATS 5222, gateway 9080, ...) to run "
    "beside another stack. Explicit ports are not shifted.",
)
@click.option(
    "--service-port",
    "service_ports",
    multiple=True,
    metavar="NAME=PORT",
    help=f"Port of one service (repeatable). Defaults: {_DEFAULTS}.",
)
@click.option(
    "--ready-timeout",
    type=click.FloatRange(min=1),
    default=DEFAULT_READY_TIMEOUT,
    show_default=True,
    help="Seconds to wait for every service to become ready.",
)
@click.option(
    "--stop-timeout",
    type=click.FloatRange(min=0),
    default=DEFAULT_STOP_GRACE,
    show_default=True,
    help="Seconds a service gets to stop after SIGTERM before it is killed.",
)
def up(
    data_dir: Path | None,
    port: int | None,
    nats_port: int | None,
    nats_monitor_port: int | None,
    port_base: int,
    service_ports: tuple[str, ...],
    ready_timeout: float,
    stop_timeout: float,
) -> None:
    """Start the local stack (NATS and all services) in the foreground.

    Services that die are restarted with a backoff. Ctrl-C or SIGTERM (`fabrik down`)
    stops everything cleanly.
    """
    try:
        plan = plan_ports(
            gateway_port=port,
            nats_port=nats_port,
            nats_monitor_port=nats_monitor_port,
            port_base=port_base,
            service_ports=parse_service_ports(service_ports),
        )
        config = StackConfig(
            data_dir=resolve_data_dir(data_dir),
            ports=plan,
            python=sys.executable,
            ready_timeout=ready_timeout,
            stop_grace=stop_timeout,
        )
        code = LocalStack(config).run()
    except StackError as exc:
        raise click.ClickException(str(exc)) from exc
    sys.exit(code)


@click.command()
@data_dir_option
@click.option(
    "--timeout",
    type=click.FloatRange(min=1),
    default=DEFAULT_STOP_GRACE + 25.0,
    show_default=True,
    help="Seconds to wait for the stack to stop.",
)
def down(data_dir: Path | None, timeout: float) -> None:
    """Stop the local stack started by `fabrik up` on this data directory."""
    try:
        result = stop_stack(resolve_data_dir(data_dir), timeout=timeout)
    except StackError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(result.message)


@click.command()
@data_dir_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(data_dir: Path | None, as_json: bool) -> None:
    """Health of each component of the local stack.

    Exit code 0: running and healthy; 1: running, some component unhealthy; 3: not running.
    """
    try:
        health = stack_health(resolve_data_dir(data_dir))
    except StackError as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(json.dumps(health.to_dict(), indent=2))
    else:
        click.echo(format_health(health))
    if not health.running:
        sys.exit(EXIT_NOT_RUNNING)
    sys.exit(0 if health.healthy else 1)
