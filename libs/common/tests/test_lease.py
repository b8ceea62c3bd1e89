"""Leader election over the `leases` KV bucket of a real NATS server."""

from __future__ import annotations

import asyncio
import time

from fabrik_common.bus import Context, Router
from fabrik_common.events import RunProgress
from fabrik_common.ids import new_ulid
from fabrik_common.service import Service
from fabrik_common.settings import CommonSettings


def candidate(name: str, url: str, handled: list[tuple[str, int]] | None = None) -> Service[None]:
    router = Router()

    @router.subscriber("fabrik.runs.progress.*", durable="leader-only")
    async def handle(event: RunProgress, ctx: Context[None]) -> None:
        if handled is not None:
            handled.append((name, event.finished or 0))

    settings = CommonSettings(nats_url=url, http_port=0, instance_id=name, log_format="text")
    return Service("elected", settings, routers=[router], leader_lease="elected", lease_ttl=3.0)


async def wait_until(predicate: object, timeout: float) -> float:
    assert callable(predicate)
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def test_one_leader_and_clean_handover(nats_url: str) -> None:
    a, b = candidate("a", nats_url), candidate("b", nats_url)
    await a.start()
    await wait_until(lambda: a.is_leader, 5)
    await b.start()
    await asyncio.sleep(1.0)
    assert a.is_leader
    assert not b.is_leader
    await a.stop()
    # A clean stop releases the lease: the standby takes over well before the ttl.
    took = await wait_until(lambda: b.is_leader, 5)
    assert took < 2.5
    await b.stop()


async def test_standby_takes_over_after_leader_crash_and_only_the_leader_consumes(nats_url: str) -> None:
    handled: list[tuple[str, int]] = []
    a, b = candidate("a", nats_url, handled), candidate("b", nats_url, handled)
    await a.start()
    await wait_until(lambda: a.is_leader, 5)
    await b.start()
    publisher = candidate("publisher", nats_url)
    await publisher.bus.connect()
    run_id = new_ulid()
    for i in range(20):
        await publisher.bus.publish(RunProgress(run_id=run_id, attempt=1, finished=i))
    await wait_until(lambda: len(handled) == 20, 10)
    assert {name for name, _ in handled} == {"a"}

    # Crash: the leader's process vanishes without releasing its lease.
    assert a._campaign is not None
    a._campaign.cancel()
    await a.bus.nc.close()
    crashed_at = time.monotonic()
    await wait_until(lambda: b.is_leader, 10)
    assert time.monotonic() - crashed_at < 10
    for i in range(20, 30):
        await publisher.bus.publish(RunProgress(run_id=run_id, attempt=1, finished=i))
    await wait_until(lambda: len(handled) == 30, 10)
    assert {name for name, n in handled if n >= 20} == {"b"}
    await b.stop()
    await publisher.bus.close()
    await a.http.stop()


async def test_cancel_all_ends_a_task_that_swallows_one_cancellation() -> None:
    from fabrik_common.aio import cancel_all

    swallowed = 0

    async def stubborn() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                swallowed += 1
                if swallowed > 1:
                    raise

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    await asyncio.wait_for(cancel_all([task], patience=0.1), 5)
    assert task.cancelled()
    assert swallowed == 2
