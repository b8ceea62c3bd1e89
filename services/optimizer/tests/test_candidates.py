"""Candidate experiments from a store filled through the real ingest functions, against a real NATS
(the `config` KV and the OPS stream): the memory and model proposals with their numbers, the
minimum sample, hiding by existing experiments, starting one, auto mode, and the pull request of
a winning harness experiment against the GitHub double."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest
from optimizer_events import run_lifecycle, usage
from prometheus_client import CollectorRegistry

from fabrik_common import experiments as ex
from fabrik_common import optimizer_rpc as rpc
from fabrik_common.bus import Bus, BusOptions
from fabrik_common.clock import ManualClock
from fabrik_common.events import RunDispatched, RunFinished, RunStateChanged
from fabrik_common.metrics import BusMetrics
from fabrik_common.testing.github_double import GithubDouble
from fabrik_common.topology import ensure_topology
from fabrik_optimizer.analytics.ingest import apply_llm_usage, apply_run_event
from fabrik_optimizer.analytics.store import AnalyticsStore
from fabrik_optimizer.experiments.candidates import (
    AUTO_ACTOR,
    CandidatePolicy,
    CandidateService,
    candidate_id,
    format_memory,
    round_memory,
)
from fabrik_optimizer.experiments.service import ExperimentError, Experiments, Limits, read_history
from fabrik_optimizer.experiments.spec_pr import SpecPullRequests, harness_file
from fabrik_optimizer.settings import OptimizerSettings

MONDAY_NOON = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
GI = 2**30


@pytest.fixture
async def bus(nats_url: str) -> AsyncIterator[Bus]:
    b = Bus(BusOptions(url=nats_url), BusMetrics(CollectorRegistry()))
    await b.connect()
    await ensure_topology(b.js)
    yield b
    await b.close()


class World:
    def __init__(self, bus: Bus, *, auto: bool = False, max_active: int = 3) -> None:
        self.bus = bus
        self.store = AnalyticsStore(":memory:")
        self.clock = ManualClock(MONDAY_NOON)
        self.auto = auto
        self.max_active = max_active

    async def start(self) -> tuple[Experiments, CandidateService]:
        self.kv = await self.bus.js.key_value("config")
        experiments = Experiments(
            self.kv, self.bus.publish, lambda: self.store, self.clock, Limits(max_active=self.max_active)
        )
        candidates = CandidateService(
            experiments, lambda: self.store, CandidatePolicy(min_runs=30), auto=self.auto
        )
        return experiments, candidates

    def run(
        self,
        *,
        project: str = "demo",
        spec: str = "spec-a",
        outcome: str = "succeeded",
        reason: str | None = None,
        peak: int = 2 * GI,
        model: str | None = None,
        arm: str | None = None,
    ) -> None:
        """One run through the ingest functions, as its events arrive (SMALL: memory limit 4Gi)."""
        events = run_lifecycle(project=project, spec_id=spec, outcome=outcome, peak=peak)
        run_id = events[0].run_id
        for event in events:
            if reason is not None and isinstance(event, RunFinished | RunStateChanged) and event.reason:
                event = msgspec.structs.replace(event, reason=reason)
            if arm is not None and isinstance(event, RunDispatched):
                event = msgspec.structs.replace(event, experiment_arm=arm)
            apply_run_event(self.store, event)
        if model is not None:
            apply_llm_usage(
                self.store, usage(model=model, tokens=(10, 10, 0, 0), prices=(1, 1, 0, 0), run_id=run_id)
            )

    def oom_heavy(self, runs: int = 100, ooms: int = 12, project: str = "demo") -> None:
        """`ooms` runs killed at the 4Gi limit (their peak is the limit), the others well below."""
        for i in range(runs):
            if i < ooms:
                self.run(project=project, outcome="failed", reason="oom_killed", peak=4 * GI)
            else:
                self.run(project=project, peak=2 * GI + i * 2**20)

    def models(self, project: str = "alpha") -> None:
        """gpt-x succeeds 18 of 60 times, claude-y 54 of 60: intervals far apart."""
        for i in range(60):
            self.run(
                project=project, spec="spec-m", model="gpt-x", outcome="succeeded" if i < 18 else "failed"
            )
            self.run(
                project=project, spec="spec-m", model="claude-y", outcome="succeeded" if i < 54 else "failed"
            )


def test_rounding() -> None:
    assert format_memory(round_memory(int(1.1 * GI))) == "1536Mi"
    assert format_memory(round_memory(3 * GI)) == "3Gi"
    assert format_memory(round_memory(5 * GI)) == "5Gi"
    assert format_memory(round_memory(int(6.4 * GI))) == "7Gi"
    assert format_memory(round_memory(100 * 2**20)) == "512Mi"


def test_harness_file_keeps_the_document() -> None:
    text = '{\n  "v": 1,\n  "harness": {\n    "depth": 2,\n    "style": "terse"\n  },\n  "z": "ü"\n}\n'
    assert harness_file(text, "depth", 3) == (
        '{\n  "v": 1,\n  "harness": {\n    "depth": 3,\n    "style": "terse"\n  },\n  "z": "ü"\n}\n'
    )
    assert json.loads(harness_file(None, "depth", 3)) == {"harness": {"depth": 3}}


async def test_memory_candidate_from_oom_heavy_runs(bus: Bus) -> None:
    world = World(bus)
    _, service = await world.start()
    world.oom_heavy()
    found = await service.available()
    assert len(found) == 1
    c = found[0]
    assert c.kind == "memory_limit" and c.risk == "low" and c.parameter == "resources.memory_limit"
    assert c.target == ex.Target(project="demo", spec="spec-a")
    # p95 of the peaks is the 4Gi of the killed runs; times 1.25 = 5Gi
    assert c.treatments == [ex.Arm(name="more-memory", overrides={"resources.memory_limit": "5Gi"})]
    assert c.control == ex.Arm(name="control")
    assert c.summary == "OOM rate 12% at 4Gi (12 of 100 runs), p95 peak 4.0Gi → try 5Gi"
    assert c.sample_size == 100
    e = c.evidence
    assert (e["runs"], e["oom_kills"], e["oom_rate"]) == (100, 12, 0.12)
    assert (e["memory_limit"], e["peak_p95_bytes"], e["proposed_limit_bytes"]) == ("4Gi", 4 * GI, 5 * GI)
    assert c.id == candidate_id(c.target, c.parameter, "5Gi")
    assert [x.id for x in await service.available()] == [c.id]  # the same id next round
    assert await service.available(project="other") == []


async def test_no_candidate_without_enough_runs_or_ooms(bus: Bus) -> None:
    world = World(bus)
    _, service = await world.start()
    world.oom_heavy(runs=29, ooms=10)  # 34% OOM, but under the 30 runs the policy needs
    world.oom_heavy(runs=100, ooms=2, project="calm")  # 2%: under the 5% threshold
    assert await service.available() == []


async def test_an_experiment_on_the_same_target_and_parameter_hides_the_candidate(bus: Bus) -> None:
    world = World(bus)
    experiments, service = await world.start()
    world.oom_heavy()
    [candidate] = await service.available()
    other = await experiments.create(
        rpc.ExperimentCreateRequest(
            name="by hand",
            target=candidate.target,
            parameter="resources.memory_limit",
            control=ex.Arm(name="control"),
            treatments=[ex.Arm(name="eight", overrides={"resources.memory_limit": "8Gi"})],
            actor="alice",
        )
    )
    assert await service.available() == []  # active, other value
    await experiments.action(other.id, "stop", "alice")
    assert [c.id for c in await service.available()] == [candidate.id]  # ended: listed again
    started = await service.start(candidate.id, "alice")
    await experiments.action(started.id, "stop", "alice")
    assert await service.available() == []  # that value was tried
    with pytest.raises(ExperimentError) as unknown:
        await service.start(candidate.id, "alice")
    assert (unknown.value.error.status, unknown.value.error.field) == (404, "id")


async def test_model_candidate_and_starting_candidates(bus: Bus) -> None:
    world = World(bus)
    _, service = await world.start()
    world.models()
    [c] = await service.available()
    assert c.kind == "model" and c.risk == "medium" and c.target == ex.Target(project="alpha")
    assert c.treatments[0].overrides == {"model": "claude-y"}
    assert c.evidence["better"]["model"] == "claude-y" and c.evidence["better"]["successes"] == 54
    assert [w["model"] for w in c.evidence["worse"]] == ["gpt-x"]
    assert c.evidence["worse"][0]["ci95"][1] < c.evidence["better"]["ci95"][0]
    assert c.summary.startswith("success 30% with gpt-x (60 runs, 95% CI ")
    assert c.summary.endswith("in alpha → try claude-y")
    assert c.sample_size == 120
    started = await service.start(c.id, "mia")
    assert started.state == "pending_approval" and started.created_by == "mia"
    assert started.risk == "medium" and started.parameter == "model" and started.target == c.target
    assert await service.available() == []


async def test_auto_mode_starts_low_risk_candidates_only(bus: Bus) -> None:
    world = World(bus, auto=True)
    experiments, service = await world.start()
    world.oom_heavy()
    world.models()
    assert {c.risk for c in await service.available()} == {"low", "medium"}
    await experiments.set_pause(True, "incident", "root")
    assert await service.auto_start() == []
    await experiments.set_pause(False, "", "root")
    [started] = await service.auto_start()
    assert started.state == "active" and started.created_by == AUTO_ACTOR
    assert started.parameter == "resources.memory_limit" and started.risk == "low"
    assert [e.id for e in await experiments.all()] == [started.id]  # the model one waits for a person
    assert await service.auto_start() == []  # never two on the same target and parameter
    rows = await read_history(bus.js, started.id, 10)
    assert [(r["status"], r["by"]) for r in rows] == [("created", AUTO_ACTOR), ("running", AUTO_ACTOR)]


async def test_auto_mode_respects_the_active_limit_and_the_setting(bus: Bus) -> None:
    world = World(bus, auto=True, max_active=0)
    experiments, service = await world.start()
    world.oom_heavy()
    assert await service.auto_start() == []
    assert await experiments.all() == []  # no draft left behind
    with pytest.raises(ExperimentError) as full:
        await service.start((await service.available())[0].id, "alice")
    assert full.value.error.status == 409
    off = CandidateService(experiments, lambda: world.store, auto=False)
    assert await off.auto_start() == []


def harness_experiment(**changes: Any) -> rpc.ExperimentCreateRequest:
    fields: dict[str, Any] = {
        "name": "deeper planning",
        "target": ex.Target(project="demo", spec="spec-a"),
        "parameter": "harness.depth",
        "control": ex.Arm(name="control"),
        "treatments": [ex.Arm(name="deep", overrides={"harness.depth": 3})],
        "treatment_share": 0.2,
        "guardrails": ["failure_rate", "cost_per_run"],
        "risk": "low",
        "actor": "alice",
    }
    fields.update(changes)
    return rpc.ExperimentCreateRequest(**fields)


def winning_runs(world: World, experiment_id: str) -> None:
    for arm, succeeded, failed in (("control", 400, 400), ("deep", 194, 6)):
        for i in range(succeeded + failed):
            world.run(outcome="succeeded" if i < succeeded else "failed", arm=f"{experiment_id}/{arm}")


SPEC_FILE = '{\n  "harness": {\n    "depth": 2,\n    "style": "terse"\n  },\n  "owner": "team-a"\n}\n'


async def pr_world(bus: Bus, github: GithubDouble, tmp_path: Path) -> tuple[World, Experiments]:
    github.add_repo("acme/specs")
    github.add_file("acme/specs", "specs/spec-a.harness.json", SPEC_FILE)
    token = tmp_path / "token"
    token.write_text(github.add_token() + "\n")
    settings = OptimizerSettings(
        optimizer_spec_repository="acme/specs",
        optimizer_github_token_file=str(token),
        github_api_url=github.url,
    )
    config = settings.spec_pull_requests()
    assert config is not None and config.path == "specs/{spec}.harness.json"
    world = World(bus)
    experiments, _ = await world.start()
    experiments.propose_change = SpecPullRequests(config).propose
    return world, experiments


async def test_winning_harness_experiment_opens_a_pull_request(bus: Bus, tmp_path: Path) -> None:
    async with GithubDouble() as github:
        world, experiments = await pr_world(bus, github, tmp_path)
        exp = await experiments.create(harness_experiment())
        winning_runs(world, exp.id)
        await experiments.evaluate()
        after = await experiments.get(exp.id)
        assert after.state == "shipped" and after.decision == "SHIP" and after.winner == "deep"
        url = after.numbers["pull_request"]
        assert url == "https://github.com/acme/specs/pull/1"
        defaults = await experiments.defaults()
        assert defaults.overrides == {} and defaults.revision == 0  # not rolled out

        repo = github.repo("acme/specs")
        pull = repo.pulls[1]
        branch = f"fabrik/optimizer/{exp.id.lower()}"
        assert (pull["head"]["ref"], pull["base"]["ref"], pull["state"]) == (branch, "main", "open")
        assert pull["title"] == "Optimizer: set harness.depth to 3"
        assert (
            exp.id in pull["body"] and "SHIP" in pull["body"] and "| runs in `deep` | 200 |" in pull["body"]
        )
        changed = github.file_at("acme/specs", "specs/spec-a.harness.json", branch)
        assert changed is not None
        assert json.loads(changed) == {"harness": {"depth": 3, "style": "terse"}, "owner": "team-a"}
        assert github.file_at("acme/specs", "specs/spec-a.harness.json") == SPEC_FILE.encode()
        put = github.calls_to("PUT", "/contents/")[0]
        assert put.status == 200 and base64.b64decode(put.json["content"]) == changed

        # once more (as after a stop between opening and recording): the same pull request
        assert experiments.propose_change is not None
        assert await experiments.propose_change(after) == url
        assert len(repo.pulls) == 1 and len(github.calls_to("PUT", "/contents/")) == 1
        assert [c.status for c in github.calls_to("POST", "/git/refs$")] == [201, 422]
        assert [c.status for c in github.calls_to("POST", "/pulls$")] == [201, 422]

        rows = await read_history(bus.js, exp.id, 20)
        shipped = rows[-1]
        assert shipped["status"] == "shipped" and url in shipped["message"]
        assert shipped["numbers"]["pull_request"] == url
        assert not [r for r in rows if r["type"] == "config"]


async def test_pull_request_failure_waits_for_approval_and_others_ship_as_before(
    bus: Bus, tmp_path: Path
) -> None:
    async with GithubDouble() as github:
        world, experiments = await pr_world(bus, github, tmp_path)
        github.fail("POST", r"/pulls$", 502, times=1)
        exp = await experiments.create(harness_experiment())
        winning_runs(world, exp.id)
        await experiments.evaluate()
        after = await experiments.get(exp.id)
        assert after.state == "pending_approval" and after.winner == "deep"
        assert "502" in after.reasons[-2] or "502" in after.reasons[-1]
        assert (await experiments.defaults()).revision == 0

        # a resource experiment's change is no spec change: rolled out as before
        memory = await experiments.create(
            harness_experiment(
                name="memory",
                parameter="resources.memory_limit",
                target=ex.Target(project="demo", spec="spec-b"),
                treatments=[ex.Arm(name="deep", overrides={"resources.memory_limit": "6Gi"})],
            )
        )
        for arm, succeeded, failed in (("control", 400, 400), ("deep", 194, 6)):
            for i in range(succeeded + failed):
                world.run(
                    spec="spec-b",
                    outcome="succeeded" if i < succeeded else "failed",
                    arm=f"{memory.id}/{arm}",
                )
        await experiments.evaluate()
        assert (await experiments.get(memory.id)).state == "shipped"
        assert (await experiments.defaults()).overrides == {"resources.memory_limit": "6Gi"}


def test_spec_repository_settings_are_checked(tmp_path: Path) -> None:
    assert OptimizerSettings().spec_pull_requests() is None
    with pytest.raises(ValueError, match="FABRIK_OPTIMIZER_SPEC_REPOSITORY"):
        OptimizerSettings(optimizer_spec_repository="not a repo")
    with pytest.raises(ValueError, match="FABRIK_OPTIMIZER_GITHUB_TOKEN_FILE is required"):
        OptimizerSettings(optimizer_spec_repository="acme/specs")
    with pytest.raises(ValueError, match="FABRIK_OPTIMIZER_SPEC_PATH"):
        OptimizerSettings(optimizer_spec_repository="acme/specs", optimizer_spec_path="specs/{spec}.yaml")
    with pytest.raises(ValueError, match="cannot be read"):
        OptimizerSettings(
            optimizer_spec_repository="acme/specs", optimizer_github_token_file=str(tmp_path / "missing")
        )
