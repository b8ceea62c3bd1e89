"""`fabrik init`: set Fabrik up — where it runs, the first project, LLM keys — and check first."""

from __future__ import annotations

import os
from pathlib import Path

import click

from fabrik_cli.errors import CliError, UsageError
from fabrik_cli.infra.config import LOCATIONS
from fabrik_cli.onboarding.setup import TARGET_HELP, TARGETS, Answers, preflight, problems, write
from fabrik_cli.userconfig import OUTPUT_FORMATS


def _ask(answers: Answers, environ: dict[str, str]) -> None:
    click.echo("Where should Fabrik run?")
    for i, target in enumerate(TARGETS, start=1):
        click.echo(f"  {i}. {target:8} {TARGET_HELP[target]}")
    choice = click.prompt("choose", type=click.Choice([*TARGETS, "1", "2", "3"]), default=answers.target)
    answers.target = TARGETS[int(choice) - 1] if choice.isdigit() else choice  # type: ignore[assignment]
    answers.project = click.prompt("First project (a DNS-1123 label, e.g. web-shop)", default=answers.project)
    click.echo("LLM providers (leave empty to skip; without any key the offline echo provider answers)")
    answers.openai_api_key = click.prompt(
        "  OpenAI API key", default=answers.openai_api_key, hide_input=True, show_default=False
    )
    answers.anthropic_api_key = click.prompt(
        "  Anthropic API key", default=answers.anthropic_api_key, hide_input=True, show_default=False
    )
    if answers.target == "local":
        answers.port_base = click.prompt(
            "Shift every local port by (0: 8080, 4222, ...)", default=answers.port_base
        )
    elif answers.target == "cluster":
        default = answers.kubeconfig or environ.get("KUBECONFIG", "") or "~/.kube/config"
        answers.kubeconfig = click.prompt("kubeconfig of the cluster", default=default)
        answers.context = click.prompt(
            "context (empty: the current one)", default=answers.context, show_default=False
        )
    else:
        answers.hcloud_token = click.prompt(
            "Hetzner Cloud API token (read & write)",
            default=answers.hcloud_token,
            hide_input=True,
            show_default=False,
        )
        answers.cluster_name = click.prompt("cluster name", default=answers.cluster_name)
        answers.location = click.prompt("location", type=click.Choice(LOCATIONS), default=answers.location)
        answers.ssh_public_key = click.prompt("SSH public key", default=answers.ssh_public_key)
        cidrs = click.prompt(
            "address ranges allowed to reach SSH and the Kubernetes API (comma-separated CIDRs)",
            default=",".join(answers.allowed_cidrs) or None,
        )
        answers.allowed_cidrs = [c.strip() for c in str(cidrs).split(",") if c.strip()]
        answers.infra_file = click.prompt("cluster file to write", default=answers.infra_file)
        answers.image_registry = click.prompt(
            "registry of the fabrik-* images (empty: install the platform yourself)",
            default=answers.image_registry,
            show_default=False,
        ).strip()
    click.echo("Defaults of the other commands (flags and FABRIK_* variables still win)")
    local_hint = "empty: the local stack's" if answers.target == "local" else "empty: set it later"
    answers.api_url = click.prompt(
        f"  gateway URL ({local_hint})", default=answers.api_url, show_default=False
    ).strip()
    if answers.api_url and not answers.token_file:
        answers.token = click.prompt(
            "  API token (empty: none, or `fabrik login` later)",
            default=answers.token,
            hide_input=True,
            show_default=False,
        ).strip()


