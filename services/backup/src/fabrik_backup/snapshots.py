"""CSI VolumeSnapshots of run workspaces (`data-fabrik-<run>` PVCs) taken with a backup.

NATS holds everything Fabrik knows except the run workspaces, which live on PersistentVolumeClaims
in the runs namespace. When the backup service runs against Kubernetes, each backup also asks the
cluster's CSI snapshotter for a VolumeSnapshot of every workspace PVC whose storage class has a
VolumeSnapshotClass for its provisioner, and records per PVC what happened (ready, failed, skipped,
timed out) in the backup's manifest. Snapshots are labelled with the backup, so deleting a backup
(by hand or by retention) deletes them.

Nothing here may fail a backup: the archive of NATS is what a restore needs first, so every problem
becomes a state and a reason in the result instead of an exception.

kubernetes-asyncio's generated API is untyped; it is used through `Any` and plain dicts (the
objects' JSON) so the rest stays strictly typed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp
from kubernetes_asyncio import client as _client
from kubernetes_asyncio import config as _config
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.config.config_exception import ConfigException

from fabrik_common.backup_rpc import VolumeSnapshotResult, VolumeSnapshots

log = logging.getLogger(__name__)

k8s: Any = _client
k8s_config: Any = _config

Obj = dict[str, Any]
NETWORK_ERRORS = (OSError, TimeoutError, aiohttp.ClientError)

SNAPSHOT_GROUP = "snapshot.storage.k8s.io"
SNAPSHOT_VERSION = "v1"
PVC_PREFIX = "data-fabrik-"
DEFAULT_SNAPSHOT_CLASS = "snapshot.storage.kubernetes.io/is-default-class"
DEFAULT_STORAGE_CLASS = "storageclass.kubernetes.io/is-default-class"

LABEL_BACKUP = "fabrik.sh/backup-id"
LABEL_RUN_ID = "fabrik.sh/run-id"
LABEL_MANAGED_BY = "fabrik.sh/managed-by"
LABEL_COMPONENT = "fabrik.sh/component"
ANN_BACKUP = "fabrik.sh/backup-id"
ANN_PVC = "fabrik.sh/pvc"
STANDARD_LABELS: Mapping[str, str] = {
    LABEL_MANAGED_BY: "fabrik",
    LABEL_COMPONENT: "backup",
    "app.kubernetes.io/part-of": "fabrik",
    "app.kubernetes.io/managed-by": "fabrik-backup",
}

_LABEL_VALUE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?$")
_NOT_DNS = re.compile(r"[^a-z0-9-]+")


# ---------------------------------------------------------------------------------------------
# names


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def backup_label(backup_id: str) -> str:
    """The `fabrik.sh/backup-id` label value of a backup's snapshots. A backup id may be longer
    than a label value allows (80 > 63) or end in `-`/`_`; those get a stable digest instead (the
    full id is in the `fabrik.sh/backup-id` annotation)."""
    if _LABEL_VALUE.match(backup_id):
        return backup_id
    return f"b-{_digest(backup_id)[:32]}"


def snapshot_name(backup_id: str, pvc: str) -> str:
    """A DNS-1123 label (at most 63 characters) naming the snapshot of `pvc` in `backup_id`.

    Deterministic, so a retried or resumed backup finds the snapshot it already created instead
    of taking another. The digest keeps names apart that lowercasing or truncating would merge
    (backup ids are case-sensitive and may hold `_`)."""
    readable = _NOT_DNS.sub("-", f"{backup_id}-{pvc.removeprefix(PVC_PREFIX)}".lower()).strip("-")
    return f"{readable[:54].rstrip('-')}-{_digest(backup_id, pvc)[:8]}"


# ---------------------------------------------------------------------------------------------
# connection


@dataclass(frozen=True)
class Connection:
    """How to reach the Kubernetes API."""

    source: Literal["url", "in-cluster", "kubeconfig"]
    api_url: str = ""
    kubeconfig: str = ""
    context: str = ""


def connection_for(
    mode: str, *, api_url: str, kubeconfig: str, context: str, environ: Mapping[str, str]
) -> Connection | None:
    """The API to snapshot through, or None when snapshots are off or there is no cluster.

    `auto` uses a cluster only when one is configured on purpose: the in-cluster service account,
    a plain API URL, a kubeconfig named in the settings or `$KUBECONFIG`. A laptop's default
    `~/.kube/config` often points at an unrelated cluster, so only `on` falls back to it."""
    if mode == "off":
        return None
    if api_url:
        return Connection("url", api_url=api_url.rstrip("/"))
    if environ.get("KUBERNETES_SERVICE_HOST"):
        return Connection("in-cluster")
    if kubeconfig or environ.get("KUBECONFIG") or mode == "on":
        return Connection("kubeconfig", kubeconfig=kubeconfig, context=context)
    return None


def disabled(mode: str) -> VolumeSnapshots:
    """What a backup records when no snapshots are taken by configuration."""
    if mode == "off":
        return VolumeSnapshots(status="off", message="off (FABRIK_BACKUP_VOLUME_SNAPSHOTS=off)")
    return VolumeSnapshots(status="unavailable", message="not on Kubernetes")


async def build_api_client(connection: Connection) -> Any:
    configuration = k8s.Configuration()
    if connection.source == "url":
        configuration.host = connection.api_url
    elif connection.source == "in-cluster":
        k8s_config.load_incluster_config(client_configuration=configuration)
    else:
        await k8s_config.load_kube_config(
            config_file=connection.kubeconfig or None,
            context=connection.context or None,
            client_configuration=configuration,
        )
    return k8s.ApiClient(configuration=configuration)


def api_message(exc: BaseException) -> str:
    """The API server's own words (its Status `message`) where it sent them."""
    if isinstance(exc, ApiException):
        body = exc.body
        if body:
            with contextlib.suppress(ValueError, AttributeError, TypeError):
                message = json.loads(body).get("message")
                if message:
                    return f"{exc.status}: {message}"
        return f"{exc.status}: {exc.reason}"
    return f"{type(exc).__name__}: {exc}"


