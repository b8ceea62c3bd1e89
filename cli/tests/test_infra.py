"""`fabrik infra` against the Hetzner Cloud API double, through the real `hcloud` client."""

from __future__ import annotations

import asyncio
import base64
import os
import stat
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from fabrik_cli.infra import cloudinit, hetzner, remote
from fabrik_cli.infra.cluster import Cluster, InfraError
from fabrik_cli.infra.config import InfraFileError, load, parse
from fabrik_cli.main import cli
from fabrik_common.testing.hcloud_double import HcloudDouble, parse_label_selector

TOKEN = "hcloud-test-token"
PUBLIC_KEY = (
    "ssh-ed25519 " + base64.b64encode(b"\x00\x00\x00\x0bssh-ed25519\x00\x00\x00 " + bytes(range(32))).decode()
)
OTHER_KEY = (
    "ssh-ed25519 "
    + base64.b64encode(b"\x00\x00\x00\x0bssh-ed25519\x00\x00\x00 " + bytes(range(1, 33))).decode()
)
VERSION = "v1.31.4+k3s1"


def infra_yaml(*, workers: int = 2, control_planes: int = 1, name: str = "demo", **extra: str) -> str:
    doc = {
        "name": name,
        "location": "nbg1",
        "k3s_version": VERSION,
        "network": {"ip_range": "10.0.0.0/16", "subnet": "10.0.1.0/24"},
        "firewall": {"ssh_allowed_cidrs": ["203.0.113.0/24"], "api_allowed_cidrs": ["198.51.100.7/32"]},
        "control_plane": {"server_type": "cx22", "count": control_planes},
        "workers": [{"name": "general", "server_type": "cx32", "count": workers}],
        "ssh_keys": [{"name": "ops", "public_key_file": "id_ed25519.pub"}],
        "load_balancer": {"type": "lb11"},
    }
    doc.update(extra)
    return yaml.safe_dump(doc)


@pytest.fixture
def double() -> Iterator[HcloudDouble]:
    d = HcloudDouble(action_polls=2)
    d.add_server_type("cx22", 2, 4.0, {"nbg1": "0.006"})
    d.add_server_type("cx32", 4, 8.0, {"nbg1": "0.011"})
    with d.running_in_thread():
        yield d


@pytest.fixture
def infra_file(tmp_path: Path) -> Path:
    (tmp_path / "id_ed25519.pub").write_text(PUBLIC_KEY + " ops@example\n")
    path = tmp_path / "fabrik-infra.yaml"
    path.write_text(infra_yaml())
    return path


def make_cluster(double: HcloudDouble, path: Path, policy: hetzner.RetryPolicy | None = None) -> Cluster:
    client = hetzner.connect(
        {},
        token=TOKEN,
        endpoint=double.endpoint,
        poll_interval=0.005,
        policy=policy or hetzner.RetryPolicy(base=0.05),
        page_size=2,  # several pages for every list
    )
    return Cluster(load(path), client)


def ours(double: HcloudDouble) -> list[str]:
    return sorted(s.name for s in double.servers.values() if s.labels.get("fabrik.sh/cluster") == "demo")


def test_plan_on_an_empty_project_creates_everything_and_changes_nothing(
    double: HcloudDouble, infra_file: Path
) -> None:
    plan = make_cluster(double, infra_file).plan()
    creates = sorted((c.resource, c.name) for c in plan.changes if c.kind == "create")
    assert creates == [
        ("firewall", "demo"),
        ("load_balancer", "demo-api"),
        ("network", "demo"),
        ("server", "demo-cp-1"),
        ("server", "demo-general-1"),
        ("server", "demo-general-2"),
        ("ssh_key", "ops"),
    ]
    assert double.mutations == []
    assert "7 to create, 0 to change, 0 to delete" in plan.render()


