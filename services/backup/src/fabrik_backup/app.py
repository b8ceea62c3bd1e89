"""Wiring and start-up of the backup service."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from fabrik_backup.engine import BackupOptions, load_manifest, run_backup
from fabrik_backup.handlers import router
from fabrik_backup.jsapi import RawClient, connect_raw
from fabrik_backup.operations import Operations, OperationStore, Timing, Worker
from fabrik_backup.restore import restore
from fabrik_backup.rpc import RpcServer
from fabrik_backup.schedule import run_schedule
from fabrik_backup.settings import BackupSettings
from fabrik_backup.snapshots import (
    SnapshotConfig,
    VolumeSnapshotter,
    connection_for,
    disabled,
    summary,
    warnings,
)
from fabrik_backup.targets import NatsObjectStoreTarget, Target, open_target
from fabrik_backup.verify import verify
from fabrik_common.aio import cancel_all
from fabrik_common.backup_rpc import Operation, VolumeSnapshots
from fabrik_common.service import Service, run_service

log = logging.getLogger(__name__)

NAME = "backup"
STATE_BUCKET = "backups"


@dataclass
class BackupState:
    raw: RawClient
    target: Target
    operations: Operations
    rpc: RpcServer
    snapshotter: VolumeSnapshotter | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


def make_snapshotter(settings: BackupSettings) -> VolumeSnapshotter | None:
    """The volume snapshotter, or None when snapshots are off or there is no cluster."""
    connection = connection_for(
        settings.backup_volume_snapshots,
        api_url=settings.backup_k8s_api_url,
        kubeconfig=settings.backup_k8s_kubeconfig,
        context=settings.backup_k8s_context,
        environ=os.environ,
    )
    if connection is None:
        return None
    return VolumeSnapshotter(
        connection,
        SnapshotConfig(
            namespace=settings.backup_volume_snapshot_namespace,
            timeout_seconds=settings.backup_volume_snapshot_timeout_seconds,
        ),
    )


def excluded_streams(settings: BackupSettings, target: Target) -> list[str]:
    """The service's own operation records and a NATS target's store are never backed up."""
    excluded = [f"KV_{STATE_BUCKET}", *settings.backup_exclude_streams]
    if isinstance(target, NatsObjectStoreTarget):
        excluded.append(target.stream)
    return excluded


def make_workers(
    settings: BackupSettings,
    raw: RawClient,
    target: Target,
    prune: Callable[[], Awaitable[list[str]]] | None = None,
    snapshotter: VolumeSnapshotter | None = None,
) -> dict[Any, Worker]:
    exclude = excluded_streams(settings, target)

    async def backup_work(op: Operation, report: Any) -> dict[str, Any]:
        streams = op.options.get("streams")
        options = BackupOptions(
            streams=[str(s) for s in streams] if isinstance(streams, list) else None,
            exclude=exclude,
            chunk_max_messages=settings.backup_chunk_messages,
            chunk_max_bytes=settings.backup_chunk_bytes,
        )

        async def volumes() -> VolumeSnapshots:
            if snapshotter is None:
                return disabled(settings.backup_volume_snapshots)
            try:
                return await snapshotter.take(op.backup_id)
            except Exception as exc:  # the NATS backup must not fail for its volumes
                log.exception("volume snapshots failed", extra={"backup_id": op.backup_id})
                return VolumeSnapshots(
                    status="error",
                    message=f"{type(exc).__name__}: {exc}",
                    namespace=settings.backup_volume_snapshot_namespace,
                )

        manifest = await run_backup(raw, target, op.backup_id, options, report, volumes)
        pruned = await prune() if prune is not None else []
        result: dict[str, Any] = {
            "streams": len(manifest.streams),
            "messages": manifest.messages,
            "data_bytes": manifest.data_bytes,
            "stored_bytes": manifest.stored_bytes,
            "parts": manifest.parts,
            "pruned": pruned,
        }
        if manifest.volume_snapshots is not None:
            result["volume_snapshots"] = summary(manifest.volume_snapshots)
            if found := warnings(manifest.volume_snapshots):
                result["warnings"] = found
        return result

    async def verify_work(op: Operation, report: Any) -> dict[str, Any]:
        result = await verify(target, op.backup_id, deep=bool(op.options.get("deep")), report=report)
        return {
            "parts": result.parts,
            "messages": result.messages,
            "deep": result.deep,
            "compared": result.compared,
        }

    async def restore_work(op: Operation, report: Any) -> dict[str, Any]:
        manifest = await load_manifest(target, op.backup_id)
        streams = op.options.get("streams")
        replace_opt = op.options.get("replace") or []
        replace: list[str] | bool = (
            True
            if replace_opt == ["*"]
            else [str(s) for s in replace_opt]
            if isinstance(replace_opt, list)
            else False
        )
        result = await restore(
            raw,
            target,
            manifest,
            streams=[str(s) for s in streams] if isinstance(streams, list) else None,
            replace=replace,
            report=report,
        )
        return {
            "streams": [
                {
                    "name": s.name,
                    "messages": s.messages,
                    "skipped": s.skipped,
                    "conditions_dropped": s.conditions_dropped,
                }
                for s in result.streams
            ]
        }

    return {"backup": backup_work, "verify": verify_work, "restore": restore_work}


def build(settings: BackupSettings) -> Service[BackupState]:
    async def on_start(service: Service[BackupState]) -> BackupState:
        js = service.bus.js
        raw = await connect_raw(
            settings.nats_url, name=f"backup:{service.instance_id}", reconnect_forever=True
        )
        target = open_target(
            settings.backup_target, nc=raw, s3=settings.s3_options(), replicas=settings.stream_replicas
        )
        store = OperationStore(await js.key_value(STATE_BUCKET))
        servers: list[RpcServer] = []
        snapshotter = make_snapshotter(settings)
        if snapshotter is None:
            log.info("volume snapshots: %s", disabled(settings.backup_volume_snapshots).message)
        else:
            log.info(
                "volume snapshots: on",
                extra={
                    "kubernetes": snapshotter.connection.source,
                    "namespace": settings.backup_volume_snapshot_namespace,
                },
            )

        async def prune() -> list[str]:
            return await servers[0].apply_retention() if servers and settings.retention().enabled else []

        operations = Operations(
            store,
            make_workers(settings, raw, target, prune, snapshotter),
            instance=service.instance_id,
            target=target.url,
            publish=service.bus.publish,
            timing=Timing(
                heartbeat_seconds=settings.backup_heartbeat_seconds,
                stale_seconds=settings.backup_stale_seconds,
                reap_seconds=settings.backup_heartbeat_seconds,
            ),
        )
        server = RpcServer(
            service.bus.nc,
            operations,
            target,
            deadlines={
                "backup": settings.backup_deadline_seconds,
                "verify": settings.verify_deadline_seconds,
                "restore": settings.restore_deadline_seconds,
            },
            retention=settings.retention(),
            schedule=settings.backup_schedule,
            schedule_timezone=settings.backup_schedule_timezone,
            snapshotter=snapshotter,
        )
        servers.append(server)
        await server.start()
        state = BackupState(raw, target, operations, server, snapshotter)
        state.tasks.append(asyncio.create_task(operations.reaper(), name="backup-reaper"))
        if settings.backup_schedule:

            async def scheduled(backup_id: str) -> None:
                await operations.submit(
                    "backup", backup_id, deadline_seconds=settings.backup_deadline_seconds, actor="schedule"
                )

            state.tasks.append(
                asyncio.create_task(
                    run_schedule(
                        store.kv,
                        settings.backup_schedule,
                        settings.backup_schedule_timezone,
                        service.instance_id,
                        scheduled,
                    ),
                    name="backup-schedule",
                )
            )
        return state

    async def on_stop(state: BackupState) -> None:
        await state.rpc.stop()
        # cancel_all repeats the cancel: nats-py can swallow one inside its own wait_for, and a
        # single cancel then left the reaper looping and the service never exiting on SIGTERM.
        await cancel_all(state.tasks)
        await state.operations.stop()
        if state.snapshotter is not None:
            await state.snapshotter.close()
        await state.target.close()
        await state.raw.close()

    return Service(NAME, settings, routers=[router], on_start=on_start, on_stop=on_stop)


def main() -> None:
    run_service(BackupSettings, build, NAME)