def _status(exc: BaseException) -> int:
    return int(getattr(exc, "status", 0) or 0) if isinstance(exc, ApiException) else 0


# ---------------------------------------------------------------------------------------------
# the API subset


class _Api:
    def __init__(self, api_client: Any) -> None:
        self.client = api_client
        self.core: Any = k8s.CoreV1Api(api_client)
        self.storage: Any = k8s.StorageV1Api(api_client)
        self.custom: Any = k8s.CustomObjectsApi(api_client)

    def _plain(self, value: Any) -> Any:
        return self.client.sanitize_for_serialization(value)

    async def pvcs(self, namespace: str) -> list[Obj]:
        found = self._plain(await self.core.list_namespaced_persistent_volume_claim(namespace))
        return list(found.get("items") or [])

    async def storage_classes(self) -> list[Obj]:
        return list(self._plain(await self.storage.list_storage_class()).get("items") or [])

    async def snapshot_classes(self) -> list[Obj]:
        found = await self.custom.list_cluster_custom_object(
            SNAPSHOT_GROUP, SNAPSHOT_VERSION, "volumesnapshotclasses"
        )
        return list(found.get("items") or [])

    async def create_snapshot(self, namespace: str, body: Obj) -> Obj:
        created: Obj = await self.custom.create_namespaced_custom_object(
            SNAPSHOT_GROUP, SNAPSHOT_VERSION, namespace, "volumesnapshots", body
        )
        return created

    async def get_snapshot(self, namespace: str, name: str) -> Obj:
        found: Obj = await self.custom.get_namespaced_custom_object(
            SNAPSHOT_GROUP, SNAPSHOT_VERSION, namespace, "volumesnapshots", name
        )
        return found

    async def snapshots(self, namespace: str, selector: str) -> list[Obj]:
        found = await self.custom.list_namespaced_custom_object(
            SNAPSHOT_GROUP, SNAPSHOT_VERSION, namespace, "volumesnapshots", label_selector=selector
        )
        return list(found.get("items") or [])

    async def delete_snapshot(self, namespace: str, name: str) -> None:
        await self.custom.delete_namespaced_custom_object(
            SNAPSHOT_GROUP, SNAPSHOT_VERSION, namespace, "volumesnapshots", name
        )


