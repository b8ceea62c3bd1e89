"""Volume snapshots of run workspaces with backups, end to end: the REAL backup service over a real
NATS server and the Kubernetes API double (through the real kubernetes-asyncio client), the
gateway's REST API, and the CLI (`fabrik backup list|show|delete`).

Covers: snapshots taken for PVCs whose storage class supports them, skipped for one that does not,
a failed snapshot recorded (the backup succeeds, with a warning and an alert), the listing and
detail showing them, retention and deletion deleting them, and laptop mode (no Kubernetes) saying so.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import msgspec
import nats
import pytest

from fabrik_backup.app import build as build_backup
from fabrik_backup.settings import BackupSettings
from fabrik_cli.commands.backup import backup_detail, backups_table
from fabrik_common.service import Service
from fabrik_common.testing import running_service
from fabrik_common.testing.k8s_double import KubeDouble
from fabrik_gateway.app import build as build_gateway
from fabrik_gateway.auth.jwt import mint_hs256
from fabrik_gateway.gateway import Gateway
from fabrik_gateway.settings import GatewaySettings

SECRET = "volume-snapshots-test-hs256-secret-0123456789"
ROOT = Path(__file__).resolve().parents[2]
NS = "fabrik-runs"
CSI = "hostpath.csi.k8s.io"
READY_PVC = "data-fabrik-01jaaaaaaaaaaaaaaaaaaaaaaa"
LOCAL_PVC = "data-fabrik-01jbbbbbbbbbbbbbbbbbbbbbbb"
FAILING_PVC = "data-fabrik-01jccccccccccccccccccccccc"


def bearer(role: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {mint_hs256(SECRET, f'{role}@example.com', role)}"}


ADMIN = bearer("admin")
VIEWER = bearer("viewer")


def populate(double: KubeDouble) -> None:
    def obj(api_version: str, kind: str, meta: dict[str, Any], **rest: Any) -> dict[str, Any]:
        return {"apiVersion": api_version, "kind": kind, "metadata": meta, **rest}

    double.put_object(obj("storage.k8s.io/v1", "StorageClass", {"name": "csi-hostpath"}, provisioner=CSI))
    double.put_object(
        obj("storage.k8s.io/v1", "StorageClass", {"name": "local-path"}, provisioner="rancher.io/local-path")
    )
    double.put_object(
        obj(
            "snapshot.storage.k8s.io/v1",
            "VolumeSnapshotClass",
            {"name": "csi-hostpath-snapclass"},
            driver=CSI,
            deletionPolicy="Delete",
        )
    )
    for name, storage_class in (
        (READY_PVC, "csi-hostpath"),
        (LOCAL_PVC, "local-path"),
        (FAILING_PVC, "csi-hostpath"),
    ):
        double.put_object(
            obj(
                "v1",
                "PersistentVolumeClaim",
                {"name": name, "namespace": NS},
                spec={
                    "storageClassName": storage_class,
                    "accessModes": ["ReadWriteOnce"],
                    "resources": {"requests": {"storage": "10Gi"}},
                },
            )
        )
    double.fail_snapshots[FAILING_PVC] = (
        "rpc error: code = ResourceExhausted desc = no space for the snapshot"
    )


@dataclass
class Stack:
    http: httpx.AsyncClient
    api: str
    nats_url: str
    double: KubeDouble | None


@contextlib.asynccontextmanager
async def stack(nats_url: str, tmp_path: Path, double: KubeDouble | None) -> AsyncIterator[Stack]:
    backup_settings = BackupSettings(
        nats_url=nats_url,
        http_port=0,
        log_format="text",
        instance_id="backup-snapshots",
        backup_target=f"dir://{tmp_path / 'archives'}",
        backup_heartbeat_seconds=0.2,
        backup_stale_seconds=2.0,
        backup_keep_last=1,
        backup_k8s_api_url=double.url if double is not None else "",
        backup_volume_snapshot_timeout_seconds=10.0,
    )
    gateway: Service[Gateway] = build_gateway(
        GatewaySettings(
            nats_url=nats_url,
            http_port=0,
            log_format="text",
            anonymous_role="none",
            jwt_hs256_secret=SECRET,
            rate_limit_per_minute=100000,
            rate_limit_burst=100000,
        )
    )
    async with running_service(build_backup(backup_settings)), running_service(gateway):
        api = f"http://127.0.0.1:{gateway.http.port}"
        async with httpx.AsyncClient(base_url=api, timeout=30) as http:
            deadline = time.monotonic() + 15
            while (await http.get("/readyz")).status_code != 200:
                assert time.monotonic() < deadline, "gateway not ready"
                await asyncio.sleep(0.05)
            yield Stack(http=http, api=api, nats_url=nats_url, double=double)


async def backup(http: httpx.AsyncClient, backup_id: str) -> dict[str, Any]:
    response = await http.post("/api/v1/backups", json={"backup_id": backup_id}, headers=ADMIN)
    assert response.status_code == 202, response.text
    op_id = response.json()["operation_id"]
    deadline = time.monotonic() + 30
    while True:
        op: dict[str, Any] = (await http.get(f"/api/v1/backups/operations/{op_id}", headers=VIEWER)).json()
        if op["terminal"]:
            return op
        assert time.monotonic() < deadline, f"{op_id} still {op['state']}"
        await asyncio.sleep(0.1)


def cli(api: str, home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "FABRIK_TOKEN"}
    env.update(
        FABRIK_API_URL=api,
        FABRIK_HOME=str(home),
        HOME=str(home),
        XDG_CONFIG_HOME=str(home / "config"),
        FABRIK_TOKEN=mint_hs256(SECRET, "cli@example.com", "admin"),
    )
    return subprocess.run(
        [sys.executable, "-m", "fabrik_cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=ROOT,
        input="",
        check=False,
    )


def snapshots_of(double: KubeDouble, backup_id: str) -> list[str]:
    return sorted(
        s["metadata"]["name"]
        for s in double.list_objects("volumesnapshots", NS, f"fabrik.sh/backup-id={backup_id}")
    )


async def test_backups_snapshot_workspaces_list_them_and_delete_them(nats_url: str, tmp_path: Path) -> None:
    alerts: list[dict[str, Any]] = []
    nc = await nats.connect(nats_url)

    async def on_alert(msg: Any) -> None:
        alerts.append(msgspec.json.decode(msg.data))

    await nc.subscribe("fabrik.alerts.raised.>", cb=on_alert)
    try:
        async with KubeDouble() as double:
            populate(double)
            async with stack(nats_url, tmp_path, double) as s:
                http = s.http
                op = await backup(http, "vs-1")

                # The NATS backup succeeds; the failed snapshot is a warning on it and an alert.
                assert op["state"] == "succeeded", op
                assert op["result"]["volume_snapshots"] == {
                    "status": "taken",
                    "ready": 1,
                    "skipped": 1,
                    "failed": 1,
                }
                assert f"volume snapshot of {FAILING_PVC} failed" in op["message"]
                assert "no space for the snapshot" in op["message"]
                deadline = time.monotonic() + 5
                while not alerts:
                    assert time.monotonic() < deadline, "no alert raised"
                    await asyncio.sleep(0.05)
                assert alerts[0]["severity"] == "warning" and alerts[0]["entity_id"] == "vs-1"
                assert FAILING_PVC in alerts[0]["message"]
                taken = snapshots_of(double, "vs-1")
                assert len(taken) == 2  # the ready one and the failed one (kept: its error is its record)

                # Listed with the backup, in the API and in the CLI.
                listing = (await http.get("/api/v1/backups", headers=VIEWER)).json()
                [listed] = [b for b in listing["backups"] if b["backup_id"] == "vs-1"]
                snapshots = listed["volume_snapshots"]
                assert (snapshots["status"], snapshots["namespace"]) == ("taken", NS)
                volumes = {v["pvc"]: v for v in snapshots["volumes"]}
                assert volumes[READY_PVC]["state"] == "ready"
                assert volumes[READY_PVC]["snapshot"] in taken
                assert volumes[READY_PVC]["snapshot_class"] == "csi-hostpath-snapclass"
                assert volumes[READY_PVC]["restore_size"] == "10Gi"
                assert volumes[LOCAL_PVC]["state"] == "skipped" and volumes[LOCAL_PVC]["snapshot"] == ""
                assert "does not support snapshots" in volumes[LOCAL_PVC]["reason"]
                assert volumes[FAILING_PVC]["state"] == "failed"
                table = backups_table(listing)
                assert "VOLUMES" in table and "1 ready, 1 failed, 1 skipped" in table, table
                detail = (await http.get("/api/v1/backups/vs-1", headers=VIEWER)).json()
                assert detail["volume_snapshots"] == snapshots
                shown = backup_detail(detail)
                assert volumes[READY_PVC]["snapshot"] in shown and "csi-hostpath-snapclass" in shown, shown
                assert "does not support snapshots" in shown

                home = tmp_path / "home"
                home.mkdir()
                printed = await asyncio.to_thread(cli, s.api, home, "backup", "show", "vs-1")
                assert printed.returncode == 0, printed.stderr
                assert volumes[READY_PVC]["snapshot"] in printed.stdout
                assert (
                    "volume snapshots" in printed.stdout and "1 ready, 1 failed, 1 skipped" in printed.stdout
                )

                # Retention (keep the last one) deletes vs-1 and its snapshots after vs-2.
                second = await backup(http, "vs-2")
                assert second["state"] == "succeeded" and second["result"]["pruned"] == ["vs-1"]
                assert snapshots_of(double, "vs-1") == []
                kept = snapshots_of(double, "vs-2")
                assert len(kept) == 2

                # Deleting a backup deletes its snapshots.
                deleted = await asyncio.to_thread(cli, s.api, home, "backup", "delete", "vs-2", "--yes")
                assert deleted.returncode == 0, deleted.stderr
                assert "2 volume snapshot(s)" in deleted.stdout, deleted.stdout
                assert double.list_objects("volumesnapshots", NS) == []

                # Snapshots that cannot be deleted keep their backup (listed, deletable again).
                assert (await backup(http, "vs-3"))["state"] == "succeeded"
                await double.stop()
                refused = await http.delete("/api/v1/backups/vs-3", headers=ADMIN)
                assert refused.status_code == 502 and "could not be deleted" in refused.json()["detail"]
                listing = (await http.get("/api/v1/backups", headers=VIEWER)).json()
                assert [b["backup_id"] for b in listing["backups"]] == ["vs-3"]
    finally:
        await nc.close()


async def test_laptop_mode_takes_no_snapshots_and_says_so(
    nats_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    async with stack(nats_url, tmp_path, None) as s:
        op = await backup(s.http, "laptop-1")
        assert op["state"] == "succeeded" and op["message"] == "", op
        assert op["result"]["volume_snapshots"] == {"status": "unavailable"}
        listing = (await s.http.get("/api/v1/backups", headers=VIEWER)).json()
        [listed] = listing["backups"]
        assert listed["volume_snapshots"] == {
            "status": "unavailable",
            "message": "not on Kubernetes",
            "namespace": "",
            "volumes": [],
        }
        assert "volume snapshots: not on Kubernetes" in backups_table(listing)
        deleted = (await s.http.delete("/api/v1/backups/laptop-1", headers=ADMIN)).json()
        assert deleted["snapshots_deleted"] == []
