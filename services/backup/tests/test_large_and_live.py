"""A round trip with a million-message stream, a backup taken while publishers keep writing, and
interrupted backups and restores."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import nats
import pytest
from backup_fixtures import (
    assert_same_servers,
    kv_contents,
    object_contents,
    populate,
    stream_snapshot,
)

from fabrik_backup import jsapi
from fabrik_backup.archive.format import PROGRESS
from fabrik_backup.engine import BackupOptions, run_backup
from fabrik_backup.restore import restore
from fabrik_backup.targets import DirectoryTarget
from fabrik_common.natsserver import NatsServer
from fabrik_common.testing import NatsServerLike

LARGE = 1_000_000


async def fill(url: str, stream: str, count: int, size: int) -> None:
    """Publish `count` messages fast: without acks, except one request per thousand that waits
    until the server has stored everything before it."""
    nc = await jsapi.connect_raw(url)
    try:
        await jsapi.create_stream(
            nc, {"name": stream, "subjects": [f"{stream.lower()}.>"], "storage": "file"}
        )
        # Every payload differs (its index first), so a message restored out of place shows.
        padding = b"e" * max(size - 10, 0)
        prefix = stream.lower()
        for i in range(count):
            payload = b"%010d%s" % (i, padding)
            if i % 1000 == 999 or i == count - 1:
                await nc.request(f"{prefix}.{i % 100}", payload, timeout=30)
            else:
                await nc.send_raw(f"{prefix}.{i % 100}", payload, None, "")
        info = await jsapi.stream_info(nc, stream)
        assert info is not None and info["state"]["messages"] == count
    finally:
        await nc.close()


async def test_million_message_round_trip(
    nats_server: NatsServerLike, fresh_server: NatsServer, tmp_path: Path
) -> None:
    """Streams, KV buckets and an object store, one stream of a million messages among them:
    backed up, restored into a fresh server, and compared with the source byte for byte."""
    nc = await nats.connect(nats_server.url)
    await populate(nc)
    await nc.close()
    started = time.monotonic()
    await fill(nats_server.url, "BIG", LARGE, 100)
    filled = time.monotonic() - started
    source = await jsapi.connect_raw(nats_server.url)
    dest = await jsapi.connect_raw(fresh_server.url)
    target = DirectoryTarget(tmp_path / "archives")
    try:
        started = time.monotonic()
        manifest = await run_backup(source, target, "big", BackupOptions())
        backed_up = time.monotonic() - started
        big = manifest.stream("BIG")
        assert (big.messages, big.last_seq, len(big.parts)) == (LARGE, LARGE, LARGE // 20_000)
        assert {"DATA", "KV_settings", "OBJ_files", "RUNS"} <= {s.name for s in manifest.streams}
        started = time.monotonic()
        await restore(dest, target, manifest)
        restored = time.monotonic() - started
        started = time.monotonic()
        compared = await assert_same_servers(source, dest)
        assert compared == manifest.messages > LARGE
        assert await kv_contents(fresh_server.url, "settings") == await kv_contents(
            nats_server.url, "settings"
        )
        assert await object_contents(fresh_server.url, "files") == await object_contents(
            nats_server.url, "files"
        )
        checked = time.monotonic() - started
        print(
            f"{LARGE:,} messages: fill {filled:.1f} s, backup {backed_up:.1f} s, "
            f"restore {restored:.1f} s, compare {checked:.1f} s"
        )
    finally:
        await source.close()
        await dest.close()


async def test_backup_while_publishers_write(
    nats_server: NatsServerLike, fresh_server: NatsServer, tmp_path: Path
) -> None:
    await fill(nats_server.url, "LIVE", 20_000, 100)
    stop = asyncio.Event()
    published = 0

    async def publisher() -> None:
        nonlocal published
        nc = await nats.connect(nats_server.url)
        js = nc.jetstream()
        try:
            while not stop.is_set():
                await js.publish(
                    f"live.{published % 7}", f"late-{published}".encode(), headers={"N": str(published)}
                )
                published += 1
        finally:
            await nc.close()

    writers = [asyncio.create_task(publisher()) for _ in range(2)]
    await asyncio.sleep(0.2)
    source = await jsapi.connect_raw(nats_server.url)
    dest = await jsapi.connect_raw(fresh_server.url)
    target = DirectoryTarget(tmp_path / "archives")
    try:
        manifest = await run_backup(
            source, target, "live", BackupOptions(streams=["LIVE"], chunk_max_messages=1000)
        )
        await asyncio.sleep(0.2)
        stop.set()
        await asyncio.gather(*writers)
        entry = manifest.stream("LIVE")
        source_state = (await jsapi.stream_info(source, "LIVE")) or {}
        assert int(source_state["state"]["last_seq"]) > entry.last_seq > 20_000  # writes went on throughout
        await restore(dest, target, manifest)
        expected = await stream_snapshot(source, "LIVE", last=entry.last_seq)
        actual = await stream_snapshot(dest, "LIVE")
        assert (
            (actual.count, actual.digest)
            == (expected.count, expected.digest)
            == (entry.messages, actual.digest)
        )
        assert actual.state["last_seq"] == entry.last_seq
    finally:
        stop.set()
        await source.close()
        await dest.close()


class FlakyTarget(DirectoryTarget):
    """Fails (as a dying process would stop) after `limit` chunk writes."""

    def __init__(self, root: Path, limit: int) -> None:
        super().__init__(root)
        self.limit = limit
        self.chunks = 0

    async def put(self, name: str, data: bytes) -> None:
        if name.endswith(".chunk.zst"):
            self.chunks += 1
            if self.chunks > self.limit:
                raise ConnectionError("target went away")
        await super().put(name, data)


async def test_interrupted_backup_resumes_from_its_last_chunk(
    nats_server: NatsServerLike, fresh_server: NatsServer, tmp_path: Path
) -> None:
    await fill(nats_server.url, "RESUME", 10_000, 100)
    source = await jsapi.connect_raw(nats_server.url)
    dest = await jsapi.connect_raw(fresh_server.url)
    options = BackupOptions(streams=["RESUME"], chunk_max_messages=1000)
    try:
        flaky = FlakyTarget(tmp_path / "archives", limit=4)
        with pytest.raises(ConnectionError):
            await run_backup(source, flaky, "r1", options)
        assert f"r1/{PROGRESS}" in await flaky.list("r1/")

        # Cancelled half way (a task cancelled, as on shutdown): resumes as well.
        slow = FlakyTarget(tmp_path / "archives", limit=10**6)
        task = asyncio.create_task(run_backup(source, slow, "r1", options))
        while slow.chunks < 2:
            await asyncio.sleep(0.001)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

        # More messages arrive; the resumed backup still ends at the sequence captured first.
        nc = await nats.connect(nats_server.url)
        for i in range(50):
            await nc.jetstream().publish("resume.late", str(i).encode())
        await nc.close()

        target = DirectoryTarget(tmp_path / "archives")
        written_before = len(await target.list("r1/streams/"))
        manifest = await run_backup(source, target, "r1", options)
        assert written_before >= 4
        entry = manifest.stream("RESUME")
        assert (entry.last_seq, entry.messages, len(entry.parts)) == (10_000, 10_000, 10)
        assert f"r1/{PROGRESS}" not in await target.list("r1/")
        await restore(dest, target, manifest)
        expected = await stream_snapshot(source, "RESUME", last=10_000)
        actual = await stream_snapshot(dest, "RESUME")
        assert (actual.count, actual.digest) == (expected.count, expected.digest)
    finally:
        await source.close()
        await dest.close()


class FailingReads(DirectoryTarget):
    """Reads fail (the restoring process stops) after `limit` chunk reads."""

    def __init__(self, root: Path, limit: int) -> None:
        super().__init__(root)
        self.limit = limit
        self.reads = 0

    async def get(self, name: str) -> bytes:
        if name.endswith(".chunk.zst"):
            self.reads += 1
            if self.reads > self.limit:
                raise ConnectionError("target went away")
        return await super().get(name)


async def test_interrupted_restore_is_retried_to_completion(
    nats_server: NatsServerLike, fresh_server: NatsServer, tmp_path: Path
) -> None:
    await fill(nats_server.url, "ONE", 3000, 50)
    await fill(nats_server.url, "TWO", 3000, 50)
    source = await jsapi.connect_raw(nats_server.url)
    dest = await jsapi.connect_raw(fresh_server.url)
    options = BackupOptions(streams=["ONE", "TWO"], chunk_max_messages=500)
    try:
        manifest = await run_backup(source, DirectoryTarget(tmp_path / "a"), "r", options)
        with pytest.raises(ConnectionError):
            await restore(dest, FailingReads(tmp_path / "a", limit=8), manifest)  # ONE done, TWO half
        await dest.flush()
        half = await jsapi.stream_info(dest, "TWO")
        assert half is not None and 0 < half["state"]["messages"] < 3000
        result = await restore(dest, DirectoryTarget(tmp_path / "a"), manifest)
        assert [(s.name, s.skipped) for s in result.streams] == [("ONE", True), ("TWO", False)]
        for name in ("ONE", "TWO"):
            expected = await stream_snapshot(source, name)
            actual = await stream_snapshot(dest, name)
            assert (actual.count, actual.digest, actual.state, actual.config) == (
                expected.count,
                expected.digest,
                expected.state,
                expected.config,
            )
    finally:
        await source.close()
        await dest.close()
