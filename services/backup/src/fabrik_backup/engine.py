"""Backup: every stream (KV buckets and object stores are streams too) into an archive.

Consistency: for each stream the backup first records its durable consumers, then its state; the
state's last sequence bounds what is read, so messages published after the start are not in the
archive and each stream is consistent as of the last sequence recorded in the manifest. Messages
are read through an ephemeral consumer (no acks, in memory on the server) with pipelined pulls,
chunk by chunk, so memory stays bounded by two chunks plus four pull batches. After each chunk is
stored the progress record is rewritten; an interrupted backup resumes after its last chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import msgspec

from fabrik_backup import jsapi
from fabrik_backup.archive.format import (
    MANIFEST,
    PROGRESS,
    ArchiveError,
    ChunkBuilder,
    ConsumerEntry,
    Manifest,
    Progress,
    Record,
    StreamEntry,
    build_chunk,
    chunk_name,
    decode_manifest,
    encode_manifest,
)
from fabrik_backup.jsapi import RawClient
from fabrik_backup.targets.base import PartNotFoundError, Target
from fabrik_common.backup_rpc import VolumeSnapshots

log = logging.getLogger(__name__)

Report = Callable[[int, int], Awaitable[None]]
"""Called after every stored part with (bytes stored, parts stored); raises to stop the work."""

Volumes = Callable[[], Awaitable[VolumeSnapshots]]
"""Takes the run workspaces' volume snapshots of the backup (never raises for the cluster's sake)."""

PULL_BUFFER_BYTES = 4 << 20


async def _no_report(_bytes: int, _parts: int) -> None:
    return None


@dataclass(frozen=True)
class BackupOptions:
    streams: Sequence[str] | None = None
    """Only these streams (None: every stream)."""
    exclude: Sequence[str] = ()
    chunk_max_messages: int = 20_000
    chunk_max_bytes: int = 8 << 20
    compression_level: int = 3
    server: dict[str, Any] = field(default_factory=dict)


def _now() -> datetime:
    return datetime.now(UTC)


def _durable_consumers(infos: list[jsapi.Json]) -> list[ConsumerEntry]:
    entries = []
    for info in infos:
        config = info.get("config") or {}
        if not config.get("durable_name"):
            continue  # ephemeral consumers (watchers, readers) are not part of the state
        entries.append(
            ConsumerEntry(
                name=str(info.get("name") or config["durable_name"]),
                config=config,
                delivered_stream_seq=int((info.get("delivered") or {}).get("stream_seq", 0)),
                ack_floor_stream_seq=int((info.get("ack_floor") or {}).get("stream_seq", 0)),
                num_ack_pending=int(info.get("num_ack_pending", 0)),
                num_pending=int(info.get("num_pending", 0)),
            )
        )
    return entries


async def capture(nc: RawClient, backup_id: str, options: BackupOptions) -> Progress:
    """What the backup will contain: every selected stream's configuration, consumers and state."""
    names = await jsapi.stream_names(nc)
    if options.streams is not None:
        missing = sorted(set(options.streams) - set(names))
        if missing:
            raise ArchiveError(f"no such stream: {', '.join(missing)}")
        names = [n for n in names if n in set(options.streams)]
    names = [n for n in names if n not in set(options.exclude)]
    progress = Progress(backup_id=backup_id, created_at=_now(), server=options.server)
    for name in names:
        consumers = _durable_consumers(await jsapi.consumers(nc, name))
        info = await jsapi.stream_info(nc, name)
        if info is None:
            continue  # deleted meanwhile
        state = info.get("state") or {}
        first = int(state.get("first_seq", 0))
        last = int(state.get("last_seq", 0))
        progress.streams.append(
            StreamEntry(
                name=name,
                config=info["config"],
                state=state,
                first_seq=first,
                last_seq=last,
                consumers=consumers,
                next_seq=max(first, 1),
                done=int(state.get("messages", 0)) == 0 or first > last,
            )
        )
    return progress


async def load_manifest(target: Target, backup_id: str) -> Manifest:
    try:
        data = await target.get(f"{backup_id}/{MANIFEST}")
    except PartNotFoundError as exc:
        raise ArchiveError(f"{backup_id}: no manifest (the backup is incomplete or does not exist)") from exc
    return decode_manifest(data, f"{backup_id}/{MANIFEST}")


async def _load_progress(target: Target, backup_id: str) -> Progress | None:
    try:
        data = await target.get(f"{backup_id}/{PROGRESS}")
    except PartNotFoundError:
        return None
    return msgspec.json.decode(data, type=Progress)


async def run_backup(
    nc: RawClient,
    target: Target,
    backup_id: str,
    options: BackupOptions | None = None,
    report: Report = _no_report,
    volumes: Volumes | None = None,
) -> Manifest:
    """Back up into `target` as `backup_id`; resumes a previous attempt of the same id.

    `volumes` runs beside the reading of the streams, started right after the capture so that the
    workspaces are snapshotted as close as possible to the moment the streams are consistent as of;
    its result goes into the manifest."""
    options = options or BackupOptions()
    try:
        return await load_manifest(target, backup_id)  # already complete: nothing to do
    except ArchiveError:
        pass
    progress = await _load_progress(target, backup_id)
    if progress is None:
        progress = await capture(nc, backup_id, options)
        await target.put(f"{backup_id}/{PROGRESS}", msgspec.json.encode(progress))
    else:
        log.info("resuming backup", extra={"backup_id": backup_id})
    snapshotting = asyncio.ensure_future(volumes()) if volumes is not None else None
    try:
        return await _finish_backup(nc, target, backup_id, options, report, progress, snapshotting)
    finally:
        if snapshotting is not None and not snapshotting.done():
            snapshotting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await snapshotting


