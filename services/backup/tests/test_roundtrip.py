"""Back up a server with every kind of data, restore it into a fresh one, compare everything."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import nats
import pytest
from backup_fixtures import kv_contents, object_contents, populate, server_snapshot, stream_snapshot
from nats.js import api

from fabrik_backup import jsapi
from fabrik_backup.archive.format import ArchiveError
from fabrik_backup.engine import BackupOptions, run_backup
from fabrik_backup.restore import RestoreError, restore
from fabrik_backup.targets import DirectoryTarget
from fabrik_backup.verify import verify
from fabrik_common.natsserver import NatsServer
from fabrik_common.testing import NatsServerLike


async def test_round_trip_reproduces_every_stream_kv_and_object_store(
    nats_server: NatsServerLike, fresh_server: NatsServer, tmp_path: Path
) -> None:
    nc = await nats.connect(nats_server.url)
    await populate(nc)
    await nc.close()
    source = await jsapi.connect_raw(nats_server.url)
    dest = await jsapi.connect_raw(fresh_server.url)
    target = DirectoryTarget(tmp_path / "archives")
    try:
        manifest = await run_backup(source, target, "b1", BackupOptions(chunk_max_messages=64))
        assert {s.name for s in manifest.streams} >= {"DATA", "KV_settings", "OBJ_files", "RUNS", "KV_runs"}
        data = manifest.stream("DATA")
        assert (data.first_seq, data.last_seq, data.messages) == (1, 400, 395)
        assert len(data.parts) == 7  # 395 messages in chunks of 64
        assert [c.name for c in data.consumers] == ["halfway"]

        result = await restore(dest, target, manifest)
        assert sum(s.fillers for s in result.streams) > 0  # gaps were reproduced

        before = await server_snapshot(source)
        after = await server_snapshot(dest)
        assert set(after) == set(before)
        for name, snap in before.items():
            assert after[name].config == snap.config, name
            assert after[name].state == snap.state, name
            assert (after[name].count, after[name].digest) == (snap.count, snap.digest), name
            assert after[name].consumers == snap.consumers, name
        assert before["DATA"].consumers["halfway"][0] == 123  # 120 acked, 3 deleted below
        assert await kv_contents(fresh_server.url, "settings") == await kv_contents(
            nats_server.url, "settings"
        )
        assert await object_contents(fresh_server.url, "files") == await object_contents(
            nats_server.url, "files"
        )

        # Header blocks are restored byte for byte, repeated keys and case included.
        restored = await jsapi.request(dest, "$JS.API.STREAM.MSG.GET.DATA", {"seq": 4})
        original = await jsapi.request(source, "$JS.API.STREAM.MSG.GET.DATA", {"seq": 4})
        assert restored["message"]["hdrs"] == original["message"]["hdrs"]

        # Services carry on: the next KV revision and the next stream sequence continue the source.
        dnc = await nats.connect(fresh_server.url)
        snc = await nats.connect(nats_server.url)
        try:
            d_rev = await (await dnc.jetstream().key_value("settings")).put("alpha", b"next")
            s_rev = await (await snc.jetstream().key_value("settings")).put("alpha", b"next")
            assert d_rev == s_rev
            d_ack = await dnc.jetstream().publish("data.1", b"next")
            s_ack = await snc.jetstream().publish("data.1", b"next")
            assert d_ack.seq == s_ack.seq == 401
        finally:
            await dnc.close()
            await snc.close()

        # Streams written since the restore are not overwritten by another restore.
        with pytest.raises(RestoreError, match="exists with"):
            await restore(dest, target, manifest)
    finally:
        await source.close()
        await dest.close()


async def test_verify_names_the_corrupted_part_and_deep_verify_compares(
    nats_server: NatsServerLike, tmp_path: Path
) -> None:
    nc = await nats.connect(nats_server.url)
    await populate(nc)
    await nc.close()
    source = await jsapi.connect_raw(nats_server.url)
    target = DirectoryTarget(tmp_path / "archives")
    try:
        manifest = await run_backup(source, target, "b2", BackupOptions(chunk_max_messages=100))
    finally:
        await source.close()
    ok = await verify(target, "b2", deep=True)
    assert ok.parts == manifest.parts and ok.messages == manifest.messages
    assert ok.compared == manifest.messages

    victim = manifest.stream("DATA").parts[2].name
    path = tmp_path / "archives" / victim
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(ArchiveError, match=victim.replace(".", r"\.")):
        await verify(target, "b2")
    (tmp_path / "archives" / manifest.stream("KV_settings").parts[0].name).unlink()
    path.write_bytes(bytes(blob[: len(blob) // 2]))
    with pytest.raises(ArchiveError, match="size"):
        await verify(target, "b2")


async def test_restore_replaces_only_named_streams(
    nats_server: NatsServerLike, fresh_server: NatsServer, tmp_path: Path
) -> None:
    nc = await nats.connect(nats_server.url)
    await populate(nc)
    await nc.close()
    source = await jsapi.connect_raw(nats_server.url)
    dest = await jsapi.connect_raw(fresh_server.url)
    target = DirectoryTarget(tmp_path / "archives")
    try:
        manifest = await run_backup(source, target, "b3", BackupOptions(streams=["DATA", "KV_settings"]))
        assert [s.name for s in manifest.streams] == ["DATA", "KV_settings"]
        dnc = await nats.connect(fresh_server.url)
        await dnc.jetstream().add_stream(name="DATA", subjects=["data.>"])
        await dnc.jetstream().publish("data.x", b"local")
        await dnc.close()
        with pytest.raises(RestoreError, match="DATA exists with 1 messages"):
            await restore(dest, target, manifest, streams=["DATA"])
        await restore(dest, target, manifest, streams=["DATA"], replace=["DATA"])
        assert (await stream_snapshot(dest, "DATA")).digest == (await stream_snapshot(source, "DATA")).digest
    finally:
        await source.close()
        await dest.close()


async def test_restored_consumers_match_the_source_and_are_fast(
    nats_server: NatsServerLike, fresh_server: NatsServer, tmp_path: Path
) -> None:
    """Consumers of every acknowledgement kind come back at their ack floor with the same pending
    count and configuration — including one that may hold a single unacknowledged message (the
    scheduler's `max_ack_pending=1`), which must not cost a fetch timeout per message."""
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream(timeout=10.0)
    await js.add_stream(api.StreamConfig(name="USAGE", subjects=["usage.>"]))
    for i in range(600):
        await js.publish(f"usage.{'a' if i % 3 else 'b'}", str(i).encode())
    # name: (server configuration, messages taken and acknowledged before the backup)
    consumers: dict[str, tuple[dict[str, Any], int]] = {
        "one-at-a-time": ({"ack_policy": "explicit", "max_ack_pending": 1, "max_deliver": 10}, 250),
        "ack-all": ({"ack_policy": "all", "max_batch": 7}, 321),
        "no-ack": ({"ack_policy": "none"}, 90),
        "filtered": ({"ack_policy": "explicit", "filter_subject": "usage.b", "max_ack_pending": 5}, 40),
        "untouched": ({"ack_policy": "explicit"}, 0),
    }
    raw = await jsapi.connect_raw(nats_server.url)
    try:
        for name, (config, _count) in consumers.items():
            await jsapi.create_consumer(raw, "USAGE", {**config, "durable_name": name})
    finally:
        await raw.close()
    for name, (config, count) in consumers.items():
        psub = await js.pull_subscribe_bind(name, "USAGE")
        taken = 0
        while taken < count:
            batch = min(count - taken, 5, int(config.get("max_ack_pending", 5)))
            for msg in await psub.fetch(batch, timeout=5):
                taken += 1
                policy = config["ack_policy"]
                if policy == "explicit" or (policy == "all" and taken == count):
                    await msg.ack_sync()
        await psub.unsubscribe()
    await nc.close()

    source = await jsapi.connect_raw(nats_server.url)
    dest = await jsapi.connect_raw(fresh_server.url)
    target = DirectoryTarget(tmp_path / "archives")
    try:
        manifest = await run_backup(source, target, "c1", BackupOptions(streams=["USAGE"]))
        started = time.monotonic()
        await restore(dest, target, manifest)
        elapsed = time.monotonic() - started
        before = {c["name"]: c for c in await jsapi.consumers(source, "USAGE")}
        after = {c["name"]: c for c in await jsapi.consumers(dest, "USAGE")}
        assert set(after) == set(before) == set(consumers)
        for name, info in before.items():
            restored = after[name]
            for field in ("num_pending", "num_ack_pending", "num_waiting"):
                assert restored[field] == info[field], (name, field)
            assert restored["ack_floor"]["stream_seq"] == info["ack_floor"]["stream_seq"], name
            assert restored["delivered"]["stream_seq"] == info["delivered"]["stream_seq"], name
            assert {k: v for k, v in restored["config"].items() if k != "created"} == {
                k: v for k, v in info["config"].items() if k != "created"
            }, name
        assert before["one-at-a-time"]["ack_floor"]["stream_seq"] == 250
        assert before["filtered"]["num_pending"] == 200 - 40
        assert elapsed < 5, f"restoring five consumers took {elapsed:.1f} s"
        assert await stream_snapshot(dest, "USAGE") == await stream_snapshot(source, "USAGE")
    finally:
        await source.close()
        await dest.close()
