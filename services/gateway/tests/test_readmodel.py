"""The read model without NATS: indexes, pagination, filters, pending views, queue positions."""

from __future__ import annotations

import random
import time
from datetime import UTC, datetime, timedelta

import pytest
from ulid import ULID

from fabrik_common.events import RunParameters
from fabrik_common.runs import TEMPLATES, QueueEntry, QueueSnapshot, RunRecord
from fabrik_gateway.readmodel import ReadModel, SortedIds

T0 = datetime(2025, 1, 1, tzinfo=UTC)


def ulids(n: int, start: datetime = T0) -> list[str]:
    """n distinct ULIDs, ascending (one per millisecond)."""
    return [str(ULID.from_datetime(start + timedelta(milliseconds=i))) for i in range(n)]


def record(
    run_id: str, project: str = "alpha", state: str = "queued", labels: dict[str, str] | None = None
) -> RunRecord:
    return RunRecord(
        run_id=run_id,
        project=project,
        env="dev",
        params=RunParameters(resources=TEMPLATES["default"], labels=labels or {}),
        state=state,  # type: ignore[arg-type]
        created_at=T0,
        state_entered_at=T0,
    )


def all_pages(model: ReadModel, limit: int, **filters: object) -> list[list[str]]:
    pages: list[list[str]] = []
    before = None
    while True:
        items, before = model.query(limit=limit, before=before, **filters)  # type: ignore[arg-type]
        pages.append([r.run_id for r in items])
        if before is None:
            return pages


def test_sorted_ids() -> None:
    ids = SortedIds(["b", "d", "a"])
    ids.add("c")
    ids.add("e")
    ids.add("c")
    assert list(ids.newest_first()) == ["e", "d", "c", "b", "a"]
    assert list(ids.newest_first("c")) == ["b", "a"]
    ids.discard("a")
    ids.discard("zz")
    assert len(ids) == 4 and "b" in ids and "a" not in ids


def test_pages_are_newest_first_without_duplicates_or_gaps() -> None:
    model = ReadModel()
    ids = ulids(1000)
    shuffled = ids[:]
    random.Random(1).shuffle(shuffled)
    model.load(record(i, project=("alpha", "beta")[n % 2]) for n, i in enumerate(shuffled))
    pages = all_pages(model, 64)
    flat = [i for page in pages for i in page]
    assert flat == sorted(ids, reverse=True)
    assert all(len(p) == 64 for p in pages[:-1]) and len(pages[-1]) == 1000 % 64
    exact = all_pages(model, 100)  # the last full page has no next cursor
    assert len(exact) == 10 and len(exact[-1]) == 100


def test_filters_by_project_state_and_label() -> None:
    model = ReadModel()
    ids = ulids(300)
    for n, run_id in enumerate(ids):
        model.upsert(
            record(
                run_id,
                project=("alpha", "beta", "gamma")[n % 3],
                state=("queued", "running", "succeeded", "failed")[n % 4],
                labels={"team": "a" if n % 5 == 0 else "b", "kind": "nightly"},
            )
        )

    def expected(pred: object) -> list[str]:
        assert callable(pred)
        return [i for n, i in reversed(list(enumerate(ids))) if pred(n)]

    def flat(**filters: object) -> list[str]:
        return [i for page in all_pages(model, 7, **filters) for i in page]

    assert flat(project="beta") == expected(lambda n: n % 3 == 1)
    assert flat(states=["running"]) == expected(lambda n: n % 4 == 1)
    assert flat(states=["running", "failed"]) == expected(lambda n: n % 4 in (1, 3))
    assert flat(project="alpha", states=["succeeded"]) == expected(lambda n: n % 3 == 0 and n % 4 == 2)
    assert flat(labels=[("team", "a")]) == expected(lambda n: n % 5 == 0)
    assert flat(project="gamma", labels=[("team", "a"), ("kind", "nightly")]) == expected(
        lambda n: n % 3 == 2 and n % 5 == 0
    )
    assert flat(project="nope") == []
    assert flat(labels=[("team", "zzz")]) == []


def test_state_changes_move_runs_between_indexes() -> None:
    model = ReadModel()
    a, b = ulids(2)
    model.upsert(record(a))
    model.upsert(record(b, project="beta"))
    assert [r.run_id for r in model.query(states=["queued"])[0]] == [b, a]
    model.upsert(record(a, state="running", labels={"x": "1"}))
    assert [r.run_id for r in model.query(states=["queued"])[0]] == [b]
    assert [r.run_id for r in model.query(states=["running"], labels=[("x", "1")])[0]] == [a]
    assert [(p.project, p.total, p.states) for p in model.projects()] == [
        ("alpha", 1, {"running": 1}),
        ("beta", 1, {"queued": 1}),
    ]
    model.remove(a)
    assert model.get(a) is None
    assert [p.project for p in model.projects()] == ["beta"]
    assert model.query(labels=[("x", "1")])[0] == []


