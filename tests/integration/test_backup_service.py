"""The backup service as a process: request/reply verbs, a backup killed half way and resumed by
the restarted service, verify, point-in-time restore, cancel, deadline, delete, events."""

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
