"""A simulator of experiment traffic with known true success rates.

It drives the real parts that decide an experiment's fate, at simulated time:

- the optimizer's `Experiments` (creation, the evaluation round, rollout and rollback of the
  defaults) writing the experiments to a `config`-shaped KV bucket on a real NATS server;
- the scheduler's `ExperimentView`, following that bucket through its KV watch as the scheduler
  does, assigning every simulated run at dispatch (`ExperimentView.configure`);
- the optimizer's analytics store, fed the run events the gateway, scheduler and executor would
  publish (`apply_events`, the ingest's batch path).

Each simulated 15 minutes, every experiment's project gets `runs_per_look` runs whose outcome is
drawn from the true success rate of the arm the scheduler assigned; then the optimizer evaluates.
Experiments of one batch target different projects, so none takes another's runs; each batch gets
its own bucket and store so that the evaluation reads what a real optimizer would read at that
scale.

Beside the real decision, every look also runs the naive fixed-sample z-test (two-sided 5%, the
"peek at a t-test every few minutes" method) on the same counts: what it would have shipped shows
what the sequential method protects against.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from unittest import mock

import msgspec
from nats.js.client import JetStreamContext

from fabrik_common import experiments as ex
from fabrik_common import optimizer_rpc as rpc
from fabrik_common.clock import ManualClock
from fabrik_common.events import (
    Event,
    Resources,
    RunDispatched,
    RunParameters,
    RunRequested,
    RunStateChanged,
)
from fabrik_common.runs import RunRecord
from fabrik_optimizer.analytics.ingest import apply_events
from fabrik_optimizer.analytics.store import AnalyticsStore
from fabrik_optimizer.experiments.service import Experiments, Limits
from fabrik_scheduler import experiments as assignment

LOOK = timedelta(minutes=15)
START = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
RESOURCES = Resources(cpu_request="500m", memory_request="1Gi", cpu_limit="2", memory_limit="4Gi")
Z_975 = 1.959963984540054
ENDED = ("shipped", "rolled_back", "stopped", "invalid")
SETTLED = (*ENDED, "pending_approval")
"""States in which an experiment takes no more runs."""


@dataclass(frozen=True)
class Scenario:
    """One kind of simulated experiment: the true success rate of each arm, and optionally a fault
    of the platform that loses the outcomes of a share of the control's runs."""

    name: str
    control_rate: float
    treatment_rate: float
    lost_control_share: float = 0.0
    risk: ex.Risk = "low"


@dataclass
class Outcome:
    """What happened to one simulated experiment."""

    experiment_id: str
    scenario: str
    state: str = "active"
    decision: str | None = None
    looks: int = 0
    decided_at_look: int | None = None
    runs: dict[str, int] = field(default_factory=dict)
    naive_significant: bool = False
    reasons: list[str] = field(default_factory=list)
    first_eligible_look: int | None = None
    """The first look at which both arms had the emergency rule's minimum of 10 runs."""


