"""Experiments under simulated traffic with known true rates (docs/optimizer.md#simulation): the
real optimizer decides, the real scheduler assignment splits the runs, at a decision every
simulated 15 minutes."""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from fabrik_common.bus import Bus, BusOptions
from fabrik_common.metrics import BusMetrics
from fabrik_common.topology import ensure_topology
from fabrik_optimizer.experiments.service import read_history


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)
    spec.loader.exec_module(module)
    return module


simulator = _load(
    "fabrik_test_experiment_simulator", Path(__file__).parent / "support" / "experiment_simulator.py"
)
Scenario, Simulator, summary = simulator.Scenario, simulator.Simulator, simulator.summary


@pytest.fixture
async def bus(nats_url: str) -> AsyncIterator[Bus]:
    b = Bus(BusOptions(url=nats_url), BusMetrics(CollectorRegistry()))
    await b.connect()
    await ensure_topology(b.js)
    yield b
    await b.close()


def report(name: str, figures: dict[str, Any]) -> None:
    """Print the figures (pytest -s shows them; docs/optimizer.md quotes them)."""
    print(f"\n{name}: {json.dumps(figures, sort_keys=True)}")


@pytest.mark.parametrize("shard", range(4))
async def test_aa_experiments_keep_the_false_ship_rate_despite_a_decision_every_15_minutes(
    bus: Bus, shard: int
) -> None:
    # 1,000 A/A experiments in four shards of 250 (both arms with the same true rate, 0.5, 0.7 or
    # 0.9), 20% of their runs to the treatment, 12 runs and one decision every simulated 15 minutes
    # for 8 hours (32 looks, 384 runs each), 25 experiments side by side.
    sim = Simulator(bus.js, bus.publish, seed=20261129 + shard, runs_per_look=12, looks=32)
    rates = (0.5, 0.7, 0.9)
    outcomes = []
    started = time.perf_counter()
    for batch in range(10):
        scenarios = [
            Scenario("A/A", rates[(batch * 25 + i) % 3], rates[(batch * 25 + i) % 3]) for i in range(25)
        ]
        outcomes.extend(await sim.run_batch(scenarios))
    figures = summary(outcomes)
    figures["seconds"] = round(time.perf_counter() - started, 1)
    report(f"A/A shard {shard}", figures)
    assert figures["experiments"] == 250
    assert sum(o.runs["control"] + o.runs["treatment"] for o in outcomes) >= 250 * 300
    # alpha = 5%: a false SHIP needs the primary metric wrong in the better direction (about half
    # of alpha); 5% per shard of 250 leaves room for the Monte-Carlo error.
    assert figures["ship_rate"] <= 0.05
    assert figures["rollback_rate"] <= 0.05
    # The chi-squared sample-ratio check at p < 0.001, looked at 32 times (docs/optimizer.md).
    assert figures["decisions"].get("INVALID", 0) <= 10
    # The same looks with a fixed-sample z-test declare a difference many times more often.
    assert figures["naive_rate"] >= 0.08
    assert figures["naive_rate"] >= 3 * max(figures["ship_rate"], figures["rollback_rate"], 0.01)


