"""Shared counters: exact reservations across replicas, lazy additions that lose nothing."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from typing import Any

import nats.js.errors

from fabrik_llm_proxy.limits import SharedCounters


@dataclass
class Entry:
    key: str
    value: bytes
    revision: int


class FakeKV:
    """In-memory stand-in with the KV semantics the counters rely on (revision-checked update)."""

    def __init__(self) -> None:
        self.data: dict[str, Entry] = {}
        self.seq = 0
        self.updates = 0

    async def get(self, key: str) -> Entry:
        await asyncio.sleep(random.random() / 1000)
        if key not in self.data:
            raise nats.js.errors.KeyNotFoundError
        return self.data[key]

    async def update(self, key: str, value: bytes, last: int | None = None) -> int:
        await asyncio.sleep(random.random() / 1000)
        current = self.data[key].revision if key in self.data else 0
        if (last or 0) != current:
            raise nats.js.errors.KeyWrongLastSequenceError(description="wrong last sequence")
        self.seq += 1
        self.updates += 1
        self.data[key] = Entry(key, value, self.seq)
        return self.seq


def replicas(kv: FakeKV, n: int, now: list[float]) -> list[SharedCounters]:
    return [SharedCounters(kv, clock=lambda: now[0]) for _ in range(n)]  # type: ignore[arg-type]


async def test_three_replicas_grant_exactly_the_limit_under_concurrency() -> None:
    kv, now = FakeKV(), [1000.0]
    counters = replicas(kv, 3, now)
    results = await asyncio.gather(*(counters[i % 3].reserve("rpm.project.p", 30, 60.0) for i in range(100)))
    assert sum(ok for ok, _ in results) == 30
    assert all(retry == 60.0 for ok, retry in results if not ok)
    # Concurrent calls are batched: far fewer writes than calls.
    assert kv.updates < 30
    # A new window admits again.
    now[0] += 60
    assert (await counters[0].reserve("rpm.project.p", 30, 60.0))[0]


async def test_lazy_additions_from_several_replicas_add_up() -> None:
    kv, now = FakeKV(), [0.0]
    counters = replicas(kv, 3, now)
    for i in range(90):
        counters[i % 3].add("spend.run.r", 0.5)
    await asyncio.gather(*(c.flush() for c in counters))
    fresh = SharedCounters(kv)  # type: ignore[arg-type]
    await fresh._load("spend.run.r")
    assert fresh.current("spend.run.r")[0] == 45.0
    # Before its flush, a replica already counts its own additions.
    counters[0].add("spend.run.r", 1.0)
    assert counters[0].current("spend.run.r")[0] >= 1.0


async def test_a_refused_call_gives_back_what_it_took() -> None:
    kv, now = FakeKV(), [0.0]
    (c,) = replicas(kv, 1, now)
    assert (await c.reserve("rpm.project.p", 5, 60.0))[0]
    c.add("rpm.project.p", -1, 60.0)
    await c.flush()
    value: Any = c.current("rpm.project.p", 60.0)[0]
    assert value == 0
