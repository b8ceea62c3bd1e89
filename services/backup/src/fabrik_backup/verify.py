"""Verify an archive: every part read back and checked against the manifest; `deep` also restores
it into a scratch nats-server and compares the result message by message."""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from fabrik_backup import jsapi
from fabrik_backup.archive.format import ArchiveError, decode_chunk
from fabrik_backup.compare import compare_stream
from fabrik_backup.engine import Report, load_manifest
from fabrik_backup.restore import restore
from fabrik_backup.targets.base import Target
from fabrik_common.natsserver import NatsServer


@dataclass(frozen=True)
class VerifyResult:
    backup_id: str
    parts: int
    messages: int
    stored_bytes: int
    deep: bool
    compared: int = 0


async def _nothing(_bytes: int, _parts: int) -> None:
    return None


async def verify(
    target: Target, backup_id: str, *, deep: bool = False, report: Report = _nothing
) -> VerifyResult:
    """Raises `ArchiveError` naming the first part that is missing, corrupted or inconsistent."""
    manifest = await load_manifest(target, backup_id)
    parts = 0
    stored = 0
    messages = 0
    for entry in manifest.streams:
        if sum(ref.messages for ref in entry.parts) != entry.messages:
            raise ArchiveError(
                f"{backup_id}/manifest.json: the parts of {entry.name} do not add up to its messages"
            )
        for ref in entry.parts:
            records = decode_chunk(ref, await target.get(ref.name), entry.name)
            messages += len(records)
            parts += 1
            stored += ref.size
            await report(stored, parts)
    compared = 0
    if deep:
        async with scratch_server() as server:
            nc = await jsapi.connect_raw(server.url, name="fabrik-backup-verify")
            try:
                await restore(nc, target, manifest, report=report)
                for entry in manifest.streams:
                    compared += await compare_stream(nc, target, manifest, entry)
            finally:
                await nc.close()
    return VerifyResult(backup_id, parts, messages, stored, deep, compared)


@contextlib.asynccontextmanager
async def scratch_server() -> AsyncIterator[NatsServer]:
    """A nats-server of its own in a temporary directory, stopped and removed on the way out —
    also when the verify is cancelled while the server starts. Starting is a thread that cannot
    be interrupted: leaving at once would remove the directory under a server still starting,
    leave it running, and keep the service from exiting until that thread gave up."""
    with tempfile.TemporaryDirectory(prefix="fabrik-verify-") as scratch:
        server = NatsServer(Path(scratch) / "nats")
        started = asyncio.ensure_future(asyncio.to_thread(server.start))
        try:
            await asyncio.shield(started)
            yield server
        finally:

            async def stop() -> None:
                with contextlib.suppress(Exception):
                    await started
                await asyncio.to_thread(server.stop)

            stopping = asyncio.ensure_future(stop())
            # The operation's stop repeats its cancel until the work ends: each may interrupt this
            # wait, never the stop itself.
            while not stopping.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.shield(stopping)
            stopping.result()