def test_apply_creates_the_cluster_and_a_second_apply_changes_nothing(
    double: HcloudDouble, infra_file: Path
) -> None:
    cluster = make_cluster(double, infra_file)
    cluster.apply()

    (network,) = double.networks.values()
    assert network.name == "demo" and network.ip_range == "10.0.0.0/16"
    assert [s["ip_range"] for s in network.subnets] == ["10.0.1.0/24"]
    assert network.subnets[0]["network_zone"] == "eu-central"

    (firewall,) = double.firewalls.values()
    rules = sorted((r["direction"], r["protocol"], r["port"], tuple(r["source_ips"])) for r in firewall.rules)
    assert rules == [("in", "tcp", "22", ("203.0.113.0/24",)), ("in", "tcp", "6443", ("198.51.100.7/32",))]
    assert firewall.applied_to == [
        {"type": "label_selector", "label_selector": {"selector": "fabrik.sh/cluster=demo"}}
    ]

    (lb,) = double.load_balancers.values()
    assert lb.name == "demo-api" and lb.lb_type == "lb11" and network.id in lb.networks
    assert [(s["protocol"], s["listen_port"], s["destination_port"]) for s in lb.services] == [
        ("tcp", 6443, 6443)
    ]
    (target,) = lb.targets
    assert target["label_selector"]["selector"] == "fabrik.sh/cluster=demo,fabrik.sh/role=control-plane"
    assert target["use_private_ip"] is True

    assert ours(double) == ["demo-cp-1", "demo-general-1", "demo-general-2"]
    cp = double.server_named("demo-cp-1")
    worker = double.server_named("demo-general-1")
    assert cp is not None and worker is not None
    assert cp.labels["fabrik.sh/role"] == "control-plane" and cp.labels["fabrik.sh/pool"] == "cp"
    assert worker.labels["fabrik.sh/role"] == "worker" and worker.labels["fabrik.sh/pool"] == "general"
    assert cp.labels["fabrik.sh/k3s-version"] == "v1.31.4-k3s1"
    assert cp.server_type == "cx22" and worker.server_type == "cx32"
    assert all(s.status == "running" for s in double.servers.values())  # their create actions were waited for
    assert all(network.id in s.networks for s in double.servers.values())
    (key,) = double.ssh_keys.values()
    assert cp.ssh_keys == [key.id] and key.labels["fabrik.sh/cluster"] == "demo"

    # cloud-init: the pinned release, the first server initialises, the rest join through the LB
    lb_private = lb.networks[network.id]
    assert cp.user_data is not None and worker.user_data is not None
    assert "INSTALL_K3S_VERSION='v1.31.4+k3s1'" in cp.user_data
    assert "k3s-io/k3s/v1.31.4%2Bk3s1/install.sh" in cp.user_data
    assert '"cluster-init": true' not in cp.user_data and "cluster-init: true" in cp.user_data
    assert f'tls-san: ["{lb.public_ipv4}", "{lb_private}"]' in cp.user_data
    assert "INSTALL_K3S_EXEC='agent'" in worker.user_data
    assert f'server: "https://{lb_private}:6443"' in worker.user_data
    assert "cluster-init" not in worker.user_data
    token = (infra_file.parent / ".fabrik" / "demo" / "k3s-token").read_text().strip()
    assert len(token) == 64 and f'token: "{token}"' in worker.user_data
    token_file = infra_file.parent / ".fabrik" / "demo" / "k3s-token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600

    # again: nothing to do, and not a single mutating call
    before = len(double.mutations)
    again = make_cluster(double, infra_file)
    assert again.plan().empty
    again.apply()
    assert len(double.mutations) == before
    # lists were paged (page_size 2): more than one page of servers was read
    assert any(path == "/v1/servers" and query.get("page") == "2" for path, query in double.calls)