async def test_a_real_improvement_ships_and_a_regression_rolls_back(bus: Bus) -> None:
    # 16 and 24 runs per look for a day: up to 1,536 and 2,304 runs per experiment.
    lifts = await Simulator(bus.js, bus.publish, seed=7, runs_per_look=16, looks=96).run_batch(
        [Scenario("+15 points", 0.70, 0.85)] * 20
    )
    regressions = await Simulator(bus.js, bus.publish, seed=8, runs_per_look=24, looks=96).run_batch(
        [Scenario("-10 points", 0.80, 0.70)] * 20
    )
    report("+15 points", summary(lifts) | {"median_look": median_look(lifts)})
    report("-10 points", summary(regressions) | {"median_look": median_look(regressions)})
    assert sum(o.decision == "SHIP" and o.state == "shipped" for o in lifts) >= 18
    assert not [o for o in lifts if o.decision == "ROLLBACK"]
    assert sum(o.decision == "ROLLBACK" and o.state == "rolled_back" for o in regressions) >= 18
    assert not [o for o in regressions if o.decision == "SHIP"]
    # Rollout and rollback leave their trail: who, what, the numbers behind it.
    rows = await read_history(bus.js, None, 100_000)
    for outcome in [*lifts, *regressions]:
        trail = [r for r in rows if r["experiment_id"] == outcome.experiment_id]
        steps = [r.get("status") or r.get("decision") for r in trail]
        assert steps[:2] == ["created", "running"], steps
        if outcome.state in ("shipped", "rolled_back"):
            decision = next(r for r in trail if r["type"] == "decision")
            assert decision["decision"] == outcome.decision.lower()
            assert decision["numbers"]["arms"]["treatment"]["primary.estimate"] is not None
            assert steps[-1] == outcome.state and trail[-1]["by"] == "optimizer"
        if outcome.state == "shipped":
            change = next(r for r in trail if r["type"] == "config")
            assert change["decision"] == "ship" and change["new"]["resources.memory_limit"] == "4Gi"


async def test_a_broken_split_is_invalid(bus: Bus) -> None:
    # Equal true rates, but three of four control runs never reach the optimizer: the arms look
    # 50/50 where 80/20 was assigned.
    sim = Simulator(bus.js, bus.publish, seed=3, runs_per_look=12, looks=32)
    outcomes = await sim.run_batch([Scenario("broken split", 0.7, 0.7, lost_control_share=0.75)] * 10)
    report("broken split", summary(outcomes) | {"median_look": median_look(outcomes)})
    assert [(o.state, o.decision) for o in outcomes] == [("invalid", "INVALID")] * 10


async def test_emergency_rollback_within_one_interval_and_pause_at_once(bus: Bus) -> None:
    sim = Simulator(bus.js, bus.publish, seed=5, runs_per_look=12, looks=32)
    broken = await sim.run_batch([Scenario("broken treatment", 0.7, 0.0)] * 10)
    report("broken treatment", summary(broken) | {"median_look": median_look(broken)})
    for outcome in broken:
        assert (outcome.state, outcome.decision) == ("rolled_back", "ROLLBACK")
        # decided at the first look at which the emergency rule had its minimum sample
        assert outcome.decided_at_look == outcome.first_eligible_look
    assert any(r.startswith("treatment: emergency:") for r in broken[0].reasons), broken[0].reasons

    # The global pause: no run dispatched while it is on takes part in an experiment.
    paused = await sim.run_batch([Scenario("A/A", 0.7, 0.7)] * 5, paused_looks=range(3, 7))
    assert sim.dispatched_while_paused == 5 * 12 * 4 and sim.assigned_while_paused == 0
    report("pause", {"seen_by_the_scheduler_after_s": max(sim.pause_seen_after)})
    assert all(o.runs["control"] + o.runs["treatment"] > 0 for o in paused)


async def test_medium_risk_winner_waits_for_a_maintainer(bus: Bus) -> None:
    sim = Simulator(bus.js, bus.publish, seed=9, runs_per_look=16, looks=96)
    outcomes = await sim.run_batch(
        [Scenario("+15 points, medium risk", 0.70, 0.85, risk="medium")] * 3, start_approved_by="mia"
    )
    assert [(o.state, o.decision) for o in outcomes] == [("pending_approval", "SHIP")] * 3
    rows = await read_history(bus.js, None, 10_000)
    assert not [r for r in rows if r["type"] == "config"]  # nothing rolled out without the approval


def median_look(outcomes: list[Any]) -> int | None:
    looks = sorted(o.decided_at_look for o in outcomes if o.decided_at_look is not None)
    return looks[len(looks) // 2] if looks else None
