"""`fabrik infra`: a k3s cluster on Hetzner Cloud from `fabrik-infra.yaml` (docs/infra.md)."""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click
import requests
from hcloud import APIException
from hcloud.actions import ActionException

from fabrik_cli.errors import CliError, UsageError
from fabrik_cli.infra import hetzner, remote
from fabrik_cli.infra.cluster import CONTROL_PLANE, ROLE, Cluster, InfraError
from fabrik_cli.infra.config import EXAMPLE, InfraConfig, InfraFileError, load
from fabrik_cli.infra.drain import DrainError

F = TypeVar("F", bound=Callable[..., Any])
DEFAULT_FILE = "fabrik-infra.yaml"


def file_option(func: F) -> F:
    option = click.option(
        "-f",
        "--file",
        "file",
        type=click.Path(dir_okay=False, path_type=Path),
        default=DEFAULT_FILE,
        show_default=True,
        help="The cluster's description.",
    )
    return option(func)


def _config(file: Path) -> InfraConfig:
    try:
        return load(file)
    except InfraFileError as exc:
        raise UsageError(f"{exc.path} is not a valid infra file", exc.problems) from None


def _cluster(file: Path) -> Cluster:
    config = _config(file)
    try:
        client = hetzner.connect()
    except hetzner.TokenMissingError as exc:
        raise UsageError(str(exc)) from None
    return Cluster(config, client, echo=click.echo)


def _api_errors(func: Callable[[], Any]) -> Any:
    try:
        return func()
    except InfraError as exc:
        raise CliError(str(exc)) from None
    except DrainError as exc:
        raise CliError(
            f"could not drain: {exc}",
            ["no server was removed; fix the cluster access, or pass --force to remove without draining"],
        ) from None
    except APIException as exc:
        raise CliError(f"the Hetzner Cloud API refused: {exc.message} ({exc.code})") from None
    except ActionException as exc:
        raise CliError(f"a Hetzner Cloud action failed: {exc.message}") from None
    except requests.exceptions.RequestException as exc:
        raise CliError(f"cannot reach the Hetzner Cloud API: {exc}") from None


@click.group("infra")
def infra_group() -> None:
    """Hetzner Cloud k3s clusters: plan, apply, destroy, kubeconfig, ssh.

    The token comes from $HCLOUD_TOKEN or the file `fabrik init` stores; the cluster's own
    secrets (k3s join token, kubeconfig) live in `.fabrik/<name>/` beside the file, mode 0600.
    """


@infra_group.command("example")
def example() -> None:
    """Print a commented fabrik-infra.yaml to start from."""
    click.echo(EXAMPLE, nl=False)


@infra_group.command("validate")
@file_option
def validate(file: Path) -> None:
    """Check the file (no API calls)."""
    config = _config(file)
    click.echo(f"{file}: valid (cluster {config.name}, {config.spec.location})")


@infra_group.command("plan")
@file_option
@click.option("-v", "--verbose", is_flag=True, help="List what stays as it is, too.")
def plan(file: Path, verbose: bool) -> None:
    """Show what `apply` would change. Exit code 0: nothing to do; 3: changes pending."""
    cluster = _cluster(file)
    result = _api_errors(cluster.plan)
    click.echo(result.render(verbose=verbose))
    if not result.empty:
        sys.exit(3)


def _drainer(cluster: Cluster, kubeconfig: str | None) -> Callable[[Sequence[str]], None] | None:
    from fabrik_cli.infra.drain import drainer

    path = kubeconfig or (str(cluster.kubeconfig_file) if cluster.kubeconfig_file.exists() else None)
    return None if path is None else drainer(path, echo=click.echo)


@infra_group.command("apply")
@file_option
@click.option("-y", "--yes", is_flag=True, help="Do not ask before changing anything.")
@click.option("--force", is_flag=True, help="Remove servers even when they cannot be drained first.")
@click.option(
    "--kubeconfig",
    metavar="PATH",
    default=None,
    help="Kubeconfig used to drain nodes. [default: .fabrik/<name>/kubeconfig beside the file]",
)
def apply(file: Path, yes: bool, force: bool, kubeconfig: str | None) -> None:
    """Create or change what the project lacks to match the file (idempotent)."""
    cluster = _cluster(file)
    pending = _api_errors(cluster.plan)
    click.echo(pending.render())
    if pending.empty:
        return
    if not yes and not click.confirm("Apply these changes?", default=False):
        raise CliError("nothing changed")
    _api_errors(lambda: cluster.apply(drainer=_drainer(cluster, kubeconfig), force=force))
    address, servers = _api_errors(cluster.endpoints)
    click.echo(f"applied. Kubernetes API: https://{address}:6443 ({len(servers)} servers)")
    platform = cluster.config.spec.platform
    if platform is None:
        click.echo(
            "next: wait for the nodes to boot (about two minutes), then `fabrik infra kubeconfig "
            f"-f {file}` and install the platform: docs/infra.md#the-platform"
        )
    else:
        click.echo(
            f"next: the first control plane installs the platform (chart {platform.chart} "
            f"{cluster.config.chart_version}) once k3s is up; after about two minutes run "
            f"`fabrik infra kubeconfig -f {file}` and watch it with "
            "`kubectl -n kube-system get helmchart fabrik` and `kubectl -n fabrik-system get pods`"
        )