def test_growing_a_pool_adds_joining_nodes_and_shrinking_drains_first(
    double: HcloudDouble, infra_file: Path
) -> None:
    make_cluster(double, infra_file).apply()
    infra_file.write_text(infra_yaml(workers=3))
    grow = make_cluster(double, infra_file)
    assert [(c.kind, c.name) for c in grow.plan().actionable] == [("create", "demo-general-3")]
    grow.apply()
    new = double.server_named("demo-general-3")
    assert new is not None and new.user_data is not None and "INSTALL_K3S_EXEC='agent'" in new.user_data
    assert ours(double) == ["demo-cp-1", "demo-general-1", "demo-general-2", "demo-general-3"]

    infra_file.write_text(infra_yaml(workers=1))
    shrink = make_cluster(double, infra_file)
    assert sorted((c.kind, c.name) for c in shrink.plan().actionable) == [
        ("delete", "demo-general-2"),
        ("delete", "demo-general-3"),
    ]
    mutations = len(double.mutations)
    with pytest.raises(InfraError, match="cannot drain demo-general-2, demo-general-3: no kubeconfig"):
        shrink.apply()
    assert len(double.mutations) == mutations and len(ours(double)) == 4  # stopped before anything

    drained: list[Sequence[str]] = []
    shrink.apply(drainer=drained.append)
    assert drained == [["demo-general-2", "demo-general-3"]]
    assert ours(double) == ["demo-cp-1", "demo-general-1"]

    infra_file.write_text(infra_yaml(workers=0))
    make_cluster(double, infra_file).apply(force=True)  # without a drain: only with --force
    assert ours(double) == ["demo-cp-1"]


def test_changed_allowed_ranges_update_the_firewall_rules_only(
    double: HcloudDouble, infra_file: Path
) -> None:
    make_cluster(double, infra_file).apply()
    doc = yaml.safe_load(infra_file.read_text())
    doc["firewall"]["api_allowed_cidrs"] = ["198.51.100.0/24", "192.0.2.10/32"]
    infra_file.write_text(yaml.safe_dump(doc))
    cluster = make_cluster(double, infra_file)
    assert [(c.kind, c.resource) for c in cluster.plan().actionable] == [("update", "firewall")]
    before = len(double.mutations)
    cluster.apply()
    assert [p for _, p in double.mutations[before:]] == [
        f"/v1/firewalls/{next(iter(double.firewalls))}/actions/set_rules"
    ]
    (firewall,) = double.firewalls.values()
    api_rule = next(r for r in firewall.rules if r["port"] == "6443")
    assert api_rule["source_ips"] == ["198.51.100.0/24", "192.0.2.10/32"]
    assert make_cluster(double, infra_file).plan().empty


def test_a_failing_drain_removes_nothing(double: HcloudDouble, infra_file: Path) -> None:
    env = {
        "HCLOUD_TOKEN": TOKEN,
        "FABRIK_HCLOUD_ENDPOINT": double.endpoint,
        "FABRIK_HCLOUD_POLL_INTERVAL": "0.005",
    }
    make_cluster(double, infra_file).apply()
    infra_file.write_text(infra_yaml(workers=1))
    broken = infra_file.parent / "broken-kubeconfig"
    broken.write_text("not: a kubeconfig\n")
    result = CliRunner().invoke(
        cli, ["infra", "apply", "-f", str(infra_file), "--yes", "--kubeconfig", str(broken)], env=env
    )
    assert result.exit_code == 1, result.output
    assert (
        "could not drain: cannot drain through" in result.output and "no server was removed" in result.output
    )
    assert ours(double) == ["demo-cp-1", "demo-general-1", "demo-general-2"]


def test_three_control_planes_one_initialises_the_others_join(double: HcloudDouble, infra_file: Path) -> None:
    infra_file.write_text(infra_yaml(control_planes=3, workers=0))
    make_cluster(double, infra_file).apply()
    (lb,) = double.load_balancers.values()
    (network,) = double.networks.values()
    inits = []
    for name in ("demo-cp-1", "demo-cp-2", "demo-cp-3"):
        server = double.server_named(name)
        assert server is not None and server.user_data is not None
        assert "INSTALL_K3S_EXEC='server'" in server.user_data
        if "cluster-init: true" in server.user_data:
            inits.append(name)
        else:
            assert f'server: "https://{lb.networks[network.id]}:6443"' in server.user_data
    assert inits == ["demo-cp-1"]
    # cp-1 lost and re-created: it joins the existing cluster instead of starting a second one
    cp1 = double.server_named("demo-cp-1")
    assert cp1 is not None
    del double.servers[cp1.id]
    make_cluster(double, infra_file).apply()
    again = double.server_named("demo-cp-1")
    assert again is not None and again.user_data is not None
    assert "cluster-init" not in again.user_data and "server: " in again.user_data


