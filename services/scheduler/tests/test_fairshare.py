from __future__ import annotations

import random

from fabrik_scheduler.fairshare import Demand, FairShareQueue, QueuedRun

CLUSTER = Demand(4, 8.0, 16 * 2**30)
SMALL = Demand(1, 0.5, 2**30)
seq = iter(range(1_000_000))


def run(run_id: str, project: str, priority: str = "normal", demand: Demand = SMALL) -> QueuedRun:
    return QueuedRun(run_id=run_id, project=project, priority=priority, queued_seq=next(seq), demand=demand)


def make(project_default: Demand = CLUSTER, **kwargs: object) -> FairShareQueue:
    return FairShareQueue(CLUSTER, project_default, **kwargs)  # type: ignore[arg-type]


def test_fifo_inside_a_project_with_priority_first() -> None:
    q = make()
    for r in [run("a1", "a"), run("a2", "a", "low"), run("a3", "a", "high"), run("a4", "a")]:
        q.add(r)
    assert [r.run_id for r in q.order()] == ["a3", "a1", "a4", "a2"]


def test_flooding_project_does_not_starve_another() -> None:
    q = make()
    for i in range(200):
        q.add(run(f"a{i:03}", "a"))
    for i in range(5):
        q.add(run(f"b{i}", "b"))
    order = [r.run_id for r in q.order()]
    # b's runs are interleaved with a's from the start, not after a's 200.
    positions = [order.index(f"b{i}") for i in range(5)]
    assert positions == [1, 3, 5, 7, 9]


def test_weights_shift_the_share() -> None:
    q = make(weights={"a": 3.0})
    for i in range(30):
        q.add(run(f"a{i:02}", "a"))
        q.add(run(f"b{i:02}", "b"))
    first_twelve = [r.project for r in q.order()[:12]]
    assert first_twelve.count("a") == 9
    assert first_twelve.count("b") == 3


def test_select_never_exceeds_cluster_or_project_limits() -> None:
    q = make(project_default=Demand(2, 8.0, 16 * 2**30))
    for i in range(10):
        q.add(run(f"a{i}", "a"))
        q.add(run(f"b{i}", "b"))
    chosen = q.select()
    assert [r.project for r in chosen].count("a") == 2
    assert [r.project for r in chosen].count("b") == 2
    for r in chosen:
        q.mark_active(r)
    assert q.select() == []
    q.release(chosen[0].run_id)
    again = q.select()
    assert [r.project for r in again] == [chosen[0].project]


def test_a_head_that_does_not_fit_blocks_only_its_own_project() -> None:
    big = Demand(1, 6.0, 2**30)
    q = make()
    q.mark_active(run("running", "x", demand=Demand(1, 4.0, 2**30)))
    q.add(run("a-big", "a", demand=big))
    q.add(run("a-small", "a"))
    q.add(run("b-small", "b"))
    assert [r.run_id for r in q.select()] == ["b-small"]


def test_random_workload_keeps_every_limit_at_every_instant() -> None:
    rng = random.Random(7)
    project_limit = Demand(3, 5.0, 12 * 2**30)
    q = make(project_default=project_limit)
    active: list[QueuedRun] = []
    for i in range(400):
        demand = Demand(1, rng.choice([0.5, 1.0, 2.0]), rng.choice([1, 2, 4]) * 2**30)
        q.add(run(f"r{i}", rng.choice("abc"), rng.choice(["low", "normal", "high"]), demand))
    while len(q) or active:
        for r in q.select():
            q.mark_active(r)
            active.append(r)
        total = Demand(0, 0.0, 0)
        for r in active:
            total = total + r.demand
        assert total.fits_within(CLUSTER)
        for project in "abc":
            used = [r.demand for r in active if r.project == project]
            project_total = Demand(0, 0.0, 0)
            for d in used:
                project_total = project_total + d
            assert project_total.fits_within(project_limit)
        assert active, "nothing running while runs are queued: a deadlock"
        done = active.pop(rng.randrange(len(active)))
        q.release(done.run_id)


def test_remove_and_membership() -> None:
    q = make()
    q.add(run("x", "a"))
    q.add(run("y", "a"))
    assert "x" in q
    assert q.remove("x") is not None
    assert q.remove("x") is None
    assert "x" not in q
    assert [r.run_id for r in q.order()] == ["y"]


def test_select_stops_at_its_limit_in_the_same_order() -> None:
    q = make()
    for i in range(10):
        q.add(run(f"a{i}", "a"))
        q.add(run(f"b{i}", "b"))
    everything = q.select()
    assert [r.run_id for r in q.select(limit=3)] == [r.run_id for r in everything[:3]]
