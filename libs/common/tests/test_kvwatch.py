"""Loading a KV key range before serving, against a real NATS server."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry

from fabrik_common import kvwatch
from fabrik_common.bus import Bus, BusOptions
from fabrik_common.metrics import BusMetrics
from fabrik_common.topology import ensure_topology


async def test_load_feeds_every_matching_key_and_returns(nats_url: str) -> None:
    bus = Bus(BusOptions(url=nats_url), BusMetrics(CollectorRegistry()))
    await bus.connect()
    try:
        await ensure_topology(bus.js)
        kv = await bus.js.key_value("tokens")

        seen: dict[str, bytes | None] = {}

        def observe(key: str, value: bytes | None, revision: int) -> None:
            seen[key] = value

        started = time.monotonic()
        await kvwatch.load(kv, "revoked.>", observe)
        assert seen == {}
        assert time.monotonic() - started < 2.0

        for i in range(300):
            await kv.put(f"revoked.run.r{i}", b"{}")
        await kv.put("other.key", b"x")
        await kv.delete("revoked.run.r7")
        for _ in range(5):
            seen.clear()
            await kvwatch.load(kv, "revoked.>", observe)
            assert len(seen) == 300
            assert seen["revoked.run.r7"] is None
            assert seen["revoked.run.r299"] == b"{}"
            assert "other.key" not in seen
    finally:
        await bus.close()
