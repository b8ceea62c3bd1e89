"""SSH to the nodes: the command line, and the kubeconfig fetched from the first control plane.

Host keys are pinned per cluster in `.fabrik/<cluster>/known_hosts` (first use accepted, a changed
key refused), so a Hetzner address that is reused by a later server never clashes with entries in
your own `~/.ssh/known_hosts`.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

import yaml

K3S_KUBECONFIG = "/etc/rancher/k3s/k3s.yaml"


class RemoteError(Exception):
    pass


def ssh_argv(
    address: str, *, key_file: Path | None, known_hosts: Path, command: Sequence[str] = ()
) -> list[str]:
    argv = ["ssh"]
    if key_file is not None:
        argv += ["-i", str(key_file), "-o", "IdentitiesOnly=yes"]
    argv += [
        "-o",
        "StrictHostKeyChecking=accept-new",
        "-o",
        f"UserKnownHostsFile={known_hosts}",
        f"root@{address}",
    ]
    return argv + list(command)


def run_ssh(argv: Sequence[str]) -> str:
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=60, check=False)
    except FileNotFoundError as exc:
        raise RemoteError("ssh is not installed (OpenSSH client needed)") from exc
    except subprocess.TimeoutExpired as exc:
        raise RemoteError(f"ssh did not answer within 60s: {' '.join(argv)}") from exc
    if done.returncode != 0:
        raise RemoteError(f"ssh exited {done.returncode}: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def rewrite_kubeconfig(text: str, *, server: str, name: str) -> str:
    """k3s's kubeconfig (`https://127.0.0.1:6443`, names `default`) made to reach `server`."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RemoteError(f"the node's kubeconfig is not YAML: {exc}") from exc
    if not isinstance(doc, dict) or not doc.get("clusters"):
        raise RemoteError("the node's kubeconfig has no clusters (is k3s running there yet?)")
    for entry in doc.get("clusters", []):
        entry["name"] = name
        entry.setdefault("cluster", {})["server"] = server
    for entry in doc.get("users", []):
        entry["name"] = name
    for entry in doc.get("contexts", []):
        entry["name"] = name
        entry.setdefault("context", {}).update({"cluster": name, "user": name})
    doc["current-context"] = name
    return yaml.safe_dump(doc, sort_keys=False)


def fetch_kubeconfig(
    address: str,
    *,
    api_address: str,
    name: str,
    key_file: Path | None,
    known_hosts: Path,
    run: Callable[[Sequence[str]], str] = run_ssh,
) -> str:
    argv = ssh_argv(address, key_file=key_file, known_hosts=known_hosts, command=["cat", K3S_KUBECONFIG])
    return rewrite_kubeconfig(run(argv), server=f"https://{api_address}:6443", name=name)
