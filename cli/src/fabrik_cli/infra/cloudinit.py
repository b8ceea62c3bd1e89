"""Cloud-init user data that turns a fresh Ubuntu server into a k3s node of the cluster.

The k3s configuration goes to `/etc/rancher/k3s/config.yaml` (0600: it holds the token); a boot
script finds the node's address in the cluster subnet and its interface (the private network), so
k3s and flannel talk over the private network, then runs the install script *of the pinned
release* (`raw.githubusercontent.com/k3s-io/k3s/<version>/install.sh`, not the moving
`get.k3s.io`) with `INSTALL_K3S_VERSION` set to the same release.

On the first control plane of a new cluster the same script then installs the platform: once the
API answers it applies a `HelmChart` (k3s's built-in Helm controller, `helm.cattle.io/v1`) for the
umbrella chart, pinned to a chart version, with the production values in `valuesContent`. The
controller runs `helm install` in the cluster and retries it until it succeeds (images pulled,
volumes bound). It is applied once rather than dropped into k3s's auto-deploy directory, which
k3s re-applies at every restart and would undo a later `helm upgrade` or edit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final, Literal
from urllib.parse import quote

import yaml

Role = Literal["init", "server", "agent"]
INSTALL_URL: Final = "https://raw.githubusercontent.com/k3s-io/k3s/{version}/install.sh"
PLATFORM_MANIFEST: Final = "/var/lib/fabrik/platform.yaml"
RELEASE: Final = "fabrik"
RELEASE_NAMESPACE: Final = "default"  # the services go to fabrik-system whatever the release's namespace


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (the values in the HelmChart) as `|` blocks, readable on the node."""


def _represent_str(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style="|" if "\n" in data else None)


_BlockDumper.add_representer(str, _represent_str)


@dataclass(frozen=True)
class PlatformInstall:
    chart: str  # oci://... reference or https://... URL of the packaged umbrella chart
    version: str
    values: dict[str, Any]


def helm_chart(platform: PlatformInstall) -> dict[str, Any]:
    """The HelmChart resource k3s's Helm controller installs the umbrella chart from."""
    spec: dict[str, Any] = {"chart": platform.chart}
    if platform.chart.startswith("oci://"):
        spec["version"] = platform.version
    spec["targetNamespace"] = RELEASE_NAMESPACE
    spec["valuesContent"] = yaml.safe_dump(platform.values, sort_keys=False)
    return {
        "apiVersion": "helm.cattle.io/v1",
        "kind": "HelmChart",
        "metadata": {"name": RELEASE, "namespace": "kube-system"},
        "spec": spec,
    }


@dataclass(frozen=True)
class NodeBoot:
    role: Role
    k3s_version: str
    token: str
    subnet: str
    join_address: str  # the load balancer's private address (server URL for joining nodes)
    tls_sans: tuple[str, ...]  # the load balancer's public and private addresses
    node_labels: tuple[str, ...]
    platform: PlatformInstall | None = None  # only on the node that initialises the cluster


def k3s_config(boot: NodeBoot) -> dict[str, object]:
    config: dict[str, object] = {"token": boot.token, "node-label": list(boot.node_labels)}
    if boot.role == "init":
        config["cluster-init"] = True
    else:
        config["server"] = f"https://{boot.join_address}:6443"
    if boot.role in ("init", "server"):
        config["tls-san"] = list(boot.tls_sans)
        config["write-kubeconfig-mode"] = "0600"
        config["secrets-encryption"] = True
        config["disable"] = ["servicelb"]
    return config


def render(boot: NodeBoot) -> str:
    """The `#cloud-config` document for one node."""
    config_yaml = "\n".join(f"      {k}: {json.dumps(v)}" for k, v in k3s_config(boot).items())
    exec_kind = "agent" if boot.role == "agent" else "server"
    url = INSTALL_URL.format(version=quote(boot.k3s_version, safe=""))
    script = f"""\
      #!/bin/sh
      set -eu
      SUBNET={boot.subnet}
      for i in $(seq 1 90); do
        IP=$(python3 -c 'import ipaddress,subprocess,sys
      net = ipaddress.ip_network(sys.argv[1])
      out = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True).stdout
      for line in out.splitlines():
          addr = line.split()[3].split("/")[0]
          if ipaddress.ip_address(addr) in net:
              print(addr, line.split()[1]); break' "$SUBNET")
        [ -n "$IP" ] && break
        sleep 2
      done
      [ -n "$IP" ] || {{ echo "no address in $SUBNET: is the server attached to the network?" >&2; exit 1; }}
      set -- $IP
      printf 'node-ip: "%s"\\nflannel-iface: "%s"\\n' "$1" "$2" >> /etc/rancher/k3s/config.yaml
      curl -sfL {url} -o /root/k3s-install.sh
      INSTALL_K3S_VERSION='{boot.k3s_version}' INSTALL_K3S_EXEC='{exec_kind}' sh /root/k3s-install.sh
"""
    platform_file = ""
    if boot.platform is not None and boot.role == "init":
        # The HelmChart kind exists once k3s's controllers have started: retry until it applies.
        script += f"""      for i in $(seq 1 150); do
        k3s kubectl apply -f {PLATFORM_MANIFEST} && exit 0
        sleep 4
      done
      echo "the platform was not installed: k3s kubectl apply -f {PLATFORM_MANIFEST}" >&2
      exit 1
"""
        manifest = yaml.dump(helm_chart(boot.platform), Dumper=_BlockDumper, sort_keys=False)
        platform_file = f"""  - path: {PLATFORM_MANIFEST}
    permissions: "0600"
    owner: root:root
    content: |
{_indent(manifest, 6)}
"""
    platform_note = f", platform {boot.platform.version}" if boot.platform and boot.role == "init" else ""
    return f"""#cloud-config
# fabrik infra: k3s {boot.k3s_version} ({boot.role}{platform_note})
write_files:
  - path: /etc/rancher/k3s/config.yaml
    permissions: "0600"
    owner: root:root
    content: |
{config_yaml}
  - path: /usr/local/sbin/fabrik-k3s-install
    permissions: "0700"
    owner: root:root
    content: |
{script}{platform_file}runcmd:
  - [/usr/local/sbin/fabrik-k3s-install]
"""


def _indent(text: str, spaces: int) -> str:
    pad = " " * spaces
    return "\n".join(pad + line if line else line for line in text.rstrip("\n").split("\n"))
