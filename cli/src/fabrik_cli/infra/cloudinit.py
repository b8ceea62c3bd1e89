"""Cloud-init user data that turns a fresh Ubuntu server into a k3s node of the cluster.

The k3s configuration goes to `/etc/rancher/k3s/config.yaml` (0600: it holds the token); a boot
script finds the node's address in the cluster subnet and its interface (the private network), so
k3s and flannel talk over the private network, then runs the install script *of the pinned
release* (`raw.githubusercontent.com/k3s-io/k3s/<version>/install.sh`, not the moving
`get.k3s.io`) with `INSTALL_K3S_VERSION` set to the same release.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Final, Literal
from urllib.parse import quote

Role = Literal["init", "server", "agent"]
INSTALL_URL: Final = "https://raw.githubusercontent.com/k3s-io/k3s/{version}/install.sh"


@dataclass(frozen=True)
class NodeBoot:
    role: Role
    k3s_version: str
    token: str
    subnet: str
    join_address: str  # the load balancer's private address (server URL for joining nodes)
    tls_sans: tuple[str, ...]  # the load balancer's public and private addresses
    node_labels: tuple[str, ...]


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
    return f"""#cloud-config
# fabrik infra: k3s {boot.k3s_version} ({boot.role})
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
{script}runcmd:
  - [/usr/local/sbin/fabrik-k3s-install]
"""