# ---------------------------------------------------------------------------------------------
# choosing a class


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def _is_default(obj: Mapping[str, Any], annotation: str) -> bool:
    return str((_meta(obj).get("annotations") or {}).get(annotation, "")).lower() == "true"


def snapshot_class_for(driver: str, classes: list[Obj]) -> str | None:
    """The VolumeSnapshotClass for a CSI driver: the one marked default, else the first by name."""
    matching = sorted(
        (c for c in classes if c.get("driver") == driver), key=lambda c: str(_meta(c).get("name"))
    )
    if not matching:
        return None
    chosen = next((c for c in matching if _is_default(c, DEFAULT_SNAPSHOT_CLASS)), matching[0])
    return str(_meta(chosen).get("name"))


@dataclass(frozen=True)
class Plan:
    """A workspace PVC and how it is to be snapshotted (or why not)."""

    pvc: str
    storage_class: str
    snapshot_class: str | None
    reason: str
    run_id: str


def plan_snapshots(
    pvcs: list[Obj], storage_classes: list[Obj], snapshot_classes: list[Obj] | None
) -> list[Plan]:
    """Per workspace PVC, the snapshot class to use or the reason there is none.
    `snapshot_classes` None: the cluster serves no snapshot API."""
    provisioners = {str(_meta(c).get("name")): str(c.get("provisioner") or "") for c in storage_classes}
    default_class = next(
        (str(_meta(c).get("name")) for c in storage_classes if _is_default(c, DEFAULT_STORAGE_CLASS)), ""
    )
    plans = []
    for pvc in sorted(pvcs, key=lambda p: str(_meta(p).get("name"))):
        meta = _meta(pvc)
        name = str(meta.get("name") or "")
        if not name.startswith(PVC_PREFIX):
            continue
        run_id = str((meta.get("labels") or {}).get(LABEL_RUN_ID, ""))
        spec = pvc.get("spec") or {}
        # A PVC without the field got the default class at admission; "" means "no class".
        storage_class = spec.get("storageClassName")
        storage_class = default_class if storage_class is None else str(storage_class)

        def skip(reason: str, pvc: str = name, cls: str = storage_class, run: str = run_id) -> Plan:
            return Plan(pvc, cls, None, reason, run)

        phase = (pvc.get("status") or {}).get("phase")
        if meta.get("deletionTimestamp"):
            plans.append(skip("the PVC is being deleted"))
        elif phase != "Bound":
            plans.append(skip(f"the PVC is not bound ({phase or 'no phase'})"))
        elif not storage_class:
            plans.append(skip("the PVC has no storage class"))
        elif storage_class not in provisioners:
            plans.append(skip(f"storage class {storage_class} does not exist"))
        elif snapshot_classes is None:
            plans.append(skip("the cluster has no VolumeSnapshot API (snapshot.storage.k8s.io/v1)"))
        else:
            provisioner = provisioners[storage_class]
            chosen = snapshot_class_for(provisioner, snapshot_classes)
            if chosen is None:
                plans.append(
                    skip(
                        f"storage class {storage_class} (provisioner {provisioner}) does not support "
                        "snapshots: no VolumeSnapshotClass for its driver"
                    )
                )
            else:
                plans.append(Plan(name, storage_class, chosen, "", run_id))
    return plans


