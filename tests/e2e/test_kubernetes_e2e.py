"""The Kubernetes executor's scenarios against a real cluster (skipped without KUBECONFIG).

The same scenarios as tests/integration/test_executor_kubernetes.py, with real workloads: a
busybox image pinned by digest (`FABRIK_E2E_IMAGE` overrides it), real OOM kills, real image
pull failures, real deadlines and evictions through the Eviction API. The runs namespace gets
the `restricted` Pod Security level enforced, so a manifest that breaks it fails here. What a
real cluster cannot be made to do on demand is left to the double's suite: node loss, a watch
connection dropped mid-way, and 410 Gone.

The executor runs in this process (backend=kubernetes, the kubeconfig), with its own NATS.
Namespaces default to `fabrik-e2e-runs` / `fabrik-e2e-system` (created if missing); every
object a test creates carries its run id and is deleted at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NatsClient
from prometheus_client import CollectorRegistry

from fabrik_common.bus import Bus, BusOptions
from fabrik_common.events import RunStarted
from fabrik_common.metrics import BusMetrics
from fabrik_common.service import Service
from fabrik_common.testing import running_service
from fabrik_common.topology import ensure_topology
from fabrik_executor.app import build
from fabrik_executor.kubernetes import render
from fabrik_executor.kubernetes.api import Apis, ClientSettings, build_api_client, k8s
from fabrik_executor.settings import ExecutorSettings

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

IMAGE = os.environ.get(
    "FABRIK_E2E_IMAGE",
    "docker.io/library/busybox:1.36.1@sha256:73aaf090f3d85aa34ee199857f03fa3a95c8ede2ffd4cc2cdb5b94e566b11662",
)
RUNS_NS = os.environ.get("FABRIK_E2E_NAMESPACE", "fabrik-e2e-runs")
SYSTEM_NS = os.environ.get("FABRIK_E2E_SYSTEM_NAMESPACE", "fabrik-e2e-system")
MISSING_IMAGE = "registry.invalid/fabrik/missing@sha256:" + "0" * 64


def _load_harness() -> Any:
    path = Path(__file__).parents[1] / "integration" / "support" / "k8s_harness.py"
    spec = importlib.util.spec_from_file_location("fabrik_k8s_harness", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("fabrik_k8s_harness", module)
    spec.loader.exec_module(module)
    return module


H = _load_harness()


class RealCluster:
    def __init__(self, nats_url: str, tmp: Path, apis: Apis, bus: Bus, nc: NatsClient) -> None:
        self.nats_url = nats_url
        self.tmp = tmp
        self.apis = apis
        self.bus = bus
        self.recorder = H.Recorder(nc.jetstream(), "e2e")
        self.run_ids: list[str] = []

    @contextlib.asynccontextmanager
    async def executor(self) -> AsyncIterator[Service[Any]]:
        settings = ExecutorSettings(
            nats_url=self.nats_url,
            http_port=0,
            data_dir=str(self.tmp),
            backend="kubernetes",
            k8s_config="kubeconfig",
            k8s_namespace=RUNS_NS,
            k8s_system_namespace=SYSTEM_NS,
            k8s_pvc_size="64Mi",
            k8s_image_pull_grace_seconds=10.0,
            cancel_grace_seconds=5.0,
            shutdown_grace_seconds=2.0,
        )
        async with running_service(build(settings)) as service:
            yield service

    async def dispatch(self, command: str, **kwargs: Any) -> Any:
        kwargs.setdefault("image", IMAGE)
        event = H.dispatch(command=("/bin/sh", "-c", command), **kwargs)
        self.run_ids.append(event.run_id)
        await self.bus.publish(event)
        return event

    async def pods(self, run_id: str, attempt: int = 1) -> list[Any]:
        result = await self.apis.core.list_namespaced_pod(
            RUNS_NS, label_selector=f"batch.kubernetes.io/job-name={render.job_name(run_id, attempt)}"
        )
        return list(result.items)

    async def cleanup(self) -> None:
        for run_id in self.run_ids:
            selector = f"{render.LABEL_RUN_ID}={run_id}"
            with contextlib.suppress(Exception):
                jobs = await self.apis.batch.list_namespaced_job(RUNS_NS, label_selector=selector)
                for job in jobs.items:
                    if render.FINALIZER in (job.metadata.finalizers or []):
                        await self.apis.batch.patch_namespaced_job(
                            job.metadata.name,
                            RUNS_NS,
                            {"metadata": {"finalizers": []}},
                            _content_type="application/merge-patch+json",
                        )
                    await self.apis.batch.delete_namespaced_job(
                        job.metadata.name, RUNS_NS, propagation_policy="Foreground"
                    )
            with contextlib.suppress(Exception):
                await self.apis.core.delete_collection_namespaced_persistent_volume_claim(
                    RUNS_NS, label_selector=selector
                )
            with contextlib.suppress(Exception):
                await self.apis.core.delete_collection_namespaced_secret(RUNS_NS, label_selector=selector)


async def _ensure_namespace(apis: Apis, name: str, labels: dict[str, str]) -> None:
    try:
        await apis.core.read_namespace(name)
    except Exception:
        await apis.core.create_namespace({"metadata": {"name": name, "labels": labels}})


@pytest.fixture
async def cluster(nats_url: str, tmp_path: Path) -> AsyncIterator[RealCluster]:
    apis = Apis(await build_api_client(ClientSettings(mode="kubeconfig")))
    restricted = {
        "pod-security.kubernetes.io/enforce": "restricted",
        "pod-security.kubernetes.io/enforce-version": "latest",
    }
    await _ensure_namespace(apis, RUNS_NS, restricted)
    await _ensure_namespace(apis, SYSTEM_NS, {})
    nc = NatsClient()
    await nc.connect(nats_url)
    bus = Bus(BusOptions(url=nats_url, publish_deadline=20), BusMetrics(CollectorRegistry()))
    await bus.connect()
    await ensure_topology(bus.js)
    c = RealCluster(nats_url, tmp_path / "data", apis, bus, nc)
    await c.recorder.start()
    try:
        yield c
    finally:
        await c.cleanup()
        await bus.close()
        await nc.close()
        await apis.close()


SLOW = 240.0


async def test_state_mappings_on_a_real_cluster(cluster: RealCluster) -> None:
    c, rec = cluster, cluster.recorder
    progress = '::fabrik::progress {"phase":"verify","finished":1,"total":1}'
    async with c.executor():
        runs = {
            "success": await c.dispatch(f"echo hello; echo '{progress}'; echo bye"),
            "failure": await c.dispatch("echo boom >&2; exit 3"),
            "oom": await c.dispatch("tail /dev/zero", memory="32Mi"),
            "image_pull": await c.dispatch("true", image=MISSING_IMAGE),
            "deadline": await c.dispatch("sleep 600", deadline_s=25),
            "evicted": await c.dispatch("echo running; sleep 600"),
            # a tag alone is resolved to its digest through Docker Hub at submit
            "tag_resolved": await c.dispatch("true", image="docker.io/library/busybox:1.36.1"),
        }
        evicted = runs["evicted"].run_id
        await rec.started(evicted, timeout=SLOW)
        pod = (await c.pods(evicted))[0]
        await c.apis.core.create_namespaced_pod_eviction(
            pod.metadata.name,
            RUNS_NS,
            k8s.V1Eviction(metadata=k8s.V1ObjectMeta(name=pod.metadata.name, namespace=RUNS_NS)),
        )
        finished = {name: await rec.finished(d.run_id, timeout=SLOW) for name, d in runs.items()}
    got = {name: (f.outcome, f.reason) for name, f in finished.items()}
    assert got == {
        "success": ("succeeded", None),
        "failure": ("failed", "workload_error"),
        "oom": ("failed", "oom_killed"),
        "image_pull": ("failed", "image_pull"),
        "deadline": ("timed_out", "timeout"),
        "evicted": ("failed", "infra_error"),
        "tag_resolved": ("succeeded", None),
    }
    assert finished["failure"].exit_code == 3
    assert rec.texts(runs["success"].run_id, stream="stdout") == ["hello", progress, "bye"]


async def test_cancel_pending_and_running_on_a_real_cluster(cluster: RealCluster) -> None:
    c, rec = cluster, cluster.recorder
    async with c.executor():
        # Pending for good: no node has that much memory.
        pending = await c.dispatch("true", memory="4000Gi")
        running = await c.dispatch("echo working; sleep 600")
        await rec.started(running.run_id, timeout=SLOW)
        await H.cancel(c.bus, pending.run_id)
        await H.cancel(c.bus, running.run_id)
        p = await rec.finished(pending.run_id, timeout=SLOW)
        r = await rec.finished(running.run_id, timeout=SLOW)
    assert (p.outcome, r.outcome) == ("cancelled", "cancelled")
    assert rec.of(pending.run_id, RunStarted) == []


async def test_resume_on_the_same_volume_and_digest_on_a_real_cluster(cluster: RealCluster) -> None:
    c, rec = cluster, cluster.recorder
    command = "if [ -f /workspace/mark ]; then echo resumed; else touch /workspace/mark; exit 1; fi"
    async with c.executor():
        first = await c.dispatch(command)
        assert (await rec.finished(first.run_id, timeout=SLOW)).outcome == "failed"
        digest = (await rec.started(first.run_id)).image_digest
        second = H.dispatch(
            run_id=first.run_id,
            attempt=2,
            image=IMAGE,
            image_digest=digest,
            command=("/bin/sh", "-c", command),
        )
        await c.bus.publish(second)
        f2 = await rec.finished(first.run_id, 2, timeout=SLOW)
    assert f2.outcome == "succeeded"
    assert "resumed" in rec.texts(first.run_id, 2)


async def test_executor_restart_reports_exactly_once_on_a_real_cluster(cluster: RealCluster) -> None:
    c, rec = cluster, cluster.recorder
    async with c.executor():
        d = await c.dispatch("echo before; sleep 15; echo after")
        await rec.started(d.run_id, timeout=SLOW)
    await asyncio.sleep(20)
    async with c.executor():
        f = await rec.finished(d.run_id, timeout=SLOW)
        await asyncio.sleep(2)
        await rec.poll()
    assert f.outcome == "succeeded"
    assert rec.texts(d.run_id, stream="stdout") == ["before", "after"]
    assert len(rec.of(d.run_id, type(f))) == 1
