"""Plan, apply and destroy one cluster: what the file says against what the project has.

Nothing is remembered locally about the cloud side: every run lists the project's resources by
the label `fabrik.sh/cluster=<name>` and compares. Names are derived from the cluster's name
(network and firewall `<name>`, load balancer `<name>-api`, servers `<name>-cp-<n>` and
`<name>-<pool>-<n>`), labels say what each thing is (`fabrik.sh/role`, `fabrik.sh/pool`,
`fabrik.sh/index`, `fabrik.sh/k3s-version`, `fabrik.sh/managed-by=fabrik`).
"""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Final, Literal

from hcloud import APIException, Client
from hcloud.firewalls import BoundFirewall, FirewallResource, FirewallResourceLabelSelector, FirewallRule
from hcloud.images import Image
from hcloud.load_balancer_types import LoadBalancerType
from hcloud.load_balancers import (
    BoundLoadBalancer,
    LoadBalancerAlgorithm,
    LoadBalancerHealthCheck,
    LoadBalancerService,
    LoadBalancerTarget,
    LoadBalancerTargetLabelSelector,
)
from hcloud.locations import Location
from hcloud.networks import BoundNetwork, NetworkSubnet
from hcloud.server_types import ServerType
from hcloud.servers import BoundServer
from hcloud.ssh_keys import BoundSSHKey

from fabrik_cli.infra import cloudinit
from fabrik_cli.infra.config import InfraConfig, merge_values

PREFIX: Final = "fabrik.sh/"
CLUSTER: Final = PREFIX + "cluster"
ROLE: Final = PREFIX + "role"
POOL: Final = PREFIX + "pool"
INDEX: Final = PREFIX + "index"
VERSION: Final = PREFIX + "k3s-version"
MANAGED: Final = PREFIX + "managed-by"
CONTROL_PLANE: Final = "control-plane"
WORKER: Final = "worker"
CP_POOL: Final = "cp"
API_PORT: Final = 6443
SSH_PORT: Final = 22
TOKEN_FILE: Final = "k3s-token"  # noqa: S105 - a file name
KUBECONFIG_FILE: Final = "kubeconfig"

ChangeKind = Literal["create", "update", "delete", "keep", "note"]


class InfraError(Exception):
    """Something the cluster cannot be brought to; the message says what to do."""


@dataclass(frozen=True)
class Change:
    kind: ChangeKind
    resource: str  # ssh_key, network, firewall, load_balancer, server, volume
    name: str
    detail: str = ""

    def line(self) -> str:
        mark = {"create": "+", "update": "~", "delete": "-", "keep": "=", "note": "!"}[self.kind]
        text = f"{mark} {self.resource} {self.name}"
        return f"{text}: {self.detail}" if self.detail else text


@dataclass
class Plan:
    changes: list[Change] = field(default_factory=list)

    @property
    def actionable(self) -> list[Change]:
        return [c for c in self.changes if c.kind in ("create", "update", "delete")]

    @property
    def empty(self) -> bool:
        return not self.actionable

    def add(self, kind: ChangeKind, resource: str, name: str, detail: str = "") -> None:
        self.changes.append(Change(kind, resource, name, detail))

    def render(self, *, verbose: bool = False) -> str:
        shown = [c for c in self.changes if verbose or c.kind != "keep"]
        counts = {k: sum(1 for c in self.changes if c.kind == k) for k in ("create", "update", "delete")}
        summary = f"{counts['create']} to create, {counts['update']} to change, {counts['delete']} to delete"
        if not self.actionable:
            summary = "no changes: the project matches the file"
        return "\n".join([*(c.line() for c in shown), summary])


@dataclass(frozen=True)
class DesiredServer:
    name: str
    role: str
    pool: str
    index: int
    server_type: str

    def labels(self, cluster: str, k3s_version: str) -> dict[str, str]:
        return {
            CLUSTER: cluster,
            MANAGED: "fabrik",
            ROLE: self.role,
            POOL: self.pool,
            INDEX: str(self.index),
            VERSION: label_value(k3s_version),
        }


