"""Security policy over rendered Kubernetes manifests.

`violations(manifests, extra_pods=...)` returns one line per rule broken; an empty list is a pass.
The rules are those of docs/deployment.md: no privileged or host-level pods, images pinned by tag
or digest (never `latest`), requests and limits on every container, non-root with a read-only
root filesystem, selectors (NetworkPolicy, Service, PodDisruptionBudget, ServiceMonitor) that
select what exists, the executor's RBAC confined to the runs namespace, and the backup service's
to reading workspace PVCs and managing their VolumeSnapshots there, plus reading storage classes
and snapshot classes cluster-wide (the only cluster-wide grant).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

Manifest = dict[str, Any]

POD_SPEC_PATHS: Mapping[str, tuple[str, ...]] = {
    "Pod": ("spec",),
    "Deployment": ("spec", "template", "spec"),
    "StatefulSet": ("spec", "template", "spec"),
    "DaemonSet": ("spec", "template", "spec"),
    "ReplicaSet": ("spec", "template", "spec"),
    "Job": ("spec", "template", "spec"),
    "CronJob": ("spec", "jobTemplate", "spec", "template", "spec"),
}
POD_LABEL_PATHS: Mapping[str, tuple[str, ...]] = {
    "Pod": ("metadata", "labels"),
    "Deployment": ("spec", "template", "metadata", "labels"),
    "StatefulSet": ("spec", "template", "metadata", "labels"),
    "DaemonSet": ("spec", "template", "metadata", "labels"),
    "ReplicaSet": ("spec", "template", "metadata", "labels"),
    "Job": ("spec", "template", "metadata", "labels"),
    "CronJob": ("spec", "jobTemplate", "spec", "template", "metadata", "labels"),
}


@dataclass(frozen=True)
class ExecutorRbac:
    """What the executor's service account may be granted."""

    service_account: str = "fabrik-executor"
    system_namespace: str = "fabrik-system"
    runs_namespace: str = "fabrik-runs"
    # (API group, resource) -> verbs allowed in the runs namespace
    runs_allowed: Mapping[tuple[str, str], frozenset[str]] = field(
        default_factory=lambda: {
            ("batch", "jobs"): frozenset({"create", "get", "list", "watch", "patch", "delete"}),
            ("", "pods"): frozenset({"get", "list", "watch", "delete"}),
            ("", "pods/log"): frozenset({"get"}),
            ("", "persistentvolumeclaims"): frozenset({"create", "get", "list", "patch", "delete"}),
            ("", "secrets"): frozenset({"create", "get", "list", "update", "patch", "delete"}),
            ("", "events"): frozenset({"list"}),
        }
    )
    backup_account: str = "fabrik-backup"
    # (API group, resource) -> verbs the backup service may have in the runs namespace
    backup_runs_allowed: Mapping[tuple[str, str], frozenset[str]] = field(
        default_factory=lambda: {
            ("", "persistentvolumeclaims"): frozenset({"get", "list"}),
            ("snapshot.storage.k8s.io", "volumesnapshots"): frozenset({"create", "get", "list", "delete"}),
        }
    )
    # (API group, resource) -> verbs the backup service may have cluster-wide (read-only)
    cluster_read_allowed: Mapping[tuple[str, str], frozenset[str]] = field(
        default_factory=lambda: {
            ("storage.k8s.io", "storageclasses"): frozenset({"get", "list"}),
            ("snapshot.storage.k8s.io", "volumesnapshotclasses"): frozenset({"get", "list"}),
        }
    )


@dataclass(frozen=True)
class Pod:
    """A pod (template) found in the manifests, where it runs and with which labels."""

    source: str
    namespace: str
    labels: Mapping[str, str]
    spec: Mapping[str, Any]


def _get(obj: Any, path: Sequence[str]) -> Any:
    for key in path:
        if not isinstance(obj, Mapping):
            return None
        obj = obj.get(key)
    return obj


def name_of(manifest: Manifest) -> str:
    meta = manifest.get("metadata") or {}
    ns = meta.get("namespace")
    return f"{manifest.get('kind')}/{(ns + '/') if ns else ''}{meta.get('name')}"