def test_destroy_removes_only_what_carries_the_cluster_label(double: HcloudDouble, infra_file: Path) -> None:
    make_cluster(double, infra_file).apply()
    foreign = double.add_server("hand-made", labels={"team": "data"})
    neighbour = double.add_server("other-cp-1", labels={"fabrik.sh/cluster": "other"})
    volume = double.add_volume("pvc-123")  # not attached to a node: neither deleted nor mentioned
    cluster = make_cluster(double, infra_file)
    plan = cluster.destroy_plan()
    assert sorted(c.name for c in plan.changes if c.kind == "delete") == sorted(
        ["demo-cp-1", "demo-general-1", "demo-general-2", "demo-api", "demo", "demo", "ops"]
    )
    cluster.destroy()
    assert sorted(s.name for s in double.servers.values()) == ["hand-made", "other-cp-1"]
    assert foreign.id in double.servers and neighbour.id in double.servers
    assert not double.networks and not double.firewalls and not double.load_balancers and not double.ssh_keys
    assert volume.id in double.volumes
    assert make_cluster(double, infra_file).destroy_plan().changes == []


def test_destroy_keeps_a_users_own_ssh_key_and_names_attached_volumes(
    double: HcloudDouble, infra_file: Path
) -> None:
    double.ssh_keys.clear()
    client = hetzner.connect({}, token=TOKEN, endpoint=double.endpoint, poll_interval=0.005)
    client.ssh_keys.create(name="alice", public_key=PUBLIC_KEY)  # already uploaded by hand, unlabelled
    cluster = make_cluster(double, infra_file)
    assert ("keep", "ssh_key", "alice") in [(c.kind, c.resource, c.name) for c in cluster.plan().changes]
    cluster.apply()
    (key,) = double.ssh_keys.values()
    assert key.name == "alice" and key.labels == {}
    cp = double.server_named("demo-cp-1")
    assert cp is not None and cp.ssh_keys == [key.id]
    volume = double.add_volume("pvc-data")
    volume.server = cp.id
    notes = [c for c in cluster.destroy_plan().changes if c.kind == "note"]
    assert [(c.resource, c.name) for c in notes] == [("volume", "pvc-data")]
    volume.server = None
    cluster.destroy()
    assert [k.name for k in double.ssh_keys.values()] == ["alice"]


def test_rate_limit_waits_for_the_reset_instead_of_hammering(double: HcloudDouble, infra_file: Path) -> None:
    policy = hetzner.RetryPolicy(base=1.0)
    cluster = make_cluster(double, infra_file, policy)
    double.rate_limit(0.3)
    started = time.time()
    plan = cluster.plan()
    elapsed = time.time() - started
    assert not plan.empty
    assert double.rate_limited == 1  # one refusal, then a wait until RateLimit-Reset
    assert len(policy.waits) == 1 and 0.05 <= policy.waits[0] <= 1.0
    assert elapsed >= 0.25


def test_rate_limit_that_does_not_end_surfaces_as_an_error(double: HcloudDouble, infra_file: Path) -> None:
    from hcloud import APIException

    slept: list[float] = []
    policy = hetzner.RetryPolicy(base=1.0, max_retries=3, sleep=slept.append)
    cluster = make_cluster(double, infra_file, policy)
    double.rate_limit(3600)
    with pytest.raises(APIException) as info:
        cluster.plan()
    assert info.value.code == "rate_limit_exceeded"
    assert double.rate_limited == 4 and slept == [1.0, 2.0, 4.0]  # reset an hour away: backoff steps


def test_a_lost_create_answer_is_adopted_when_ours(double: HcloudDouble, infra_file: Path) -> None:
    double.lose_next_response("POST", "/v1/networks")
    make_cluster(double, infra_file).apply()
    assert len(double.networks) == 1
    posts = [p for m, p in double.mutations if p == "/v1/networks"]
    assert len(posts) == 2  # the retry met uniqueness_error and adopted the network
    assert make_cluster(double, infra_file).plan().empty


