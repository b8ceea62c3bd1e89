"""Reading a stream back and comparing it with an archive, message by message (deep verify)."""

from __future__ import annotations

import secrets
from collections.abc import AsyncGenerator, AsyncIterator

from fabrik_backup import jsapi
from fabrik_backup.archive.format import ArchiveError, Manifest, Record, StreamEntry, decode_chunk
from fabrik_backup.jsapi import RawClient
from fabrik_backup.targets.base import Target


async def read_stream(
    nc: RawClient, stream: str, *, start: int = 1, last: int | None = None
) -> AsyncGenerator[Record, None]:
    """Every message of `stream` from `start` (to `last`), in order, through an ephemeral reader."""
    info = await jsapi.stream_info(nc, stream)
    if info is None:
        raise ArchiveError(f"stream {stream} does not exist")
    state = info.get("state") or {}
    if int(state.get("messages", 0)) == 0:
        return
    last = int(state["last_seq"]) if last is None else last
    consumer = f"fabrik-read-{secrets.token_hex(6)}"
    await jsapi.create_consumer(
        nc,
        stream,
        {
            "name": consumer,
            "deliver_policy": "by_start_sequence",
            "opt_start_seq": max(start, 1),
            "ack_policy": "none",
            "inactive_threshold": 60_000_000_000,
            "mem_storage": True,
            "num_replicas": 1,
        },
    )
    puller = jsapi.Puller(nc, stream, consumer, batch=1000)
    await puller.start()
    try:
        while True:
            deliveries = await puller.next_batch()
            if not deliveries:
                return
            for subject, reply, data, headers in deliveries:
                seq, ts, pending = jsapi.ack_metadata(reply)
                if seq > last:
                    return
                yield Record(seq, ts, subject.decode(), headers or None, data)
                if seq >= last or pending == 0:
                    return
    finally:
        await puller.stop()
        await jsapi.delete_consumer(nc, stream, consumer)


async def archive_records(target: Target, entry: StreamEntry) -> AsyncIterator[Record]:
    for ref in entry.parts:
        for record in decode_chunk(ref, await target.get(ref.name), entry.name):
            yield record


def without_conditions(raw: bytes | None) -> bytes | None:
    """A header block without its publish-time condition lines (`Nats-Expected-*`)."""
    if not raw or b"nats-expected-" not in raw.lower():
        return raw or None
    lines = [line for line in raw.split(b"\r\n") if not line.lower().startswith(b"nats-expected-")]
    return b"\r\n".join(lines)


def same_message(a: Record, b: Record) -> bool:
    """Equal as a restore reproduces them: sequence, subject, payload and headers (conditions aside)."""
    return (
        a.seq == b.seq
        and a.subject == b.subject
        and a.data == b.data
        and without_conditions(a.headers) == without_conditions(b.headers)
    )


async def compare_stream(nc: RawClient, target: Target, manifest: Manifest, entry: StreamEntry) -> int:
    """Compare the server's copy of `entry` with the archive — state, configuration, durable
    consumers' ack floors, then every message; raises `ArchiveError` at the first difference.
    Returns the number of messages compared."""
    info = await jsapi.stream_info(nc, entry.name)
    if info is None:
        raise ArchiveError(f"{manifest.backup_id}: stream {entry.name} was not restored")
    state = info.get("state") or {}
    if int(state.get("last_seq", 0)) != entry.last_seq or int(state.get("messages", 0)) != entry.messages:
        raise ArchiveError(
            f"{entry.name}: restored last sequence {state.get('last_seq')} "
            f"with {state.get('messages')} messages, "
            f"archive has {entry.last_seq} with {entry.messages}"
        )
    config = info.get("config") or {}
    for key, value in entry.config.items():
        if key in ("metadata", "first_seq", "mirror", "sources"):
            continue
        if config.get(key) != value:
            raise ArchiveError(
                f"{entry.name}: restored configuration has {key}={config.get(key)!r}, archive {value!r}"
            )
    restored = {c["name"]: c for c in await jsapi.consumers(nc, entry.name)}
    for consumer in entry.consumers:
        found = restored.get(consumer.name)
        if found is None:
            raise ArchiveError(f"{entry.name}: consumer {consumer.name} was not restored")
        floor = int((found.get("ack_floor") or {}).get("stream_seq", 0))
        if floor != consumer.ack_floor_stream_seq:
            raise ArchiveError(
                f"{entry.name}: consumer {consumer.name} has ack floor {floor}, "
                f"archive {consumer.ack_floor_stream_seq}"
            )
    server = read_stream(nc, entry.name)
    count = 0
    async for expected in archive_records(target, entry):
        actual = await anext(server, None)
        if actual is None:
            raise ArchiveError(f"{entry.name}: restored stream ends before sequence {expected.seq}")
        if not same_message(expected, actual):
            raise ArchiveError(
                f"{entry.name}: sequence {expected.seq} differs (restored: sequence {actual.seq}, "
                f"subject {actual.subject})"
            )
        count += 1
    extra = await anext(server, None)
    if extra is not None:
        raise ArchiveError(f"{entry.name}: restored stream has an extra message at sequence {extra.seq}")
    await server.aclose()
    return count
