"""Operations: state machine, deadline, cancel, take-over of abandoned work (real KV bucket)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import nats
import pytest
from nats.aio.client import Client

from fabrik_backup.operations import Operations, OperationStore, Timing, Worker
from fabrik_common.backup_rpc import Operation
from fabrik_common.events import BackupStateChanged, Event
from fabrik_common.testing import NatsServerLike
from fabrik_common.topology import ensure_topology

FAST = Timing(heartbeat_seconds=0.05, stale_seconds=0.5, reap_seconds=0.05)


@pytest.fixture
async def nc(nats_server: NatsServerLike) -> AsyncIterator[Client]:
    client = await nats.connect(nats_server.url)
    await ensure_topology(client.jetstream())
    yield client
    await client.close()


async def make_ops(
    nc: Client, workers: dict[Any, Worker], instance: str = "a"
) -> tuple[Operations, list[Event]]:
    events: list[Event] = []

    async def publish(event: Event) -> None:
        events.append(event)

    store = OperationStore(await nc.jetstream().key_value("backups"))
    return Operations(
        store, workers, instance=instance, target="dir:///x", publish=publish, timing=FAST
    ), events


async def wait_state(ops: Operations, op_id: str, states: set[str], within: float = 5.0) -> Operation:
    deadline = asyncio.get_running_loop().time() + within
    while True:
        op, _ = await ops.store.get(op_id)
        if op.state in states:
            return op
        assert asyncio.get_running_loop().time() < deadline, f"still {op.state}"
        await asyncio.sleep(0.02)


def sleeper(started: asyncio.Event, cancelled: asyncio.Event) -> Worker:
    async def work(_op: Operation, _report: Callable[[int, int], Awaitable[None]]) -> dict[str, Any]:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return {}

    return work


async def test_succeeds_with_progress_and_events(nc: Client) -> None:
    async def work(_op: Operation, report: Callable[[int, int], Awaitable[None]]) -> dict[str, Any]:
        await report(100, 1)
        await asyncio.sleep(0.15)
        await report(250, 2)
        return {"messages": 7}

    ops, events = await make_ops(nc, {"backup": work})
    op = await ops.submit("backup", "b1", deadline_seconds=30)
    assert op.state == "requested"
    done = await wait_state(ops, op.operation_id, {"succeeded", "failed"})
    assert (done.state, done.result, done.bytes_done, done.parts_done) == (
        "succeeded",
        {"messages": 7},
        250,
        2,
    )
    assert done.finished_at is not None and done.owner == "a" and done.attempts == 1
    states = [e.state for e in events if isinstance(e, BackupStateChanged)]
    assert states == ["requested", "running", "succeeded"]


async def test_deadline_fails_the_operation_and_stops_the_work(nc: Client) -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()
    ops, _ = await make_ops(nc, {"backup": sleeper(started, cancelled)})
    op = await ops.submit("backup", "b1", deadline_seconds=0.3)
    done = await wait_state(ops, op.operation_id, {"succeeded", "failed", "cancelled"})
    assert done.state == "failed" and "deadline exceeded" in done.message
    assert started.is_set() and cancelled.is_set()


async def test_cancel_stops_the_work(nc: Client) -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()
    ops, events = await make_ops(nc, {"restore": sleeper(started, cancelled)})
    op = await ops.submit("restore", "b1", deadline_seconds=30)
    await asyncio.wait_for(started.wait(), 5)
    after = await ops.cancel(op.operation_id)
    assert after.state == "cancelling"
    done = await wait_state(ops, op.operation_id, {"succeeded", "failed", "cancelled"})
    assert done.state == "cancelled" and cancelled.is_set()
    assert (await ops.cancel(op.operation_id)).state == "cancelled"  # cancelling again changes nothing
    assert [e.state for e in events if isinstance(e, BackupStateChanged)][-2:] == ["cancelling", "cancelled"]


async def test_cancel_through_another_replica(nc: Client) -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()
    owner, _ = await make_ops(nc, {"verify": sleeper(started, cancelled)}, instance="a")
    other, _ = await make_ops(nc, {}, instance="b")
    op = await owner.submit("verify", "b1", deadline_seconds=30)
    await asyncio.wait_for(started.wait(), 5)
    assert (await other.cancel(op.operation_id)).state == "cancelling"
    done = await wait_state(owner, op.operation_id, {"succeeded", "failed", "cancelled"})
    assert done.state == "cancelled" and cancelled.is_set()


async def test_abandoned_operation_is_taken_over_or_failed(nc: Client) -> None:
    runs: list[str] = []

    async def work(op: Operation, _report: Callable[[int, int], Awaitable[None]]) -> dict[str, Any]:
        runs.append(op.operation_id)
        return {"resumed": True}

    ops, _ = await make_ops(nc, {"backup": work}, instance="b")
    now = datetime.now(UTC)
    abandoned = Operation(
        operation_id="op-abandoned",
        operation="backup",
        state="running",
        backup_id="b9",
        target="dir:///x",
        requested_at=now - timedelta(seconds=60),
        started_at=now - timedelta(seconds=60),
        heartbeat_at=now - timedelta(seconds=30),
        owner="a-dead",
        attempts=1,
        deadline=now + timedelta(seconds=60),
    )
    expired = msgspec.structs.replace(
        abandoned, operation_id="op-expired", deadline=now - timedelta(seconds=1)
    )
    alive = msgspec.structs.replace(abandoned, operation_id="op-alive", heartbeat_at=now, owner="c")
    for record in (abandoned, expired, alive):
        await ops.store.create(record)
    await ops.reap_once()
    taken = await wait_state(ops, "op-abandoned", {"succeeded", "failed"})
    assert (taken.state, taken.owner, taken.attempts, taken.result) == (
        "succeeded",
        "b",
        2,
        {"resumed": True},
    )
    failed = await wait_state(ops, "op-expired", {"failed"})
    assert "deadline exceeded" in failed.message
    assert (await ops.store.get("op-alive"))[0].state == "running"  # its owner is alive
    assert runs == ["op-abandoned"]
