"""The cloud-init user data of `fabrik infra` nodes, parsed as cloud-init parses it (YAML), and the
platform the first control plane installs: what `apply` really sends, through the Hetzner double."""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from fabrik_cli.infra import cloudinit, hetzner
from fabrik_cli.infra.cluster import Cluster
from fabrik_cli.infra.config import DEFAULT_CHART, InfraFileError, fabrik_version, load
from fabrik_cli.main import cli
from fabrik_common.testing.hcloud_double import HcloudDouble

REPO = Path(__file__).resolve().parents[2]
K3S = "v1.31.4+k3s1"
TOKEN = "a" * 64
HCLOUD_TOKEN = "hcloud-test-token"
PUBLIC_KEY = (
    "ssh-ed25519 " + base64.b64encode(b"\x00\x00\x00\x0bssh-ed25519\x00\x00\x00 " + bytes(range(32))).decode()
)


def document(user_data: str) -> dict[str, Any]:
    assert user_data.startswith("#cloud-config\n")
    parsed = yaml.safe_load(user_data)
    assert set(parsed) == {"write_files", "runcmd"}
    return dict(parsed)


def files(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {f["path"]: f for f in doc["write_files"]}


def boot(role: cloudinit.Role, platform: cloudinit.PlatformInstall | None = None) -> cloudinit.NodeBoot:
    return cloudinit.NodeBoot(
        role=role,
        k3s_version=K3S,
        token=TOKEN,
        subnet="10.0.1.0/24",
        join_address="10.0.1.254",
        tls_sans=("203.0.113.7", "10.0.1.254"),
        node_labels=("fabrik.sh/pool=cp", "fabrik.sh/role=control-plane"),
        platform=platform,
    )


PLATFORM = cloudinit.PlatformInstall(
    "oci://registry.example.com/charts/fabrik", "0.1.0", {"global": {"streamReplicas": 3}}
)


def test_the_first_control_plane_initialises_the_cluster_and_installs_the_platform() -> None:
    doc = document(cloudinit.render(boot("init", PLATFORM)))
    written = files(doc)
    k3s = yaml.safe_load(written["/etc/rancher/k3s/config.yaml"]["content"])
    assert written["/etc/rancher/k3s/config.yaml"]["permissions"] == "0600"
    assert k3s["cluster-init"] is True and "server" not in k3s
    assert k3s["token"] == TOKEN
    assert k3s["tls-san"] == ["203.0.113.7", "10.0.1.254"]  # the load balancer, public and private
    assert k3s["disable"] == ["servicelb"] and k3s["secrets-encryption"] is True

    script = written["/usr/local/sbin/fabrik-k3s-install"]["content"]
    assert "https://raw.githubusercontent.com/k3s-io/k3s/v1.31.4%2Bk3s1/install.sh" in script
    assert "get.k3s.io" not in script
    assert f"INSTALL_K3S_VERSION='{K3S}' INSTALL_K3S_EXEC='server'" in script
    assert doc["runcmd"] == [["/usr/local/sbin/fabrik-k3s-install"]]

    # the platform: applied after k3s is installed, from the manifest written beside
    install = script.index("sh /root/k3s-install.sh")
    apply = script.index(f"k3s kubectl apply -f {cloudinit.PLATFORM_MANIFEST}")
    assert install < apply
    manifest = written[cloudinit.PLATFORM_MANIFEST]
    assert manifest["permissions"] == "0600"
    chart = yaml.safe_load(manifest["content"])
    assert chart["apiVersion"] == "helm.cattle.io/v1" and chart["kind"] == "HelmChart"
    assert chart["metadata"] == {"name": "fabrik", "namespace": "kube-system"}
    assert chart["spec"]["chart"] == "oci://registry.example.com/charts/fabrik"
    assert chart["spec"]["version"] == "0.1.0"
    assert chart["spec"]["targetNamespace"] == "default"
    assert yaml.safe_load(chart["spec"]["valuesContent"]) == {"global": {"streamReplicas": 3}}


def test_other_nodes_join_through_the_load_balancer_with_the_token_and_install_nothing() -> None:
    for role, kind in (("server", "server"), ("agent", "agent")):
        doc = document(cloudinit.render(boot(role, PLATFORM)))  # type: ignore[arg-type]
        written = files(doc)
        k3s = yaml.safe_load(written["/etc/rancher/k3s/config.yaml"]["content"])
        assert k3s["server"] == "https://10.0.1.254:6443"
        assert k3s["token"] == TOKEN
        assert "cluster-init" not in k3s
        assert ("tls-san" in k3s) == (role == "server")
        script = written["/usr/local/sbin/fabrik-k3s-install"]["content"]
        assert f"INSTALL_K3S_VERSION='{K3S}' INSTALL_K3S_EXEC='{kind}'" in script
        assert cloudinit.PLATFORM_MANIFEST not in written and "kubectl apply" not in script


# --------------------------------------------------------------------------------------------
# through `fabrik infra apply`: the file's platform section, the values, what reaches the API


def infra_file(tmp_path: Path, platform: str) -> Path:
    (tmp_path / "id_ed25519.pub").write_text(PUBLIC_KEY + "\n")
    path = tmp_path / "fabrik-infra.yaml"
    path.write_text(
        f"""\
name: demo
location: nbg1
k3s_version: {K3S}
firewall:
  ssh_allowed_cidrs: [203.0.113.0/24]
  api_allowed_cidrs: [203.0.113.0/24]
ssh_keys:
  - name: ops
    public_key_file: id_ed25519.pub
workers:
  - name: general
    server_type: cx32
    count: 1
{platform}"""
    )
    return path


@pytest.fixture
def hcloud() -> Iterator[HcloudDouble]:
    double = HcloudDouble()
    double.add_server_type("cx22", 2, 4.0, {"nbg1": "0.006"})
    double.add_server_type("cx32", 4, 8.0, {"nbg1": "0.011"})
    with double.running_in_thread():
        yield double


def apply(double: HcloudDouble, path: Path) -> None:
    client = hetzner.connect({}, token=HCLOUD_TOKEN, endpoint=double.endpoint, poll_interval=0.005)
    Cluster(load(path), client).apply()


def user_data(double: HcloudDouble) -> dict[str, str]:
    return {s.name: s.user_data or "" for s in double.servers.values()}


def test_apply_gives_the_first_control_plane_the_platform_with_the_production_values(
    tmp_path: Path, hcloud: HcloudDouble
) -> None:
    production = REPO / "charts" / "fabrik" / "values-production.yaml"
    path = infra_file(
        tmp_path,
        f"""\
platform:
  image_registry: ghcr.io/acme/fabrik
  values_files: [{production}]
  values: {{gateway: {{replicaCount: 5}}}}
""",
    )
    apply(hcloud, path)
    servers = user_data(hcloud)
    assert all(len(data.encode()) < 32 * 1024 for data in servers.values())  # Hetzner's user data limit
    cp = document(servers["demo-cp-1"])
    worker = document(servers["demo-general-1"])
    assert cloudinit.PLATFORM_MANIFEST not in files(worker)

    chart = yaml.safe_load(files(cp)[cloudinit.PLATFORM_MANIFEST]["content"])
    assert chart["spec"]["chart"] == DEFAULT_CHART
    assert chart["spec"]["version"] == fabrik_version()
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", chart["spec"]["version"])
    values = yaml.safe_load(chart["spec"]["valuesContent"])
    expected = yaml.safe_load(production.read_text())
    # the production values: R3 streams, a NATS cluster of 3 ...
    assert values["global"]["streamReplicas"] == expected["global"]["streamReplicas"] == 3
    assert values["nats"]["config"]["cluster"] == {"enabled": True, "replicas": 3}
    # ... what this cluster implies ...
    assert values["global"]["imageRegistry"] == "ghcr.io/acme/fabrik"
    assert values["secrets"]["runKey"]["create"] is True and values["secrets"]["envKey"]["create"] is True
    lb_ip = next(iter(hcloud.load_balancers.values())).public_ipv4
    assert values["network"]["apiServerCIDRs"] == ["10.0.0.0/16", f"{lb_ip}/32"]
    k3s = yaml.safe_load(files(cp)["/etc/rancher/k3s/config.yaml"]["content"])
    assert lb_ip in k3s["tls-san"]
    # ... and the file's own values last
    assert values["gateway"]["replicaCount"] == 5
    assert {k: v for k, v in values["gateway"].items() if k != "replicaCount"} == {
        k: v for k, v in expected["gateway"].items() if k != "replicaCount"
    }


def test_without_a_platform_section_nothing_is_installed(tmp_path: Path, hcloud: HcloudDouble) -> None:
    apply(hcloud, infra_file(tmp_path, ""))
    for data in user_data(hcloud).values():
        assert cloudinit.PLATFORM_MANIFEST not in data and "kubectl apply" not in data


def test_platform_rules(tmp_path: Path) -> None:
    path = infra_file(
        tmp_path,
        """\
platform:
  image_registry: https://ghcr.io/acme
  chart: charts/fabrik
  version: latest
  values_files: [missing.yaml]
""",
    )
    with pytest.raises(InfraFileError) as info:
        load(path)
    problems = info.value.problems
    assert any(p.startswith("platform.image_registry: required") for p in problems)
    assert any(p.startswith("platform.chart: must be an oci:// chart reference") for p in problems)
    assert any(p.startswith("platform.version: must be a released chart version") for p in problems)
    assert any(p.startswith("platform.values_files[0]: cannot read") for p in problems)


def test_init_for_hetzner_with_a_registry_writes_a_platform_the_cluster_installs(
    tmp_path: Path, hcloud: HcloudDouble
) -> None:
    key = tmp_path / "id_ed25519.pub"
    key.write_text(PUBLIC_KEY + "\n")
    (tmp_path / "id_ed25519").write_text("private\n")
    values = tmp_path / "charts" / "fabrik" / "values-production.yaml"
    values.parent.mkdir(parents=True)
    values.write_text((REPO / "charts" / "fabrik" / "values-production.yaml").read_text())
    infra = tmp_path / "fabrik-infra.yaml"
    env = {
        "FABRIK_HOME": str(tmp_path / "home"),
        "FABRIK_HCLOUD_ENDPOINT": hcloud.endpoint,
        "HCLOUD_TOKEN": HCLOUD_TOKEN,
        "OPENAI_API_KEY": "",
        "ANTHROPIC_API_KEY": "",
    }
    args = ["init", "-y", "--target", "hetzner", "--ssh-key", str(key), "--allow-cidr", "203.0.113.0/24"]
    args += ["--infra-file", str(infra), "--image-registry", "ghcr.io/acme/fabrik"]
    result = CliRunner().invoke(cli, args, env=env)
    assert result.exit_code == 0, result.output
    config = load(infra)
    assert config.spec.platform is not None and config.spec.platform.image_registry == "ghcr.io/acme/fabrik"
    assert config.platform_values is not None and config.platform_values["global"]["streamReplicas"] == 3