def pods_of(manifests: Iterable[Manifest]) -> list[Pod]:
    pods = []
    for m in manifests:
        kind = m.get("kind", "")
        if kind in POD_SPEC_PATHS:
            pods.append(
                Pod(
                    source=name_of(m),
                    namespace=(m.get("metadata") or {}).get("namespace", ""),
                    labels=_get(m, POD_LABEL_PATHS[kind]) or {},
                    spec=_get(m, POD_SPEC_PATHS[kind]) or {},
                )
            )
    return pods


def selector_matches(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """A LabelSelector (matchLabels and matchExpressions) against labels; {} matches everything."""
    selector = selector or {}
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def _image_ok(image: str) -> str | None:
    """Why `image` is not pinned, or None when it is (a tag other than latest, or a digest)."""
    if "@sha256:" in image:
        return None
    last = image.rsplit("/", 1)[-1]
    if ":" not in last:
        return "has no tag"
    tag = last.rsplit(":", 1)[1]
    if tag == "latest" or not tag:
        return "uses the tag latest"
    return None


def _pod_violations(pod: Pod) -> list[str]:
    out: list[str] = []
    spec = pod.spec
    where = pod.source
    for host in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(host):
            out.append(f"{where}: {host} is set")
    for volume in spec.get("volumes") or []:
        if "hostPath" in volume:
            out.append(f"{where}: volume {volume.get('name')} is a hostPath")
    pod_sc = spec.get("securityContext") or {}
    containers = [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]
    if not containers:
        out.append(f"{where}: no containers")
    for c in containers:
        cname = f"{where} container {c.get('name')}"
        sc = c.get("securityContext") or {}
        image = str(c.get("image") or "")
        why = _image_ok(image)
        if why:
            out.append(f"{cname}: image {image!r} {why}")
        if sc.get("privileged"):
            out.append(f"{cname}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{cname}: allowPrivilegeEscalation is not false")
        drop = (sc.get("capabilities") or {}).get("drop") or []
        if "ALL" not in drop:
            out.append(f"{cname}: capabilities do not drop ALL")
        if (sc.get("capabilities") or {}).get("add"):
            out.append(f"{cname}: adds capabilities")
        if sc.get("readOnlyRootFilesystem") is not True:
            out.append(f"{cname}: root filesystem is not read-only")
        non_root = sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))
        if non_root is not True:
            out.append(f"{cname}: runAsNonRoot is not true")
        uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
        if uid == 0:
            out.append(f"{cname}: runs as uid 0")
        seccomp = (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(f"{cname}: seccomp profile is not RuntimeDefault")
        resources = c.get("resources") or {}
        for kind in ("requests", "limits"):
            for res in ("cpu", "memory"):
                if not (resources.get(kind) or {}).get(res):
                    out.append(f"{cname}: no {res} {kind[:-1]}")
    return out


def _namespaces(manifests: Iterable[Manifest]) -> dict[str, Mapping[str, str]]:
    return {
        m["metadata"]["name"]: m["metadata"].get("labels") or {}
        for m in manifests
        if m.get("kind") == "Namespace"
    }


def _peer_violations(
    where: str,
    peer: Mapping[str, Any],
    policy_ns: str,
    namespaces: Mapping[str, Mapping[str, str]],
    pods: Sequence[Pod],
    external_namespaces: Mapping[str, Mapping[str, str]],
) -> list[str]:
    """A NetworkPolicy peer must select something: a namespace that exists and pods in it."""
    if "ipBlock" in peer:
        return []
    if "namespaceSelector" in peer:
        ns_selector = peer["namespaceSelector"]
        rendered = [n for n, labels in namespaces.items() if selector_matches(ns_selector, labels)]
        external = [n for n, labels in external_namespaces.items() if selector_matches(ns_selector, labels)]
        if not rendered and not external:
            return [f"{where}: namespaceSelector {ns_selector} matches no namespace"]
        if not rendered:
            return []  # a namespace outside Fabrik (kube-system, monitoring): its pods are not ours to check
        selected_ns = set(rendered)
    else:
        selected_ns = {policy_ns}
    if "podSelector" in peer:
        pod_selector = peer["podSelector"]
        if not any(p.namespace in selected_ns and selector_matches(pod_selector, p.labels) for p in pods):
            return [f"{where}: podSelector {pod_selector} matches no pod in {sorted(selected_ns)}"]
    return []


def _network_policy_violations(
    manifests: Sequence[Manifest],
    pods: Sequence[Pod],
    external_namespaces: Mapping[str, Mapping[str, str]],
) -> list[str]:
    out: list[str] = []
    namespaces = _namespaces(manifests)
    for m in manifests:
        if m.get("kind") != "NetworkPolicy":
            continue
        where = name_of(m)
        ns = m["metadata"].get("namespace", "")
        spec = m.get("spec") or {}
        if ns not in namespaces:
            out.append(f"{where}: namespace {ns!r} is not one of the chart's")
        selector = spec.get("podSelector")
        if selector is None:
            out.append(f"{where}: no podSelector")
        elif not any(p.namespace == ns and selector_matches(selector, p.labels) for p in pods):
            out.append(f"{where}: podSelector {selector} matches no pod in {ns}")
        for direction, key in (("ingress", "from"), ("egress", "to")):
            for i, rule in enumerate(spec.get(direction) or []):
                for peer in rule.get(key) or []:
                    out += _peer_violations(
                        f"{where} {direction}[{i}]", peer, ns, namespaces, pods, external_namespaces
                    )
    return out


def _selector_violations(manifests: Sequence[Manifest], pods: Sequence[Pod]) -> list[str]:
    out: list[str] = []
    services = [m for m in manifests if m.get("kind") == "Service"]
    for m in manifests:
        kind = m.get("kind")
        ns = (m.get("metadata") or {}).get("namespace", "")
        if kind == "Service":
            sel = (m.get("spec") or {}).get("selector") or {}
            if not any(p.namespace == ns and selector_matches({"matchLabels": sel}, p.labels) for p in pods):
                out.append(f"{name_of(m)}: selector {sel} matches no pod")
        elif kind in ("PodDisruptionBudget", "Deployment", "StatefulSet"):
            sel = (m.get("spec") or {}).get("selector")
            if kind != "PodDisruptionBudget":
                labels = _get(m, POD_LABEL_PATHS[kind]) or {}
                if not selector_matches(sel, labels):
                    out.append(f"{name_of(m)}: selector {sel} does not match its own pod template")
            elif not any(p.namespace == ns and selector_matches(sel, p.labels) for p in pods):
                out.append(f"{name_of(m)}: selector {sel} matches no pod")
        elif kind == "ServiceMonitor":
            sel = (m.get("spec") or {}).get("selector")
            names = ((m.get("spec") or {}).get("namespaceSelector") or {}).get("matchNames") or [ns]
            if not any(
                s["metadata"].get("namespace", "") in names
                and selector_matches(sel, s["metadata"].get("labels") or {})
                for s in services
            ):
                out.append(f"{name_of(m)}: selector {sel} matches no Service")
    return out


def _rule_violations_against(
    where: str,
    rules: Sequence[Mapping[str, Any]],
    allowed: Mapping[tuple[str, str], frozenset[str]],
    scope: str,
) -> list[str]:
    out: list[str] = []
    for rule in rules:
        groups = rule.get("apiGroups") or []
        resources = rule.get("resources") or []
        verbs = set(rule.get("verbs") or [])
        if "*" in groups or "*" in resources or "*" in verbs:
            out.append(f"{where}: wildcard in {rule}")
            continue
        if rule.get("nonResourceURLs"):
            out.append(f"{where}: nonResourceURLs {rule['nonResourceURLs']}")
        for group in groups:
            for resource in resources:
                verbs_allowed = allowed.get((group, resource))
                if verbs_allowed is None:
                    out.append(f"{where}: {group or 'core'}/{resource} is not allowed {scope}")
                elif verbs - verbs_allowed:
                    out.append(
                        f"{where}: verbs {sorted(verbs - verbs_allowed)} on {resource} are not allowed"
                    )
    return out


def _rules_violations(
    where: str, rules: Sequence[Mapping[str, Any]], rbac: ExecutorRbac, ns: str
) -> list[str]:
    if ns == rbac.runs_namespace:
        return _rule_violations_against(where, rules, rbac.runs_allowed, f"in {ns}")
    out: list[str] = []
    for rule in rules:
        verbs = set(rule.get("verbs") or [])
        for group in rule.get("apiGroups") or []:
            for resource in rule.get("resources") or []:
                if not (
                    group == "" and resource == "secrets" and verbs <= {"get"} and rule.get("resourceNames")
                ):
                    out.append(
                        f"{where}: outside {rbac.runs_namespace} only `get` on named secrets is allowed, "
                        f"not {sorted(verbs)} on {group or 'core'}/{resource}"
                    )
    return out


def _is_account(subject: Mapping[str, Any], name: str, rbac: ExecutorRbac) -> bool:
    return (
        subject.get("kind") == "ServiceAccount"
        and subject.get("name") == name
        and subject.get("namespace") == rbac.system_namespace
    )


def _cluster_violations(manifests: Sequence[Manifest], rbac: ExecutorRbac) -> list[str]:
    """Cluster-wide, only the backup service reads storage classes and snapshot classes."""
    out: list[str] = []
    cluster_roles = {m["metadata"]["name"]: m for m in manifests if m.get("kind") == "ClusterRole"}
    for role in cluster_roles.values():
        if role.get("aggregationRule"):
            out.append(f"{name_of(role)}: Fabrik grants nothing cluster-wide by aggregation")
        found = _rule_violations_against(
            name_of(role), role.get("rules") or [], rbac.cluster_read_allowed, "cluster-wide"
        )
        out += [f"{line} (Fabrik grants nothing cluster-wide but reading storage classes)" for line in found]
    for m in manifests:
        if m.get("kind") != "ClusterRoleBinding":
            continue
        ref = m.get("roleRef") or {}
        if ref.get("kind") != "ClusterRole" or ref.get("name") not in cluster_roles:
            out.append(
                f"{name_of(m)}: binds {ref}, not a ClusterRole of the manifests (nothing cluster-wide)"
            )
        for subject in m.get("subjects") or []:
            if not _is_account(subject, rbac.backup_account, rbac):
                out.append(
                    f"{name_of(m)}: binds {subject} cluster-wide; Fabrik grants nothing cluster-wide "
                    "but the backup service's reads"
                )
    return out


def _rbac_violations(manifests: Sequence[Manifest], rbac: ExecutorRbac) -> list[str]:
    out: list[str] = _cluster_violations(manifests, rbac)
    roles = {
        (m["metadata"].get("namespace", ""), m["metadata"]["name"]): m
        for m in manifests
        if m.get("kind") == "Role"
    }
    for m in manifests:
        if m.get("kind") != "RoleBinding":
            continue
        ns = m["metadata"].get("namespace", "")
        ref = m.get("roleRef") or {}
        for subject in m.get("subjects") or []:
            is_executor = _is_account(subject, rbac.service_account, rbac)
            is_backup = _is_account(subject, rbac.backup_account, rbac)
            if not (is_executor or is_backup):
                out.append(
                    f"{name_of(m)}: binds {subject}; only the executor has Kubernetes permissions "
                    "(and the backup service, for volume snapshots)"
                )
                continue
            if ref.get("kind") != "Role":
                out.append(f"{name_of(m)}: binds a {ref.get('kind')}, not a Role")
                continue
            role = roles.get((ns, ref.get("name")))
            if role is None:
                out.append(f"{name_of(m)}: Role {ref.get('name')} is not in the manifests")
                continue
            if is_executor:
                out += _rules_violations(name_of(role), role.get("rules") or [], rbac, ns)
            elif ns != rbac.runs_namespace:
                out.append(
                    f"{name_of(role)}: the backup service has no permissions outside {rbac.runs_namespace}"
                )
            else:
                out += _rule_violations_against(
                    name_of(role), role.get("rules") or [], rbac.backup_runs_allowed, f"in {ns} for backup"
                )
    return out


def violations(
    manifests: Sequence[Manifest],
    *,
    extra_pods: Sequence[Manifest] = (),
    external_namespaces: Mapping[str, Mapping[str, str]] | None = None,
    rbac: ExecutorRbac | None = None,
) -> list[str]:
    """Every rule `manifests` break. `extra_pods` are workloads that are not in the chart but that
    its selectors must cover (the executor's run Jobs); `external_namespaces` are namespaces
    outside the chart (name -> labels) that policies may name."""
    rbac = rbac or ExecutorRbac()
    pods = pods_of([*manifests, *extra_pods])
    out: list[str] = []
    for pod in pods_of(manifests):
        out += _pod_violations(pod)
    out += _network_policy_violations(manifests, pods, external_namespaces or {})
    out += _selector_violations(manifests, pods)
    out += _rbac_violations(manifests, rbac)
    return out
