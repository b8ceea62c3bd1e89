"""Admission and weighted fair share between projects. Pure: no NATS, no clock.

Order of dispatch: among the projects with queued runs, the one with the lowest weighted dominant
share goes next (its share of the cluster limits for runs, CPU and memory, whichever is largest,
divided by its weight); ties go to the higher priority, then to the older run. Inside a project,
runs are taken by priority, then oldest first, and a head that does not fit blocks the project's
later runs (no overtaking inside a project) while other projects may still proceed.
"""

from __future__ import annotations

import bisect
import heapq
from dataclasses import dataclass, field

PRIORITY_RANK = {"high": 2, "normal": 1, "low": 0}


@dataclass(frozen=True)
class Demand:
    runs: int
    cpu: float
    memory: int

    def __add__(self, other: Demand) -> Demand:
        return Demand(self.runs + other.runs, self.cpu + other.cpu, self.memory + other.memory)

    def __sub__(self, other: Demand) -> Demand:
        return Demand(self.runs - other.runs, self.cpu - other.cpu, self.memory - other.memory)

    def fits_within(self, limit: Demand) -> bool:
        return self.runs <= limit.runs and self.cpu <= limit.cpu + 1e-9 and self.memory <= limit.memory


ZERO = Demand(0, 0.0, 0)


@dataclass(frozen=True)
class QueuedRun:
    run_id: str
    project: str
    priority: str
    queued_seq: int
    demand: Demand

    def sort_key(self) -> tuple[int, int, str]:
        return (-PRIORITY_RANK[self.priority], self.queued_seq, self.run_id)


@dataclass
class _ProjectQueue:
    runs: list[tuple[tuple[int, int, str], QueuedRun]] = field(default_factory=list)

    def head(self) -> QueuedRun | None:
        return self.runs[0][1] if self.runs else None


class FairShareQueue:
    def __init__(
        self,
        cluster: Demand,
        project_default: Demand,
        project_overrides: dict[str, Demand] | None = None,
        weights: dict[str, float] | None = None,
    ) -> None:
        self.cluster = cluster
        self.project_default = project_default
        self.project_overrides = project_overrides or {}
        self.weights = weights or {}
        self._queues: dict[str, _ProjectQueue] = {}
        self._queued: dict[str, QueuedRun] = {}
        self._active: dict[str, QueuedRun] = {}
        self.usage: dict[str, Demand] = {}
        self.total = ZERO

    # ---- membership

    def __len__(self) -> int:
        return len(self._queued)

    def __contains__(self, run_id: object) -> bool:
        return run_id in self._queued

    def add(self, run: QueuedRun) -> None:
        if run.run_id in self._queued:
            return
        self._queued[run.run_id] = run
        queue = self._queues.setdefault(run.project, _ProjectQueue())
        bisect.insort(queue.runs, (run.sort_key(), run))

    def remove(self, run_id: str) -> QueuedRun | None:
        run = self._queued.pop(run_id, None)
        if run is None:
            return None
        queue = self._queues[run.project]
        index = bisect.bisect_left(queue.runs, (run.sort_key(),))
        while queue.runs[index][1].run_id != run_id:
            index += 1
        del queue.runs[index]
        if not queue.runs:
            del self._queues[run.project]
        return run

    def mark_active(self, run: QueuedRun) -> None:
        """The run holds resources now (starting, running or cancelling)."""
        self.remove(run.run_id)
        if run.run_id in self._active:
            return
        self._active[run.run_id] = run
        self.usage[run.project] = self.usage.get(run.project, ZERO) + run.demand
        self.total = self.total + run.demand

    def release(self, run_id: str) -> None:
        run = self._active.pop(run_id, None)
        if run is None:
            return
        self.usage[run.project] = self.usage[run.project] - run.demand
        if self.usage[run.project] == ZERO:
            del self.usage[run.project]
        self.total = self.total - run.demand

    def is_active(self, run_id: str) -> bool:
        return run_id in self._active

    @property
    def active_count(self) -> int:
        return len(self._active)

    # ---- decisions

    def project_limit(self, project: str) -> Demand:
        return self.project_overrides.get(project, self.project_default)

    def _share(self, project: str, usage: Demand) -> float:
        c = self.cluster
        dominant = max(
            usage.runs / c.runs if c.runs else 0.0,
            usage.cpu / c.cpu if c.cpu else 0.0,
            usage.memory / c.memory if c.memory else 0.0,
        )
        return dominant / self.weights.get(project, 1.0)

    def _entry(self, project: str, usage: Demand, run: QueuedRun) -> tuple[float, int, int, str, str]:
        return (
            self._share(project, usage),
            -PRIORITY_RANK[run.priority],
            run.queued_seq,
            run.run_id,
            project,
        )

    def select(self, limit: int | None = None) -> list[QueuedRun]:
        """The runs to dispatch now (at most `limit`), in order, within every limit.

        Does not change the queue."""
        usage = dict(self.usage)
        total = self.total
        cursor = {p: 0 for p in self._queues}
        heap = [self._entry(p, usage.get(p, ZERO), q.runs[0][1]) for p, q in self._queues.items()]
        heapq.heapify(heap)
        chosen: list[QueuedRun] = []
        while heap and (limit is None or len(chosen) < limit):
            *_, project = heapq.heappop(heap)
            queue = self._queues[project].runs
            run = queue[cursor[project]][1]
            project_usage = usage.get(project, ZERO) + run.demand
            if not (total + run.demand).fits_within(self.cluster) or not project_usage.fits_within(
                self.project_limit(project)
            ):
                continue  # the head does not fit: this project waits, others may go
            chosen.append(run)
            usage[project] = project_usage
            total = total + run.demand
            cursor[project] += 1
            if cursor[project] < len(queue):
                heapq.heappush(heap, self._entry(project, project_usage, queue[cursor[project]][1]))
        return chosen

    def order(self) -> list[QueuedRun]:
        """Every queued run in the order it would be dispatched if capacity kept freeing up."""
        usage = dict(self.usage)
        cursor = {p: 0 for p in self._queues}
        heap = [self._entry(p, usage.get(p, ZERO), q.runs[0][1]) for p, q in self._queues.items()]
        heapq.heapify(heap)
        ordered: list[QueuedRun] = []
        while heap:
            *_, project = heapq.heappop(heap)
            queue = self._queues[project].runs
            run = queue[cursor[project]][1]
            ordered.append(run)
            usage[project] = usage.get(project, ZERO) + run.demand
            cursor[project] += 1
            if cursor[project] < len(queue):
                heapq.heappush(heap, self._entry(project, usage[project], queue[cursor[project]][1]))
        return ordered
