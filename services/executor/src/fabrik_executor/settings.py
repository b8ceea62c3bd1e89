"""Configuration of the executor service, from `FABRIK_*` environment variables."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import msgspec

from fabrik_common.envs import load_env_cipher
from fabrik_common.settings import CommonSettings, Port, PositiveFloat, PositiveInt


class ExecutorSettings(CommonSettings, frozen=True, kw_only=True):
    http_port: Port = 9102
    backend: Literal["local", "kubernetes"] = "local"
    """Where workloads run: processes on this machine, or a Kubernetes Job per attempt."""
    data_dir: str = ""
    """Fabrik's data directory (`fabrik up` sets it); the executor keeps its files in `<data_dir>/executor`.
    Empty: `$FABRIK_HOME`, else `$XDG_DATA_HOME/fabrik`, else `~/.local/share/fabrik`."""
    default_command: tuple[str, ...] = ()
    """The workload command (JSON list) for runs that do not name one."""
    llm_proxy_url: str = "http://127.0.0.1:8081"
    cancel_grace_seconds: PositiveFloat = 10.0
    """Time between SIGTERM and SIGKILL when a workload is cancelled or passes its deadline."""
    cancel_memory_seconds: PositiveFloat = 3600.0
    """How long a cancel for a run not hosted here is remembered (it stops that run's next dispatch)."""
    enforce_memory_limit: bool = True
    """Apply `resources.memory_limit` as RLIMIT_AS to local workloads."""
    workload_path: str = ""
    """PATH of local workloads; empty: the executor's own PATH."""
    clone_timeout_seconds: PositiveFloat = 600.0
    poll_interval_seconds: PositiveFloat = 0.05
    """How often each running attempt's output, exit and deadline are checked."""
    log_flush_seconds: PositiveFloat = 0.1
    log_batch_lines: PositiveInt = 200
    progress_interval_seconds: PositiveFloat = 0.5
    """Minimum time between two RunProgress events of a run (0.5 s: at most 2 per second)."""
    retention_days: PositiveFloat = 7.0
    """Finished runs' workspaces and state are deleted this long after their last attempt ended."""
    env_encryption_key: str = ""
    """Fernet key(s) of the project environments store (as the gateway's); see docs/environments.md.
    Without one the executor starts only while no environment is stored."""
    env_encryption_key_file: str = ""
    """A file holding the key(s) instead; set one of the two, not both."""

    run_key_secret: str = ""
    """Signs run-scoped LLM keys (the llm-proxy verifies them with the same secret); empty: no key."""
    run_key_secret_file: str = ""

    # ---- the kubernetes backend (docs/kubernetes.md)
    k8s_namespace: str = "fabrik-runs"
    """Where workloads (Jobs, pods, workspace PVCs, mirrored Secrets) live."""
    k8s_system_namespace: str = "fabrik-system"
    """Where project env Secrets and credential bundles are read from."""
    k8s_api_url: str = ""
    """A plain API URL without credentials (`kubectl proxy`, a test double); empty: see k8s_config."""
    k8s_config: Literal["auto", "in-cluster", "kubeconfig"] = "auto"
    """auto: in-cluster when KUBERNETES_SERVICE_HOST is set, else the kubeconfig."""
    k8s_kubeconfig: str = ""
    """Kubeconfig file; empty: $KUBECONFIG or ~/.kube/config."""
    k8s_context: str = ""
    k8s_storage_class: str = ""
    """Storage class of workspace PVCs; empty: the cluster default."""
    k8s_pvc_size: str = "10Gi"
    k8s_clone_image: str = "docker.io/alpine/git:2.47.2"
    """Image of the init container that clones the repository (pin it by digest in production)."""
    k8s_default_image: str = ""
    """Workload image (pinned by digest) of runs that name none."""
    k8s_image_pull_secrets: tuple[str, ...] = ()
    k8s_image_pull_grace_seconds: PositiveFloat = 120.0
    """How long an image pull may fail (ErrImagePull / ImagePullBackOff) before the attempt fails."""
    k8s_registry_auth_file: str = ""
    """A Docker config JSON (`auths`) with registry credentials for resolving tags; empty: anonymous."""
    k8s_insecure_registries: tuple[str, ...] = ()
    """Registries (host[:port], comma-separated) reached over plain http when resolving tags."""
    k8s_registry_timeout_seconds: PositiveFloat = 15.0
    """How long resolving one tag to its digest may take."""
    k8s_llm_proxy_url: str = ""
    """The llm-proxy as pods reach it (a Service URL); empty: FABRIK_LLM_PROXY_URL."""
    k8s_credential_bundles: dict[str, str] = msgspec.field(default_factory=dict)
    """JSON {target: secret}: Secrets in the system namespace mounted at /etc/fabrik/credentials/<target>/."""
    k8s_ttl_seconds_after_finished: PositiveInt = 604800
    k8s_watch_timeout_seconds: PositiveInt = 300
    k8s_log_drain_seconds: PositiveFloat = 15.0
    """How long the end of an attempt waits for the rest of its log."""
    k8s_checkpoint_seconds: PositiveFloat = 5.0
    """How often the log cursor of a running attempt is saved on its Job."""
    k8s_reap_interval_seconds: PositiveFloat = 600.0
    k8s_orphan_grace_seconds: PositiveFloat = 3600.0
    k8s_mirror_sync_seconds: PositiveFloat = 60.0

    def __post_init__(self) -> None:
        # An unusable key stops the start with the variable named (exit 2).
        load_env_cipher(self.env_encryption_key, self.env_encryption_key_file)

    def executor_dir(self) -> Path:
        return resolve_data_dir(self.data_dir) / "executor"


def resolve_data_dir(configured: str) -> Path:
    if configured:
        return Path(configured).expanduser()
    if os.environ.get("FABRIK_HOME"):
        return Path(os.environ["FABRIK_HOME"]).expanduser()
    if os.environ.get("XDG_DATA_HOME"):
        return Path(os.environ["XDG_DATA_HOME"]).expanduser() / "fabrik"
    return Path.home() / ".local" / "share" / "fabrik"
