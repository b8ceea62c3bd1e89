"""The bus under replicas, server restarts and shutdowns, against a real NATS server and real processes."""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from fabrik_common.bus import Context, Router
from fabrik_common.events import RunProgress
from fabrik_common.ids import new_ulid
from fabrik_common.natsserver import NatsServer
from fabrik_common.service import Service
from fabrik_common.settings import CommonSettings
from fabrik_common.testing import ServiceProcess, running_service

SUPPORT = Path(__file__).parent / "support"


@dataclass
class Replica:
    name: str
    handled: list[str] = field(default_factory=list)


def replica_service(name: str, url: str, router: Router) -> Service[Replica]:
    async def on_start(service: Service[Replica]) -> Replica:
        return Replica(name)

    settings = CommonSettings(nats_url=url, http_port=0, instance_id=name, log_format="text")
    return Service("replicated", settings, routers=[router], on_start=on_start)


def recording_router() -> Router:
    router = Router()

    @router.subscriber("fabrik.runs.progress.*", durable="replicated-progress", batch=64)
    async def handle(event: RunProgress, ctx: Context[Replica]) -> None:
        ctx.state.handled.append(event.event_id)

    return router


async def wait_for(predicate: object, timeout: float) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


async def test_two_replicas_share_a_durable_consumer_exactly_once(nats_url: str) -> None:
    router = recording_router()
    a = replica_service("a", nats_url, router)
    b = replica_service("b", nats_url, router)
    async with running_service(a), running_service(b):
        run_id = new_ulid()
        events = [RunProgress(run_id=run_id, attempt=1, finished=i, total=10_000) for i in range(10_000)]
        # Publish concurrently in bounded waves; each publish waits for its JetStream ack.
        for start in range(0, len(events), 500):
            await asyncio.gather(*(a.bus.publish(e) for e in events[start : start + 500]))

        def total() -> int:
            return len(a.state.handled) + len(b.state.handled)

        await wait_for(lambda: total() >= 10_000, timeout=120)
        await asyncio.sleep(0.5)
        counts = Counter(a.state.handled + b.state.handled)
        assert len(counts) == 10_000
        assert set(counts) == {e.event_id for e in events}
        assert max(counts.values()) == 1
        # Both replicas took part: the work was shared, not merely failed over.
        assert a.state.handled and b.state.handled


async def test_service_survives_a_nats_restart_mid_stream(tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "nats")
    server.start()
    try:
        router = recording_router()
        consumer = replica_service("consumer", server.url, router)
        publisher = replica_service("publisher", server.url, Router())
        async with running_service(consumer), running_service(publisher):
            run_id = new_ulid()
            acknowledged: list[str] = []

            async def publish_all() -> None:
                for i in range(1500):
                    event = RunProgress(run_id=run_id, attempt=1, finished=i, total=1500)
                    await publisher.bus.publish(event)
                    acknowledged.append(event.event_id)
                    await asyncio.sleep(0.002)

            publishing = asyncio.create_task(publish_all())
            await wait_for(lambda: len(acknowledged) >= 300, timeout=30)
            await asyncio.to_thread(server.restart)
            await publishing
            assert len(acknowledged) == 1500

            await wait_for(lambda: set(acknowledged) <= set(consumer.state.handled), timeout=60)
            assert consumer.metrics.registry.get_sample_value("fabrik_nats_reconnects_total") >= 1
            assert publisher.bus.connected and consumer.bus.connected
    finally:
        server.stop()


async def test_sigterm_mid_batch_loses_nothing(nats_url: str, tmp_path: Path) -> None:
    output = tmp_path / "handled.txt"
    output.touch()
    env = {
        "FABRIK_NATS_URL": nats_url,
        "FABRIK_TEST_OUTPUT": str(output),
        "FABRIK_TEST_HANDLER_DELAY": "0.02",
        "FABRIK_LOG_FORMAT": "text",
        "PYTHONPATH": os.pathsep.join([str(SUPPORT), os.environ.get("PYTHONPATH", "")]),
    }
    first = ServiceProcess("recording_consumer", env, log_path=tmp_path / "first.log").start()
    try:
        router = Router()
        publisher = replica_service("publisher", nats_url, router)
        async with running_service(publisher):
            run_id = new_ulid()
            events = [RunProgress(run_id=run_id, attempt=1, finished=i, total=600) for i in range(600)]
            await asyncio.gather(*(publisher.bus.publish(e) for e in events))

            def lines() -> list[str]:
                return output.read_text().split("\n")[:-1]

            await wait_for(lambda: len(lines()) >= 100, timeout=30)
            # Mid-batch: a batch of 64 takes ~1.3 s at 20 ms per message.
            code = await asyncio.to_thread(first.terminate, 30)
            assert code == 0
            handled_by_first = len(lines())
            assert handled_by_first < 600

            # A new replica picks up the rest at once: returned messages are not waiting for
            # the 30 s ack_wait to expire.
            started = time.monotonic()
            fast_env = {**env, "FABRIK_TEST_HANDLER_DELAY": "0.001"}
            second = ServiceProcess("recording_consumer", fast_env, log_path=tmp_path / "second.log").start()
            try:
                await wait_for(lambda: len(lines()) >= 600, timeout=25)
                assert time.monotonic() - started < 25
                await asyncio.sleep(0.5)
            finally:
                second.kill()
            ids = Counter(line.split()[0] for line in lines())
            assert set(ids) == {e.event_id for e in events}
            assert max(ids.values()) == 1, "a message was handled twice"
    finally:
        first.kill()