def test_a_foreign_resource_with_our_name_stops_apply(double: HcloudDouble, infra_file: Path) -> None:
    client = hetzner.connect({}, token=TOKEN, endpoint=double.endpoint)
    client.networks.create(name="demo", ip_range="10.1.0.0/16")
    with pytest.raises(
        InfraError, match=r"network named 'demo' already exists .* not part of cluster 'demo'"
    ):
        make_cluster(double, infra_file).apply()
    assert len(double.networks) == 1 and not double.servers


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"k3s_version": "latest"}, "k3s_version: must be a pinned release"),
        ({"k3s_version": "stable"}, "k3s_version: must be a pinned release"),
        ({"k3s_version": "1.31"}, "k3s_version: must look like v1.31.4+k3s1"),
        ({"location": "sin"}, "location: must be one of nbg1, fsn1, hel1, ash"),
        ({"control_plane": {"server_type": "cx22", "count": 2}}, "control_plane.count: must be 1 or 3"),
        (
            {"firewall": {"ssh_allowed_cidrs": [], "api_allowed_cidrs": ["10.0.0.0/33"]}},
            "firewall.ssh_allowed_cidrs: list at least one",
        ),
        (
            {"firewall": {"ssh_allowed_cidrs": ["1.2.3.4/8"], "api_allowed_cidrs": ["x"]}},
            "firewall.ssh_allowed_cidrs[0]: must be a CIDR",
        ),
        (
            {"network": {"ip_range": "10.0.0.0/16", "subnet": "10.9.1.0/24"}},
            "network.subnet: must lie within network.ip_range",
        ),
        (
            {"workers": [{"name": "general", "server_type": "cx32", "count": "two"}]},
            "workers[0].count: Expected `int`, got `str`",
        ),
        (
            {"control_plane": {"count": 1, "flavour": "big"}},
            "control_plane: Object contains unknown field `flavour`",
        ),
    ],
)
def test_invalid_files_name_the_field_and_the_rule(
    tmp_path: Path, change: dict[str, object], message: str
) -> None:
    (tmp_path / "id_ed25519.pub").write_text(PUBLIC_KEY)
    path = tmp_path / "fabrik-infra.yaml"
    doc = yaml.safe_load(infra_yaml())
    doc.update(change)
    with pytest.raises(InfraFileError) as info:
        parse(yaml.safe_dump(doc), path)
    assert any(message in problem for problem in info.value.problems), info.value.problems


def test_a_missing_k3s_version_is_named(tmp_path: Path) -> None:
    doc = yaml.safe_load(infra_yaml())
    del doc["k3s_version"]
    with pytest.raises(InfraFileError, match="missing required field `k3s_version`"):
        parse(yaml.safe_dump(doc), tmp_path / "f.yaml")


def test_label_selectors_as_the_api_evaluates_them() -> None:
    labels = {"fabrik.sh/cluster": "demo", "fabrik.sh/role": "worker", "env": "prod"}
    assert parse_label_selector("fabrik.sh/cluster=demo,fabrik.sh/role==worker")(labels)
    assert not parse_label_selector("fabrik.sh/cluster=demo,fabrik.sh/role=control-plane")(labels)
    assert parse_label_selector("env in (prod, staging),!team")(labels)
    assert not parse_label_selector("env notin (prod)")(labels)
    assert parse_label_selector("fabrik.sh/role!=control-plane,env")(labels)
    with pytest.raises(ValueError, match="invalid label selector expression"):
        parse_label_selector("env in prod")


def test_the_kubeconfig_points_at_the_load_balancer(tmp_path: Path) -> None:
    k3s = yaml.safe_dump(
        {
            "apiVersion": "v1",
            "clusters": [
                {
                    "name": "default",
                    "cluster": {"server": "https://127.0.0.1:6443", "certificate-authority-data": "Q0E="},
                }
            ],
            "users": [{"name": "default", "user": {"client-certificate-data": "Q0VSVA=="}}],
            "contexts": [{"name": "default", "context": {"cluster": "default", "user": "default"}}],
            "current-context": "default",
        }
    )
    seen: list[Sequence[str]] = []

    def run(argv: Sequence[str]) -> str:
        seen.append(argv)
        return k3s

    text = remote.fetch_kubeconfig(
        "203.0.113.10",
        api_address="203.0.113.99",
        name="demo",
        key_file=tmp_path / "k",
        known_hosts=tmp_path / "kh",
        run=run,
    )
    doc = yaml.safe_load(text)
    assert doc["clusters"][0]["cluster"]["server"] == "https://203.0.113.99:6443"
    assert doc["current-context"] == "demo" and doc["contexts"][0]["context"] == {
        "cluster": "demo",
        "user": "demo",
    }
    assert seen[0][-3:] == ["root@203.0.113.10", "cat", "/etc/rancher/k3s/k3s.yaml"]
    assert ["-i", str(tmp_path / "k")] == list(seen[0][1:3])


