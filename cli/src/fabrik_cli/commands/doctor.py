"""`fabrik doctor`: check the platform (and the cluster) and say how to fix what is wrong."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import click

from fabrik_cli.commands.common import api_option
from fabrik_cli.doctor import (
    ENV_KEY_SECRET,
    EXECUTOR_SERVICE_ACCOUNT,
    LLM_KEYS_SECRET,
    RUN_KEY_SECRET,
    RUNS_NAMESPACE,
    SYSTEM_NAMESPACE,
    DoctorOptions,
    format_report,
    run_doctor,
)


@click.command(context_settings={"show_default": True})
@api_option
@click.option(
    "--llm-proxy",
    "llm_proxy",
    metavar="URL",
    default=None,
    help="llm-proxy URL. [default: $FABRIK_LLM_PROXY_URL, else the local stack's, else :8081]",
)
@click.option(
    "--nats-url",
    metavar="URL",
    default=None,
    help="NATS URL. [default: $FABRIK_NATS_URL, else the local stack's, else nats://127.0.0.1:4222]",
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Data directory of the local stack whose state file says where things are.",
)
@click.option(
    "--kubeconfig",
    metavar="PATH",
    default=None,
    help="Check this cluster. [default: $KUBECONFIG, or the in-cluster config inside a pod]",
)
@click.option(
    "--context", metavar="NAME", default=None, help="kubeconfig context. [default: the current one]"
)
@click.option("--no-cluster", is_flag=True, help="Skip the Kubernetes checks even with a kubeconfig.")
@click.option(
    "--system-namespace", default=SYSTEM_NAMESPACE, help="Namespace of the services and credentials."
)
@click.option("--runs-namespace", default=RUNS_NAMESPACE, help="Namespace of the workloads.")
@click.option(
    "--executor-service-account",
    default=EXECUTOR_SERVICE_ACCOUNT,
    help="Service account of the executor (in the system namespace).",
)
@click.option("--storage-class", default=None, help="Check this class instead of the default class.")
@click.option("--run-key-secret", default=RUN_KEY_SECRET, help="Secret of the run-key HMAC secret.")
@click.option("--llm-keys-secret", default=LLM_KEYS_SECRET, help="Secret of the LLM provider keys.")
@click.option("--env-key-secret", default=ENV_KEY_SECRET, help="Secret of the environments' encryption key.")
@click.option(
    "--skip",
    "skip",
    multiple=True,
    metavar="CHECK",
    help="Skip a check by id, or a group by prefix (e.g. `llm-proxy`, `k8s.quota`, `nats`).",
)
@click.option("--timeout", type=click.FloatRange(min=0.1), default=5.0, help="Seconds per request.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def doctor(
    api: str | None,
    llm_proxy: str | None,
    nats_url: str | None,
    data_dir: Path | None,
    kubeconfig: str | None,
    context: str | None,
    no_cluster: bool,
    system_namespace: str,
    runs_namespace: str,
    executor_service_account: str,
    storage_class: str | None,
    run_key_secret: str,
    llm_keys_secret: str,
    env_key_secret: str,
    skip: tuple[str, ...],
    timeout: float,
    as_json: bool,
) -> None:  # fmt: skip
    """Check that Fabrik works here: NATS, JetStream and its streams, the gateway and the llm-proxy,
    and (with a kubeconfig) the cluster: API, namespaces, storage class, quota, limit range, the
    executor's RBAC and the credentials Secrets. Each problem comes with a fix.

    Exit code 0: no critical failure (warnings allowed); 1: a critical check failed.
    """
    options = DoctorOptions(
        api=api,
        llm_proxy=llm_proxy,
        nats_url=nats_url,
        data_dir=data_dir,
        kubeconfig=kubeconfig,
        context=context,
        no_cluster=no_cluster,
        system_namespace=system_namespace,
        runs_namespace=runs_namespace,
        executor_service_account=executor_service_account,
        storage_class=storage_class,
        run_key_secret=run_key_secret,
        llm_keys_secret=llm_keys_secret,
        env_key_secret=env_key_secret,
        timeout=timeout,
        skip=skip,
    )
    report = asyncio.run(run_doctor(options))
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo(format_report(report))
    sys.exit(0 if report.ok else 1)