def snapshot_body(backup_id: str, plan: Plan) -> Obj:
    labels = {**STANDARD_LABELS, LABEL_BACKUP: backup_label(backup_id)}
    if plan.run_id and _LABEL_VALUE.match(plan.run_id):
        labels[LABEL_RUN_ID] = plan.run_id
    return {
        "apiVersion": f"{SNAPSHOT_GROUP}/{SNAPSHOT_VERSION}",
        "kind": "VolumeSnapshot",
        "metadata": {
            "name": snapshot_name(backup_id, plan.pvc),
            "labels": labels,
            "annotations": {ANN_BACKUP: backup_id, ANN_PVC: plan.pvc},
        },
        "spec": {
            "volumeSnapshotClassName": plan.snapshot_class,
            "source": {"persistentVolumeClaimName": plan.pvc},
        },
    }


def snapshot_outcome(obj: Mapping[str, Any]) -> tuple[str, str, str] | None:
    """(state, reason, restore size) of a VolumeSnapshot that is done, None while it is not."""
    status = obj.get("status") or {}
    size = str(status.get("restoreSize") or "")
    error = status.get("error") or {}
    if error.get("message"):
        return "failed", str(error["message"]), size
    if status.get("readyToUse") is True:
        return "ready", "", size
    return None


# ---------------------------------------------------------------------------------------------
# taking and deleting


@dataclass(frozen=True)
class SnapshotConfig:
    namespace: str = "fabrik-runs"
    timeout_seconds: float = 600.0
    """How long a backup waits for its snapshots to become ready to use."""
    poll_seconds: float = 1.0


async def take_snapshots(api_client: Any, backup_id: str, config: SnapshotConfig) -> VolumeSnapshots:
    """Snapshot every workspace PVC of the runs namespace that can be, and wait for them (bounded
    by `config.timeout_seconds`). Never raises for the cluster's sake: problems are states."""
    api = _Api(api_client)
    ns = config.namespace
    try:
        pvcs = await api.pvcs(ns)
        storage_classes = await api.storage_classes()
        snapshot_classes: list[Obj] | None
        try:
            snapshot_classes = await api.snapshot_classes()
        except ApiException as exc:
            if _status(exc) != 404:
                raise
            snapshot_classes = None  # the snapshot CRDs are not installed
    except (ApiException, *NETWORK_ERRORS) as exc:
        log.warning("volume snapshots: the Kubernetes API failed", extra={"error": api_message(exc)})
        return VolumeSnapshots(status="error", message=api_message(exc), namespace=ns)

    results: dict[str, VolumeSnapshotResult] = {}
    pending: dict[str, Plan] = {}
    for plan in plan_snapshots(pvcs, storage_classes, snapshot_classes):
        if plan.snapshot_class is None:
            results[plan.pvc] = VolumeSnapshotResult(
                pvc=plan.pvc, storage_class=plan.storage_class, state="skipped", reason=plan.reason
            )
            continue
        body = snapshot_body(backup_id, plan)
        name = body["metadata"]["name"]
        try:
            await api.create_snapshot(ns, body)
        except ApiException as exc:
            if _status(exc) != 409:
                results[plan.pvc] = _result(plan, name, "failed", f"not created: {api_message(exc)}")
                continue
            # created by an earlier attempt of this backup: wait for that one
        except NETWORK_ERRORS as exc:
            results[plan.pvc] = _result(plan, name, "failed", f"not created: {api_message(exc)}")
            continue
        pending[name] = plan

    deadline = time.monotonic() + config.timeout_seconds
    while pending:
        for name, plan in list(pending.items()):
            try:
                outcome = snapshot_outcome(await api.get_snapshot(ns, name))
            except ApiException as exc:
                if _status(exc) == 404:
                    outcome = ("failed", "deleted before it became ready", "")
                else:
                    continue  # a passing API error: asked again at the next poll
            except NETWORK_ERRORS:
                continue
            if outcome is not None:
                state, reason, size = outcome
                results[plan.pvc] = _result(plan, name, state, reason, size)
                del pending[name]
        if not pending:
            break
        if time.monotonic() >= deadline:
            for name, plan in pending.items():
                results[plan.pvc] = _result(
                    plan,
                    name,
                    "timed_out",
                    f"not ready to use within {config.timeout_seconds:g} s "
                    "(FABRIK_BACKUP_VOLUME_SNAPSHOT_TIMEOUT_SECONDS); it may still become ready",
                )
            break
        await asyncio.sleep(min(config.poll_seconds, max(deadline - time.monotonic(), 0.0)))
    volumes = [results[pvc] for pvc in sorted(results)]
    log.info(
        "volume snapshots taken",
        extra={"backup_id": backup_id, "volumes": {v.pvc: v.state for v in volumes}},
    )
    return VolumeSnapshots(status="taken", namespace=ns, volumes=volumes)


