"""Loading every run record on election, against a real NATS server."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec
from prometheus_client import CollectorRegistry

from fabrik_common.bus import Bus, BusOptions
from fabrik_common.events import Resources, RunParameters
from fabrik_common.ids import new_ulid
from fabrik_common.metrics import BusMetrics
from fabrik_common.runs import RunRecord
from fabrik_common.topology import ensure_topology
from fabrik_scheduler.store import RunStore

SMALL = Resources(cpu_request="500m", memory_request="1Gi", cpu_limit="2", memory_limit="4Gi")


def record(run_id: str, state: str = "queued") -> RunRecord:
    now = datetime.now(UTC)
    return RunRecord(
        run_id=run_id,
        project="demo",
        env="dev",
        params=RunParameters(resources=SMALL),
        state=state,  # type: ignore[arg-type]
        created_at=now,
        state_entered_at=now,
    )


async def test_load_all_returns_every_record_and_nothing_deleted(nats_url: str) -> None:
    bus = Bus(BusOptions(url=nats_url), BusMetrics(CollectorRegistry()))
    await bus.connect()
    try:
        await ensure_topology(bus.js)
        store = RunStore(await bus.js.key_value("runs"), await bus.js.key_value("queue"))
        assert await store.load_all() == {}

        ids = [new_ulid() for _ in range(1500)]
        for run_id in ids:
            await store.runs.put(run_id, msgspec.json.encode(record(run_id)))
        # Several revisions of one record: the latest one counts.
        await store.runs.put(ids[0], msgspec.json.encode(record(ids[0], "succeeded")))
        # A deleted record, as the very last message of the bucket.
        await store.runs.delete(ids[1])

        for _ in range(5):  # the watcher's start-up race shows only sometimes: try a few times
            loaded = await store.load_all()
            assert set(loaded) == set(ids) - {ids[1]}
            assert loaded[ids[0]].state == "succeeded"
            assert loaded[ids[2]].revision > 0
    finally:
        await bus.close()
