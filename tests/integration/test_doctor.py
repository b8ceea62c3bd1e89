"""`fabrik doctor` against a real NATS, gateway and llm-proxy, and its cluster checks against the
Kubernetes API doubles (the workload double `k8s_double.KubeDouble` behind `ClusterFront`, and
the standalone `ClusterDouble` for authentication failures)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest
from click.testing import CliRunner, Result

from fabrik_cli.doctor import (
    EXECUTOR_PERMISSIONS,
    CheckResult,
    DoctorOptions,
    Report,
    run_doctor,
)
from fabrik_cli.local import ComponentState, StackState, write_state
from fabrik_cli.main import cli
from fabrik_common.envs import local_key_file
from fabrik_common.natsserver import free_port
from fabrik_common.testing import ServiceProcess
from fabrik_common.testing.k8s_double_cluster import ClusterDouble, ClusterFront, ClusterObjects
from fabrik_common.topology import ensure_topology

EXECUTOR_USER = "system:serviceaccount:fabrik-system:fabrik-executor"
NO_CLUSTER_ENV = {
    "KUBECONFIG": None,
    "KUBERNETES_SERVICE_HOST": None,
    "FABRIK_NATS_URL": None,
    "FABRIK_API_URL": None,
    "FABRIK_LLM_PROXY_URL": None,
}


def doctor(*args: str, home: Path) -> Result:
    return CliRunner().invoke(
        cli, ["doctor", *args], env={**NO_CLUSTER_ENV, "FABRIK_HOME": str(home)}, catch_exceptions=False
    )


def by_id(report: dict[str, Any] | Report) -> dict[str, Any]:
    if isinstance(report, Report):
        return {c.id: c for c in report.checks}
    return {c["id"]: c for c in report["checks"]}


@pytest.fixture
def platform(nats_url: str, tmp_path: Path) -> Iterator[dict[str, str]]:
    """A gateway and an llm-proxy (their start creates the topology)."""
    common = {"FABRIK_NATS_URL": nats_url, "FABRIK_LOG_FORMAT": "text"}
    procs = [
        ServiceProcess("fabrik_gateway", common, log_path=tmp_path / "gateway.log"),
        ServiceProcess("fabrik_llm_proxy", common, log_path=tmp_path / "llm-proxy.log"),
    ]
    try:
        for proc in procs:
            proc.start_process()
        for proc in procs:
            proc.wait_ready(60)
        yield {"nats": nats_url, "api": procs[0].base_url, "llm": procs[1].base_url}
    finally:
        for proc in procs:
            proc.kill()


# --------------------------------------------------------------------------------------------
# the platform


def test_healthy_platform_exits_0(platform: dict[str, str], tmp_path: Path) -> None:
    args = ["--nats-url", platform["nats"], "--api", platform["api"], "--llm-proxy", platform["llm"]]
    result = doctor(*args, home=tmp_path / "home")
    assert result.exit_code == 0, result.stdout
    text = result.stdout
    for title in (
        "NATS reachable",
        "JetStream enabled",
        "streams and buckets present",
        "gateway ready",
        "llm-proxy ready",
    ):
        line = next(line for line in text.splitlines() if title in line)
        assert line.split()[0] == "ok", line
    assert "skip  Kubernetes cluster" in text
    assert "healthy" in text.splitlines()[-1]

    report = json.loads(doctor(*args, "--json", home=tmp_path / "home").stdout)
    assert report["ok"] is True
    checks = by_id(report)
    assert checks["nats"]["detail"].startswith(f"{platform['nats']} (from --nats-url), nats-server ")
    assert checks["nats.topology"]["status"] == "ok"
    assert checks["k8s"]["status"] == "skip"
    assert set(report["summary"]) == {"ok", "warn", "fail", "skip", "critical"}


def test_nats_down_is_critical_with_a_fix(platform: dict[str, str], tmp_path: Path) -> None:
    dead = f"nats://127.0.0.1:{free_port()}"
    result = doctor(
        "--nats-url",
        dead,
        "--api",
        platform["api"],
        "--llm-proxy",
        platform["llm"],
        "--timeout",
        "1",
        home=tmp_path / "home",
    )
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    failed = next(i for i, line in enumerate(lines) if "NATS reachable" in line)
    assert lines[failed].split()[0] == "FAIL"
    assert dead in lines[failed] and "(critical)" in lines[failed]
    assert "fix: start the local stack with `fabrik up`" in lines[failed + 1]
    assert "--nats-url" in lines[failed + 1]
    assert next(line for line in lines if "JetStream enabled" in line).split()[0] == "skip"
    assert "NOT healthy" in lines[-1]
    report = json.loads(
        doctor(
            "--nats-url",
            dead,
            "--api",
            platform["api"],
            "--llm-proxy",
            platform["llm"],
            "--timeout",
            "1",
            "--json",
            home=tmp_path / "home",
        ).stdout
    )
    assert report["ok"] is False
    nats_check = by_id(report)["nats"]
    assert (nats_check["status"], nats_check["critical"]) == ("fail", True)
    assert "fabrik up" in nats_check["fix"]
    assert by_id(report)["gateway"]["status"] == "ok"


async def test_missing_topology_and_services(nats_url: str, tmp_path: Path) -> None:
    options = DoctorOptions(
        nats_url=nats_url,
        api=f"http://127.0.0.1:{free_port()}",
        llm_proxy=f"http://127.0.0.1:{free_port()}",
        timeout=1.0,
        environ={"FABRIK_HOME": str(tmp_path)},
    )
    report = await run_doctor(options)
    checks = by_id(report)
    assert checks["nats"].status == "ok"
    assert checks["nats.jetstream"].status == "ok"
    topology: CheckResult = checks["nats.topology"]
    assert topology.status == "fail"
    assert "stream RUNS" in topology.detail and "bucket envs" in topology.detail
    assert "creates the topology" in topology.fix
    assert checks["gateway"].status == "fail"
    assert "refused" in checks["gateway"].detail.lower() or "connect" in checks["gateway"].detail.lower()
    assert "fabrik up" in checks["gateway"].fix
    assert not report.ok

    nc = await nats.connect(nats_url)
    try:
        await ensure_topology(nc.jetstream())
    finally:
        await nc.close()
    report = await run_doctor(options)
    assert by_id(report)["nats.topology"].status == "ok"


async def test_locations_from_the_local_stack_state_file(nats_url: str, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    dead = f"http://127.0.0.1:{free_port()}"

    def component(name: str, url: str) -> ComponentState:
        return ComponentState(name=name, port=0, pid=None, url=url, health_url="", log="")

    write_state(
        data / "stack.json",
        StackState(
            pid=1,
            data_dir=str(data),
            started_at="",
            status="running",
            nats=component("nats", nats_url),
            services={"gateway": component("gateway", dead), "llm-proxy": component("llm-proxy", dead)},
            nats_monitor_port=0,
            log_dir="",
        ),
    )
    report = await run_doctor(DoctorOptions(timeout=1.0, environ={"FABRIK_HOME": str(data)}))
    checks = by_id(report)
    assert checks["nats"].status == "ok"
    assert "(from the local stack's state file)" in checks["nats"].detail
    assert "the local stack's state file" in checks["gateway"].detail
    assert checks["local.env-key"].status == "warn"
    assert "fabrik up" in checks["local.env-key"].fix
    local_key_file(data).parent.mkdir()
    local_key_file(data).write_text("x")
    report = await run_doctor(
        DoctorOptions(timeout=1.0, environ={"FABRIK_HOME": str(data)}, skip=("gateway",))
    )
    assert by_id(report)["local.env-key"].status == "ok"
    assert by_id(report)["gateway"].status == "skip"


# --------------------------------------------------------------------------------------------
# the cluster, against the Kubernetes API doubles


def _healthy_cluster(double: Any) -> None:
    double.put_object(
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {  # (not among the double's initial ones)
                "name": "fabrik-runs",
                "labels": {"pod-security.kubernetes.io/enforce": "restricted"},
            },
        }
    )
    double.put_object(
        {
            "apiVersion": "storage.k8s.io/v1",
            "kind": "StorageClass",
            "provisioner": "rancher.io/local-path",
            "metadata": {
                "name": "local-path",
                "annotations": {"storageclass.kubernetes.io/is-default-class": "true"},
            },
        }
    )
    double.put_object(
        {
            "apiVersion": "v1",
            "kind": "ResourceQuota",
            "metadata": {"name": "runs", "namespace": "fabrik-runs"},
            "spec": {"hard": {"requests.cpu": "16", "requests.memory": "64Gi"}},
        }
    )
    double.put_object(
        {
            "apiVersion": "v1",
            "kind": "LimitRange",
            "metadata": {"name": "runs", "namespace": "fabrik-runs"},
            "spec": {
                "limits": [
                    {
                        "type": "Container",
                        "default": {"cpu": "2", "memory": "4Gi"},
                        "defaultRequest": {"cpu": "500m", "memory": "1Gi"},
                    }
                ]
            },
        }
    )
    rules = [
        {"apiGroups": [group], "resources": [f"{resource}/{sub}" if sub else resource], "verbs": list(verbs)}
        for group, resource, sub, verbs in EXECUTOR_PERMISSIONS
    ]
    double.put_object(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": "fabrik-executor", "namespace": "fabrik-runs"},
            "rules": rules,
        }
    )
    double.put_object(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "fabrik-executor", "namespace": "fabrik-runs"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "fabrik-executor"},
            "subjects": [{"kind": "ServiceAccount", "name": "fabrik-executor", "namespace": "fabrik-system"}],
        }
    )
    for name, data in (
        ("fabrik-run-key", {"secret": "c2VjcmV0"}),
        ("fabrik-env-key", {"key": "a2V5"}),
        ("fabrik-llm-keys", {"openai": "c2stLi4u"}),
    ):
        double.put_object(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "type": "Opaque",
                "metadata": {"name": name, "namespace": "fabrik-system"},
                "data": data,
            }
        )


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[tuple[Any, ClusterFront, Path]]:
    k8s_double = pytest.importorskip("fabrik_common.testing.k8s_double")
    double = k8s_double.KubeDouble(namespaces=("default", "kube-system", "fabrik-system"))
    await double.start()
    front = ClusterFront(double)
    await front.start()
    try:
        yield double, front, front.kubeconfig(tmp_path / "kubeconfig")
    finally:
        await front.stop()
        await double.stop()


def cluster_options(kubeconfig: Path, **overrides: Any) -> DoctorOptions:
    return DoctorOptions(
        kubeconfig=str(kubeconfig),
        skip=("nats", "gateway", "llm-proxy"),
        timeout=2.0,
        environ={},
        **overrides,
    )


async def test_healthy_cluster(cluster: tuple[Any, ClusterFront, Path]) -> None:
    double, _, kubeconfig = cluster
    _healthy_cluster(double)
    report = await run_doctor(cluster_options(kubeconfig))
    checks = by_id(report)
    k8s = {k: v for k, v in checks.items() if k.startswith("k8s")}
    assert {k: v.status for k, v in k8s.items()} == {
        "k8s.api": "ok",
        "k8s.namespace.system": "ok",
        "k8s.namespace.runs": "ok",
        "k8s.storage-class": "ok",
        "k8s.quota": "ok",
        "k8s.limit-range": "ok",
        "k8s.rbac": "ok",
        "k8s.secret.run-key": "ok",
        "k8s.secret.env-key": "ok",
        "k8s.secret.llm-keys": "ok",
    }, {k: (v.detail, v.fix) for k, v in k8s.items() if v.status != "ok"}
    assert "v1.31.0+double" in checks["k8s.api"].detail
    assert checks["k8s.storage-class"].detail == "default: local-path"
    assert EXECUTOR_USER in checks["k8s.rbac"].detail
    assert "c2VjcmV0" not in json.dumps(report.to_dict())  # secret values never shown
    assert report.ok


async def test_broken_cluster_names_each_problem_with_a_fix(cluster: tuple[Any, ClusterFront, Path]) -> None:
    double, front, kubeconfig = cluster
    _healthy_cluster(double)
    role = double.get("roles", "fabrik-runs", "fabrik-executor")
    role["rules"] = [r for r in role["rules"] if r["resources"] != ["pods/log"]]
    double.put_object(role)
    sc = double.get("storageclasses", "", "local-path")
    sc["metadata"]["annotations"] = {}
    double.put_object(sc)
    ns = double.get("namespaces", "", "fabrik-runs")
    ns["metadata"]["labels"] = {}
    double.put_object(ns)
    async with httpx.AsyncClient(base_url=front.url) as http:  # deleted as a user would
        for path in (
            "/api/v1/namespaces/fabrik-runs/resourcequotas/runs",
            "/api/v1/namespaces/fabrik-runs/limitranges/runs",
            "/api/v1/namespaces/fabrik-system/secrets/fabrik-run-key",
        ):
            assert (await http.delete(path)).status_code == 200

    report = await run_doctor(cluster_options(kubeconfig))
    checks = by_id(report)
    assert checks["k8s.rbac"].status == "fail"
    assert checks["k8s.rbac"].detail.endswith("may not, in fabrik-runs: get pods/log")
    assert "RoleBinding" in checks["k8s.rbac"].fix
    assert checks["k8s.storage-class"].status == "fail"
    assert "is-default-class=true" in checks["k8s.storage-class"].fix
    assert checks["k8s.namespace.runs"].status == "warn"
    assert "pod-security.kubernetes.io/enforce=restricted" in checks["k8s.namespace.runs"].fix
    assert (checks["k8s.quota"].status, checks["k8s.quota"].critical) == ("warn", False)
    assert "create quota" in checks["k8s.quota"].fix
    assert checks["k8s.limit-range"].status == "warn"
    assert checks["k8s.secret.run-key"].status == "fail"
    assert "create secret generic fabrik-run-key" in checks["k8s.secret.run-key"].fix
    assert not report.ok
    assert {c.id for c in report.checks if c.failed_critically} == {
        "k8s.rbac",
        "k8s.storage-class",
        "k8s.secret.run-key",
    }

    assert (
        by_id(await run_doctor(cluster_options(kubeconfig, storage_class="local-path")))[
            "k8s.storage-class"
        ].status
        == "ok"
    )


async def test_missing_namespaces_skip_what_depends_on_them(tmp_path: Path) -> None:
    k8s_double = pytest.importorskip("fabrik_common.testing.k8s_double")
    double = k8s_double.KubeDouble(namespaces=("default",))
    async with double, ClusterFront(double) as front:
        checks = by_id(await run_doctor(cluster_options(front.kubeconfig(tmp_path / "kubeconfig"))))
    assert checks["k8s.namespace.runs"].status == "fail"
    assert "kubectl create namespace fabrik-runs" in checks["k8s.namespace.runs"].fix
    assert checks["k8s.rbac"].status == "skip"
    assert checks["k8s.quota"].status == "skip"
    assert checks["k8s.secret.run-key"].status == "skip"


async def test_without_review_rights_rbac_is_checked_for_yourself(
    cluster: tuple[Any, ClusterFront, Path],
) -> None:
    double, front, kubeconfig = cluster
    _healthy_cluster(double)
    front.may_review_others = False
    double.authorize = lambda attributes: True
    rbac = by_id(await run_doctor(cluster_options(kubeconfig)))["k8s.rbac"]
    assert rbac.status == "warn"
    assert "your own" in rbac.detail
    assert "cluster-admin" in rbac.fix


async def test_cluster_credentials_and_reachability(tmp_path: Path) -> None:
    objects = ClusterObjects()
    async with ClusterDouble(objects) as k8s:
        kubeconfig = k8s.kubeconfig(tmp_path / "kubeconfig")
        objects.token = "rotated"
        api = by_id(await run_doctor(cluster_options(kubeconfig)))["k8s.api"]
        assert api.status == "fail"
        assert "401" in api.detail
        assert "credentials" in api.fix
    unreachable = by_id(await run_doctor(cluster_options(kubeconfig)))
    assert unreachable["k8s.api"].status == "fail"
    assert "kubectl cluster-info" in unreachable["k8s.api"].fix
    assert unreachable["k8s.namespace.runs"].status == "skip"
    broken = tmp_path / "broken"
    broken.write_text("not: [a kubeconfig")
    assert by_id(await run_doctor(cluster_options(broken)))["k8s.api"].status == "fail"


def test_cluster_checks_from_the_cli(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli,
        [
            "doctor",
            "--kubeconfig",
            str(tmp_path / "missing"),
            "--skip",
            "nats",
            "--skip",
            "gateway",
            "--skip",
            "llm-proxy",
            "--json",
        ],
        env={**NO_CLUSTER_ENV, "FABRIK_HOME": str(tmp_path)},
    )
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert by_id(report)["k8s.api"]["status"] == "fail"
    assert by_id(report)["nats"]["status"] == "skip"
