"""The backup service as a process: request/reply verbs, a backup killed half way and resumed by
the restarted service, verify, point-in-time restore, cancel, deadline, delete, events; a restore
into a fresh server killed half way and finished by the restarted service."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import msgspec
import nats
import pytest
from nats.aio.client import Client

from fabrik_backup import jsapi
from fabrik_backup.compare import read_stream, same_message
from fabrik_backup.engine import BackupOptions, run_backup
from fabrik_backup.targets import DirectoryTarget
from fabrik_common import backup_rpc as rpc
from fabrik_common.backup_rpc import (
    CancelRequest,
    CreateRequest,
    DeleteRequest,
    DeleteResponse,
    GetRequest,
    ListRequest,
    ListResponse,
    Operation,
    OperationResponse,
    PruneRequest,
    PruneResponse,
    RestoreRequest,
    RpcError,
    VerifyRequest,
)
from fabrik_common.natsserver import NatsServer
from fabrik_common.testing import NatsServerLike, ServiceProcess
from fabrik_common.topology import ensure_topology

R = TypeVar("R")
MESSAGES = 60_000


@pytest.fixture
def service_env(nats_server: NatsServerLike, tmp_path: Path) -> dict[str, str]:
    return {
        "FABRIK_NATS_URL": nats_server.url,
        "FABRIK_BACKUP_TARGET": f"dir://{tmp_path / 'archives'}",
        "FABRIK_INSTANCE_ID": "backup-1",
        "FABRIK_BACKUP_CHUNK_MESSAGES": "500",
        "FABRIK_BACKUP_HEARTBEAT_SECONDS": "0.2",
        "FABRIK_BACKUP_STALE_SECONDS": "1",
        "FABRIK_BACKUP_KEEP_LAST": "1",
        "FABRIK_SHUTDOWN_GRACE_SECONDS": "2",
        "FABRIK_LOG_LEVEL": "INFO",
    }


@pytest.fixture
def service(service_env: dict[str, str], tmp_path: Path) -> Iterator[ServiceProcess]:
    proc = ServiceProcess("fabrik_backup", service_env, log_path=tmp_path / "backup.log")
    proc.start()
    try:
        yield proc
    finally:
        if proc.proc is not None and proc.proc.poll() is None:
            proc.kill()


async def call(nc: Client, subject: str, request: msgspec.Struct, response: type[R]) -> R | RpcError:
    reply = await nc.request(subject, rpc.encode(request), timeout=20)
    return rpc.decode_response(reply.data, response)


async def operation(nc: Client, subject: str, request: msgspec.Struct) -> Operation:
    result = await call(nc, subject, request, OperationResponse)
    assert isinstance(result, OperationResponse), result
    return result.operation


async def finished(nc: Client, op_id: str, within: float = 30.0) -> Operation:
    deadline = time.monotonic() + within
    while True:
        op = await operation(nc, rpc.GET, GetRequest(operation_id=op_id))
        if op.state in rpc.TERMINAL_STATES:
            return op
        assert time.monotonic() < deadline, f"{op_id} still {op.state}"
        await asyncio.sleep(0.05)


async def fill(url: str) -> None:
    nc = await nats.connect(url)
    await ensure_topology(nc.jetstream())
    await nc.close()
    raw = await jsapi.connect_raw(url)
    try:
        await jsapi.create_stream(raw, {"name": "DATA", "subjects": ["data.>"], "storage": "file"})
        payload = os.urandom(500).hex().encode()
        for i in range(MESSAGES):
            if i % 1000 == 999:
                await raw.request(f"data.{i % 50}", payload, timeout=30)
            else:
                await raw.send_raw(f"data.{i % 50}", payload, b"NATS/1.0\r\nN: %d\r\n\r\n" % i, "")
        kv = await raw.jetstream().create_key_value(bucket="settings", history=3)
        for rev in range(5):
            await kv.put("k", str(rev).encode())
    finally:
        await raw.close()


async def test_backup_service_end_to_end(
    nats_server: NatsServerLike, service: ServiceProcess, service_env: dict[str, str], tmp_path: Path
) -> None:
    await fill(nats_server.url)
    nc = await nats.connect(nats_server.url)
    archives = tmp_path / "archives"
    try:
        # Invalid requests are answered with the field and the rule.
        bad = await call(nc, rpc.VERIFY, VerifyRequest(backup_id="nope"), OperationResponse)
        assert isinstance(bad, RpcError) and bad.status == 404 and bad.field == "backup_id"
        bad = await call(nc, rpc.RESTORE, RestoreRequest(), OperationResponse)
        assert isinstance(bad, RpcError) and bad.status == 400

        # A backup killed half way (SIGKILL) is resumed by the restarted service and completes.
        op = await operation(nc, rpc.CREATE, CreateRequest(backup_id="first", actor="ops"))
        chunks = archives / "first" / "streams" / "DATA"
        deadline = time.monotonic() + 30
        while len(list(chunks.glob("*.chunk.zst"))) < 10:
            assert time.monotonic() < deadline, "backup made no progress"
            await asyncio.sleep(0.005)
        assert service.proc is not None
        service.proc.send_signal(signal.SIGKILL)
        service.proc.wait(10)
        assert not (archives / "first" / "manifest.json").exists()
        first_chunk = chunks / "00000000.chunk.zst"
        first_chunk_mtime = first_chunk.stat().st_mtime_ns
        restarted = ServiceProcess("fabrik_backup", service_env, log_path=tmp_path / "backup-2.log")
        restarted.start()
        try:
            done = await finished(nc, op.operation_id)
            assert (done.state, done.attempts) == ("succeeded", 2), done
            messages = done.result["messages"]
            assert isinstance(messages, int) and messages >= MESSAGES
            assert first_chunk.stat().st_mtime_ns == first_chunk_mtime  # not written again

            # List shows it with its time; verify (plain and deep) succeeds and is recorded.
            listed = await call(nc, rpc.LIST, ListRequest(), ListResponse)
            assert isinstance(listed, ListResponse)
            assert [b.backup_id for b in listed.backups] == ["first"]
            verified = await finished(
                nc,
                (await operation(nc, rpc.VERIFY, VerifyRequest(backup_id="first", deep=True))).operation_id,
            )
            assert verified.state == "succeeded" and verified.result["compared"] == done.result["messages"]
            listed = await call(nc, rpc.LIST, ListRequest(), ListResponse)
            assert isinstance(listed, ListResponse) and listed.backups[0].verified_at is not None

            # Point in time: a second backup later; restoring "as of" between them picks the first.
            between = datetime.now(UTC)
            await asyncio.sleep(1.1)
            js = nc.jetstream()
            await js.publish("data.late", b"after the first backup")
            second = await finished(
                nc, (await operation(nc, rpc.CREATE, CreateRequest(backup_id="second"))).operation_id
            )
            assert second.state == "succeeded" and second.result["pruned"] == []
            # Retention (keep the last one) keeps "first" all the same: it is the last verified.
            plan = await call(nc, rpc.PRUNE, PruneRequest(), PruneResponse)
            assert isinstance(plan, PruneResponse)
            assert (plan.keep, plan.delete) == ({"second": ["last"], "first": ["last verified"]}, [])
            await js.purge_stream("DATA")
            restored = await finished(
                nc,
                (
                    await operation(
                        nc, rpc.RESTORE, RestoreRequest(at=between, streams=["DATA"], replace=["DATA"])
                    )
                ).operation_id,
            )
            assert (restored.state, restored.backup_id) == ("succeeded", "first"), restored
            info = await js.stream_info("DATA")
            assert (info.state.messages, info.state.last_seq) == (MESSAGES, MESSAGES)

            # Without replace, a stream with data is refused and the operation fails with the reason.
            refused = await finished(
                nc,
                (
                    await operation(nc, rpc.RESTORE, RestoreRequest(backup_id="second", streams=["DATA"]))
                ).operation_id,
            )
            assert refused.state == "failed" and "DATA exists" in refused.message

            # Deadline and cancel.
            late = await finished(
                nc, (await operation(nc, rpc.CREATE, CreateRequest(deadline_seconds=0.01))).operation_id
            )
            assert late.state == "failed" and "deadline exceeded" in late.message
            running = await operation(nc, rpc.VERIFY, VerifyRequest(backup_id="first", deep=True))
            cancelled = await operation(nc, rpc.CANCEL, CancelRequest(operation_id=running.operation_id))
            assert cancelled.state in ("cancelling", "cancelled")
            assert (await finished(nc, running.operation_id)).state == "cancelled"

            # Delete: gone from the list, its parts removed.
            deleted = await call(nc, rpc.DELETE, DeleteRequest(backup_id="second"), DeleteResponse)
            assert isinstance(deleted, DeleteResponse) and deleted.parts_deleted > 1
            assert not (archives / "second").exists() or not list((archives / "second").rglob("*.zst"))
            listed = await call(nc, rpc.LIST, ListRequest(), ListResponse)
            assert isinstance(listed, ListResponse)
            assert [b.backup_id for b in listed.backups] == ["first"]

            # Every transition is a backup.state_changed event on the OPS stream.
            psub = await js.subscribe(f"fabrik.backup.state_changed.{op.operation_id}", ordered_consumer=True)
            states = []
            while True:
                try:
                    msg = await psub.next_msg(timeout=1)
                except nats.errors.TimeoutError:
                    break
                states.append(msgspec.json.decode(msg.data)["state"])
            await psub.unsubscribe()
            assert states[0] == "requested" and states[-1] == "succeeded" and states.count("running") == 2
        finally:
            restarted.terminate(timeout=15)
    finally:
        await nc.close()


async def assert_same_streams(source: jsapi.RawClient, dest: jsapi.RawClient, names: list[str]) -> None:
    """Configuration, state, durable consumers and every message (sequence, subject, header block,
    payload) of `names` are the same on both servers; both are read with bulk pulls side by side."""
    for name in names:
        a, b = await jsapi.stream_info(source, name), await jsapi.stream_info(dest, name)
        assert a is not None and b is not None, name
        assert b["config"] == a["config"], name
        volatile = ("first_ts", "last_ts", "consumer_count")
        assert {k: v for k, v in b["state"].items() if k not in volatile} == {
            k: v for k, v in a["state"].items() if k not in volatile
        }, name
        consumers_a = {c["name"]: c for c in await jsapi.consumers(source, name)}
        consumers_b = {c["name"]: c for c in await jsapi.consumers(dest, name)}
        assert set(consumers_b) == set(consumers_a), name
        for consumer, info in consumers_a.items():
            restored = consumers_b[consumer]
            assert restored["ack_floor"]["stream_seq"] == info["ack_floor"]["stream_seq"], consumer
            assert restored["delivered"]["stream_seq"] == info["delivered"]["stream_seq"], consumer
            assert restored["num_pending"] == info["num_pending"], consumer
            assert restored["config"] == info["config"], consumer
        theirs = read_stream(dest, name)
        count = 0
        async for expected in read_stream(source, name):
            actual = await anext(theirs, None)
            assert actual is not None and same_message(expected, actual), (name, expected.seq)
            count += 1
        assert await anext(theirs, None) is None, name
        assert count == a["state"]["messages"], name


async def test_restore_killed_half_way_is_taken_over_and_exact(
    nats_server: NatsServerLike, service_env: dict[str, str], tmp_path: Path
) -> None:
    """Disaster recovery into a fresh server: the backup service is SIGKILLed while it restores,
    the restarted service takes the operation over (the interrupted stream is redone) and the
    result equals the source exactly, consumers' ack floors included."""
    await fill(nats_server.url)
    source = await jsapi.connect_raw(nats_server.url)
    try:
        await jsapi.create_consumer(
            source, "DATA", {"durable_name": "worker", "ack_policy": "explicit", "max_ack_pending": 1}
        )
        await jsapi.create_consumer(source, "DATA", {"durable_name": "idle", "ack_policy": "explicit"})
        psub = await source.jetstream().pull_subscribe_bind("worker", "DATA")
        for _ in range(25):
            for msg in await psub.fetch(1, timeout=5):
                await msg.ack_sync()
        await psub.unsubscribe()
        streams = ["DATA", "KV_settings"]
        await run_backup(
            source,
            DirectoryTarget(tmp_path / "archives"),
            "dr",
            BackupOptions(streams=streams, chunk_max_messages=500),
        )

        fresh = NatsServer(tmp_path / "fresh-nats")
        fresh.start()
        env = {**service_env, "FABRIK_NATS_URL": fresh.url}
        first = ServiceProcess("fabrik_backup", env, log_path=tmp_path / "restore-1.log")
        first.start()
        dest = await jsapi.connect_raw(fresh.url)
        nc = await nats.connect(fresh.url)
        restarted: ServiceProcess | None = None
        try:
            op = await operation(nc, rpc.RESTORE, RestoreRequest(backup_id="dr", actor="ops"))
            deadline = time.monotonic() + 30
            while True:
                info = await jsapi.stream_info(dest, "DATA")
                # Early in the stream, so that a slow poll on a loaded machine still kills it half way.
                if info is not None and info["state"]["messages"] >= 1000:
                    break
                assert time.monotonic() < deadline, "restore made no progress"
                await asyncio.sleep(0.002)
            assert first.proc is not None
            first.proc.send_signal(signal.SIGKILL)
            first.proc.wait(10)
            half = await jsapi.stream_info(dest, "DATA")
            assert half is not None and half["state"]["messages"] < MESSAGES, "killed too late"
            # The dead process left its operation running, to be taken over.
            entry = await (await nc.jetstream().key_value("backups")).get(f"op.{op.operation_id}")
            assert entry.value is not None
            assert msgspec.json.decode(entry.value, type=Operation).state == "running"

            # Another replica (a new pod's name) takes it over once its heartbeat is stale.
            restarted = ServiceProcess(
                "fabrik_backup",
                {**env, "FABRIK_INSTANCE_ID": "backup-2"},
                log_path=tmp_path / "restore-2.log",
            )
            restarted.start()
            done = await finished(nc, op.operation_id, within=90)
            assert (done.state, done.attempts) == ("succeeded", 2), done
            await assert_same_streams(source, dest, streams)
            kv = await nc.jetstream().key_value("settings")
            assert ((await kv.get("k")).value, (await kv.get("k")).revision) == (b"4", 5)
            listed = await call(nc, rpc.LIST, ListRequest(), ListResponse)
            assert isinstance(listed, ListResponse)
            assert all(o.state in rpc.TERMINAL_STATES for o in listed.operations), listed.operations
        finally:
            await nc.close()
            await dest.close()
            if restarted is not None:
                restarted.terminate(timeout=15)
            if first.proc is not None and first.proc.poll() is None:
                first.kill()
            fresh.stop()
    finally:
        await source.close()
