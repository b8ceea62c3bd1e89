"""The scheduler's view of experiments (fabrik_scheduler.experiments): what a dispatch gets."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec

from fabrik_common import experiments as ex
from fabrik_common.events import Resources, RunParameters
from fabrik_common.ids import new_ulid
from fabrik_common.runs import RunRecord
from fabrik_scheduler.experiments import ExperimentView

T0 = datetime(2026, 3, 2, 10, 0, tzinfo=UTC)
SMALL = Resources(cpu_request="500m", memory_request="1Gi", cpu_limit="2", memory_limit="4Gi")


def record(project: str = "demo", attempt: int = 1, **params: object) -> RunRecord:
    """A run as the gateway records one submitted without resources: the `default` template's."""
    fields: dict[str, object] = {"resources": SMALL, "template": "default", **params}
    return RunRecord(
        run_id=new_ulid(),
        project=project,
        env="dev",
        params=RunParameters(**fields),  # type: ignore[arg-type]
        state="starting",
        attempt=attempt,
        created_at=T0,
        state_entered_at=T0,
    )


def experiment(share: float = 0.2) -> ex.Experiment:
    return ex.Experiment(
        id=new_ulid(),
        name="more memory",
        target=ex.Target(project="demo"),
        parameter="resources.memory_limit",
        control=ex.Arm(name="control"),
        treatments=[ex.Arm(name="six", overrides={"resources.memory_limit": "6Gi"})],
        treatment_share=share,
        created_at=T0,
        created_by="alice",
        state="active",
    )


def view_with(*entries: tuple[str, msgspec.Struct | None]) -> ExperimentView:
    view = ExperimentView()
    for key, value in entries:
        view.observe(key, None if value is None else ex.encode(value))
    return view


def test_defaults_and_arms_are_applied_and_stamped() -> None:
    exp = experiment()
    view = view_with(
        (ex.experiment_key(exp.id), exp),
        (
            ex.DEFAULTS_KEY,
            ex.Defaults(overrides={"resources.cpu_limit": "3", "resources.memory_limit": "5Gi"}),
        ),
    )
    arms: dict[str, int] = {}
    for _ in range(400):
        r = record()
        view.configure(r)
        assert r.params.resources.cpu_limit == "3"
        assert r.experiments and r.experiments[0].id == exp.id
        arm = r.experiments[0].arm
        arms[arm] = arms.get(arm, 0) + 1
        assert r.params.resources.memory_limit == ("6Gi" if arm == "six" else "5Gi")
        assert r.experiment_arm == f"{exp.id}/{arm}"
        assert ex.arm_for(exp, r.run_id).name == arm
    assert 40 <= arms["six"] <= 120  # 20 % of 400 = 80, sd 8
    other = record(project="other")
    view.configure(other)
    assert other.experiments == [] and other.experiment_arm is None


def test_what_the_request_pinned_is_left_alone() -> None:
    # Resources given explicitly (no template) and a budget: neither the defaults nor an
    # experiment on them change the run; the rest of the configuration still applies.
    exp = experiment(share=1.0)
    view = view_with(
        (ex.experiment_key(exp.id), exp),
        (
            ex.DEFAULTS_KEY,
            ex.Defaults(overrides={"resources.memory_limit": "5Gi", "budget_usd": 9, "model": "m"}),
        ),
    )
    explicit = record(template=None, budget_usd=2.0)
    view.configure(explicit)
    assert explicit.params.resources == SMALL and explicit.params.budget_usd == 2.0
    assert explicit.params.workload.env == {"FABRIK_MODEL": "m"}
    assert explicit.experiments == [] and explicit.experiment_arm is None
    templated = record()
    view.configure(templated)
    assert templated.params.resources.memory_limit == "6Gi" and templated.params.budget_usd == 9
    assert ex.pinned_parameters(explicit.params) == {
        "resources.cpu_request",
        "resources.memory_request",
        "resources.cpu_limit",
        "resources.memory_limit",
        "budget_usd",
    }


def test_later_attempts_keep_the_first_configuration() -> None:
    exp = experiment(share=0.2)
    view = view_with((ex.experiment_key(exp.id), exp))
    r = record()
    view.configure(r)
    first = (list(r.experiments), r.params)
    view.observe(ex.DEFAULTS_KEY, ex.encode(ex.Defaults(overrides={"resources.memory_limit": "9Gi"})))
    r.attempt = 2
    view.configure(r)
    assert (r.experiments, r.params) == first
    resumed = record(attempt=2)  # e.g. dispatched before experiments existed: nothing changes
    view.configure(resumed)
    assert resumed.params.resources.memory_limit == "4Gi" and resumed.experiments == []


def test_pause_stops_assignment_but_not_defaults() -> None:
    exp = experiment()
    view = view_with(
        (ex.experiment_key(exp.id), exp),
        (ex.DEFAULTS_KEY, ex.Defaults(overrides={"resources.memory_limit": "5Gi"})),
        (ex.PAUSE_KEY, ex.OptimizerPause(paused=True, reason="incident")),
    )
    for _ in range(50):
        r = record()
        view.configure(r)
        assert r.experiments == [] and r.params.resources.memory_limit == "5Gi"
    view.observe(ex.PAUSE_KEY, None)
    assigned = [record() for _ in range(50)]
    for r in assigned:
        view.configure(r)
    assert all(r.experiments for r in assigned)


def test_ended_deleted_and_undecodable_entries() -> None:
    exp = experiment()
    view = view_with((ex.experiment_key(exp.id), exp))
    view.observe(ex.experiment_key(exp.id), b"{not json")  # kept as it was
    assert view.active() == [exp]
    view.observe(ex.experiment_key(exp.id), ex.encode(msgspec.structs.replace(exp, state="stopped")))
    assert view.active() == []
    view.observe(ex.experiment_key(exp.id), None)
    assert view.experiments == {}
    view.observe("budgets.global", b"100")  # other keys of the bucket are not ours
    assert view.defaults == ex.Defaults()
