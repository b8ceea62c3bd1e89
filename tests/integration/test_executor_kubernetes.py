"""The executor with backend=kubernetes, against a real NATS server and the Kubernetes API double.

The executor service runs in this process, configured as in production except for
`FABRIK_K8S_API_URL` (the double); it talks to the double through the real kubernetes-asyncio
client. The test plays the scheduler (publishes RunDispatched / RunCancelRequested) and scripts
what the fake kubelet does with each run's pod.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import importlib.util
import json
import sys
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NatsClient
from prometheus_client import CollectorRegistry, generate_latest

from fabrik_common.bus import Bus, BusOptions
from fabrik_common.events import (
    RepoRef,
    RunFinished,
    RunLogChunk,
    RunProgress,
    RunResultReported,
    RunStarted,
)
from fabrik_common.ids import new_ulid, utcnow
from fabrik_common.metrics import BusMetrics
from fabrik_common.service import Service
from fabrik_common.testing import free_port, running_service
from fabrik_common.testing.k8s_double import KubeDouble, Script
from fabrik_common.testing.registry_double import RegistryDouble
from fabrik_common.topology import ensure_topology
from fabrik_executor.app import build
from fabrik_executor.kubernetes import render
from fabrik_executor.settings import ExecutorSettings


def _load_harness() -> Any:
    path = Path(__file__).parent / "support" / "k8s_harness.py"
    spec = importlib.util.spec_from_file_location("fabrik_k8s_harness", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("fabrik_k8s_harness", module)
    spec.loader.exec_module(module)
    return module


H = _load_harness()
NS = "fabrik-runs"
RUN_KEY_SECRET = "integration-test-run-key-secret-0123456789"

pytestmark = pytest.mark.slow


class Cluster:
    def __init__(self, nats_url: str, data_dir: Path, api: KubeDouble, bus: Bus, nc: NatsClient) -> None:
        self.nats_url = nats_url
        self.data_dir = data_dir
        self.api = api
        self.bus = bus
        self.nc = nc
        self.recorder = H.Recorder(nc.jetstream())

    def settings(self, **overrides: Any) -> ExecutorSettings:
        values: dict[str, Any] = {
            "nats_url": self.nats_url,
            "http_port": 0,
            "data_dir": str(self.data_dir),
            "backend": "kubernetes",
            "k8s_api_url": self.api.url,
            "k8s_image_pull_grace_seconds": 0.6,
            "k8s_log_drain_seconds": 3.0,
            "k8s_checkpoint_seconds": 0.2,
            "k8s_mirror_sync_seconds": 0.3,
            "k8s_credential_bundles": {"github": "github-app", "npm": "npm-default"},
            "k8s_llm_proxy_url": "http://llm-proxy.fabrik-system.svc:8081",
            "progress_interval_seconds": 0.2,
            "run_key_secret": RUN_KEY_SECRET,
            "shutdown_grace_seconds": 2.0,
        }
        values.update(overrides)
        return ExecutorSettings(**values)

    @contextlib.asynccontextmanager
    async def executor(self, **overrides: Any) -> AsyncIterator[Service[Any]]:
        async with running_service(build(self.settings(**overrides))) as service:
            yield service

    async def dispatch(self, script: Script | None, **kwargs: Any) -> Any:
        event = H.dispatch(**kwargs)
        if script is not None:
            self.api.script(
                {render.LABEL_RUN_ID: event.run_id, render.LABEL_ATTEMPT: str(event.attempt)}, script
            )
        await self.bus.publish(event)
        return event

    def job(self, run_id: str, attempt: int = 1) -> dict[str, Any] | None:
        return self.api.get("jobs", NS, render.job_name(run_id, attempt))

    async def until(self, predicate: Any, timeout: float = 10.0, what: str = "") -> Any:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            result = predicate()
            if result:
                return result
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"timed out waiting for {what or predicate}")
            await asyncio.sleep(0.05)


@pytest.fixture
async def cluster(nats_url: str, tmp_path: Path) -> AsyncIterator[Cluster]:
    nc = NatsClient()
    await nc.connect(nats_url)
    bus = Bus(BusOptions(url=nats_url, publish_deadline=20), BusMetrics(CollectorRegistry()))
    await bus.connect()
    await ensure_topology(bus.js)
    async with KubeDouble(pod_termination_seconds=0.05) as api:
        api.put_object(
            _secret("fabrik-system", "fabrik-env-demo-dev", {"API_URL": "https://api.test", "TOKEN": "s3"})
        )
        api.put_object(_secret("fabrik-system", "github-app", {"token": "gh-default"}))
        api.put_object(_secret("fabrik-system", "npm-default", {"npmrc": "default"}))
        api.put_object(
            _secret("fabrik-system", "npm-team", {"npmrc": "team"}, labels={"fabrik.sh/credentials": "true"})
        )
        c = Cluster(nats_url, tmp_path / "data", api, bus, nc)
        await c.recorder.start()
        try:
            yield c
        finally:
            await bus.close()
            await nc.close()


def _secret(
    ns: str, name: str, values: dict[str, str], labels: dict[str, str] | None = None
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": ns, "labels": labels or {}},
        "type": "Opaque",
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in values.items()},
    }


def _b64(secret: dict[str, Any] | None, key: str) -> str:
    assert secret is not None
    return base64.b64decode(secret["data"][key]).decode()


# --------------------------------------------------------------------------------------------


async def test_every_state_mapping_with_logs_progress_and_secrets(cluster: Cluster) -> None:
    c, rec = cluster, cluster.recorder

    progress = '::fabrik::progress {"phase":"implement","task":"1","finished":1,"total":2}'
    async with c.executor() as service:
        runs = {
            "success": await c.dispatch(
                Script(
                    Script.wait(0.05),
                    Script.start(),
                    Script.log("hello", progress),
                    Script.wait(0.3),
                    Script.log(
                        '::fabrik::progress {"finished":2}', '::fabrik::result {"status":"ok"}', "bye"
                    ),
                    Script.exit(0),
                ),
                spec={"id": "hello", "goal": "say hello"},
                labels={"credentials.fabrik.sh/npm": "npm-team"},
                repo=RepoRef(url="https://git.test/acme/shop.git", ref="main"),
            ),
            "failure": await c.dispatch(
                Script(Script.start(), Script.log("working", "error: boom"), Script.exit(3))
            ),
            "oom": await c.dispatch(Script(Script.start(), Script.log("allocating"), Script.oom_kill())),
            "image_pull": await c.dispatch(Script(Script.image_pull_backoff())),
            "evicted": await c.dispatch(
                Script(Script.start(), Script.log("busy"), Script.wait(0.1), Script.evict())
            ),
            "evicted_api": await c.dispatch(Script(Script.start(), Script.log("busy"), Script.hang())),
            "node_lost": await c.dispatch(
                Script(Script.start(), Script.log("busy"), Script.wait(0.1), Script.lose_node())
            ),
            "deadline": await c.dispatch(
                Script(Script.start(), Script.log("slow"), Script.hang()), deadline_s=1.5
            ),
            "clone_failed": await c.dispatch(
                Script(Script.init(128, "fatal: repository not found")),
                repo=RepoRef(url="https://git.test/nope.git"),
            ),
            "unresolvable": await c.dispatch(None, image=f"127.0.0.1:{free_port()}/agent:latest"),
            "past_deadline": await c.dispatch(None, deadline_s=-1),
        }
        evicting = runs["evicted_api"].run_id
        started = await rec.started(evicting)
        assert started.workload_ref == f"kubernetes:{NS}/{render.job_name(evicting, 1)}"
        pod = c.api.pods_of_job(NS, render.job_name(evicting, 1))[0]
        c.api.evict(NS, pod["metadata"]["name"])
        finished = {name: await rec.finished(d.run_id) for name, d in runs.items()}
        await asyncio.sleep(0.3)
        await rec.poll()
        metrics = generate_latest(service.registry).decode()

    got = {name: (f.outcome, f.reason) for name, f in finished.items()}
    assert got == {
        "success": ("succeeded", None),
        "failure": ("failed", "workload_error"),
        "oom": ("failed", "oom_killed"),
        "image_pull": ("failed", "image_pull"),
        "evicted": ("failed", "infra_error"),
        "evicted_api": ("failed", "infra_error"),
        "node_lost": ("failed", "infra_error"),
        "deadline": ("timed_out", "timeout"),
        "clone_failed": ("failed", "infra_error"),
        "unresolvable": ("failed", "image_pull"),
        "past_deadline": ("timed_out", "timeout"),
    }
    assert finished["failure"].exit_code == 3 and "error: boom" in finished["failure"].message
    assert finished["oom"].exit_code == 137
    assert "repository not found" in finished["clone_failed"].message
    assert "could not be resolved to a digest" in finished["unresolvable"].message
    assert "unreachable" in finished["unresolvable"].message
    assert "could not be pulled" in finished["image_pull"].message
    # exactly one RunFinished per attempt; RunStarted only where the workload ran
    for name, d in runs.items():
        assert len(rec.of(d.run_id, RunFinished)) == 1, name
        ran = name not in ("image_pull", "clone_failed", "unresolvable", "past_deadline")
        assert len(rec.of(d.run_id, RunStarted)) == (1 if ran else 0), name
    # the recorded digest, for a resume
    ok = runs["success"].run_id
    assert rec.of(ok, RunStarted)[0].image_digest == H.DIGEST
    # logs: numbered from 0, every line once, in order; protocol lines parsed as the local backend
    lines = rec.log_lines(ok)
    assert [n for n, _, _ in lines] == list(range(len(lines)))
    stdout = rec.texts(ok, stream="stdout")
    assert stdout == [
        "hello",
        progress,
        '::fabrik::progress {"finished":2}',
        '::fabrik::result {"status":"ok"}',
        "bye",
    ]
    system = rec.texts(ok, stream="system")
    assert any("project env: 2 variables" in t for t in system)
    assert any(t.startswith("the attempt ended: succeeded") for t in system)
    last = rec.of(ok, RunProgress)[-1]
    assert (last.phase, last.finished, last.total) == ("implement", 2, 2)
    assert [r.result for r in rec.of(ok, RunResultReported)] == [{"status": "ok"}]
    # RunFinished comes after every log chunk and the latest progress
    before = [e.occurred_at for e in rec.of(ok) if isinstance(e, (RunLogChunk, RunProgress))]
    assert finished["success"].occurred_at >= max(before)  # (two streams: compare times, not order)
    assert 'fabrik_executor_runs_finished_total{backend="kubernetes"' in metrics

    # Secrets: the env mirrored with the run's labels, the bundles as directories, the override
    # suppressing the default bundle of its target, the LLM key Secret gone with the attempt.
    env = c.api.get("secrets", NS, "fabrik-env-demo-dev")
    assert _b64(env, "API_URL") == "https://api.test"
    assert env is not None and env["metadata"]["labels"]["fabrik.sh/component"] == "env"
    assert _b64(c.api.get("secrets", NS, "fabrik-cred-npm-team"), "npmrc") == "team"
    job = c.job(ok)
    assert job is not None
    pod_spec = job["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in pod_spec["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec["volumes"]}
    assert volumes[mounts["/etc/fabrik/credentials/npm"]]["secret"]["secretName"] == "fabrik-cred-npm-team"
    assert (
        volumes[mounts["/etc/fabrik/credentials/github"]]["secret"]["secretName"] == "fabrik-cred-github-app"
    )
    assert "/etc/fabrik/llm" in mounts
    assert c.api.get("secrets", NS, render.llm_secret_name(ok, 1)) is None  # deleted at the end
    # the Job records what was reported and lets go of its finalizer
    annotations = job["metadata"]["annotations"]
    assert json.loads(annotations["fabrik.sh/outcome"])["event_id"] == finished["success"].event_id
    assert json.loads(annotations["fabrik.sh/status"])["reported"] is True
    assert "fabrik.sh/finished-at" in annotations and "fabrik.sh/started-at" in annotations
    assert render.FINALIZER not in (job["metadata"].get("finalizers") or [])
    # image pull: the Job was deleted (foreground), so nothing keeps pulling
    assert c.job(runs["image_pull"].run_id) is None


async def test_cancel_during_pending_and_during_running(cluster: Cluster) -> None:
    c, rec = cluster, cluster.recorder

    async with c.executor():
        pending = await c.dispatch(Script(Script.wait(30), Script.start(), Script.exit(0)))
        running = await c.dispatch(Script(Script.start(), Script.log("working"), Script.hang()))
        await rec.started(running.run_id)
        await c.until(lambda: c.api.pods_of_job(NS, render.job_name(pending.run_id, 1)), what="pending pod")
        await H.cancel(c.bus, pending.run_id)
        await H.cancel(c.bus, running.run_id)
        p = await rec.finished(pending.run_id)
        r = await rec.finished(running.run_id)
        # the Jobs are deleted (foreground: pods first) once the end is reported
        await c.until(
            lambda: c.job(pending.run_id) is None and c.job(running.run_id) is None, what="jobs gone"
        )
        await asyncio.sleep(0.3)
        await rec.poll()
    assert (p.outcome, p.reason) == ("cancelled", "cancelled")
    assert (r.outcome, r.reason) == ("cancelled", "cancelled")
    assert "cancelled by test" in r.message
    assert rec.of(pending.run_id, RunStarted) == []
    assert len(rec.of(running.run_id, RunStarted)) == 1
    assert "working" in rec.texts(running.run_id)
    assert len(rec.of(running.run_id, RunFinished)) == 1
    assert c.api.pods_of_job(NS, render.job_name(running.run_id, 1)) == []
    delete = [q for m, q in c.api.requests if m == "DELETE" and "/jobs/" in q]
    assert delete  # and the body asked for foreground propagation (checked by the double's GC)


async def test_resume_uses_the_same_volume_and_the_recorded_digest(cluster: Cluster) -> None:
    c, rec = cluster, cluster.recorder

    async with c.executor():
        first = await c.dispatch(
            Script(Script.start(), Script.log("step 1"), Script.exit(1)),
            image="registry.test/agent:1.0",
            image_digest=H.DIGEST,
        )
        f1 = await rec.finished(first.run_id)
        digest = rec.of(first.run_id, RunStarted)[0].image_digest
        assert digest == H.DIGEST
        # the scheduler resumes: same run, attempt 2, the digest RunStarted recorded
        second = await c.dispatch(
            Script(Script.start(), Script.log("step 2"), Script.exit(0)),
            run_id=first.run_id,
            attempt=2,
            image="registry.test/agent:1.0",
            image_digest=digest,
        )
        f2 = await rec.finished(second.run_id, 2)
    assert (f1.outcome, f2.outcome) == ("failed", "succeeded")
    jobs = [c.job(first.run_id, n) for n in (1, 2)]
    claims = {
        j["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] for j in jobs if j
    }
    assert claims == {render.pvc_name(first.run_id)}
    images = {j["spec"]["template"]["spec"]["containers"][0]["image"] for j in jobs if j}
    assert images == {f"registry.test/agent:1.0@{H.DIGEST}"}
    assert any("reusing volume" in t for t in rec.texts(first.run_id, 2))
    assert len(c.api.list_objects("persistentvolumeclaims", NS, f"fabrik.sh/run-id={first.run_id}")) == 1


async def test_a_tag_is_resolved_to_its_digest_and_a_resume_keeps_it(cluster: Cluster) -> None:
    c, rec = cluster, cluster.recorder

    async with RegistryDouble() as reg:
        digest = reg.push("fabrik/agent", "1.2")
        image = f"{reg.host}/fabrik/agent:1.2"
        async with c.executor(k8s_insecure_registries=(reg.host,)):
            first = await c.dispatch(Script(Script.start(), Script.exit(1)), image=image)
            f1 = await rec.finished(first.run_id)
            recorded = rec.of(first.run_id, RunStarted)[0].image_digest
            assert recorded == digest
            # the tag moves; the resume carries the recorded digest and is not resolved again
            reg.push("fabrik/agent", "1.2", content="a newer build")
            asked = len(reg.requests)
            second = await c.dispatch(
                Script(Script.start(), Script.exit(0)),
                run_id=first.run_id,
                attempt=2,
                image=image,
                image_digest=recorded,
            )
            f2 = await rec.finished(first.run_id, 2)
            assert len(reg.requests) == asked
            assert rec.of(second.run_id, RunStarted, 2)[0].image_digest == digest
            # a tag the registry does not know: image_pull, nothing created
            missing = await c.dispatch(None, image=f"{reg.host}/fabrik/agent:9.9")
            fm = await rec.finished(missing.run_id)
    assert (f1.outcome, f2.outcome) == ("failed", "succeeded")
    for n in (1, 2):
        job = c.job(first.run_id, n)
        assert job is not None
        assert job["spec"]["template"]["spec"]["containers"][0]["image"] == f"{image}@{digest}"
        assert job["metadata"]["annotations"][render.ANN_IMAGE_DIGEST] == digest
    assert any(f"resolved to {digest}" in t for t in rec.texts(first.run_id, 1, stream="system"))
    assert (fm.outcome, fm.reason) == ("failed", "image_pull")
    assert f"{reg.host}/fabrik/agent:9.9" in fm.message and "404" in fm.message
    assert c.job(missing.run_id) is None


async def test_watch_reconnects_and_relists_without_missing_a_transition(cluster: Cluster) -> None:
    c, rec = cluster, cluster.recorder

    lines = [f"line {i}" for i in range(30)]
    async with c.executor():
        d = await c.dispatch(
            Script(
                Script.start(),
                Script.log(*lines[:10]),
                Script.wait(0.4),
                Script.log(*lines[10:20]),
                Script.wait(0.4),
                Script.log(*lines[20:]),
                Script.wait(0.4),
                Script.exit(4),
            )
        )
        await rec.started(d.run_id)

        def watch_count() -> int:
            return len([q for m, q in c.api.requests if m == "GET" and "watch=" in q.lower()])

        async def reconnected(before: int, dropped: int) -> None:
            # every dropped watch is opened again (a loaded machine may take longer than a fixed sleep)
            for _ in range(200):
                if watch_count() >= before + dropped:
                    return
                await asyncio.sleep(0.05)
            raise AssertionError(f"{dropped} dropped watches were not reopened: {watch_count() - before}")

        # the connections drop mid-way: watches resume from their resourceVersion, the log from its cursor
        before = watch_count()
        dropped = c.api.drop_watches()
        assert dropped >= 2
        c.api.drop_log_streams()
        await reconnected(before, dropped)
        # the history is compacted and the connections drop again: 410 Gone, relist
        c.api.compact()
        before = watch_count()
        dropped = c.api.drop_watches()
        assert dropped >= 2
        c.api.drop_log_streams()
        await reconnected(before, dropped)
        f = await rec.finished(d.run_id)
        await asyncio.sleep(0.2)
        await rec.poll()
    assert (f.outcome, f.reason, f.exit_code) == ("failed", "workload_error", 4)
    assert rec.texts(d.run_id, stream="stdout") == lines  # every line once, in order
    watches = [q for m, q in c.api.requests if m == "GET" and "watch=" in q.lower()]
    relists = [q for m, q in c.api.requests if m == "GET" and "/jobs?" in q and "watch" not in q.lower()]
    assert len(watches) >= 6
    assert len(relists) >= 2  # the first list, then the one after 410 Gone


async def test_restart_adopts_jobs_and_reports_exactly_once(cluster: Cluster) -> None:
    c, rec = cluster, cluster.recorder

    async with c.executor():
        d = await c.dispatch(
            Script(
                Script.start(), Script.log("before"), Script.wait(1.2), Script.log("after"), Script.exit(0)
            )
        )
        await rec.started(d.run_id)
        await rec.wait_for(lambda: "before" in rec.texts(d.run_id), what="first line")
    # the executor is gone while the workload ends; a new one adopts the Job from its annotations
    await c.until(lambda: (c.job(d.run_id) or {}).get("status", {}).get("succeeded") == 1, what="job done")
    assert rec.of(d.run_id, RunFinished) == []
    async with c.executor():
        f = await rec.finished(d.run_id)
        await asyncio.sleep(0.3)
    assert f.outcome == "succeeded"
    texts = rec.texts(d.run_id, stream="stdout")
    assert texts == ["before", "after"]
    assert len({e.event_id for e in rec.of(d.run_id, RunStarted)}) == 1
    # a RunFinished that was stored but whose publication was not confirmed is published again,
    # the same event (same id: JetStream keeps one), and never decided anew
    job = c.job(d.run_id)
    assert job is not None
    status = json.loads(job["metadata"]["annotations"]["fabrik.sh/status"])
    status["reported"] = False
    job["metadata"]["annotations"]["fabrik.sh/status"] = json.dumps(status)
    c.api.put_object(job)
    async with c.executor():
        await c.until(
            lambda: json.loads((c.job(d.run_id) or {})["metadata"]["annotations"]["fabrik.sh/status"]).get(
                "reported"
            ),
            what="reported again",
        )
        await asyncio.sleep(0.3)
        await rec.poll()
    assert [e.event_id for e in rec.of(d.run_id, RunFinished)] == [f.event_id]


async def test_retention_reaps_old_workspaces_and_orphans(cluster: Cluster) -> None:
    c, rec = cluster, cluster.recorder

    async with c.executor() as service:
        done = await c.dispatch(Script(Script.start(), Script.exit(0)))
        keep = await c.dispatch(
            Script(Script.start(), Script.exit(0)), labels={"retention.fabrik.sh/days": "30"}
        )
        active = await c.dispatch(Script(Script.start(), Script.hang()))
        await rec.finished(done.run_id)
        await rec.finished(keep.run_id)
        await rec.started(active.run_id)
        old = (utcnow() - timedelta(days=2)).strftime("%Y-%m-%dT%H:%M:%SZ")
        orphan = {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {
                "name": "data-fabrik-orphan",
                "namespace": NS,
                "labels": {"fabrik.sh/run-id": new_ulid(), "fabrik.sh/managed-by": "fabrik"},
            },
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
        }
        c.api.put_object(orphan)
        stored = c.api.objects[("/persistentvolumeclaims", NS, "data-fabrik-orphan")]
        stored["metadata"]["creationTimestamp"] = old
        backend = service.state.backend
        assert await backend.reap(utcnow()) != []  # only the orphan goes now
        assert c.api.get("persistentvolumeclaims", NS, "data-fabrik-orphan") is None
        assert c.api.get("persistentvolumeclaims", NS, render.pvc_name(done.run_id)) is not None
        reaped = await backend.reap(utcnow() + timedelta(days=8))
        metrics = generate_latest(service.registry).decode()
        await H.cancel(c.bus, active.run_id)
        await rec.finished(active.run_id)
    names = {r.name for r in reaped if r.kind == "pvc"}
    assert names == {render.pvc_name(done.run_id)}
    assert c.api.get("persistentvolumeclaims", NS, render.pvc_name(keep.run_id)) is not None
    assert c.api.get("persistentvolumeclaims", NS, render.pvc_name(active.run_id)) is not None
    assert 'fabrik_executor_k8s_reaped_total{kind="pvc",why="retention"} 1.0' in metrics
    assert 'fabrik_executor_k8s_reaped_total{kind="pvc",why="orphaned"} 1.0' in metrics