def _result(plan: Plan, name: str, state: Any, reason: str = "", size: str = "") -> VolumeSnapshotResult:
    return VolumeSnapshotResult(
        pvc=plan.pvc,
        snapshot=name,
        snapshot_class=plan.snapshot_class or "",
        storage_class=plan.storage_class,
        state=state,
        reason=reason,
        restore_size=size,
    )


async def delete_snapshots(api_client: Any, backup_id: str, namespace: str) -> list[str]:
    """Delete the backup's VolumeSnapshots (found by label); returns their names. Raises when the
    API fails, so that the caller keeps the backup listed until its snapshots are gone."""
    api = _Api(api_client)
    selector = f"{LABEL_BACKUP}={backup_label(backup_id)},{LABEL_MANAGED_BY}=fabrik"
    try:
        found = await api.snapshots(namespace, selector)
    except ApiException as exc:
        if _status(exc) == 404:
            return []  # no snapshot API in this cluster: nothing was ever taken here
        raise
    deleted = []
    for snapshot in found:
        meta = _meta(snapshot)
        # a digest label could in theory be shared; the annotation holds the exact id
        if (meta.get("annotations") or {}).get(ANN_BACKUP, backup_id) != backup_id:
            continue
        name = str(meta.get("name"))
        try:
            await api.delete_snapshot(namespace, name)
        except ApiException as exc:
            if _status(exc) != 404:
                raise
        deleted.append(name)
    return sorted(deleted)


def summary(snapshots: VolumeSnapshots) -> dict[str, Any]:
    """Counts per state, for an operation's result."""
    counts: dict[str, Any] = {"status": snapshots.status}
    for volume in snapshots.volumes:
        counts[volume.state] = int(counts.get(volume.state, 0)) + 1
    return counts


def warnings(snapshots: VolumeSnapshots) -> list[str]:
    """What an operator must hear about: the snapshot step failing, or a snapshot that did."""
    if snapshots.status == "error":
        return [f"volume snapshots not taken: {snapshots.message}"]
    out = []
    for volume in snapshots.volumes:
        if volume.state in ("failed", "timed_out"):
            out.append(f"volume snapshot of {volume.pvc} {volume.state.replace('_', ' ')}: {volume.reason}")
    return out


class VolumeSnapshotter:
    """Takes and deletes a backup's volume snapshots over one lazily built API client."""

    def __init__(self, connection: Connection, config: SnapshotConfig) -> None:
        self.connection = connection
        self.config = config
        self._client: Any = None
        self._lock = asyncio.Lock()

    async def _api_client(self) -> Any:
        async with self._lock:
            if self._client is None:
                self._client = await build_api_client(self.connection)
            return self._client

    async def take(self, backup_id: str) -> VolumeSnapshots:
        try:
            client = await self._api_client()
        except (ConfigException, OSError, ValueError) as exc:
            message = f"no Kubernetes configuration: {exc}"
            log.warning("volume snapshots: %s", message)
            return VolumeSnapshots(status="error", message=message, namespace=self.config.namespace)
        return await take_snapshots(client, backup_id, self.config)

    async def delete(self, backup_id: str) -> list[str]:
        return await delete_snapshots(await self._api_client(), backup_id, self.config.namespace)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None
