"""The Helm charts: lint (--strict), render with the default, dev and production values, validate
every manifest against Kubernetes' schemas (strict), and hold them to the security policy.

The umbrella chart is assembled as `helm dependency build` would (the service charts copied into
`charts/fabrik/charts/`) in a temporary directory. The NATS chart is fetched from its repository
at install time and is not available offline, so the umbrella is rendered with `nats.enabled`
false; its values are checked for what Fabrik relies on (users, JetStream, replicas).
"""

from __future__ import annotations

import copy
import importlib.util
import shutil
import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import helm_python as helm
import kubernetes_validate  # type: ignore[import-untyped]
import msgspec
import pytest
import yaml

from fabrik_backup.settings import BackupSettings
from fabrik_cli import doctor
from fabrik_common import topology
from fabrik_common.events import Resources, RunDispatched, RunParameters, Workload
from fabrik_common.settings import CommonSettings, load_settings
from fabrik_executor.kubernetes import render
from fabrik_executor.settings import ExecutorSettings
from fabrik_gateway.settings import GatewaySettings
from fabrik_llm_proxy.settings import LlmProxySettings
from fabrik_optimizer.settings import OptimizerSettings
from fabrik_scheduler.settings import SchedulerSettings

REPO = Path(__file__).resolve().parents[2]
CHARTS = REPO / "charts"
SERVICES = ("gateway", "scheduler", "executor", "backup", "llm-proxy", "optimizer")
SETTINGS: dict[str, type[CommonSettings]] = {
    "gateway": GatewaySettings,
    "scheduler": SchedulerSettings,
    "executor": ExecutorSettings,
    "backup": BackupSettings,
    "llm-proxy": LlmProxySettings,
    "optimizer": OptimizerSettings,
}
VALUE_SETS = {"default": None, "dev": "values-dev.yaml", "production": "values-production.yaml"}
K8S_VERSION = "1.31"
RELEASE = "fabrik"
MISSING_NATS = "chart directory is missing these dependencies: nats"
# Namespaces outside the chart that its NetworkPolicies may name, with the labels Kubernetes sets.
EXTERNAL_NAMESPACES = {
    "kube-system": {"kubernetes.io/metadata.name": "kube-system"},
    "monitoring": {"kubernetes.io/metadata.name": "monitoring"},
}


def _load_support(name: str) -> ModuleType:
    path = Path(__file__).parent / "support" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"fabrik_deploy_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


policy = _load_support("policy")


def parse(rendered: dict[str, str]) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def umbrella_values(name: str) -> dict[str, Any]:
    file = VALUE_SETS[name]
    values: dict[str, Any] = {}
    if file:
        values = yaml.safe_load((CHARTS / "fabrik" / file).read_text()) or {}
    return values


def offline(values: dict[str, Any]) -> dict[str, Any]:
    """The values with the NATS subchart off (it is not available offline)."""
    out = copy.deepcopy(values)
    out.setdefault("nats", {})["enabled"] = False
    return out


