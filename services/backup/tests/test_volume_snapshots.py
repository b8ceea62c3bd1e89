"""Volume snapshots of run workspaces, through the real kubernetes-asyncio client against the
Kubernetes API double (`fabrik_common.testing.k8s_double`), and into a backup's manifest."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from kubernetes_asyncio import client as k8s_client
from kubernetes_asyncio.client.exceptions import ApiException

from fabrik_backup.archive.format import FORMAT_VERSION, Manifest, decode_manifest, encode_manifest
from fabrik_backup.engine import run_backup
from fabrik_backup.jsapi import connect_raw
from fabrik_backup.snapshots import (
    LABEL_BACKUP,
    Connection,
    SnapshotConfig,
    VolumeSnapshotter,
    backup_label,
    build_api_client,
    connection_for,
    delete_snapshots,
    disabled,
    snapshot_name,
    summary,
    take_snapshots,
    warnings,
)
from fabrik_backup.targets import DirectoryTarget
from fabrik_common.backup_rpc import VolumeSnapshots
from fabrik_common.testing import NatsServerLike
from fabrik_common.testing.k8s_double import KubeDouble

NS = "fabrik-runs"
CSI = "hostpath.csi.k8s.io"
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def storage_class(name: str, provisioner: str) -> dict[str, Any]:
    return {
        "apiVersion": "storage.k8s.io/v1",
        "kind": "StorageClass",
        "metadata": {"name": name},
        "provisioner": provisioner,
    }


def snapshot_class(name: str, driver: str, *, default: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if default:
        meta["annotations"] = {"snapshot.storage.kubernetes.io/is-default-class": "true"}
    return {
        "apiVersion": "snapshot.storage.k8s.io/v1",
        "kind": "VolumeSnapshotClass",
        "metadata": meta,
        "driver": driver,
        "deletionPolicy": "Delete",
    }


def pvc(name: str, storage: str | None, size: str = "10Gi", run_id: str = "") -> dict[str, Any]:
    spec: dict[str, Any] = {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": size}}}
    if storage is not None:
        spec["storageClassName"] = storage
    meta: dict[str, Any] = {"name": name, "namespace": NS}
    if run_id:
        meta["labels"] = {"fabrik.sh/run-id": run_id, "fabrik.sh/managed-by": "fabrik"}
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": meta, "spec": spec}


def cluster(double: KubeDouble) -> None:
    """A CSI class with snapshot support (two snapshot classes, one default), local-path without."""
    double.put_object(storage_class("csi-hostpath", CSI))
    double.put_object(storage_class("local-path", "rancher.io/local-path"))
    double.put_object(snapshot_class("a-other", CSI))
    double.put_object(snapshot_class("csi-hostpath-snapclass", CSI, default=True))
    double.put_object(snapshot_class("ebs", "ebs.csi.aws.com", default=True))
    double.put_object(
        pvc("data-fabrik-01jaaaaaaaaaaaaaaaaaaaaaaa", "csi-hostpath", "10Gi", "01JAAAAAAAAAAAAAAAAAAAAAAA")
    )
    double.put_object(pvc("data-fabrik-01jbbbbbbbbbbbbbbbbbbbbbbb", "local-path"))
    double.put_object(pvc("data-fabrik-01jccccccccccccccccccccccc", "csi-hostpath", "5Gi"))
    double.put_object(pvc("scratch", "csi-hostpath"))  # not a workspace


@pytest.fixture
async def double() -> AsyncIterator[KubeDouble]:
    async with KubeDouble() as api:
        cluster(api)
        yield api


@pytest.fixture
async def client(double: KubeDouble) -> AsyncIterator[Any]:
    api_client = await build_api_client(Connection("url", api_url=double.url))
    try:
        yield api_client
    finally:
        await api_client.close()


def by_pvc(result: VolumeSnapshots) -> dict[str, Any]:
    return {v.pvc: v for v in result.volumes}


def test_snapshot_names_are_dns_labels_deterministic_and_distinct() -> None:
    ids = [
        "20261129T201500Z-1a2b3c4d",
        "20261129t201500z-1a2b3c4d",
        "a_b",
        "a-b",
        "x" * 80,
        "before-upgrade-",
    ]
    pvcs = ["data-fabrik-01jx2y3z4a5b6c7d8e9f0g1h2j", "data-fabrik-01jx2y3z4a5b6c7d8e9f0g1h2k"]
    names = {snapshot_name(b, p) for b in ids for p in pvcs}
    assert len(names) == len(ids) * len(pvcs)
    for name in names:
        assert len(name) <= 63 and DNS_LABEL.match(name), name
    assert snapshot_name(ids[0], pvcs[0]) == snapshot_name(ids[0], pvcs[0])
    assert snapshot_name(ids[0], pvcs[0]).startswith("20261129t201500z-1a2b3c4d-01jx2y3z4a5b6c7d8e9f0g1h2j-")
    assert backup_label("before-upgrade") == "before-upgrade"
    for odd in ("x" * 80, "before-upgrade-", "a_"):
        label = backup_label(odd)
        assert len(label) <= 63 and label == backup_label(odd) and label != odd


def test_auto_uses_a_cluster_only_when_one_is_configured() -> None:
    none: dict[str, str] = {}

    def conn(mode: str, environ: dict[str, str], **kw: str) -> Connection | None:
        args = {"api_url": "", "kubeconfig": "", "context": "", **kw}
        return connection_for(mode, environ=environ, **args)

    assert conn("auto", none) is None  # a laptop: no snapshots, and the listing says why
    assert disabled("auto").message == "not on Kubernetes"
    assert conn("off", {"KUBERNETES_SERVICE_HOST": "10.0.0.1"}) is None
    assert disabled("off").status == "off"
    assert conn("auto", {"KUBERNETES_SERVICE_HOST": "10.0.0.1"}) == Connection("in-cluster")
    assert conn("auto", {"KUBECONFIG": "/k"}) == Connection("kubeconfig")
    assert conn("auto", none, kubeconfig="/k", context="c") == Connection(
        "kubeconfig", kubeconfig="/k", context="c"
    )
    assert conn("auto", none, api_url="http://127.0.0.1:1/") == Connection(
        "url", api_url="http://127.0.0.1:1"
    )
    assert conn("on", none) == Connection("kubeconfig")


async def test_snapshots_taken_skipped_failed_and_not_duplicated_on_retry(
    double: KubeDouble, client: Any
) -> None:
    double.fail_snapshots["data-fabrik-01jccccccccccccccccccccccc"] = (
        "rpc error: code = Internal desc = disk full"
    )
    config = SnapshotConfig(namespace=NS, timeout_seconds=10, poll_seconds=0.05)
    result = await take_snapshots(client, "nightly-1", config)
    assert result.status == "taken" and result.namespace == NS
    volumes = by_pvc(result)
    assert sorted(volumes) == [
        "data-fabrik-01jaaaaaaaaaaaaaaaaaaaaaaa",
        "data-fabrik-01jbbbbbbbbbbbbbbbbbbbbbbb",
        "data-fabrik-01jccccccccccccccccccccccc",
    ]
    ready = volumes["data-fabrik-01jaaaaaaaaaaaaaaaaaaaaaaa"]
    assert (ready.state, ready.snapshot_class, ready.storage_class, ready.restore_size) == (
        "ready",
        "csi-hostpath-snapclass",  # the default class of the driver, not the first by name
        "csi-hostpath",
        "10Gi",
    )
    assert ready.snapshot == snapshot_name("nightly-1", ready.pvc)
    skipped = volumes["data-fabrik-01jbbbbbbbbbbbbbbbbbbbbbbb"]
    assert skipped.state == "skipped" and skipped.snapshot == ""
    assert "local-path" in skipped.reason and "rancher.io/local-path" in skipped.reason
    failed = volumes["data-fabrik-01jccccccccccccccccccccccc"]
    assert failed.state == "failed" and "disk full" in failed.reason
    assert summary(result) == {"status": "taken", "ready": 1, "skipped": 1, "failed": 1}
    assert warnings(result) == [f"volume snapshot of {failed.pvc} failed: {failed.reason}"]

    stored = double.get("volumesnapshots", NS, ready.snapshot)
    assert stored is not None
    assert stored["spec"] == {
        "volumeSnapshotClassName": "csi-hostpath-snapclass",
        "source": {"persistentVolumeClaimName": ready.pvc},
    }
    labels = stored["metadata"]["labels"]
    assert labels[LABEL_BACKUP] == "nightly-1"
    assert labels["fabrik.sh/managed-by"] == "fabrik" and labels["fabrik.sh/component"] == "backup"
    assert labels["fabrik.sh/run-id"] == "01JAAAAAAAAAAAAAAAAAAAAAAA"
    assert stored["metadata"]["annotations"]["fabrik.sh/backup-id"] == "nightly-1"

    # A retried backup (same id) finds its snapshots instead of taking more.
    before = len(double.list_objects("volumesnapshots", NS))
    again = await take_snapshots(client, "nightly-1", config)
    assert [(v.pvc, v.snapshot, v.state) for v in again.volumes] == [
        (v.pvc, v.snapshot, v.state) for v in result.volumes
    ]
    assert len(double.list_objects("volumesnapshots", NS)) == before == 2
    assert sum(1 for m, p in double.requests if m == "POST" and "volumesnapshots" in p) == 4  # 409 twice

    # Another backup: its own snapshots; deleting one backup's leaves the other's.
    await take_snapshots(client, "nightly-2", config)
    assert len(double.list_objects("volumesnapshots", NS)) == 4
    deleted = await delete_snapshots(client, "nightly-1", NS)
    assert deleted == sorted([ready.snapshot, failed.snapshot])
    left = double.list_objects("volumesnapshots", NS)
    assert {s["metadata"]["labels"][LABEL_BACKUP] for s in left} == {"nightly-2"}
    assert await delete_snapshots(client, "nightly-1", NS) == []


async def test_a_snapshot_not_ready_in_time_is_timed_out_and_a_retry_picks_it_up(
    double: KubeDouble, client: Any
) -> None:
    double.snapshot_ready_seconds = None  # the driver never finishes on its own
    config = SnapshotConfig(namespace=NS, timeout_seconds=0.3, poll_seconds=0.05)
    result = await take_snapshots(client, "slow", config)
    slow = by_pvc(result)["data-fabrik-01jaaaaaaaaaaaaaaaaaaaaaaa"]
    assert slow.state == "timed_out" and "0.3 s" in slow.reason
    assert any("timed out" in w for w in warnings(result))
    double.ready_snapshot(NS, slow.snapshot)
    again = by_pvc(await take_snapshots(client, "slow", config))["data-fabrik-01jaaaaaaaaaaaaaaaaaaaaaaa"]
    assert (again.state, again.snapshot, again.restore_size) == ("ready", slow.snapshot, "10Gi")


async def test_without_the_snapshot_api_every_workspace_is_skipped() -> None:
    async with KubeDouble(snapshot_api=False) as double:
        cluster(double)
        client = await build_api_client(Connection("url", api_url=double.url))
        try:
            result = await take_snapshots(client, "b", SnapshotConfig(namespace=NS, timeout_seconds=1))
            assert await delete_snapshots(client, "b", NS) == []  # nothing to delete, not an error
        finally:
            await client.close()
    assert result.status == "taken"
    assert {v.state for v in result.volumes} == {"skipped"}
    assert all("no VolumeSnapshot API" in v.reason for v in result.volumes)
    assert warnings(result) == []


async def test_an_unreachable_api_is_an_error_state_not_an_exception(double: KubeDouble) -> None:
    snapshotter = VolumeSnapshotter(
        Connection("url", api_url="http://127.0.0.1:9"), SnapshotConfig(namespace=NS, timeout_seconds=1)
    )
    try:
        result = await snapshotter.take("b")
    finally:
        await snapshotter.close()
    assert result.status == "error" and result.message
    assert warnings(result) == [f"volume snapshots not taken: {result.message}"]
    # a namespace that does not exist lists nothing (the API answers an empty list)
    snapshotter = VolumeSnapshotter(
        Connection("url", api_url=double.url), SnapshotConfig(namespace="elsewhere", timeout_seconds=1)
    )
    try:
        assert (await snapshotter.take("b")).volumes == []
    finally:
        await snapshotter.close()


async def test_the_manifest_records_the_snapshots_and_old_manifests_still_read(
    nats_server: NatsServerLike, tmp_path: Path, double: KubeDouble
) -> None:
    target = DirectoryTarget(tmp_path / "archives")
    raw = await connect_raw(nats_server.url)
    snapshotter = VolumeSnapshotter(
        Connection("url", api_url=double.url),
        SnapshotConfig(namespace=NS, timeout_seconds=10, poll_seconds=0.05),
    )
    try:
        manifest = await run_backup(
            raw, target, "with-volumes", volumes=lambda: snapshotter.take("with-volumes")
        )
    finally:
        await snapshotter.close()
        await raw.close()
    assert manifest.volume_snapshots is not None
    assert {v.state for v in manifest.volume_snapshots.volumes} == {"ready", "skipped"}
    stored = decode_manifest(await target.get("with-volumes/manifest.json"))
    assert stored.volume_snapshots == manifest.volume_snapshots
    assert stored.format_version == FORMAT_VERSION == 1

    # A manifest written before volume snapshots existed decodes, without them.
    old = msgspec.json.decode(encode_manifest(stored))
    del old["volume_snapshots"]
    assert decode_manifest(msgspec.json.encode(old)).volume_snapshots is None
    assert isinstance(decode_manifest(msgspec.json.encode(old)), Manifest)


async def test_the_double_answers_snapshot_requests_as_the_api_server_does(
    double: KubeDouble, client: Any
) -> None:
    custom = k8s_client.CustomObjectsApi(client)
    group, version = "snapshot.storage.k8s.io", "v1"
    spec: dict[str, Any] = {
        "volumeSnapshotClassName": "csi-hostpath-snapclass",
        "source": {"persistentVolumeClaimName": "data-fabrik-01jaaaaaaaaaaaaaaaaaaaaaaa"},
    }
    body = {
        "apiVersion": f"{group}/{version}",
        "kind": "VolumeSnapshot",
        "metadata": {"name": "s1", "labels": {"fabrik.sh/backup-id": "b1"}},
        "spec": spec,
    }
    created = await custom.create_namespaced_custom_object(group, version, NS, "volumesnapshots", body)
    assert created["metadata"]["namespace"] == NS and created["metadata"]["uid"]
    with pytest.raises(ApiException) as exists:
        await custom.create_namespaced_custom_object(group, version, NS, "volumesnapshots", body)
    status = msgspec.json.decode(exists.value.body or b"")
    assert (exists.value.status, status["kind"], status["reason"]) == (409, "Status", "AlreadyExists")
    assert status["details"] == {"name": "s1", "group": group, "kind": "volumesnapshots"}
    with pytest.raises(ApiException) as missing:
        await custom.get_namespaced_custom_object(group, version, NS, "volumesnapshots", "nope")
    assert missing.value.status == 404
    assert msgspec.json.decode(missing.value.body or b"")["reason"] == "NotFound"
    # a source PVC that does not exist: the snapshot controller reports it in status.error
    await custom.create_namespaced_custom_object(
        group,
        version,
        NS,
        "volumesnapshots",
        {
            **body,
            "metadata": {"name": "s2"},
            "spec": {**spec, "source": {"persistentVolumeClaimName": "gone"}},
        },
    )
    for _ in range(100):
        s1 = await custom.get_namespaced_custom_object(group, version, NS, "volumesnapshots", "s1")
        s2 = await custom.get_namespaced_custom_object(group, version, NS, "volumesnapshots", "s2")
        if (s1.get("status") or {}).get("readyToUse") and (s2.get("status") or {}).get("error"):
            break
        await asyncio.sleep(0.02)
    assert s1["status"]["restoreSize"] == "10Gi" and s1["status"]["boundVolumeSnapshotContentName"]
    assert "not found" in s2["status"]["error"]["message"] and s2["status"]["readyToUse"] is False
    selected = await custom.list_namespaced_custom_object(
        group, version, NS, "volumesnapshots", label_selector="fabrik.sh/backup-id=b1"
    )
    assert [i["metadata"]["name"] for i in selected["items"]] == ["s1"]
    classes = await custom.list_cluster_custom_object(group, version, "volumesnapshotclasses")
    assert {c["metadata"]["name"] for c in classes["items"]} == {"a-other", "csi-hostpath-snapclass", "ebs"}
    await custom.delete_namespaced_custom_object(group, version, NS, "volumesnapshots", "s1")
    assert double.get("volumesnapshots", NS, "s1") is None
