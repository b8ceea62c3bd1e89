"""Volume snapshots of a run workspace against a real cluster (skipped without KUBECONFIG).

A PVC named like a workspace (`data-fabrik-e2e-<random>`) in the e2e runs namespace, in the
cluster's default storage class (`FABRIK_E2E_STORAGE_CLASS` overrides it), bound by a short pod
when the class waits for a consumer; then the backup service's `take_snapshots` and
`delete_snapshots` through the kubeconfig. With a VolumeSnapshotClass for the class's provisioner
the snapshot must become ready; without one the PVC must be listed `skipped` with that reason.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from kubernetes_asyncio.client.exceptions import ApiException

from fabrik_backup.snapshots import (
    DEFAULT_STORAGE_CLASS,
    Connection,
    SnapshotConfig,
    build_api_client,
    delete_snapshots,
    k8s,
    take_snapshots,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

RUNS_NS = os.environ.get("FABRIK_E2E_NAMESPACE", "fabrik-e2e-runs")
IMAGE = os.environ.get(
    "FABRIK_E2E_IMAGE",
    "docker.io/library/busybox:1.36.1@sha256:73aaf090f3d85aa34ee199857f03fa3a95c8ede2ffd4cc2cdb5b94e566b11662",
)


@pytest.fixture
async def client() -> AsyncIterator[Any]:
    api_client = await build_api_client(Connection("kubeconfig"))
    try:
        yield api_client
    finally:
        await api_client.close()


async def _storage_class(api_client: Any) -> dict[str, Any]:
    classes = api_client.sanitize_for_serialization(await k8s.StorageV1Api(api_client).list_storage_class())
    items = classes.get("items") or []
    wanted = os.environ.get("FABRIK_E2E_STORAGE_CLASS")
    for c in items:
        annotations = c["metadata"].get("annotations") or {}
        if (wanted and c["metadata"]["name"] == wanted) or (
            not wanted and annotations.get(DEFAULT_STORAGE_CLASS) == "true"
        ):
            return dict(c)
    pytest.skip("no default storage class (set FABRIK_E2E_STORAGE_CLASS)")


async def _has_snapshot_class(api_client: Any, driver: str) -> bool:
    try:
        found = await k8s.CustomObjectsApi(api_client).list_cluster_custom_object(
            "snapshot.storage.k8s.io", "v1", "volumesnapshotclasses"
        )
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise
    return any(c.get("driver") == driver for c in found.get("items") or [])


def _binder(pvc: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"bind-{pvc}"[:63]},
        "spec": {
            "restartPolicy": "Never",
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": 1000,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [
                {
                    "name": "bind",
                    "image": IMAGE,
                    "command": ["sh", "-c", "echo workspace > /w/file"],
                    "volumeMounts": [{"name": "w", "mountPath": "/w"}],
                    "securityContext": {
                        "allowPrivilegeEscalation": False,
                        "capabilities": {"drop": ["ALL"]},
                    },
                    "resources": {"limits": {"cpu": "100m", "memory": "64Mi"}},
                }
            ],
            "volumes": [{"name": "w", "persistentVolumeClaim": {"claimName": pvc}}],
        },
    }


async def test_a_workspace_is_snapshotted_or_skipped_as_the_cluster_supports(client: Any) -> None:
    core = k8s.CoreV1Api(client)
    try:
        await core.read_namespace(RUNS_NS)
    except ApiException as exc:
        if exc.status != 404:
            raise
        await core.create_namespace({"metadata": {"name": RUNS_NS}})
    storage_class = await _storage_class(client)
    supported = await _has_snapshot_class(client, storage_class["provisioner"])
    pvc = f"data-fabrik-e2e-{secrets.token_hex(4)}"
    await core.create_namespaced_persistent_volume_claim(
        RUNS_NS,
        {
            "metadata": {"name": pvc, "labels": {"fabrik.sh/e2e": "volume-snapshots"}},
            "spec": {
                "storageClassName": storage_class["metadata"]["name"],
                "accessModes": ["ReadWriteOnce"],
                "resources": {"requests": {"storage": "64Mi"}},
            },
        },
    )
    backup_id = f"e2e-{secrets.token_hex(4)}"
    try:
        if storage_class.get("volumeBindingMode") == "WaitForFirstConsumer":
            await core.create_namespaced_pod(RUNS_NS, _binder(pvc))
        deadline = time.monotonic() + 120
        while (await core.read_namespaced_persistent_volume_claim(pvc, RUNS_NS)).status.phase != "Bound":
            assert time.monotonic() < deadline, f"{pvc} not bound"
            await asyncio.sleep(1)
        result = await take_snapshots(
            client, backup_id, SnapshotConfig(namespace=RUNS_NS, timeout_seconds=240, poll_seconds=2)
        )
        assert result.status == "taken", result
        [volume] = [v for v in result.volumes if v.pvc == pvc]
        if supported:
            assert volume.state == "ready", volume
            assert volume.restore_size
        else:
            assert volume.state == "skipped" and "does not support snapshots" in volume.reason, volume
    finally:
        deleted = await delete_snapshots(client, backup_id, RUNS_NS)
        if supported:
            assert len(deleted) == 1
        for delete, name in (
            (core.delete_namespaced_pod, f"bind-{pvc}"[:63]),
            (core.delete_namespaced_persistent_volume_claim, pvc),
        ):
            try:
                await delete(name, RUNS_NS)
            except ApiException as exc:
                if exc.status != 404:
                    raise