def label_value(text: str) -> str:
    """A label value the API accepts (`+` is not allowed): v1.31.4+k3s1 -> v1.31.4-k3s1."""
    return text.replace("+", "-")


@dataclass
class Observed:
    ssh_keys: list[BoundSSHKey]
    network: BoundNetwork | None
    firewall: BoundFirewall | None
    load_balancer: BoundLoadBalancer | None
    servers: list[BoundServer]


Drainer = Callable[[Sequence[str]], None]


class Cluster:
    def __init__(
        self,
        config: InfraConfig,
        client: Client,
        *,
        echo: Callable[[str], None] = lambda _: None,
        action_timeout: float = 600.0,
    ) -> None:
        self.config = config
        self.spec = config.spec
        self.client = client
        self.echo = echo
        self.action_timeout = action_timeout

    # -- names and labels -------------------------------------------------------------------

    @property
    def selector(self) -> str:
        return f"{CLUSTER}={self.spec.name}"

    def base_labels(self) -> dict[str, str]:
        return {CLUSTER: self.spec.name, MANAGED: "fabrik"}

    @property
    def lb_name(self) -> str:
        return f"{self.spec.name}-api"

    def desired_servers(self) -> list[DesiredServer]:
        name = self.spec.name
        wanted = [
            DesiredServer(f"{name}-cp-{i}", CONTROL_PLANE, CP_POOL, i, self.spec.control_plane.server_type)
            for i in range(1, self.spec.control_plane.count + 1)
        ]
        for pool in self.spec.workers:
            wanted += [
                DesiredServer(f"{name}-{pool.name}-{i}", WORKER, pool.name, i, pool.server_type)
                for i in range(1, pool.count + 1)
            ]
        return wanted

    def firewall_rules(self) -> list[FirewallRule]:
        return [
            FirewallRule(
                direction="in",
                protocol="tcp",
                port=str(SSH_PORT),
                source_ips=list(self.spec.firewall.ssh_allowed_cidrs),
                description="ssh",
            ),
            FirewallRule(
                direction="in",
                protocol="tcp",
                port=str(API_PORT),
                source_ips=list(self.spec.firewall.api_allowed_cidrs),
                description="kubernetes-api",
            ),
        ]

    def api_service(self) -> LoadBalancerService:
        return LoadBalancerService(
            protocol="tcp",
            listen_port=API_PORT,
            destination_port=API_PORT,
            proxyprotocol=False,
            health_check=LoadBalancerHealthCheck(
                protocol="tcp", port=API_PORT, interval=15, timeout=10, retries=3
            ),
        )

    def api_target(self) -> LoadBalancerTarget:
        return LoadBalancerTarget(
            type="label_selector",
            label_selector=LoadBalancerTargetLabelSelector(
                selector=f"{self.selector},{ROLE}={CONTROL_PLANE}"
            ),
            use_private_ip=True,
        )

    # -- local secrets ----------------------------------------------------------------------

    @property
    def token_file(self) -> Path:
        return self.config.state_dir / TOKEN_FILE

    @property
    def kubeconfig_file(self) -> Path:
        return self.config.state_dir / KUBECONFIG_FILE

    def read_token(self) -> str | None:
        try:
            return self.token_file.read_text().strip() or None
        except FileNotFoundError:
            return None

    def write_private(self, path: Path, text: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(path.parent, 0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, stat.S_IRUSR | stat.S_IWUSR)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.chmod(path, 0o600)

    # -- reading the project ----------------------------------------------------------------

    def observe(self) -> Observed:
        sel = self.selector
        networks = self.client.networks.get_all(label_selector=sel)
        firewalls = self.client.firewalls.get_all(label_selector=sel)
        lbs = self.client.load_balancers.get_all(label_selector=sel)
        return Observed(
            ssh_keys=self.client.ssh_keys.get_all(label_selector=sel),
            network=networks[0] if networks else None,
            firewall=firewalls[0] if firewalls else None,
            load_balancer=lbs[0] if lbs else None,
            servers=sorted(self.client.servers.get_all(label_selector=sel), key=lambda s: s.name or ""),
        )

    def _key_exists(self, public_key: str) -> BoundSSHKey | None:
        fingerprint = _fingerprint(public_key)
        keys = self.client.ssh_keys.get_all()
        return next((k for k in keys if k.fingerprint == fingerprint), None)

    def _key_by_name_or_fingerprint(self, name: str, public_key: str) -> BoundSSHKey | None:
        return self.client.ssh_keys.get_by_name(name) or self._key_exists(public_key)

    # -- plan -------------------------------------------------------------------------------

    def plan(self, observed: Observed | None = None) -> Plan:
        seen = observed or self.observe()
        plan = Plan()
        spec = self.spec
        # SSH keys: ours or the user's own with the same key are fine.
        wanted_fps = {_fingerprint(k) for k in self.config.public_keys.values()}
        all_keys = self.client.ssh_keys.get_all()
        for name, public_key in self.config.public_keys.items():
            existing = next((k for k in all_keys if k.fingerprint == _fingerprint(public_key)), None)
            if existing is None:
                plan.add("create", "ssh_key", name)
            else:
                plan.add("keep", "ssh_key", existing.name or name)
        for key in seen.ssh_keys:
            if key.fingerprint not in wanted_fps:
                plan.add("delete", "ssh_key", key.name or "?", "no longer in ssh_keys")
        # network
        if seen.network is None:
            plan.add("create", "network", spec.name, f"{spec.network.ip_range}, subnet {spec.network.subnet}")
        else:
            if seen.network.ip_range != spec.network.ip_range:
                plan.add(
                    "note",
                    "network",
                    seen.network.name or spec.name,
                    f"ip_range is {seen.network.ip_range}, the file says {spec.network.ip_range}: "
                    "a network's range cannot change under running nodes; destroy and re-create the cluster",
                )
            if not any(s.ip_range == spec.network.subnet for s in seen.network.subnets or []):
                plan.add(
                    "update", "network", seen.network.name or spec.name, f"add subnet {spec.network.subnet}"
                )
            else:
                plan.add("keep", "network", seen.network.name or spec.name)
        # firewall
        if seen.firewall is None:
            plan.add("create", "firewall", spec.name, self._rules_text())
        else:
            before = len(plan.actionable)
            if _rule_set(seen.firewall.rules or []) != _rule_set(self.firewall_rules()):
                plan.add("update", "firewall", spec.name, "rules: " + self._rules_text())
            selectors = [
                a.label_selector.selector
                for a in seen.firewall.applied_to or []
                if a.type == "label_selector" and a.label_selector is not None
            ]
            if self.selector not in selectors:
                plan.add("update", "firewall", spec.name, f"apply to servers with {self.selector}")
            if len(plan.actionable) == before:
                plan.add("keep", "firewall", spec.name)
        # load balancer
        lb = seen.load_balancer
        if lb is None:
            plan.add(
                "create",
                "load_balancer",
                self.lb_name,
                f"{spec.load_balancer.type}, tcp {API_PORT} -> control plane",
            )
        else:
            before = len(plan.actionable)
            if not any(s.listen_port == API_PORT for s in lb.services or []):
                plan.add("update", "load_balancer", self.lb_name, f"add service tcp {API_PORT}")
            if not any(
                t.type == "label_selector"
                and t.label_selector is not None
                and t.label_selector.selector == self.api_target().label_selector.selector  # type: ignore[union-attr]
                for t in lb.targets or []
            ):
                plan.add("update", "load_balancer", self.lb_name, "add target: the control-plane servers")
            if seen.network is not None and not any(
                p.network.id == seen.network.id for p in lb.private_net or []
            ):
                plan.add("update", "load_balancer", self.lb_name, "attach to the network")
            if len(plan.actionable) == before:
                plan.add("keep", "load_balancer", self.lb_name)
        # servers
        wanted = {d.name: d for d in self.desired_servers()}
        have = {s.name: s for s in seen.servers if s.name}
        for name, desired in wanted.items():
            server = have.get(name)
            if server is None:
                plan.add("create", "server", name, f"{desired.server_type}, {desired.role} ({desired.pool})")
                continue
            plan.add("keep", "server", name)
            labels = server.labels or {}
            stype = server.server_type.name if server.server_type is not None else "?"
            if stype != desired.server_type:
                plan.add(
                    "note",
                    "server",
                    name,
                    f"is {stype}, the file says {desired.server_type}: not changed in place "
                    "(drain it, remove it from the pool, apply, and add it back)",
                )
            if labels.get(VERSION) != label_value(spec.k3s_version):
                plan.add(
                    "note",
                    "server",
                    name,
                    f"was installed with k3s {labels.get(VERSION, '?')}; new nodes get {spec.k3s_version}. "
                    "Upgrade running nodes as docs/runbook.md describes",
                )
        for name, server in have.items():
            if name not in wanted:
                role = (server.labels or {}).get(ROLE, "?")
                plan.add("delete", "server", name, f"{role}: no longer in the file (drained first)")
        return plan

    def _rules_text(self) -> str:
        fw = self.spec.firewall
        return (
            f"in tcp {SSH_PORT} from {', '.join(fw.ssh_allowed_cidrs)}; "
            f"in tcp {API_PORT} from {', '.join(fw.api_allowed_cidrs)}; nothing else"
        )

    # -- apply ------------------------------------------------------------------------------

    def platform_install(self, lb_public: str) -> cloudinit.PlatformInstall | None:
        """The umbrella chart and its values: the values files, then what this cluster implies
        (the registry, chart-made keys, the API server's addresses kept out of run egress), then
        the file's own `values`."""
        platform = self.spec.platform
        if platform is None:
            return None
        implied = {
            "global": {"imageRegistry": platform.image_registry.strip()},
            "secrets": {"runKey": {"create": True}, "envKey": {"create": True}},
            "network": {
                "apiServerCIDRs": [self.spec.network.ip_range, *([f"{lb_public}/32"] if lb_public else [])]
            },
        }
        values = merge_values(merge_values(self.config.platform_values or {}, implied), platform.values)
        return cloudinit.PlatformInstall(platform.chart, self.config.chart_version, values)

    def wait(self, actions: Sequence[Any]) -> None:
        for action in actions:
            if action is None:
                continue
            action.wait_until_finished()

    def _adopt_or_fail(self, exc: APIException, kind: str, name: str, lookup: Callable[[], Any]) -> Any:
        """After `uniqueness_error`: the existing resource if it carries our labels, else fail."""
        if exc.code != "uniqueness_error":
            raise exc
        existing = lookup()
        labels = getattr(existing, "labels", None) or {}
        if existing is not None and labels.get(CLUSTER) == self.spec.name:
            self.echo(f"  adopted {kind} {name} (it exists already and is ours)")
            return existing
        raise InfraError(
            f"a {kind} named {name!r} already exists in the project but is not part of cluster "
            f"{self.spec.name!r} (it lacks the label {self.selector}); "
            f"rename the cluster or remove that {kind}"
        )

    def apply(
        self,
        *,
        drainer: Drainer | None = None,
        force: bool = False,
    ) -> Plan:
        observed = self.observe()
        plan = self.plan(observed)
        if plan.empty:
            return plan
        deletions = [c.name for c in plan.actionable if c.resource == "server" and c.kind == "delete"]
        if deletions and drainer is None and not force:
            raise InfraError(
                f"cannot drain {', '.join(deletions)}: no kubeconfig for the cluster "
                "(run `fabrik infra kubeconfig`, or pass --kubeconfig); nothing was changed. "
                "Pass --force to remove the servers without draining them"
            )
        spec = self.spec
        labels = self.base_labels()
        # SSH keys
        key_refs: list[BoundSSHKey] = []
        for name, public_key in self.config.public_keys.items():
            existing = self._key_exists(public_key)
            if existing is None:
                self.echo(f"+ ssh_key {name}")
                try:
                    existing = self.client.ssh_keys.create(name=name, public_key=public_key, labels=labels)
                except APIException as exc:
                    existing = self._adopt_or_fail(
                        exc,
                        "SSH key",
                        name,
                        partial(self._key_by_name_or_fingerprint, name, public_key),
                    )
            key_refs.append(existing)
        # network
        network = observed.network
        subnet = NetworkSubnet(
            ip_range=spec.network.subnet, type="cloud", network_zone=self.config.network_zone
        )
        if network is None:
            self.echo(f"+ network {spec.name}")
            try:
                network = self.client.networks.create(
                    name=spec.name, ip_range=spec.network.ip_range, subnets=[subnet], labels=labels
                )
            except APIException as exc:
                network = self._adopt_or_fail(
                    exc, "network", spec.name, lambda: self.client.networks.get_by_name(spec.name)
                )
        assert network is not None
        if not any(s.ip_range == spec.network.subnet for s in network.subnets or []):
            self.echo(f"~ network {spec.name}: add subnet {spec.network.subnet}")
            self.wait([self.client.networks.add_subnet(network, subnet)])
        # firewall
        firewall = observed.firewall
        apply_to = FirewallResource(
            type="label_selector", label_selector=FirewallResourceLabelSelector(selector=self.selector)
        )
        if firewall is None:
            self.echo(f"+ firewall {spec.name}")
            try:
                created = self.client.firewalls.create(
                    name=spec.name,
                    rules=self.firewall_rules(),
                    resources=[apply_to],
                    labels=labels,  # type: ignore[arg-type]
                )
                self.wait(created.actions or [])
                firewall = created.firewall
            except APIException as exc:
                firewall = self._adopt_or_fail(
                    exc, "firewall", spec.name, lambda: self.client.firewalls.get_by_name(spec.name)
                )
        assert firewall is not None
        firewall = self.client.firewalls.get_by_id(_id(firewall.id))
        if _rule_set(firewall.rules or []) != _rule_set(self.firewall_rules()):
            self.echo(f"~ firewall {spec.name}: rules")
            self.wait(self.client.firewalls.set_rules(firewall, self.firewall_rules()))
        if not any(
            a.type == "label_selector"
            and a.label_selector is not None
            and a.label_selector.selector == self.selector
            for a in firewall.applied_to or []
        ):
            self.echo(f"~ firewall {spec.name}: apply to {self.selector}")
            self.wait(self.client.firewalls.apply_to_resources(firewall, [apply_to]))
        # load balancer
        lb = observed.load_balancer
        if lb is None:
            self.echo(f"+ load_balancer {self.lb_name}")
            try:
                created_lb = self.client.load_balancers.create(
                    name=self.lb_name,
                    load_balancer_type=LoadBalancerType(name=spec.load_balancer.type),
                    location=Location(name=spec.location),
                    algorithm=LoadBalancerAlgorithm(type="round_robin"),
                    services=[self.api_service()],
                    targets=[self.api_target()],
                    network=network,
                    labels=labels,
                )
                self.wait([created_lb.action])
                lb = created_lb.load_balancer
            except APIException as exc:
                lb = self._adopt_or_fail(
                    exc,
                    "load balancer",
                    self.lb_name,
                    lambda: self.client.load_balancers.get_by_name(self.lb_name),
                )
        assert lb is not None
        lb = self.client.load_balancers.get_by_id(_id(lb.id))
        if not any(s.listen_port == API_PORT for s in lb.services or []):
            self.echo(f"~ load_balancer {self.lb_name}: add service tcp {API_PORT}")
            self.wait([self.client.load_balancers.add_service(lb, self.api_service())])
        wanted_selector = self.api_target().label_selector.selector  # type: ignore[union-attr]
        if not any(
            t.type == "label_selector"
            and t.label_selector is not None
            and t.label_selector.selector == wanted_selector
            for t in lb.targets or []
        ):
            self.echo(f"~ load_balancer {self.lb_name}: add the control-plane target")
            self.wait([self.client.load_balancers.add_target(lb, self.api_target())])
        if not any(p.network.id == network.id for p in lb.private_net or []):
            self.echo(f"~ load_balancer {self.lb_name}: attach to the network")
            self.wait([self.client.load_balancers.attach_to_network(lb, network)])
            lb = self.client.load_balancers.get_by_id(_id(lb.id))
        lb_public = lb.public_net.ipv4.ip if lb.public_net and lb.public_net.ipv4 else ""
        lb_private = next((p.ip for p in lb.private_net or [] if p.network.id == network.id), "")
        # servers
        have = {s.name: s for s in observed.servers}
        missing = [d for d in self.desired_servers() if d.name not in have]
        if missing:
            token = self.read_token()
            if token is None:
                if any((s.labels or {}).get(ROLE) == CONTROL_PLANE for s in observed.servers):
                    raise InfraError(
                        f"the cluster exists but its join token is not in {self.token_file}; copy it "
                        f"from the first control plane: `fabrik infra ssh {spec.name}-cp-1 cat "
                        f"/var/lib/rancher/k3s/server/token > {self.token_file}` (mode 0600), "
                        "then apply again"
                    )
                token = secrets.token_hex(32)
                self.write_private(self.token_file, token + "\n")
                self.echo(f"  k3s join token written to {self.token_file} (0600)")
            cluster_exists = any((s.labels or {}).get(ROLE) == CONTROL_PLANE for s in observed.servers)
            # control planes first: the very first one initialises the cluster and must be up
            ordered = sorted(missing, key=lambda d: (d.role != CONTROL_PLANE, d.pool, d.index))
            for desired in ordered:
                if desired.role == CONTROL_PLANE:
                    role: cloudinit.Role = "server" if cluster_exists else "init"
                    cluster_exists = True
                else:
                    role = "agent"
                boot = cloudinit.NodeBoot(
                    role=role,
                    k3s_version=spec.k3s_version,
                    token=token,
                    subnet=spec.network.subnet,
                    join_address=lb_private,
                    tls_sans=tuple(x for x in (lb_public, lb_private) if x),
                    node_labels=(f"{POOL}={desired.pool}", f"{ROLE}={desired.role}"),
                    platform=self.platform_install(lb_public) if role == "init" else None,
                )
                self.echo(f"+ server {desired.name} ({desired.server_type}, {role})")
                try:
                    result = self.client.servers.create(
                        name=desired.name,
                        server_type=ServerType(name=desired.server_type),
                        image=Image(name=spec.image),
                        location=Location(name=spec.location),
                        ssh_keys=list(key_refs),
                        networks=[network],
                        user_data=cloudinit.render(boot),
                        labels=desired.labels(spec.name, spec.k3s_version),
                    )
                    self.wait([result.action])
                except APIException as exc:
                    self._adopt_or_fail(
                        exc, "server", desired.name, partial(self.client.servers.get_by_name, desired.name)
                    )
        # removals: drained first
        removed = [have[name] for name in deletions if name in have]
        if removed:
            if drainer is not None:
                self.echo(f"  draining {', '.join(s.name or '' for s in removed)}")
                drainer([s.name or "" for s in removed])
            elif force:
                self.echo(f"  not drained (--force): {', '.join(s.name or '' for s in removed)}")
            for server in removed:
                self.echo(f"- server {server.name}")
                self.wait([self.client.servers.delete(server)])
        # SSH keys of ours that the file no longer lists
        wanted_fps = {_fingerprint(k) for k in self.config.public_keys.values()}
        for key in observed.ssh_keys:
            if key.fingerprint not in wanted_fps:
                self.echo(f"- ssh_key {key.name}")
                self.client.ssh_keys.delete(key)
        return plan

    # -- destroy ----------------------------------------------------------------------------

    def destroy_plan(self, observed: Observed | None = None) -> Plan:
        seen = observed or self.observe()
        plan = Plan()
        server_ids = {s.id for s in seen.servers}
        for server in seen.servers:
            plan.add("delete", "server", server.name or "?")
        if seen.load_balancer is not None:
            plan.add("delete", "load_balancer", seen.load_balancer.name or "?")
        if seen.firewall is not None:
            plan.add("delete", "firewall", seen.firewall.name or "?")
        if seen.network is not None:
            plan.add("delete", "network", seen.network.name or "?")
        for key in seen.ssh_keys:
            plan.add("delete", "ssh_key", key.name or "?")
        for volume in self.client.volumes.get_all():
            if volume.server is not None and volume.server.id in server_ids:
                plan.add(
                    "note",
                    "volume",
                    volume.name or "?",
                    "attached to a node but not made by fabrik infra: detached with the server and kept; "
                    "delete it yourself when its data is no longer needed",
                )
        return plan

    def destroy(self) -> Plan:
        observed = self.observe()
        plan = self.destroy_plan(observed)
        actions = []
        for server in observed.servers:
            self.echo(f"- server {server.name}")
            actions.append(self.client.servers.delete(server))
        lb = observed.load_balancer
        if lb is not None:
            self.echo(f"- load_balancer {lb.name}")
            actions.append(self.client.load_balancers.delete(lb).action)
        self.wait(actions)
        firewall = observed.firewall
        if firewall is not None:
            fresh = self.client.firewalls.get_by_id(_id(firewall.id))
            applied = [
                FirewallResource(type=a.type, server=a.server, label_selector=a.label_selector)
                for a in fresh.applied_to or []
            ]
            if applied:
                self.wait(self.client.firewalls.remove_from_resources(fresh, applied))
            self.echo(f"- firewall {firewall.name}")
            self.client.firewalls.delete(fresh)
        if observed.network is not None:
            self.echo(f"- network {observed.network.name}")
            self.client.networks.delete(observed.network)
        for key in observed.ssh_keys:
            self.echo(f"- ssh_key {key.name}")
            self.client.ssh_keys.delete(key)
        return plan

    # -- addresses --------------------------------------------------------------------------

    def endpoints(self) -> tuple[str, list[BoundServer]]:
        """The API's public address (the load balancer) and the servers, first control plane first."""
        observed = self.observe()
        lb = observed.load_balancer
        address = lb.public_net.ipv4.ip if lb is not None and lb.public_net and lb.public_net.ipv4 else ""

        def order(s: BoundServer) -> tuple[int, str, int]:
            labels = s.labels or {}
            index = int(labels.get(INDEX, "0")) if labels.get(INDEX, "").isdigit() else 0
            return (0 if labels.get(ROLE) == CONTROL_PLANE else 1, labels.get(POOL, ""), index)

        return address, sorted(observed.servers, key=order)


def _id(value: object) -> int:
    if not isinstance(value, int):
        raise InfraError(f"the API returned a resource without an id ({value!r})")
    return value


def _fingerprint(public_key: str) -> str:
    import base64
    import hashlib

    blob = base64.b64decode(public_key.split()[1].encode())
    digest = hashlib.md5(blob, usedforsecurity=False).hexdigest()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def _rule_set(rules: Sequence[FirewallRule]) -> set[tuple[str, str, str, tuple[str, ...]]]:
    return {
        (r.direction or "", r.protocol or "", str(r.port or ""), tuple(sorted(r.source_ips or [])))
        for r in rules
    }