def test_pending_views_until_the_record_arrives() -> None:
    model = ReadModel()
    a, b, c = ulids(3)
    assert model.add_pending(record(a))
    assert model.view(model.get(a)).recorded is False  # type: ignore[arg-type]
    model.load([record(b)])  # initial load keeps pending views
    assert model.is_pending(a) and model.get(b) is not None
    model.upsert(record(a, state="starting"))
    assert not model.is_pending(a)
    view = model.view(model.get(a))  # type: ignore[arg-type]
    assert view.state == "starting" and view.recorded is True
    assert not model.add_pending(record(a))  # the record wins over a late pending view
    assert model.get(a).state == "starting"  # type: ignore[union-attr]
    model.upsert(record(c))
    model.load([record(b)])  # a reload drops runs no longer in the bucket
    assert model.get(a) is None and model.get(c) is None and model.get(b) is not None


def test_queue_positions_and_view() -> None:
    model = ReadModel(queue_ahead_max=3)
    ids = ulids(6)
    for run_id in ids:
        model.upsert(record(run_id, project="beta" if run_id == ids[2] else "alpha"))
    model.upsert(record(ids[5], state="running"))
    queued = list(reversed(ids[:5]))  # dispatch order: newest first, say
    snapshot = QueueSnapshot(
        taken_at=T0,
        entries=[
            QueueEntry(run_id=r, project="alpha", priority="normal", eta_seconds=10.0 * i)
            for i, r in enumerate(queued)
        ],
        total=5,
        running=1,
        usage={"alpha": {"runs": 1.0}},
        limits={"alpha": {"runs": 10.0}},
    )
    model.set_queue(snapshot)
    info = model.view(model.get(queued[4])).queue  # type: ignore[arg-type]
    assert info is not None
    assert info.position == 5 and info.ahead_count == 4 and info.ahead == queued[:3]
    assert info.eta == T0 + timedelta(seconds=40) and info.eta_seconds == 40.0
    first = model.view(model.get(queued[0])).queue  # type: ignore[arg-type]
    assert first is not None and first.position == 1 and first.ahead == []
    assert model.view(model.get(ids[5])).queue is None  # type: ignore[arg-type]  # running: no queue
    view = model.queue_view()
    assert [(i.position, i.run_id) for i in view.items] == list(enumerate(queued, start=1))
    assert view.usage == {"alpha": {"runs": 1.0}} and view.running == 1
    assert len(model.queue_view(limit=2).items) == 2
    model.set_queue(None)
    assert model.queue_view().items == []
    unplaced = model.view(model.get(queued[0])).queue  # type: ignore[arg-type]
    assert unplaced is not None and unplaced.position is None


@pytest.mark.slow
def test_page_latency_with_100000_runs() -> None:
    model = ReadModel()
    ids = ulids(100_000)
    projects = [f"project-{i}" for i in range(20)]
    states = ["queued", "running", "succeeded", "failed", "cancelled"]
    rng = random.Random(7)
    started = time.perf_counter()
    model.load(
        record(
            run_id,
            project=rng.choice(projects),
            state=rng.choice(states),
            labels={"team": rng.choice("abcd")},
        )
        for run_id in ids
    )
    load_s = time.perf_counter() - started

    def measure(name: str, **filters: object) -> None:
        samples: list[float] = []
        before = None
        for _ in range(50):
            t = time.perf_counter()
            items, before = model.query(limit=50, before=before, **filters)  # type: ignore[arg-type]
            [model.view(r) for r in items]
            samples.append(time.perf_counter() - t)
            if before is None:
                break
        samples.sort()
        p50 = samples[len(samples) // 2] * 1000
        p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))] * 1000
        print(f"  {name:<34} p50 {p50:6.3f} ms  p99 {p99:6.3f} ms  ({len(samples)} pages of 50)")

    print(f"\n100,000 runs loaded in {load_s:.2f} s; one page of GET /runs (query + views):")
    measure("all")
    measure("project", project="project-3")
    measure("state", states=["running"])
    measure("project + state", project="project-3", states=["failed"])
    measure("label", labels=[("team", "b")])
    measure("project + state + label", project="project-3", states=["failed"], labels=[("team", "b")])
    t = time.perf_counter()
    model.upsert(record(ids[500], project="project-1", state="starting"))
    print(f"  one state change re-indexed in {(time.perf_counter() - t) * 1e6:.0f} µs")
    assert len(model) == 100_000