def test_cloud_init_for_a_joining_server() -> None:
    boot = cloudinit.NodeBoot(
        "server",
        VERSION,
        "t0k3n",
        "10.0.1.0/24",
        "10.0.1.5",
        ("203.0.113.9", "10.0.1.5"),
        ("fabrik.sh/pool=cp",),
    )
    text = cloudinit.render(boot)
    loaded = yaml.safe_load(text)
    config_file = next(f for f in loaded["write_files"] if f["path"] == "/etc/rancher/k3s/config.yaml")
    config = yaml.safe_load(config_file["content"])
    assert config["server"] == "https://10.0.1.5:6443" and "cluster-init" not in config
    assert config["tls-san"] == ["203.0.113.9", "10.0.1.5"] and config_file["permissions"] == "0600"
    script = next(f for f in loaded["write_files"] if f["path"] == "/usr/local/sbin/fabrik-k3s-install")[
        "content"
    ]
    assert script.startswith("#!/bin/sh\n")  # runcmd executes the file itself
    assert "SUBNET=10.0.1.0/24" in script and "INSTALL_K3S_EXEC='server'" in script
    assert loaded["runcmd"] == [["/usr/local/sbin/fabrik-k3s-install"]]


def test_the_commands(double: HcloudDouble, infra_file: Path) -> None:
    env = {
        "HCLOUD_TOKEN": TOKEN,
        "FABRIK_HCLOUD_ENDPOINT": double.endpoint,
        "FABRIK_HCLOUD_POLL_INTERVAL": "0.005",
    }
    runner = CliRunner()
    f = str(infra_file)
    result = runner.invoke(cli, ["infra", "plan", "-f", f], env=env)
    assert result.exit_code == 3, result.output
    assert "+ server demo-cp-1" in result.output and double.mutations == []

    result = runner.invoke(cli, ["infra", "apply", "-f", f], env=env, input="n\n")
    assert result.exit_code == 1 and "nothing changed" in result.output and double.mutations == []

    result = runner.invoke(cli, ["infra", "apply", "-f", f, "--yes"], env=env)
    assert result.exit_code == 0, result.output
    (lb,) = double.load_balancers.values()
    assert f"Kubernetes API: https://{lb.public_ipv4}:6443" in result.output

    result = runner.invoke(cli, ["infra", "plan", "-f", f], env=env)
    assert result.exit_code == 0 and "no changes" in result.output

    result = runner.invoke(cli, ["infra", "ssh", "-f", f, "--print", "general-1", "uptime"], env=env)
    assert result.exit_code == 0, result.output
    worker = double.server_named("demo-general-1")
    assert worker is not None
    assert f"root@{worker.public_ipv4} uptime" in result.output
    assert f"-i {infra_file.parent / 'id_ed25519'}" in result.output

    result = runner.invoke(cli, ["infra", "ssh", "-f", f, "--print", "nope"], env=env)
    assert result.exit_code == 2 and "no server 'nope'" in result.output

    # kubeconfig: fetched over ssh (a stand-in `ssh` on PATH), pointed at the load balancer
    bin_dir = infra_file.parent / "bin"
    bin_dir.mkdir()
    fake_ssh = bin_dir / "ssh"
    fake_ssh.write_text(
        '#!/bin/sh\necho "$@" > "$(dirname "$0")/args"\n'
        "printf 'apiVersion: v1\\nclusters:\\n- name: default\\n  cluster:\\n    server: https://127.0.0.1:6443\\n"
        "users:\\n- name: default\\n  user: {}\\ncontexts:\\n- name: default\\n"
        "  context: {cluster: default, user: default}\\n"
        "current-context: default\\n'\n"
    )
    fake_ssh.chmod(0o755)
    path_env = {**env, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}
    result = runner.invoke(cli, ["infra", "kubeconfig", "-f", f], env=path_env)
    assert result.exit_code == 0, result.output
    kubeconfig = infra_file.parent / ".fabrik" / "demo" / "kubeconfig"
    assert (
        yaml.safe_load(kubeconfig.read_text())["clusters"][0]["cluster"]["server"]
        == f"https://{lb.public_ipv4}:6443"
    )
    assert stat.S_IMODE(kubeconfig.stat().st_mode) == 0o600
    cp = double.server_named("demo-cp-1")
    assert (
        cp is not None
        and f"root@{cp.public_ipv4} cat /etc/rancher/k3s/k3s.yaml" in (bin_dir / "args").read_text()
    )

    result = runner.invoke(cli, ["infra", "destroy", "-f", f], env=env, input="wrong\n")
    assert result.exit_code == 1 and len(double.servers) == 3
    result = runner.invoke(cli, ["infra", "destroy", "-f", f], env=env, input="demo\n")
    assert result.exit_code == 0, result.output
    assert not double.servers and not double.networks
    result = runner.invoke(cli, ["infra", "destroy", "-f", f], env=env)
    assert result.exit_code == 0 and "nothing to destroy" in result.output

    bad = infra_file.parent / "bad.yaml"
    bad.write_text(infra_yaml(k3s_version="latest"))
    result = runner.invoke(cli, ["infra", "plan", "-f", str(bad)], env=env)
    assert result.exit_code == 2 and "k3s_version: must be a pinned release" in result.output

    result = runner.invoke(
        cli,
        ["infra", "plan", "-f", f],
        env={**env, "HCLOUD_TOKEN": "", "FABRIK_HOME": str(infra_file.parent)},
    )
    assert result.exit_code == 2 and "no Hetzner Cloud API token" in result.output

    result = runner.invoke(cli, ["infra", "plan", "-f", f], env={**env, "HCLOUD_TOKEN": "wrong"})
    assert result.exit_code == 1 and "unauthorized" in result.output