@pytest.fixture(scope="module")
def umbrella(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("charts") / "fabrik"
    shutil.copytree(CHARTS / "fabrik", root, ignore=shutil.ignore_patterns("charts"))
    (root / "charts").mkdir()
    for service in SERVICES:
        shutil.copytree(CHARTS / service, root / "charts" / service)
    return root


@pytest.fixture(scope="module")
def rendered(umbrella: Path) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    with helm.Chart.load(umbrella) as chart:
        for name in VALUE_SETS:
            out[name] = parse(chart.render(offline(umbrella_values(name)), name=RELEASE, namespace="default"))
    return out


@pytest.fixture(scope="module")
def run_job() -> dict[str, Any]:
    """A Job as the executor renders it for a run: the pods the runs namespace's policies cover."""
    now = datetime(2026, 1, 1, tzinfo=UTC)
    dispatch = RunDispatched(
        run_id="01JX2Y3Z4A5B6C7D8E9F0G1H2J",
        project="shop",
        env="dev",
        attempt=1,
        params=RunParameters(
            workload=Workload(image="ghcr.io/acme/agent:1.4@sha256:" + "ab" * 32, command=("agent",)),
            resources=Resources(cpu_request="500m", memory_request="1Gi", cpu_limit="2", memory_limit="4Gi"),
        ),
        deadline=now + timedelta(hours=1),
        occurred_at=now,
    )
    job, _ = render.render_job(
        dispatch,
        render.RenderConfig(namespace=doctor.RUNS_NAMESPACE),
        render.AttemptInputs(now=now, started_event_id="01JX2Y3Z4A5B6C7D8E9F0STARTD"),
    )
    return job


def of_kind(manifests: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [m for m in manifests if m["kind"] == kind]


def one(manifests: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [m for m in of_kind(manifests, kind) if m["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def container_env(deployment: dict[str, Any]) -> dict[str, dict[str, Any]]:
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e for e in container.get("env", [])}


# ------------------------------------------------------------------------------------------------
# the service charts on their own


def test_the_service_charts_share_their_templates() -> None:
    reference = CHARTS / "gateway" / "templates"
    for service in SERVICES:
        templates = CHARTS / service / "templates"
        assert sorted(p.name for p in templates.iterdir()) == sorted(p.name for p in reference.iterdir())
        for path in reference.iterdir():
            assert (templates / path.name).read_text() == path.read_text(), f"{service}: {path.name} differs"
        assert (CHARTS / service / "values.schema.json").read_text() == (
            CHARTS / "gateway" / "values.schema.json"
        ).read_text()


@pytest.mark.parametrize("values", VALUE_SETS)
@pytest.mark.parametrize("service", SERVICES)
def test_service_chart_lints_strict_renders_and_validates(service: str, values: str) -> None:
    """Each service chart alone, with its own defaults and with its part of the dev and
    production values (and their globals)."""
    umbrella = umbrella_values(values)
    overrides: dict[str, Any] = copy.deepcopy(umbrella.get(service) or {})
    if umbrella.get("global"):
        overrides["global"] = copy.deepcopy(umbrella["global"])
    report = helm.lint(CHARTS / service, overrides, strict=True, kube_version=f"v{K8S_VERSION}.0")
    assert report["errors"] == [], report["messages"]
    with helm.Chart.load(CHARTS / service) as chart:
        assert chart.name == service
        manifests = parse(chart.render(overrides, name=RELEASE, namespace="fabrik-system"))
    kinds = {m["kind"] for m in manifests}
    assert kinds >= {"Deployment", "Service", "ServiceAccount", "PodDisruptionBudget"}
    for manifest in manifests:
        if manifest["kind"] != "ServiceMonitor":
            kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)
    assert policy.violations(manifests, external_namespaces=EXTERNAL_NAMESPACES) == []


def test_the_values_schema_refuses_bad_values() -> None:
    with helm.Chart.load(CHARTS / "gateway") as chart:
        chart.validate_schema({"replicaCount": 2})
        for bad in (
            {"replicaCount": "two"},
            {"image": {"repository": "fabrik-gateway", "tag": "latest"}},
            {"image": {"repository": "fabrik-gateway", "digest": "sha256:short"}},
            {"unknownKey": True},
            {"env": {"lower_case": "x"}},
        ):
            with pytest.raises(helm.HelmValuesError):
                chart.validate_schema(bad)


# ------------------------------------------------------------------------------------------------
# the umbrella chart


@pytest.mark.parametrize("values", VALUE_SETS)
def test_umbrella_lints_strict_but_for_the_nats_chart_fetched_at_install(umbrella: Path, values: str) -> None:
    report = helm.lint(
        umbrella,
        umbrella_values(values),
        strict=True,
        with_subcharts=True,
        kube_version=f"v{K8S_VERSION}.0",
    )
    assert report["errors"] == [MISSING_NATS], report["messages"]
    declared = [(d["name"], d["version"], d["repository"]) for d in helm.dependency_list(CHARTS / "fabrik")]
    assert declared == [
        ("nats", "1.2.6", "https://nats-io.github.io/k8s/helm/charts/"),
        *((s, "0.1.0", f"file://../{s}") for s in SERVICES),
    ]


@pytest.mark.parametrize("values", VALUE_SETS)
def test_every_rendered_manifest_is_valid_kubernetes(
    rendered: dict[str, list[dict[str, Any]]], values: str
) -> None:
    manifests = rendered[values]
    assert len(manifests) > 30
    for manifest in manifests:
        if manifest["apiVersion"].startswith("monitoring.coreos.com/"):
            # a CRD without a schema here: the policy checks that it selects a Service
            assert manifest["kind"] == "ServiceMonitor"
            continue
        kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)


@pytest.mark.parametrize("values", VALUE_SETS)
def test_rendered_manifests_meet_the_security_policy(
    rendered: dict[str, list[dict[str, Any]]], run_job: dict[str, Any], values: str
) -> None:
    found = policy.violations(rendered[values], extra_pods=[run_job], external_namespaces=EXTERNAL_NAMESPACES)
    assert found == []


def test_every_service_is_deployed_with_probes_on_its_health_endpoints(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    manifests = rendered["default"]
    for service in SERVICES:
        deployment = one(manifests, "Deployment", f"fabrik-{service}")
        assert deployment["metadata"]["namespace"] == doctor.SYSTEM_NAMESPACE
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        port = SETTINGS[service]().http_port
        assert container["ports"] == [{"name": "http", "containerPort": port, "protocol": "TCP"}]
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
        assert container["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
        svc = one(manifests, "Service", f"fabrik-{service}")
        assert svc["spec"]["ports"][0]["port"] == port
        one(manifests, "PodDisruptionBudget", f"fabrik-{service}")
        assert one(manifests, "ServiceAccount", f"fabrik-{service}")


@pytest.mark.parametrize("values", VALUE_SETS)
def test_service_environment_is_what_the_settings_accept(
    rendered: dict[str, list[dict[str, Any]]], values: str
) -> None:
    """Every FABRIK_* variable is a field of the service's settings (no typo is silently ignored),
    every required field is set, and the literal values load."""
    for service in SERVICES:
        cls = SETTINGS[service]
        fields = {f"FABRIK_{f.name.upper()}": f for f in msgspec.structs.fields(cls)}
        env = container_env(one(rendered[values], "Deployment", f"fabrik-{service}"))
        unknown = sorted(n for n in env if n.startswith("FABRIK_") and n not in fields)
        assert unknown == [], f"{service}: not settings of {cls.__name__}: {unknown}"
        missing = sorted(n for n, f in fields.items() if f.required and n not in env)
        assert missing == [], f"{service}: required settings not set: {missing}"
        for needed in ("FABRIK_NATS_URL", "FABRIK_HTTP_HOST", "FABRIK_HTTP_PORT"):
            assert needed in env, f"{service}: {needed} not set"
        assert env["FABRIK_HTTP_HOST"]["value"] == "0.0.0.0"
        # The literal values load; files (Secrets) and references are the cluster's to provide.
        literal = {
            n: e["value"]
            for n, e in env.items()
            if n.startswith("FABRIK_")
            and "value" in e
            and not n.endswith("_FILE")
            and n != "FABRIK_LLM_KEYS_DIR"
        }
        settings = load_settings(cls, literal)
        assert settings.http_host == "0.0.0.0"


def test_executor_runs_workloads_on_kubernetes_with_the_doctor_names(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    manifests = rendered["default"]
    executor = one(manifests, "Deployment", "fabrik-executor")
    spec = executor["spec"]["template"]["spec"]
    assert spec["serviceAccountName"] == doctor.EXECUTOR_SERVICE_ACCOUNT
    assert spec["automountServiceAccountToken"] is True
    env = container_env(executor)
    assert env["FABRIK_BACKEND"]["value"] == "kubernetes"
    assert env["FABRIK_K8S_NAMESPACE"]["value"] == doctor.RUNS_NAMESPACE
    assert env["FABRIK_K8S_SYSTEM_NAMESPACE"]["value"] == doctor.SYSTEM_NAMESPACE
    proxy = one(manifests, "Service", "fabrik-llm-proxy")
    assert env["FABRIK_K8S_LLM_PROXY_URL"]["value"] == (
        f"http://{proxy['metadata']['name']}.{proxy['metadata']['namespace']}.svc:{proxy['spec']['ports'][0]['port']}"
    )
    # the Secrets `fabrik doctor` checks are the ones the pods mount
    secrets: dict[str, set[str]] = {}
    for deployment in of_kind(manifests, "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        for volume in pod.get("volumes", []):
            if "secret" in volume:
                secrets.setdefault(volume["secret"]["secretName"], set()).add(deployment["metadata"]["name"])
        for e in container_env(deployment).values():
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                secrets.setdefault(ref["name"], set()).add(deployment["metadata"]["name"])
    assert secrets[doctor.RUN_KEY_SECRET] == {"fabrik-executor", "fabrik-llm-proxy"}
    assert secrets[doctor.ENV_KEY_SECRET] == {"fabrik-executor", "fabrik-gateway"}
    assert secrets[doctor.LLM_KEYS_SECRET] == {"fabrik-llm-proxy"}


def test_executor_rbac_grants_what_doctor_checks_and_only_in_the_runs_namespace(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    manifests = rendered["default"]
    assert [r["metadata"]["name"] for r in of_kind(manifests, "ClusterRole")] == [
        "fabrik-system-fabrik-backup-storage-read"  # the backup service's reads, nothing else
    ]
    roles = of_kind(manifests, "Role")
    assert sorted((r["metadata"]["namespace"], r["metadata"]["name"]) for r in roles) == [
        (doctor.RUNS_NAMESPACE, "fabrik-backup-snapshots"),
        (doctor.RUNS_NAMESPACE, "fabrik-executor-runs"),
    ]
    granted: set[tuple[str, str, str]] = set()
    for rule in one(manifests, "Role", "fabrik-executor-runs")["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted |= {(group, resource, verb) for verb in rule["verbs"]}
    for group, resource, sub, verbs in doctor.EXECUTOR_PERMISSIONS:
        full = f"{resource}/{sub}" if sub else resource
        for verb in verbs:
            assert (group, full, verb) in granted, f"doctor checks {verb} {full}; the chart does not grant it"
    binding = one(manifests, "RoleBinding", "fabrik-executor-runs")
    assert binding["subjects"] == [
        {
            "kind": "ServiceAccount",
            "name": doctor.EXECUTOR_SERVICE_ACCOUNT,
            "namespace": doctor.SYSTEM_NAMESPACE,
        }
    ]


def granted_by(role: dict[str, Any]) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def test_backup_rbac_reads_pvcs_and_manages_volume_snapshots_in_the_runs_namespace_only(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    manifests = rendered["default"]
    snapshots = "snapshot.storage.k8s.io"
    role = one(manifests, "Role", "fabrik-backup-snapshots")
    assert role["metadata"]["namespace"] == doctor.RUNS_NAMESPACE
    assert granted_by(role) == {
        ("", "persistentvolumeclaims", "get"),
        ("", "persistentvolumeclaims", "list"),
        *((snapshots, "volumesnapshots", verb) for verb in ("create", "get", "list", "delete")),
    }
    cluster = one(manifests, "ClusterRole", "fabrik-system-fabrik-backup-storage-read")
    assert granted_by(cluster) == {
        ("storage.k8s.io", "storageclasses", "get"),
        ("storage.k8s.io", "storageclasses", "list"),
        (snapshots, "volumesnapshotclasses", "get"),
        (snapshots, "volumesnapshotclasses", "list"),
    }
    account = {"kind": "ServiceAccount", "name": "fabrik-backup", "namespace": doctor.SYSTEM_NAMESPACE}
    assert one(manifests, "RoleBinding", "fabrik-backup-snapshots")["subjects"] == [account]
    binding = one(manifests, "ClusterRoleBinding", "fabrik-system-fabrik-backup-storage-read")
    assert binding["subjects"] == [account]
    assert binding["roleRef"]["name"] == cluster["metadata"]["name"]
    deployment = one(manifests, "Deployment", "fabrik-backup")
    assert deployment["spec"]["template"]["spec"]["automountServiceAccountToken"] is True
    env = container_env(deployment)
    assert env["FABRIK_BACKUP_VOLUME_SNAPSHOTS"]["value"] == "auto"
    assert env["FABRIK_BACKUP_VOLUME_SNAPSHOT_NAMESPACE"]["value"] == doctor.RUNS_NAMESPACE
    # the other services get nothing
    for service in SERVICES:
        if service not in ("executor", "backup"):
            assert (
                one(manifests, "Deployment", f"fabrik-{service}")["spec"]["template"]["spec"][
                    "automountServiceAccountToken"
                ]
                is False
            )


def test_namespaces_enforce_the_restricted_pod_security_profile(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    namespaces = {
        m["metadata"]["name"]: m["metadata"]["labels"] for m in of_kind(rendered["default"], "Namespace")
    }
    assert set(namespaces) == {doctor.SYSTEM_NAMESPACE, doctor.RUNS_NAMESPACE}
    for name, labels in namespaces.items():
        assert labels["kubernetes.io/metadata.name"] == name
        for mode in ("enforce", "audit", "warn"):
            assert labels[f"pod-security.kubernetes.io/{mode}"] == "restricted"
    assert namespaces[doctor.RUNS_NAMESPACE][doctor.POD_SECURITY_LABEL] == "restricted"


def test_runs_namespace_quota_and_limit_range(rendered: dict[str, list[dict[str, Any]]]) -> None:
    manifests = rendered["default"]
    quota = one(manifests, "ResourceQuota", "fabrik-runs")
    assert quota["metadata"]["namespace"] == doctor.RUNS_NAMESPACE
    assert quota["spec"]["hard"] == {
        "pods": "100",
        "requests.cpu": "100",
        "requests.memory": "200Gi",
        "limits.cpu": "200",
        "limits.memory": "400Gi",
        "persistentvolumeclaims": "50",
        "requests.storage": "500Gi",
        "services.loadbalancers": "0",
        "services.nodeports": "0",
    }
    limits = one(manifests, "LimitRange", "fabrik-runs")["spec"]["limits"]
    assert limits == [
        {
            "type": "Container",
            "default": {"cpu": "2", "memory": "4Gi"},
            "defaultRequest": {"cpu": "500m", "memory": "1Gi"},
            "max": {"cpu": "8", "memory": "16Gi"},
        }
    ]
    scheduler = container_env(one(manifests, "Deployment", "fabrik-scheduler"))
    assert scheduler["FABRIK_MAX_RUNNING"]["value"] == quota["spec"]["hard"]["pods"]
    assert scheduler["FABRIK_MAX_CPU"]["value"] == quota["spec"]["hard"]["requests.cpu"]
    assert scheduler["FABRIK_MAX_MEMORY"]["value"] == quota["spec"]["hard"]["requests.memory"]


def test_run_pods_reach_dns_the_llm_proxy_and_the_internet_only(
    rendered: dict[str, list[dict[str, Any]]], run_job: dict[str, Any]
) -> None:
    manifests = rendered["default"]
    values = umbrella_values("default")
    run_labels = run_job["spec"]["template"]["metadata"]["labels"]
    runs_policies = [
        m for m in of_kind(manifests, "NetworkPolicy") if m["metadata"]["namespace"] == "fabrik-runs"
    ]
    covering = [m for m in runs_policies if policy.selector_matches(m["spec"]["podSelector"], run_labels)]
    assert {m["metadata"]["name"] for m in covering} == {"default-deny", "run-egress"}
    deny = one(runs_policies, "NetworkPolicy", "default-deny")
    assert deny["spec"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}  # no ingress rule at all
    egress = one(runs_policies, "NetworkPolicy", "run-egress")["spec"]["egress"]
    assert len(egress) == 3
    dns, proxy, internet = egress
    assert {(p["protocol"], p["port"]) for p in dns["ports"]} == {("UDP", 53), ("TCP", 53)}
    proxy_pods = one(manifests, "Deployment", "fabrik-llm-proxy")["spec"]["template"]["metadata"]["labels"]
    other_pods = [
        d["spec"]["template"]["metadata"]["labels"]
        for d in of_kind(manifests, "Deployment")
        if d["metadata"]["name"] != "fabrik-llm-proxy"
    ]
    assert policy.selector_matches(proxy["to"][0]["podSelector"], proxy_pods)
    assert not any(policy.selector_matches(proxy["to"][0]["podSelector"], labels) for labels in other_pods)
    assert proxy["ports"] == [{"protocol": "TCP", "port": 8081}]
    assert "ports" not in internet
    net = values.get("network") or yaml.safe_load((CHARTS / "fabrik" / "values.yaml").read_text())["network"]
    block = internet["to"][0]["ipBlock"]
    assert block["cidr"] == "0.0.0.0/0"
    # other runs and fabrik-system's services (pod and service networks), the API server, metadata
    assert set(block["except"]) >= {
        net["podCIDR"],
        net["serviceCIDR"],
        *net["apiServerCIDRs"],
        "169.254.0.0/16",
    }
    # the llm-proxy lets run pods in, from the runs namespace only
    allow = one(manifests, "NetworkPolicy", "llm-proxy-from-runs")
    peer = allow["spec"]["ingress"][0]["from"][0]
    assert peer["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "fabrik-runs"}}
    assert policy.selector_matches(peer["podSelector"], run_labels)


def test_api_server_cidrs_are_a_value(umbrella: Path) -> None:
    values = offline({"network": {"apiServerCIDRs": ["203.0.113.10/32"]}})
    with helm.Chart.load(umbrella) as chart:
        manifests = parse(chart.render(values, name=RELEASE, namespace="default"))
    egress = one(manifests, "NetworkPolicy", "run-egress")["spec"]["egress"]
    assert "203.0.113.10/32" in egress[2]["to"][0]["ipBlock"]["except"]
    assert "10.0.0.0/16" not in egress[2]["to"][0]["ipBlock"]["except"]


def test_nats_users_match_the_services(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """Each service connects as fabrik-<service> with the password under its own key of the users
    Secret; the NATS server reads the same keys (the official chart's container.env)."""
    values = yaml.safe_load((CHARTS / "fabrik" / "values.yaml").read_text())
    users = {u["user"]: u for u in values["nats"]["config"]["merge"]["authorization"]["users"]}
    env = values["nats"]["container"]["env"]
    secret = one(rendered["default"], "Secret", "fabrik-nats-users")
    assert set(secret["data"]) == {*SERVICES, "admin"}
    for service in (*SERVICES, "admin"):
        user = users[f"fabrik-{service}"]
        variable = user["password"].removeprefix("<< $").removesuffix(" >>")
        assert env[variable]["valueFrom"]["secretKeyRef"] == {"name": "fabrik-nats-users", "key": service}
    for service in SERVICES:
        deployment_env = container_env(one(rendered["default"], "Deployment", f"fabrik-{service}"))
        assert deployment_env["NATS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
            "name": "fabrik-nats-users",
            "key": service,
        }
        assert deployment_env["FABRIK_NATS_URL"]["value"] == (
            f"nats://fabrik-{service}:$(NATS_PASSWORD)@nats.fabrik-system.svc:4222"
        )
        allowed = users[f"fabrik-{service}"]["permissions"]["publish"]["allow"]
        assert (">" not in allowed and "fabrik.>" not in allowed) or service == "backup"
    # the single writers of DESIGN §2: only the scheduler writes run records, the queue and alerts,
    # only the optimizer the config bucket, only the gateway environments and API tokens
    writers = {"runs": "scheduler", "queue": "scheduler", "alerts": "scheduler", "config": "optimizer"}
    writers |= {"envs": "gateway", "tokens": "gateway"}
    for bucket, writer in writers.items():
        for service in SERVICES:
            if service == "backup":
                continue
            allowed = users[f"fabrik-{service}"]["permissions"]["publish"]["allow"]
            assert (f"$KV.{bucket}.>" in allowed) == (service == writer), (service, bucket)
            assert "$KV.>" not in allowed
    # dev: no users, services connect without a password
    dev_env = container_env(one(rendered["dev"], "Deployment", "fabrik-gateway"))
    assert "NATS_PASSWORD" not in dev_env
    assert dev_env["FABRIK_NATS_URL"]["value"] == "nats://nats.fabrik-system.svc:4222"


def test_nats_users_may_ensure_the_topology_but_not_remove_it() -> None:
    """Every service ensures the streams, buckets and object stores at start (fabrik_common.topology):
    its user may look them up, create them and update the streams, and nothing else of the
    JetStream API beyond its own consumers and buckets: no delete, no purge, no wildcard over the
    API. Only the backup service (restores) and operators manage streams."""
    values = yaml.safe_load((CHARTS / "fabrik" / "values.yaml").read_text())
    users = {u["user"]: u for u in values["nats"]["config"]["merge"]["authorization"]["users"]}
    streams = [s.name for s in topology.STREAMS]
    created = streams + [f"KV_{b.name}" for b in topology.KV_BUCKETS]
    created += [f"OBJ_{o.name}" for o in topology.OBJECT_STORES]
    for service in SERVICES:
        if service == "backup":
            continue
        publish = users[f"fabrik-{service}"]["permissions"]["publish"]
        allowed = publish["allow"]
        assert "$JS.API.STREAM.INFO.*" in allowed
        creates = {a.removeprefix("$JS.API.STREAM.CREATE.") for a in allowed if ".STREAM.CREATE." in a}
        updates = {a.removeprefix("$JS.API.STREAM.UPDATE.") for a in allowed if ".STREAM.UPDATE." in a}
        assert (creates, updates) == (set(created), set(streams)), service
        for subject in allowed:
            assert not subject.startswith(("$JS.API.STREAM.DELETE", "$JS.API.STREAM.PURGE")), subject
            assert not subject.startswith(("$JS.API.CONSUMER.DELETE", "$JS.API.STREAM.MSG.DELETE")), subject
            assert subject not in (">", "$JS.>", "$JS.API.>", "$KV.>", "$O.>", "_INBOX.>"), subject
            if subject.startswith(("$JS.API.CONSUMER.DURABLE.CREATE.", "$JS.API.CONSUMER.MSG.NEXT.")):
                durable = subject.rsplit(".", 1)[1]
                prefix = "llm-proxy" if service == "llm-proxy" else service
                assert durable.startswith(prefix + "-"), f"{service} may use {durable}"
        assert "deny" not in publish  # allow lists only: what is not listed is refused
        assert "_INBOX.>" in users[f"fabrik-{service}"]["permissions"]["subscribe"]["allow"]
        assert "fabrik.>" not in users[f"fabrik-{service}"]["permissions"]["subscribe"]["allow"]


def test_production_runs_a_nats_cluster_of_three_and_r3_streams(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    values = yaml.safe_load((CHARTS / "fabrik" / "values-production.yaml").read_text())
    assert values["nats"]["config"]["cluster"] == {"enabled": True, "replicas": 3}
    for deployment in of_kind(rendered["production"], "Deployment"):
        assert container_env(deployment)["FABRIK_STREAM_REPLICAS"]["value"] == "3"
    chart = yaml.safe_load((CHARTS / "fabrik" / "Chart.yaml").read_text())
    nats = next(d for d in chart["dependencies"] if d["name"] == "nats")
    assert nats["condition"] == "nats.enabled"
    assert nats["repository"] == "https://nats-io.github.io/k8s/helm/charts/"
    monitors = of_kind(rendered["production"], "ServiceMonitor")
    assert len(monitors) == len(SERVICES)


# ------------------------------------------------------------------------------------------------
# the policy itself: it must fail on bad manifests


def _deployment(manifests: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return one(manifests, "Deployment", name)


def _mutations() -> Iterator[tuple[str, Any, str]]:
    def container(m: list[dict[str, Any]]) -> dict[str, Any]:
        found: dict[str, Any] = _deployment(m, "fabrik-gateway")["spec"]["template"]["spec"]["containers"][0]
        return found

    def pod(m: list[dict[str, Any]]) -> dict[str, Any]:
        spec: dict[str, Any] = _deployment(m, "fabrik-gateway")["spec"]["template"]["spec"]
        return spec

    yield "privileged", lambda m: container(m)["securityContext"].update(privileged=True), "privileged"
    yield (
        "hostPath",
        lambda m: pod(m)["volumes"].append({"name": "host", "hostPath": {"path": "/var/run"}}),
        "is a hostPath",
    )
    yield "latest", lambda m: container(m).update(image="fabrik-gateway:latest"), "uses the tag latest"
    yield "untagged", lambda m: container(m).update(image="fabrik-gateway"), "has no tag"
    yield "no limits", lambda m: container(m)["resources"].pop("limits"), "no cpu limit"
    yield (
        "root",
        lambda m: container(m)["securityContext"].update(runAsNonRoot=False),
        "runAsNonRoot is not true",
    )
    yield (
        "writable root",
        lambda m: container(m)["securityContext"].update(readOnlyRootFilesystem=False),
        "root filesystem is not read-only",
    )
    yield (
        "escalation",
        lambda m: container(m)["securityContext"].pop("allowPrivilegeEscalation"),
        "allowPrivilegeEscalation is not false",
    )
    yield "hostNetwork", lambda m: pod(m).update(hostNetwork=True), "hostNetwork is set"

    def typo_in_policy(m: list[dict[str, Any]]) -> None:
        one(m, "NetworkPolicy", "llm-proxy-from-runs")["spec"]["podSelector"]["matchLabels"][
            "app.kubernetes.io/name"
        ] = "fabrik-llmproxy"

    yield "policy selects nothing", typo_in_policy, "matches no pod in fabrik-system"

    def run_selector_typo(m: list[dict[str, Any]]) -> None:
        one(m, "NetworkPolicy", "run-egress")["spec"]["podSelector"] = {
            "matchLabels": {"fabrik.sh/managed-by": "helm"}
        }

    yield "run policy selects no run pod", run_selector_typo, "matches no pod in fabrik-runs"

    def wrong_namespace(m: list[dict[str, Any]]) -> None:
        one(m, "NetworkPolicy", "run-egress")["spec"]["egress"][1]["to"][0]["namespaceSelector"] = {
            "matchLabels": {"kubernetes.io/metadata.name": "fabrik"}
        }

    yield "peer namespace matches nothing", wrong_namespace, "matches no namespace"

    def peer_pods(m: list[dict[str, Any]]) -> None:
        one(m, "NetworkPolicy", "run-egress")["spec"]["egress"][1]["to"][0]["podSelector"] = {
            "matchLabels": {"app.kubernetes.io/name": "llm-proxy"}
        }

    yield "peer pods match nothing", peer_pods, "matches no pod in ['fabrik-system']"

    def service_selector(m: list[dict[str, Any]]) -> None:
        one(m, "Service", "fabrik-gateway")["spec"]["selector"]["app.kubernetes.io/name"] = "gateway"

    yield "service selects nothing", service_selector, "Service/fabrik-system/fabrik-gateway: selector"

    def cluster_role(m: list[dict[str, Any]]) -> None:
        m.append(
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRole",
                "metadata": {"name": "fabrik-executor"},
                "rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}],
            }
        )

    yield "cluster role", cluster_role, "nothing cluster-wide"

    def more_resources(m: list[dict[str, Any]]) -> None:
        one(m, "Role", "fabrik-executor-runs")["rules"].append(
            {"apiGroups": [""], "resources": ["serviceaccounts"], "verbs": ["create"]}
        )

    yield (
        "executor beyond its resources",
        more_resources,
        "core/serviceaccounts is not allowed in fabrik-runs",
    )

    def more_verbs(m: list[dict[str, Any]]) -> None:
        one(m, "Role", "fabrik-executor-runs")["rules"][0]["verbs"].append("deletecollection")

    yield "executor beyond its verbs", more_verbs, "verbs ['deletecollection'] on jobs"

    def wildcard(m: list[dict[str, Any]]) -> None:
        one(m, "Role", "fabrik-executor-runs")["rules"].append(
            {"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}
        )

    yield "wildcard", wildcard, "wildcard in"

    def system_namespace(m: list[dict[str, Any]]) -> None:
        role = copy.deepcopy(one(m, "Role", "fabrik-executor-runs"))
        role["metadata"]["namespace"] = "fabrik-system"
        binding = copy.deepcopy(one(m, "RoleBinding", "fabrik-executor-runs"))
        binding["metadata"]["namespace"] = "fabrik-system"
        m += [role, binding]

    yield "executor in fabrik-system", system_namespace, "outside fabrik-runs only `get` on named secrets"

    def other_account(m: list[dict[str, Any]]) -> None:
        one(m, "RoleBinding", "fabrik-executor-runs")["subjects"].append(
            {"kind": "ServiceAccount", "name": "fabrik-gateway", "namespace": "fabrik-system"}
        )

    yield "another account bound", other_account, "only the executor has Kubernetes permissions"

    def backup_writes_cluster_wide(m: list[dict[str, Any]]) -> None:
        one(m, "ClusterRole", "fabrik-system-fabrik-backup-storage-read")["rules"][0]["verbs"].append(
            "delete"
        )

    yield "backup deletes storage classes", backup_writes_cluster_wide, "verbs ['delete'] on storageclasses"

    def backup_reads_secrets_cluster_wide(m: list[dict[str, Any]]) -> None:
        one(m, "ClusterRole", "fabrik-system-fabrik-backup-storage-read")["rules"].append(
            {"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}
        )

    yield (
        "backup reads secrets cluster-wide",
        backup_reads_secrets_cluster_wide,
        "core/secrets is not allowed",
    )

    def cluster_binding_other(m: list[dict[str, Any]]) -> None:
        one(m, "ClusterRoleBinding", "fabrik-system-fabrik-backup-storage-read")["subjects"].append(
            {"kind": "ServiceAccount", "name": "fabrik-gateway", "namespace": "fabrik-system"}
        )

    yield "cluster binding of another account", cluster_binding_other, "binds {'kind': 'ServiceAccount'"

    def backup_beyond(m: list[dict[str, Any]]) -> None:
        one(m, "Role", "fabrik-backup-snapshots")["rules"][0]["verbs"].append("delete")

    yield "backup deletes pvcs", backup_beyond, "verbs ['delete'] on persistentvolumeclaims"

    def backup_elsewhere(m: list[dict[str, Any]]) -> None:
        role = copy.deepcopy(one(m, "Role", "fabrik-backup-snapshots"))
        role["metadata"]["namespace"] = "fabrik-system"
        binding = copy.deepcopy(one(m, "RoleBinding", "fabrik-backup-snapshots"))
        binding["metadata"]["namespace"] = "fabrik-system"
        m += [role, binding]

    yield "backup in fabrik-system", backup_elsewhere, "the backup service has no permissions outside"


@pytest.mark.parametrize(
    ("case", "mutate", "expected"), list(_mutations()), ids=[c for c, _, _ in _mutations()]
)
def test_the_policy_fails_on_a_bad_manifest(
    rendered: dict[str, list[dict[str, Any]]], run_job: dict[str, Any], case: str, mutate: Any, expected: str
) -> None:
    manifests = copy.deepcopy(rendered["default"])
    mutate(manifests)
    found = policy.violations(manifests, extra_pods=[run_job], external_namespaces=EXTERNAL_NAMESPACES)
    assert any(expected in line for line in found), f"{case}: {found}"


def test_a_named_system_secret_role_for_the_executor_is_allowed(
    rendered: dict[str, list[dict[str, Any]]], run_job: dict[str, Any], umbrella: Path
) -> None:
    values = offline(
        {
            "executor": {
                "rbac": {
                    "roles": [
                        *yaml.safe_load((CHARTS / "executor" / "values.yaml").read_text())["rbac"]["roles"],
                        {
                            "name": "system-secrets",
                            "namespace": '{{ include "fabrik.namespace" . }}',
                            "rules": [
                                {
                                    "apiGroups": [""],
                                    "resources": ["secrets"],
                                    "resourceNames": ["github-app"],
                                    "verbs": ["get"],
                                }
                            ],
                        },
                    ]
                }
            }
        }
    )
    with helm.Chart.load(umbrella) as chart:
        manifests = parse(chart.render(values, name=RELEASE, namespace="default"))
    role = one(manifests, "Role", "fabrik-executor-system-secrets")
    assert role["metadata"]["namespace"] == "fabrik-system"
    assert policy.violations(manifests, extra_pods=[run_job], external_namespaces=EXTERNAL_NAMESPACES) == []
    role["rules"][0].pop("resourceNames")
    found = policy.violations(manifests, extra_pods=[run_job], external_namespaces=EXTERNAL_NAMESPACES)
    assert any("only `get` on named secrets" in line for line in found)