@click.command("init", context_settings={"show_default": True})
@click.option(
    "--non-interactive",
    "-y",
    "non_interactive",
    is_flag=True,
    help="Ask nothing: take the flags (for scripts).",
)
@click.option("--target", type=click.Choice(TARGETS), default="local", help="Where Fabrik runs.")
@click.option("--project", default="demo", help="The first project (a DNS-1123 label).")
@click.option(
    "--openai-api-key", envvar="OPENAI_API_KEY", default="", show_default=False, help="[env: OPENAI_API_KEY]"
)
@click.option(
    "--anthropic-api-key",
    envvar="ANTHROPIC_API_KEY",
    default="",
    show_default=False,
    help="[env: ANTHROPIC_API_KEY]",
)
@click.option("--openai-base-url", default="", help="An OpenAI-compatible endpoint (Ollama, vLLM, ...).")
@click.option("--port-base", type=int, default=0, help="local: shift every port by N.")
@click.option("--nats-url", default="", help="Use this NATS (checked) instead of the embedded one.")
@click.option("--kubeconfig", default="", help="cluster: the cluster's kubeconfig.")
@click.option("--context", default="", help="cluster: the kubeconfig context.")
@click.option(
    "--hcloud-token",
    envvar="HCLOUD_TOKEN",
    default="",
    show_default=False,
    help="hetzner: [env: HCLOUD_TOKEN]",
)
@click.option("--cluster-name", default="fabrik", help="hetzner: the cluster's name.")
@click.option("--location", type=click.Choice(LOCATIONS), default="nbg1", help="hetzner: where.")
@click.option("--ssh-key", "ssh_key", default="~/.ssh/id_ed25519.pub", help="hetzner: your SSH public key.")
@click.option(
    "--allow-cidr", "allow_cidr", multiple=True, help="hetzner: a range allowed to reach SSH and the API."
)
@click.option("--infra-file", default="fabrik-infra.yaml", help="hetzner: the cluster file to write.")
@click.option(
    "--image-registry",
    default="",
    show_default=False,
    help="hetzner: where the fabrik-* images are; the cluster then installs the platform itself.",
)
@click.option(
    "--api",
    "api_url",
    default="",
    show_default=False,
    help="The gateway URL the other commands use. [default: the local stack's]",
)
@click.option(
    "--token",
    default="",
    show_default=False,
    help="An API token (or JWT) the other commands send; stored in the configuration directory (0600).",
)
@click.option(
    "--token-file",
    default="",
    show_default=False,
    help="A file holding the API token the other commands send (read at each command).",
)
@click.option(
    "--output",
    "-o",
    "output",
    type=click.Choice(OUTPUT_FORMATS),
    default=None,
    show_default=False,
    help="The output format of the other commands. [default: table]",
)
@click.option(
    "--skip-checks", is_flag=True, help="Write the configuration even when a pre-flight check fails."
)
def init(
    non_interactive: bool,
    target: str,
    project: str,
    openai_api_key: str,
    anthropic_api_key: str,
    openai_base_url: str,
    port_base: int,
    nats_url: str,
    kubeconfig: str,
    context: str,
    hcloud_token: str,
    cluster_name: str,
    location: str,
    ssh_key: str,
    allow_cidr: tuple[str, ...],
    infra_file: str,
    image_registry: str,
    api_url: str,
    token: str,
    token_file: str,
    output: str | None,
    skip_checks: bool,
) -> None:
    """Set Fabrik up: where it runs, the first project, LLM keys; check; print how to start.

    Writes config.yaml, llm.env, token and hcloud-token (mode 0600) to the configuration
    directory ($FABRIK_HOME, else $XDG_CONFIG_HOME/fabrik, else ~/.config/fabrik). The other
    commands take config.yaml's gateway URL, token, project and output format as defaults; their
    flags and FABRIK_* variables come first. docs/quickstart.md.
    """
    environ = dict(os.environ)
    answers = Answers(
        target=target,  # type: ignore[arg-type]
        project=project,
        openai_api_key=openai_api_key,
        anthropic_api_key=anthropic_api_key,
        openai_base_url=openai_base_url,
        port_base=port_base,
        nats_url=nats_url,
        kubeconfig=kubeconfig,
        context=context,
        hcloud_token=hcloud_token,
        cluster_name=cluster_name,
        location=location,
        ssh_public_key=ssh_key,
        allowed_cidrs=list(allow_cidr),
        infra_file=infra_file,
        image_registry=image_registry,
        api_url=api_url,
        token=token,
        token_file=token_file,
        output=output or "",
    )
    if not non_interactive:
        _ask(answers, environ)
    wrong = problems(answers)
    if wrong:
        raise UsageError("cannot set Fabrik up with these answers", wrong)
    click.echo("\npre-flight checks:")
    checks = preflight(answers, environ)
    for check in checks:
        click.echo(f"  {check.line()}")
    failed = [c for c in checks if not c.ok]
    if failed and not skip_checks:
        raise CliError(
            f"{len(failed)} pre-flight check(s) failed; nothing was written",
            ["fix them and run `fabrik init` again (or pass --skip-checks)"],
        )
    try:
        written = write(answers, environ, cwd=Path.cwd())
    except ValueError as exc:
        raise UsageError(f"cannot write the cluster file: {exc}") from None
    click.echo(f"\nwrote (secrets with mode 0600) in {written.directory}:")
    for path in written.files:
        click.echo(f"  {path}")
    if written.before:
        click.echo("\nfirst:")
        for line in written.before:
            click.echo(f"  {line}")
    click.echo("\nstart Fabrik with:\n")
    click.echo(f"  {written.start}\n")