async def _finish_backup(
    nc: RawClient,
    target: Target,
    backup_id: str,
    options: BackupOptions,
    report: Report,
    progress: Progress,
    snapshotting: asyncio.Future[VolumeSnapshots] | None,
) -> Manifest:
    stored = sum(p.size for s in progress.streams for p in s.parts)
    parts = sum(len(s.parts) for s in progress.streams)
    for entry in progress.streams:
        if entry.done:
            continue

        async def chunk_stored(size: int) -> None:
            nonlocal stored, parts
            stored += size
            parts += 1
            await target.put(f"{backup_id}/{PROGRESS}", msgspec.json.encode(progress))
            await report(stored, parts)

        await _backup_stream(nc, target, backup_id, entry, options, chunk_stored)
        entry.done = True
        await target.put(f"{backup_id}/{PROGRESS}", msgspec.json.encode(progress))
    manifest = Manifest(
        backup_id=backup_id,
        created_at=progress.created_at,
        completed_at=_now(),
        server=progress.server,
        streams=progress.streams,
        messages=sum(s.messages for s in progress.streams),
        data_bytes=sum(s.data_bytes for s in progress.streams),
        stored_bytes=stored,
        parts=parts,
        volume_snapshots=await snapshotting if snapshotting is not None else None,
    )
    await target.put(f"{backup_id}/{MANIFEST}", encode_manifest(manifest))
    await target.delete(f"{backup_id}/{PROGRESS}")
    await report(stored, parts)
    return manifest


async def _backup_stream(
    nc: RawClient,
    target: Target,
    backup_id: str,
    entry: StreamEntry,
    options: BackupOptions,
    chunk_stored: Callable[[int], Awaitable[None]],
) -> None:
    if entry.next_seq > entry.last_seq:
        return
    state_msgs = max(int(entry.state.get("messages", 0)), 1)
    avg = max(int(entry.state.get("bytes", 0)) // state_msgs, 64)
    batch = max(1, min(2000, PULL_BUFFER_BYTES // avg))
    consumer = f"fabrik-backup-{secrets.token_hex(6)}"
    await jsapi.create_consumer(
        nc,
        entry.name,
        {
            "name": consumer,
            "deliver_policy": "by_start_sequence",
            "opt_start_seq": entry.next_seq,
            "ack_policy": "none",
            "replay_policy": "instant",
            "inactive_threshold": 60_000_000_000,
            "mem_storage": True,
            "num_replicas": 1,
        },
    )
    puller = jsapi.Puller(nc, entry.name, consumer, batch=batch)
    await puller.start()
    builder = ChunkBuilder(
        entry.name,
        max_messages=options.chunk_max_messages,
        max_bytes=options.chunk_max_bytes,
        level=options.compression_level,
    )
    index = len(entry.parts)
    started = time.monotonic()

    storing: asyncio.Task[None] | None = None

    async def store(records: list[Record], size: int, index: int) -> None:
        name = chunk_name(backup_id, entry.name, index)
        blob, ref = await asyncio.to_thread(
            build_chunk, entry.name, records, size, name, options.compression_level
        )
        await target.put(name, blob)
        entry.parts.append(ref)
        entry.messages += ref.messages
        entry.data_bytes += ref.data_bytes
        entry.next_seq = ref.last_seq + 1
        await chunk_stored(ref.size)

    async def seal() -> None:
        # Compressing and storing a chunk overlaps with reading the next; one chunk at a time.
        nonlocal storing, index
        records, size = builder.take()
        if storing is not None:
            await storing
        storing = asyncio.create_task(store(records, size, index))
        index += 1

    try:
        reading = True
        while reading:
            deliveries = await puller.next_batch()
            if not deliveries:
                break  # nothing left to read: the rest of the range was removed meanwhile
            for subject, reply, data, headers in deliveries:
                seq, ts, pending = jsapi.ack_metadata(reply)
                if seq > entry.last_seq:
                    reading = False
                    break
                if builder.add(Record(seq, ts, subject.decode(), headers or None, data)):
                    await seal()
                if seq >= entry.last_seq or pending == 0:
                    reading = False
                    break
        if len(builder):
            await seal()
        if storing is not None:
            await storing
    finally:
        if storing is not None and not storing.done():
            storing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await storing
        await puller.stop()
        try:
            await jsapi.delete_consumer(nc, entry.name, consumer)
        except jsapi.JetStreamApiError as exc:
            log.warning("reader consumer not deleted; it expires by itself", extra={"error": str(exc)})
    entry.next_seq = entry.last_seq + 1
    log.info(
        "stream backed up",
        extra={
            "stream": entry.name,
            "messages": entry.messages,
            "parts": len(entry.parts),
            "seconds": round(time.monotonic() - started, 2),
        },
    )
