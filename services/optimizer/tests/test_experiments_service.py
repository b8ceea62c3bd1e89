"""Experiments against a real NATS (the `config` KV and the OPS stream) and a real analytics store:
life cycle, approvals, guardrails, decisions from crafted samples, rollout and rollback of the
defaults, the global pause and the history."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest
from optimizer_events import run_lifecycle
from prometheus_client import CollectorRegistry

from fabrik_common import experiments as ex
from fabrik_common import optimizer_rpc as rpc
from fabrik_common.bus import Bus, BusOptions
from fabrik_common.clock import ManualClock
from fabrik_common.events import RunDispatched
from fabrik_common.metrics import BusMetrics
from fabrik_common.topology import ensure_topology
from fabrik_optimizer.analytics.ingest import apply_run_event
from fabrik_optimizer.analytics.store import AnalyticsStore
from fabrik_optimizer.experiments.service import (
    BusinessHours,
    ExperimentError,
    Experiments,
    Limits,
    read_history,
)

MONDAY_NOON = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
HOURS = BusinessHours.parse("09:00-17:00", "mon,tue,wed,thu,fri", "UTC")


@pytest.fixture
async def bus(nats_url: str) -> AsyncIterator[Bus]:
    b = Bus(BusOptions(url=nats_url), BusMetrics(CollectorRegistry()))
    await b.connect()
    await ensure_topology(b.js)
    yield b
    await b.close()


class World:
    def __init__(self, bus: Bus, max_active: int = 3) -> None:
        self.bus = bus
        self.store = AnalyticsStore(":memory:")
        self.clock = ManualClock(MONDAY_NOON)
        self.kv: Any = None
        self.max_active = max_active
        self.service: Experiments | None = None

    async def start(self) -> Experiments:
        self.kv = await self.bus.js.key_value("config")
        self.service = Experiments(
            self.kv,
            self.bus.publish,
            lambda: self.store,
            self.clock,
            Limits(max_active=self.max_active, hours=HOURS),
        )
        return self.service

    def runs(self, experiment_id: str, arm: str, succeeded: int, failed: int) -> None:
        for i in range(succeeded + failed):
            outcome = "succeeded" if i < succeeded else "failed"
            for event in run_lifecycle(outcome=outcome):
                if isinstance(event, RunDispatched):
                    event = msgspec.structs.replace(event, experiment_arm=f"{experiment_id}/{arm}")
                apply_run_event(self.store, event)


def create(risk: ex.Risk = "low", **changes: Any) -> rpc.ExperimentCreateRequest:
    fields: dict[str, Any] = {
        "name": "more memory",
        "target": ex.Target(project="demo"),
        "parameter": "resources.memory_limit",
        "control": ex.Arm(name="control"),
        "treatments": [ex.Arm(name="six", overrides={"resources.memory_limit": "6Gi"})],
        "treatment_share": 0.2,
        "risk": risk,
        "min_runs_per_arm": 30,
        # duration p95 and OOM rate need more runs than these tests fold to be shown non-inferior
        "guardrails": ["failure_rate", "cost_per_run"],
        "actor": "alice",
    }
    fields.update(changes)
    return rpc.ExperimentCreateRequest(**fields)


async def test_low_risk_ship_rolls_out_and_rollback_restores(bus: Bus) -> None:
    world = World(bus)
    service = await world.start()
    await world.kv.put(ex.DEFAULTS_KEY, ex.encode(ex.Defaults(overrides={"model": "gpt-big"})))
    exp = await service.create(create())
    assert exp.state == "active" and exp.started_at == MONDAY_NOON
    await service.evaluate()
    assert (await service.get(exp.id)).decision == "CONTINUE"  # no runs yet
    # 4:1 split as expected (share 0.2): control 50 % success, treatment 97 %
    world.runs(exp.id, "control", 400, 400)
    world.runs(exp.id, "six", 194, 6)
    changed = await service.evaluate()
    after = await service.get(exp.id)
    assert [c.id for c in changed] == [exp.id]
    assert after.state == "shipped" and after.decision == "SHIP" and after.winner == "six"
    defaults = await service.defaults()
    assert defaults.overrides == {"model": "gpt-big", "resources.memory_limit": "6Gi"}
    assert defaults.experiment_id == exp.id and defaults.revision == 1
    assert after.numbers["previous_defaults"] == {"resources.memory_limit": None}
    status = await service.status(after)
    assert [(a.name, a.runs, a.successes) for a in status] == [("control", 800, 400), ("six", 200, 194)]

    rolled = await service.action(exp.id, "rollback", "root", "regressed in production")
    assert rolled.state == "rolled_back"
    assert (await service.defaults()).overrides == {"model": "gpt-big"}

    rows = await read_history(bus.js, exp.id, 100)
    kinds = [(r["type"], r.get("status") or r.get("decision")) for r in rows]
    assert kinds == [
        ("experiment", "created"),
        ("experiment", "running"),
        ("decision", "ship"),
        ("config", "ship"),
        ("experiment", "shipped"),
        ("config", "rollback"),
        ("experiment", "rolled_back"),
    ]
    decision = next(r for r in rows if r["type"] == "decision")
    assert decision["numbers"]["sample_sizes"] == {"control": 800, "six": 200}
    assert rows[-2]["by"] == "root" and rows[-2]["new"] == {"model": "gpt-big"}


async def test_emergency_rollback_and_srm_invalid(bus: Bus) -> None:
    world = World(bus)
    service = await world.start()
    hurt = await service.create(create(name="hurts"))
    world.runs(hurt.id, "control", 36, 4)  # 90 %
    world.runs(hurt.id, "six", 1, 9)  # 10 %: evidently below 0.9 x control
    broken = await service.create(create(name="broken split", target=ex.Target(project="other")))
    world.runs(broken.id, "control", 250, 250)
    world.runs(broken.id, "six", 250, 250)  # 50/50 where 80/20 was expected
    await service.evaluate()
    after = await service.get(hurt.id)
    assert after.state == "rolled_back" and after.decision == "ROLLBACK"
    assert any("emergency" in r for r in after.reasons)
    invalid = await service.get(broken.id)
    assert invalid.state == "invalid" and invalid.decision == "INVALID"
    assert (await service.defaults()).overrides == {}


async def test_medium_risk_waits_for_approval_and_the_window(bus: Bus) -> None:
    world = World(bus)
    service = await world.start()
    world.clock.set(datetime(2026, 3, 7, 12, 0, tzinfo=UTC))  # a Saturday
    exp = await service.create(create("medium"))
    assert exp.state == "pending_approval"
    with pytest.raises(ExperimentError) as refused:
        await service.action(exp.id, "pause", "bob")
    assert refused.value.error.status == 409
    approved = await service.action(exp.id, "approve", "root")
    assert approved.state == "pending_approval" and approved.approved("start")
    assert "business-hours" in approved.reasons[0]
    await service.evaluate()
    assert (await service.get(exp.id)).state == "pending_approval"
    world.clock.set(datetime(2026, 3, 9, 9, 30, tzinfo=UTC))  # Monday morning
    await service.evaluate()
    active = await service.get(exp.id)
    assert active.state == "active"
    # a winner of a medium-risk experiment waits for a second approval before the rollout
    world.runs(exp.id, "control", 400, 400)
    world.runs(exp.id, "six", 194, 6)
    await service.evaluate()
    waiting = await service.get(exp.id)
    assert waiting.state == "pending_approval" and waiting.winner == "six"
    assert (await service.defaults()).overrides == {}
    shipped = await service.action(exp.id, "approve", "root")
    assert shipped.state == "shipped"
    assert (await service.defaults()).overrides == {"resources.memory_limit": "6Gi"}
    history = await read_history(bus.js, exp.id, 100)
    config = [r for r in history if r["type"] == "config"]
    assert config[0]["message"] == "approved by root"


async def test_guardrails_limit_pause_and_max_duration(bus: Bus) -> None:
    world = World(bus, max_active=2)
    service = await world.start()
    first = await service.create(create(name="one", max_duration_seconds=3600))
    await service.create(create(name="two"))
    with pytest.raises(ExperimentError) as full:
        await service.create(create(name="three"))
    assert full.value.error.rule == "too_many_active"
    draft = (await service.all())[-1]
    assert draft.name == "three" and draft.state == "draft"
    with pytest.raises(ExperimentError) as no_reason:
        await service.set_pause(True, " ", "root")
    assert no_reason.value.error.field == "reason"
    pause = await service.set_pause(True, "incident 42", "root")
    assert pause.paused and ex.decode_pause((await world.kv.get(ex.PAUSE_KEY)).value) == pause
    await service.set_pause(False, "", "root")
    world.clock.advance(timedelta(hours=2))
    await service.evaluate()
    stopped = await service.get(first.id)
    assert stopped.state == "stopped" and stopped.decision == "STOP"
    started = await service.action(draft.id, "resume", "alice")
    assert started.state == "active"
    rows = await read_history(bus.js, None, 1000)
    pauses = [r for r in rows if r["type"] == "config" and r["key"] == ex.PAUSE_KEY]
    assert [(r["decision"], r["by"]) for r in pauses] == [("pause", "root"), ("resume", "root")]
    assert pauses[0]["new"]["reason"] == "incident 42"


async def test_invalid_definitions_are_refused(bus: Bus) -> None:
    service = await World(bus).start()
    with pytest.raises(ExperimentError) as bad:
        await service.create(create(treatment_share=0.3))
    assert bad.value.error.field == "treatment_share" and bad.value.error.status == 400
    assert await service.all() == []
    with pytest.raises(ExperimentError) as missing:
        await service.get("01ARZ3NDEKTSV4RRFFQ69G5FAV")
    assert missing.value.error.status == 404