class Simulator:
    def __init__(
        self,
        js: JetStreamContext,
        publish: Callable[[Event], Any],
        *,
        seed: int,
        runs_per_look: int = 12,
        looks: int = 48,
        treatment_share: float = 0.2,
    ) -> None:
        self.js = js
        self.publish = publish
        self.rng = random.Random(seed)
        self.runs_per_look = runs_per_look
        self.looks = looks
        self.treatment_share = treatment_share
        self.clock = ManualClock(START)
        self.batches = 0
        self.dispatched_while_paused = 0
        self.assigned_while_paused = 0
        self.pause_seen_after: list[float] = []
        """Seconds from the optimizer's pause write to the scheduler's view showing it."""

    def _id(self) -> str:
        """A 26-character id (run ids and event ids) from the simulation's seeded generator: upper-case
        hex is valid ULID text, and the simulation is reproducible."""
        return f"{self.rng.getrandbits(104):026X}"

    async def run_batch(
        self, scenarios: list[Scenario], paused_looks: range = range(0), start_approved_by: str | None = None
    ) -> list[Outcome]:
        """Run one experiment per scenario side by side until each has ended or the looks run out;
        during `paused_looks` the optimizer's global pause is on. Experiments that wait for a
        maintainer's approval to start get it from `start_approved_by`."""
        self.batches += 1
        bucket = f"SIMCONFIG{self.batches}"
        # The optimizer names experiments with fresh ULIDs; seeded ones make the assignment (a hash
        # of experiment and run id) and so the whole simulation reproducible.
        with mock.patch("fabrik_optimizer.experiments.service.new_ulid", self._id):
            return await self._batch(bucket, scenarios, paused_looks, start_approved_by)

    async def _batch(
        self, bucket: str, scenarios: list[Scenario], paused_looks: range, start_approved_by: str | None
    ) -> list[Outcome]:
        kv = await self.js.create_key_value(bucket=bucket, history=1)
        store = AnalyticsStore(":memory:")
        service = Experiments(
            kv, self.publish, lambda: store, self.clock, Limits(max_active=len(scenarios), hours=None)
        )
        view = assignment.ExperimentView(kv)
        follower = asyncio.create_task(assignment.follow(kv, view))
        try:
            return await self._simulate(service, view, store, scenarios, paused_looks, start_approved_by)
        finally:
            follower.cancel()
            await asyncio.gather(follower, return_exceptions=True)
            store.close()
            await self.js.delete_key_value(bucket)

    async def _simulate(
        self,
        service: Experiments,
        view: assignment.ExperimentView,
        store: AnalyticsStore,
        scenarios: list[Scenario],
        paused_looks: range,
        start_approved_by: str | None,
    ) -> list[Outcome]:
        self.clock.set(START)
        projects: dict[str, tuple[Scenario, Outcome]] = {}
        tallies: dict[str, dict[str, list[int]]] = {}
        for index, scenario in enumerate(scenarios):
            project = f"sim-{index}"
            created = await service.create(
                rpc.ExperimentCreateRequest(
                    name=f"{scenario.name} {index}",
                    target=ex.Target(project=project),
                    parameter="resources.memory_limit",
                    control=ex.Arm(name="control"),
                    # The same memory limit the runs already have: the configuration is unchanged, the
                    # outcomes differ only as the scenario's true rates say.
                    treatments=[ex.Arm(name="treatment", overrides={"resources.memory_limit": "4Gi"})],
                    treatment_share=self.treatment_share,
                    risk=scenario.risk,
                    min_runs_per_arm=30,
                    guardrails=["failure_rate", "oom_rate"],
                    max_duration_seconds=int(self.looks * LOOK.total_seconds()),
                    actor="simulator",
                )
            )
            if created.state == "pending_approval" and start_approved_by is not None:
                created = await service.action(created.id, "approve", start_approved_by)
            projects[project] = (scenario, Outcome(created.id, scenario.name))
            tallies[created.id] = {"control": [0, 0], "treatment": [0, 0]}
        await self._until_view_shows(view, lambda e: e.state == "active", len(scenarios))
        for look in range(1, self.looks + 1):
            if (look in paused_looks) != view.pause.paused:
                await self._set_pause(service, view, look in paused_looks)
            events: list[Any] = []
            for project, (scenario, outcome) in projects.items():
                if outcome.state in SETTLED:
                    continue
                for _ in range(self.runs_per_look):
                    events.extend(self._run(view, project, scenario, tallies))
            apply_events(store, events)
            self.clock.advance(LOOK)
            await service.evaluate()
            now = self.clock()
            # Every experiment evaluated now writes its evaluation (CONTINUE or its end) to the bucket.
            await self._until_view_shows(
                view, lambda e, now=now: e.evaluated_at == now or e.state in SETTLED, len(scenarios)
            )
            for outcome in (o for _, o in projects.values()):
                if outcome.state in SETTLED:
                    continue
                outcome.looks = look
                tally = tallies[outcome.experiment_id]
                if (
                    outcome.first_eligible_look is None
                    and min(tally["control"][0], tally["treatment"][0]) >= 10
                ):
                    outcome.first_eligible_look = look
                outcome.naive_significant |= naive_z_test(tally)
                experiment = view.experiments[outcome.experiment_id]
                if experiment.state in SETTLED:
                    outcome.state, outcome.decision = experiment.state, experiment.decision
                    outcome.decided_at_look, outcome.reasons = look, list(experiment.reasons)
            if all(o.state in SETTLED for _, o in projects.values()):
                break
        for _, outcome in projects.values():
            outcome.runs = {arm: counts[0] for arm, counts in tallies[outcome.experiment_id].items()}
        return [o for _, o in projects.values()]

    def _run(
        self,
        view: assignment.ExperimentView,
        project: str,
        scenario: Scenario,
        tallies: dict[str, dict[str, list[int]]],
    ) -> list[Any]:
        """One run dispatched by the scheduler's assignment, finished with an outcome drawn from the
        true rate of its arm: the events the platform would publish for it."""
        now = self.clock()
        run_id = self._id()
        params = RunParameters(resources=RESOURCES, template="default")
        record = RunRecord(
            run_id=run_id,
            project=project,
            env="dev",
            params=params,
            state="starting",
            created_at=now,
            state_entered_at=now,
        )
        view.configure(record)
        arms = {ref.id: ref.arm for ref in record.experiments}
        if view.pause.paused:
            self.dispatched_while_paused += 1
            self.assigned_while_paused += bool(arms)
            return []  # a run outside the experiment: nothing the experiment counts
        if len(arms) != 1:
            raise AssertionError(f"run {run_id} of {project} got arms {arms}: the assignment is broken")
        experiment_id, arm = next(iter(arms.items()))
        rate = scenario.treatment_rate if arm != "control" else scenario.control_rate
        succeeded = self.rng.random() < rate
        counts = tallies[experiment_id]["control" if arm == "control" else "treatment"]
        if arm == "control" and self.rng.random() < scenario.lost_control_share:
            return []  # the platform fault: this run's events never reach the optimizer
        counts[0] += 1
        counts[1] += succeeded
        finished = now + timedelta(minutes=5)
        return [
            RunRequested(
                event_id=self._id(),
                run_id=run_id,
                project=project,
                env="dev",
                params=params,
                requested_by="sim",
                occurred_at=now,
            ),
            RunDispatched(
                event_id=self._id(),
                run_id=run_id,
                project=project,
                env="dev",
                attempt=1,
                params=record.params,
                experiment_arm=record.experiment_arm,
                experiments=tuple(record.experiments),
                deadline=now + timedelta(hours=1),
                occurred_at=now,
            ),
            RunStateChanged(
                event_id=self._id(),
                run_id=run_id,
                project=project,
                attempt=1,
                from_state="running",
                to_state="succeeded" if succeeded else "failed",
                reason=None if succeeded else "exit_code",
                revision=3,
                occurred_at=finished,
            ),
        ]

    async def _set_pause(self, service: Experiments, view: assignment.ExperimentView, paused: bool) -> None:
        started = time.perf_counter()
        await service.set_pause(paused, "simulated incident" if paused else "", "simulator")
        for _ in range(2000):
            if view.pause.paused == paused:
                self.pause_seen_after.append(time.perf_counter() - started)
                return
            await asyncio.sleep(0.001)
        raise AssertionError("the scheduler's view did not see the pause within 2 s")

    async def _until_view_shows(
        self, view: assignment.ExperimentView, condition: Callable[[ex.Experiment], bool], count: int
    ) -> None:
        """Wait until the scheduler's view holds `count` experiments that all meet `condition`: the
        KV watch delivers the optimizer's writes within milliseconds, and the simulation must not
        dispatch runs on a view older than the decisions just taken."""
        for _ in range(2000):
            seen = list(view.experiments.values())
            if len(seen) == count and all(condition(e) for e in seen):
                return
            await asyncio.sleep(0.002)
        states = sorted(e.state for e in view.experiments.values())
        raise AssertionError(f"the scheduler's view did not follow the bucket within 4 s: {states}")


def naive_z_test(tally: Mapping[str, list[int]]) -> bool:
    """A fixed-sample two-sided z-test of equal success rates at 5%, as if each look were the only one."""
    (n_c, x_c), (n_t, x_t) = tally["control"], tally["treatment"]
    if n_c < 30 or n_t < 30:
        return False
    pooled = (x_c + x_t) / (n_c + n_t)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n_c + 1 / n_t))
    return se > 0 and abs(x_t / n_t - x_c / n_c) / se > Z_975


def summary(outcomes: list[Outcome]) -> dict[str, Any]:
    count = len(outcomes)
    by: dict[str, int] = {}
    for outcome in outcomes:
        by[outcome.decision or outcome.state] = by.get(outcome.decision or outcome.state, 0) + 1
    return {
        "experiments": count,
        "decisions": by,
        "ship_rate": by.get("SHIP", 0) / count,
        "rollback_rate": by.get("ROLLBACK", 0) / count,
        "naive_rate": sum(o.naive_significant for o in outcomes) / count,
    }


def encode_outcomes(outcomes: list[Outcome]) -> bytes:
    return msgspec.json.encode([o.__dict__ for o in outcomes])
