"""Shared by the backup tests: source data of every kind, and exact comparisons of two servers."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import nats
from nats.aio.client import Client
from nats.js import api
from nats.js.errors import KeyNotFoundError

from fabrik_backup import jsapi
from fabrik_backup.compare import read_stream, without_conditions
from fabrik_backup.jsapi import RawClient
from fabrik_common.topology import ensure_topology

VOLATILE_STATE = ("first_ts", "last_ts", "consumer_count")


@dataclass(frozen=True)
class StreamSnapshot:
    config: dict[str, Any]
    state: dict[str, Any]
    count: int
    digest: str
    consumers: dict[str, tuple[int, int, int]]


async def populate(nc: Client) -> None:
    """Fabrik's topology plus: a stream with headers (repeated keys too), gaps and a consumer half
    way through; a KV bucket with revisions, updates, deletes and a purge; an object store."""
    js = nc.jetstream(timeout=10.0)
    await ensure_topology(js)
    for i in range(30):
        await js.publish(
            f"fabrik.runs.requested.run{i % 4}",
            f'{{"n": {i}}}'.encode(),
            headers={"Nats-Msg-Id": f"evt-{i}", "Fabrik-Event-Type": "run.requested"},
        )
    await js.add_stream(api.StreamConfig(name="DATA", subjects=["data.>"], max_msgs_per_subject=50))
    raw = await jsapi.connect_raw(nc.connected_url.geturl() if nc.connected_url else "")
    try:
        inbox = raw.new_inbox()
        sub = await raw.subscribe(inbox + ".*")
        for i in range(400):
            headers = None
            if i % 3 == 0:
                headers = f"NATS/1.0\r\nX-Multi: a{i}\r\nX-Multi: b{i}\r\nx-lower: {i}\r\n\r\n".encode()
            await raw.publish_raw(f"data.{i % 9}", bytes([i % 256]) * (i % 50), headers, f"{inbox}.{i}")
            await sub.next_msg(timeout=5)
        await sub.unsubscribe()
    finally:
        await raw.close()
    for seq in (5, 6, 7, 200, 399):
        await js.delete_msg("DATA", seq)
    await js.add_consumer(
        "DATA", api.ConsumerConfig(durable_name="halfway", ack_policy=api.AckPolicy.EXPLICIT)
    )
    psub = await js.pull_subscribe_bind("halfway", "DATA")
    for msg in await psub.fetch(120, timeout=5):
        await msg.ack_sync()
    await psub.unsubscribe()
    kv = await js.create_key_value(api.KeyValueConfig(bucket="settings", history=4))
    for rev in range(8):
        for key in ("alpha", "beta", "gamma", "delta"):
            await kv.put(key, f"{key}-{rev}".encode())
    entry = await kv.get("alpha")
    assert entry.revision is not None
    await kv.update("alpha", b"alpha-updated", last=entry.revision)
    await kv.delete("beta")
    await kv.purge("gamma")
    await kv.put("epsilon", b"new")
    store = await js.create_object_store("files")
    await store.put("small.txt", b"hello")
    await store.put("big.bin", bytes(range(256)) * 2000)
    await store.put("gone.bin", b"x" * 1000)
    await store.delete("gone.bin")


async def stream_snapshot(nc: RawClient, name: str, last: int | None = None) -> StreamSnapshot:
    info = await jsapi.stream_info(nc, name)
    assert info is not None, name
    digest = hashlib.sha256()
    count = 0
    async for record in read_stream(nc, name, last=last):
        count += 1
        for part in (
            str(record.seq).encode(),
            record.subject.encode(),
            without_conditions(record.headers) or b"",
            record.data,
        ):
            digest.update(len(part).to_bytes(8, "big"))
            digest.update(part)
    consumers = {}
    for c in await jsapi.consumers(nc, name):
        if (c.get("config") or {}).get("durable_name"):
            consumers[c["name"]] = (
                int(c["ack_floor"]["stream_seq"]),
                int(c["delivered"]["stream_seq"]),
                int(c["num_pending"]),
            )
    state = {k: v for k, v in info["state"].items() if k not in VOLATILE_STATE}
    return StreamSnapshot(info["config"], state, count, digest.hexdigest(), consumers)


async def server_snapshot(nc: RawClient, exclude: tuple[str, ...] = ()) -> dict[str, StreamSnapshot]:
    return {
        name: await stream_snapshot(nc, name) for name in await jsapi.stream_names(nc) if name not in exclude
    }


async def kv_contents(url: str, bucket: str) -> dict[str, tuple[bytes | None, int, str | None]]:
    nc = await nats.connect(url)
    try:
        kv = await nc.jetstream().key_value(bucket)
        out: dict[str, tuple[bytes | None, int, str | None]] = {}
        for key in ("alpha", "beta", "gamma", "delta", "epsilon"):
            try:
                entry = await kv.get(key)
            except KeyNotFoundError as exc:
                out[key] = (None, 0, type(exc).__name__)
                continue
            out[key] = (entry.value, int(entry.revision or 0), entry.operation)
        return out
    finally:
        await nc.close()


async def object_contents(url: str, bucket: str) -> dict[str, bytes]:
    nc = await nats.connect(url)
    try:
        store = await nc.jetstream().object_store(bucket)
        out = {}
        for info in await store.list(ignore_deletes=True):
            result = await store.get(info.name)
            out[info.name] = result.data or b""
        return out
    finally:
        await nc.close()


async def assert_same_servers(source: RawClient, dest: RawClient) -> int:
    """Every stream of `source` is on `dest` with the same configuration, state, durable consumers
    (ack floor, delivered, pending) and messages — sequence, subject, header block and payload,
    byte for byte. Both servers are read side by side with bulk pulls, so a difference names its
    stream and sequence. Returns the number of messages compared."""
    names = await jsapi.stream_names(source)
    assert sorted(await jsapi.stream_names(dest)) == sorted(names)
    compared = 0
    for name in names:
        a, b = await jsapi.stream_info(source, name), await jsapi.stream_info(dest, name)
        assert a is not None and b is not None, name
        assert b["config"] == a["config"], name
        assert {k: v for k, v in b["state"].items() if k not in VOLATILE_STATE} == {
            k: v for k, v in a["state"].items() if k not in VOLATILE_STATE
        }, name
        consumers = [
            {
                c["name"]: (
                    c["config"],
                    c["ack_floor"]["stream_seq"],
                    c["delivered"]["stream_seq"],
                    c["num_pending"],
                )
                for c in await jsapi.consumers(client, name)
                if (c.get("config") or {}).get("durable_name")
            }
            for client in (source, dest)
        ]
        assert consumers[1] == consumers[0], name
        restored = read_stream(dest, name)
        async for expected in read_stream(source, name):
            actual = await anext(restored, None)
            assert actual is not None, f"{name}: restored stream ends before {expected.seq}"
            assert (actual.seq, actual.subject, actual.data) == (
                expected.seq,
                expected.subject,
                expected.data,
            )
            assert without_conditions(actual.headers) == without_conditions(expected.headers), actual.seq
            compared += 1
        assert await anext(restored, None) is None, f"{name}: restored stream has more messages"
    return compared
