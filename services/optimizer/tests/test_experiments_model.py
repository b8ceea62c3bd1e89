"""The shared experiment model: validation, matching, stable assignment, applying overrides."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from fabrik_common import experiments as ex
from fabrik_common.events import ExperimentArmRef, Resources, RunParameters
from fabrik_common.ids import new_ulid

T0 = datetime(2026, 3, 2, 10, 0, tzinfo=UTC)
PARAMS = RunParameters(
    resources=Resources(cpu_request="500m", memory_request="1Gi", cpu_limit="2", memory_limit="4Gi"),
    template="default",
)


def experiment(**changes: object) -> ex.Experiment:
    base = ex.Experiment(
        id=new_ulid(),
        name="more memory",
        target=ex.Target(project="demo"),
        parameter="resources.memory_limit",
        control=ex.Arm(name="control"),
        treatments=[ex.Arm(name="six", overrides={"resources.memory_limit": "6Gi"})],
        created_at=T0,
        created_by="alice",
        state="active",
    )
    return msgspec.structs.replace(base, **changes)


def facts(run_id: str | None = None, **changes: object) -> ex.RunFacts:
    values: dict[str, object] = {
        "run_id": run_id or new_ulid(),
        "project": "demo",
        "env": "dev",
        "spec_id": "spec-a",
        "labels": {},
    }
    values.update(changes)
    return ex.RunFacts(**values)  # type: ignore[arg-type]


def test_a_valid_experiment_has_no_errors() -> None:
    assert ex.validate(experiment()) == []


def test_validation_names_every_field_and_rule() -> None:
    bad = experiment(
        name="",
        treatment_share=0.5,
        min_runs_per_arm=0,
        max_duration_seconds=10,
        treatments=[
            ex.Arm(name="Six!", overrides={"resources.memory_limit": "lots", "model": "gpt"}),
            ex.Arm(name="control", overrides={}),
        ],
        target=ex.Target(env="prod"),
        guardrails=["oom_rate", "oom_rate"],
    )
    fields = dict(ex.validate(bad))
    assert fields["name"] == "must be 1 to 200 characters"
    assert fields["treatment_share"] == "must be > 0 and <= 0.2"
    assert "min_runs_per_arm" in fields and "max_duration_seconds" in fields
    assert fields["treatments[0].name"] == "must be a DNS-1123 label"
    assert "Kubernetes quantity" in fields["treatments[0].overrides.resources.memory_limit"]
    assert "only change the parameter" in fields["treatments[0].overrides.model"]
    assert fields["treatments[1].name"] == "arm names must be unique"
    assert "must set the parameter" in fields["treatments[1].overrides"]
    assert "protected" in fields["target.env"]
    assert fields["guardrails"] == "must not repeat a metric"
    assert dict(ex.validate(experiment(parameter="image")))["parameter"].startswith("must be model")
    assert (
        ex.validate(
            experiment(
                parameter="harness.max_turns",
                treatments=[ex.Arm(name="more", overrides={"harness.max_turns": 40})],
            )
        )
        == []
    )


def test_assignment_is_stable_and_near_the_share() -> None:
    exp = experiment(
        treatment_share=0.2,
        treatments=[
            ex.Arm(name="a", overrides={"resources.memory_limit": "6Gi"}),
            ex.Arm(name="b", overrides={"resources.memory_limit": "8Gi"}),
        ],
    )
    runs = [new_ulid() for _ in range(20_000)]
    arms = [ex.arm_for(exp, r).name for r in runs]
    assert arms == [ex.arm_for(exp, r).name for r in runs]  # the same run always gets the same arm
    assert [ex.arm_for(exp, r.lower()).name for r in runs[:500]] == arms[:500]  # case of the id
    share_a, share_b = arms.count("a") / len(arms), arms.count("b") / len(arms)
    # 20,000 draws: the standard error of a 10 % share is 0.2 points; allow 5 of them.
    assert share_a == pytest.approx(0.10, abs=0.01) and share_b == pytest.approx(0.10, abs=0.01)
    other = experiment(treatment_share=0.2)
    # another experiment splits the same runs independently
    together = sum(
        1 for r in runs if ex.arm_for(other, r).name == "six" and ex.arm_for(exp, r).name != "control"
    )
    assert together / len(runs) == pytest.approx(0.04, abs=0.01)


def test_matching_rules() -> None:
    exp = experiment(target=ex.Target(project="demo", spec="spec-a", labels={"team": "core"}))
    assert ex.matches(exp, facts(labels={"team": "core", "x": "y"}))
    assert not ex.matches(exp, facts(labels={}))
    assert not ex.matches(exp, facts(project="other", labels={"team": "core"}))
    assert not ex.matches(exp, facts(spec_id="spec-b", labels={"team": "core"}))
    everywhere = experiment(target=ex.Target())
    assert ex.matches(everywhere, facts(project="other"))
    assert not ex.matches(everywhere, facts(env="prod"))  # protected: never without approval
    opted_in = experiment(target=ex.Target(), protected_env=True)
    assert not ex.matches(opted_in, facts(env="prod"))
    approved = msgspec.structs.replace(opted_in, approvals=[ex.Approval(by="root", at=T0, kind="start")])
    assert ex.matches(approved, facts(env="production"))


def test_one_experiment_per_parameter_first_by_creation() -> None:
    first = experiment(treatment_share=0.2)
    second = experiment(created_at=T0 + timedelta(hours=1), treatment_share=0.2)
    model = experiment(
        created_at=T0 + timedelta(hours=2),
        parameter="model",
        control=ex.Arm(name="control"),
        treatments=[ex.Arm(name="small", overrides={"model": "gpt-small"})],
    )
    paused = experiment(created_at=T0 - timedelta(hours=1), state="paused")
    chosen = ex.assign([model, second, paused, first], facts())
    assert [e.id for e, _ in chosen] == [first.id, model.id]


def test_defaults_then_arm_overrides() -> None:
    exp = experiment(
        parameter="model",
        treatments=[ex.Arm(name="small", overrides={"model": "gpt-small"})],
    )
    defaults = ex.Defaults(
        overrides={"resources.memory_limit": "6Gi", "model": "gpt-big", "harness.depth": 3}
    )
    params, stamps = ex.configure(PARAMS, defaults, [(exp, exp.treatments[0])])
    assert params.resources.memory_limit == "6Gi" and params.resources.cpu_limit == "2"
    assert params.workload.env == {"FABRIK_MODEL": "gpt-small", "FABRIK_HARNESS_DEPTH": "3"}
    assert stamps == [ExperimentArmRef(id=exp.id, arm="small")]
    assert ex.parse_stamp_text(ex.stamp_text(stamps)) == {exp.id: "small"}
    timed = ex.apply_overrides(PARAMS, {"timeout_seconds": 60, "template": "high-cpu", "budget_usd": 2})
    assert (timed.timeout_seconds, timed.template, timed.budget_usd) == (60, "high-cpu", 2.0)
    assert ex.apply_overrides(PARAMS, {}) is PARAMS