async def test_drain_cordons_evicts_and_deletes_the_node(tmp_path: Path) -> None:
    from fabrik_cli.infra.drain import drain
    from fabrik_common.testing.k8s_double import KubeDouble, Script
    from fabrik_common.testing.k8s_double_cluster import write_kubeconfig

    async with KubeDouble(node_name="demo-general-2") as k8s:
        k8s.put_object(
            {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "demo-general-2"}, "spec": {}}
        )
        k8s.script({"app": "web"}, Script(Script.start(), Script.wait(60)))

        def pod(name: str, labels: dict[str, str], owner: str | None = None) -> dict[str, object]:
            meta: dict[str, object] = {"name": name, "namespace": "default", "labels": labels}
            if owner:
                meta["ownerReferences"] = [
                    {"apiVersion": "apps/v1", "kind": owner, "name": "x", "uid": "u-1", "controller": True}
                ]
            return {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": meta,
                "spec": {"containers": [{"name": "c", "image": "busybox:1.36"}]},
            }

        k8s.put_object(pod("web-1", {"app": "web"}))
        k8s.put_object(pod("agent-1", {"app": "web"}, owner="DaemonSet"))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            phase = (k8s.get("pods", "default", "web-1") or {}).get("status", {}).get("phase")
            if phase == "Running":
                break
            await asyncio.sleep(0.02)
        kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", k8s.url, "t")
        notes: list[str] = []
        await drain(str(kubeconfig), ["demo-general-2"], timeout=10, poll=0.05, echo=notes.append)

        assert ("PATCH", "/api/v1/nodes/demo-general-2") in k8s.requests
        assert ("POST", "/api/v1/namespaces/default/pods/web-1/eviction") in k8s.requests
        assert not any(path.endswith("/agent-1/eviction") for _, path in k8s.requests)  # DaemonSet pods stay
        assert k8s.get("pods", "default", "web-1") is None
        assert k8s.get("nodes", "", "demo-general-2") is None
        assert notes == ["  cordoned demo-general-2", "  drained demo-general-2"]