@infra_group.command("destroy")
@file_option
@click.option("-y", "--yes", is_flag=True, help="Do not ask for the cluster's name.")
def destroy(file: Path, yes: bool) -> None:
    """Delete every resource labelled as this cluster's, and nothing else."""
    cluster = _cluster(file)
    pending = _api_errors(cluster.destroy_plan)
    if pending.empty:
        click.echo(f"nothing to destroy: no resource carries the label {cluster.selector}")
        return
    click.echo(pending.render())
    if not yes:
        typed = click.prompt(f"Type the cluster's name ({cluster.spec.name}) to destroy it", default="")
        if typed != cluster.spec.name:
            raise CliError("nothing destroyed")
    _api_errors(cluster.destroy)
    click.echo(f"destroyed cluster {cluster.spec.name}; local secrets kept in {cluster.config.state_dir}")


def _server_address(cluster: Cluster, node: str | None) -> tuple[str, str]:
    _, servers = _api_errors(cluster.endpoints)
    if not servers:
        raise CliError(f"cluster {cluster.spec.name} has no servers (run `fabrik infra apply`)")
    if node is None:
        chosen = next((s for s in servers if (s.labels or {}).get(ROLE) == CONTROL_PLANE), servers[0])
    else:
        names = {s.name: s for s in servers}
        full = node if node in names else f"{cluster.spec.name}-{node}"
        if full not in names:
            raise UsageError(
                f"no server {node!r} in cluster {cluster.spec.name}",
                [f"servers: {', '.join(sorted(n for n in names if n))}"],
            )
        chosen = names[full]
    ip = chosen.public_net.ipv4.ip if chosen.public_net and chosen.public_net.ipv4 else ""
    return chosen.name or "", ip


@infra_group.command("kubeconfig")
@file_option
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Where to write it. [default: .fabrik/<name>/kubeconfig beside the file]",
)
def kubeconfig(file: Path, output: Path | None) -> None:
    """Fetch the kubeconfig from the first control plane, pointed at the load balancer."""
    cluster = _cluster(file)
    address, _ = _api_errors(cluster.endpoints)
    if not address:
        raise CliError("the cluster has no load balancer yet (run `fabrik infra apply`)")
    name, ip = _server_address(cluster, None)
    try:
        text = remote.fetch_kubeconfig(
            ip,
            api_address=address,
            name=cluster.spec.name,
            key_file=cluster.config.private_key_file(),
            known_hosts=cluster.config.state_dir / "known_hosts",
        )
    except remote.RemoteError as exc:
        raise CliError(f"cannot fetch the kubeconfig from {name} ({ip}): {exc}") from None
    target = output or cluster.kubeconfig_file
    cluster.write_private(target, text)
    click.echo(f"wrote {target} (server https://{address}:6443); use it with: export KUBECONFIG={target}")


@infra_group.command("ssh", context_settings={"ignore_unknown_options": True})
@file_option
@click.option("--print", "print_only", is_flag=True, help="Print the ssh command instead of running it.")
@click.argument("node")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def ssh(file: Path, print_only: bool, node: str, command: tuple[str, ...]) -> None:
    """Open a shell (or run COMMAND) on NODE as root, e.g. `fabrik infra ssh cp-1`."""
    cluster = _cluster(file)
    _, ip = _server_address(cluster, node)
    known = cluster.config.state_dir / "known_hosts"
    known.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    argv = remote.ssh_argv(ip, key_file=cluster.config.private_key_file(), known_hosts=known, command=command)
    if print_only:
        click.echo(shlex.join(argv))
        return
    try:
        os.execvp(argv[0], argv)  # noqa: S606 - replaces this process with ssh
    except FileNotFoundError:
        raise CliError("ssh is not installed (OpenSSH client needed)") from None
