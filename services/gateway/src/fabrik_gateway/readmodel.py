"""The gateway's read model of runs and of the queue: in memory, NATS-free, fed by `feeds.py`.

Runs are kept by id, with sorted indexes of run ids (ULIDs, so sorting by id sorts by creation
time) for all runs, per project, per state, per (project, state) and per label pair. A page of
`GET /runs` walks the smallest index that covers the filters backwards from the cursor, so its
cost does not depend on how many runs are stored. Runs the gateway has submitted but the
scheduler has not recorded yet are kept as *pending* views (state `queued`) until their record
arrives, so a `GET` right after a `POST` finds the run.
"""

from __future__ import annotations

import heapq
import itertools
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime, timedelta
from typing import Final, TypeVar

from fabrik_common.runs import QueueEntry, QueueSnapshot, RunRecord
from fabrik_gateway.models import (
    HealthView,
    ProgressView,
    ProjectSummary,
    QueueInfo,
    QueueItem,
    QueueView,
    ResourcesView,
    RunView,
    TokensView,
)

Label = tuple[str, str]
K = TypeVar("K")
UNKNOWN_STATE: Final = "queued"


class SortedIds:
    """Run ids in ascending order; iteration from newest (largest) backwards."""

    __slots__ = ("_ids",)

    def __init__(self, ids: Iterable[str] = ()) -> None:
        self._ids: list[str] = sorted(set(ids))

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, run_id: object) -> bool:
        if not isinstance(run_id, str):
            return False
        i = bisect_left(self._ids, run_id)
        return i < len(self._ids) and self._ids[i] == run_id

    def add(self, run_id: str) -> None:
        ids = self._ids
        if not ids or run_id > ids[-1]:  # the common case: a new run is the newest
            ids.append(run_id)
            return
        i = bisect_left(ids, run_id)
        if i == len(ids) or ids[i] != run_id:
            ids.insert(i, run_id)

    def discard(self, run_id: str) -> None:
        ids = self._ids
        i = bisect_left(ids, run_id)
        if i < len(ids) and ids[i] == run_id:
            del ids[i]

    def newest_first(self, before: str | None = None) -> Iterator[str]:
        """Ids strictly smaller than `before` (all if None), largest first."""
        ids = self._ids
        end = len(ids) if before is None else bisect_left(ids, before)
        for i in range(end - 1, -1, -1):
            yield ids[i]

    def oldest_first(self, after: str | None = None) -> Iterator[str]:
        """Ids strictly larger than `after` (all if None), smallest first."""
        ids = self._ids
        start = 0 if after is None else bisect_right(ids, after)
        for i in range(start, len(ids)):
            yield ids[i]


class ReadModel:
    def __init__(self, *, queue_ahead_max: int = 20) -> None:
        self.queue_ahead_max = queue_ahead_max
        self._runs: dict[str, RunRecord] = {}
        self._pending: set[str] = set()
        self._all = SortedIds()
        self._by_project: dict[str, SortedIds] = {}
        self._by_state: dict[str, SortedIds] = {}
        self._by_project_state: dict[tuple[str, str], SortedIds] = {}
        self._by_label: dict[Label, SortedIds] = {}
        self._queue: QueueSnapshot | None = None
        self._queue_index: dict[str, int] = {}
        self._search_text: dict[str, tuple[RunRecord, str]] = {}
        """What text search looks in, per run (built on the first search, renewed with the record)."""
        self.ready = False
        """True once the initial content of the `runs` bucket has been loaded."""

    # ---------------------------------------------------------------- writes

    def load(self, records: Iterable[RunRecord]) -> None:
        """Replace every recorded run by `records` (the bucket's content); pending views stay
        unless their record is among them. Indexes are built by sorting once."""
        runs: dict[str, RunRecord] = {r.run_id: r for r in records}
        pending = {run_id for run_id in self._pending if run_id not in runs}
        for run_id in pending:
            runs[run_id] = self._runs[run_id]
        self._runs = runs
        self._pending = pending
        self._search_text = {}
        by_project: dict[str, list[str]] = {}
        by_state: dict[str, list[str]] = {}
        by_project_state: dict[tuple[str, str], list[str]] = {}
        by_label: dict[Label, list[str]] = {}
        for run_id, record in runs.items():
            by_project.setdefault(record.project, []).append(run_id)
            by_state.setdefault(record.state, []).append(run_id)
            by_project_state.setdefault((record.project, record.state), []).append(run_id)
            for label in record.params.labels.items():
                by_label.setdefault(label, []).append(run_id)
        self._all = SortedIds(runs)
        self._by_project = {k: SortedIds(v) for k, v in by_project.items()}
        self._by_state = {k: SortedIds(v) for k, v in by_state.items()}
        self._by_project_state = {k: SortedIds(v) for k, v in by_project_state.items()}
        self._by_label = {k: SortedIds(v) for k, v in by_label.items()}
        self.ready = True

    def upsert(self, record: RunRecord) -> None:
        """The scheduler's record of a run (new or changed); replaces a pending view."""
        old = self._runs.get(record.run_id)
        self._pending.discard(record.run_id)
        self._runs[record.run_id] = record
        if old is None:
            self._index(record)
        elif (old.project, old.state, old.params.labels) != (
            record.project,
            record.state,
            record.params.labels,
        ):
            self._unindex(old)
            self._index(record)

    def add_pending(self, record: RunRecord) -> bool:
        """A run submitted through this gateway, until its record arrives. False if known already."""
        if record.run_id in self._runs:
            return False
        self._runs[record.run_id] = record
        self._pending.add(record.run_id)
        self._index(record)
        return True

    def remove(self, run_id: str) -> None:
        """A record deleted from the bucket."""
        old = self._runs.pop(run_id, None)
        self._pending.discard(run_id)
        self._search_text.pop(run_id, None)
        if old is not None:
            self._unindex(old)

    def set_queue(self, snapshot: QueueSnapshot | None) -> None:
        self._queue = snapshot
        self._queue_index = {e.run_id: i for i, e in enumerate(snapshot.entries)} if snapshot else {}

    def _index(self, record: RunRecord) -> None:
        run_id = record.run_id
        self._all.add(run_id)
        self._by_project.setdefault(record.project, SortedIds()).add(run_id)
        self._by_state.setdefault(record.state, SortedIds()).add(run_id)
        self._by_project_state.setdefault((record.project, record.state), SortedIds()).add(run_id)
        for label in record.params.labels.items():
            self._by_label.setdefault(label, SortedIds()).add(run_id)

    def _unindex(self, record: RunRecord) -> None:
        run_id = record.run_id
        self._all.discard(run_id)
        _discard(self._by_project, record.project, run_id)
        _discard(self._by_state, record.state, run_id)
        _discard(self._by_project_state, (record.project, record.state), run_id)
        for label in record.params.labels.items():
            _discard(self._by_label, label, run_id)

    # ---------------------------------------------------------------- reads

    def __len__(self) -> int:
        return len(self._runs)

    def get(self, run_id: str) -> RunRecord | None:
        return self._runs.get(run_id)

    def is_pending(self, run_id: str) -> bool:
        return run_id in self._pending

    def query(
        self,
        *,
        project: str | None = None,
        states: Sequence[str] = (),
        labels: Sequence[Label] = (),
        before: str | None = None,
        limit: int = 50,
        visible: frozenset[str] | None = None,
        text: str | None = None,
        oldest_first: bool = False,
        healths: Sequence[str] = (),
    ) -> tuple[list[RunRecord], str | None]:
        """A page of runs, newest first, strictly older than `before`; and the cursor of the next
        page (the last id of this one) or None when nothing is left. `visible`: only runs of these
        projects (None: of every project). `text`: only runs where it occurs (case-insensitive) in
        the id, project, env, spec, requester, reason, message or a `key=value` label. With
        `oldest_first`, the order is reversed and `before` means "strictly newer than"."""
        state_set = frozenset(states)
        health_set = frozenset(healths)
        label_list = list(dict.fromkeys(labels))
        if project is not None:
            project_set: frozenset[str] | None = (
                frozenset((project,)) if visible is None or project in visible else frozenset()
            )
        else:
            project_set = visible
        if project_set is not None and not project_set:
            return [], None
        candidates = self._candidates(
            sorted(project_set) if project_set is not None else None, sorted(state_set), label_list
        )
        if candidates is None:
            return [], None
        sources, _ = candidates
        if oldest_first:
            walks = [s.oldest_first(before) for s in sources]
        else:
            walks = [s.newest_first(before) for s in sources]
        ordered: Iterator[str] = (
            walks[0] if len(walks) == 1 else heapq.merge(*walks, reverse=not oldest_first)
        )
        needle = text.casefold() if text else None
        items: list[RunRecord] = []
        for run_id in ordered:
            record = self._runs[run_id]
            if project_set is not None and record.project not in project_set:
                continue
            if state_set and record.state not in state_set:
                continue
            if label_list and any(record.params.labels.get(k) != v for k, v in label_list):
                continue
            if needle is not None and needle not in self._searchable(record):
                continue
            if health_set and record.health.state not in health_set:
                continue
            if len(items) == limit:
                return items, items[-1].run_id
            items.append(record)
        return items, None

    def _searchable(self, record: RunRecord) -> str:
        cached = self._search_text.get(record.run_id)
        if cached is not None and cached[0] is record:
            return cached[1]
        text = _search_text(record)
        self._search_text[record.run_id] = (record, text)
        return text

    def _candidates(
        self, projects: list[str] | None, states: list[str], labels: list[Label]
    ) -> tuple[list[SortedIds], int] | None:
        """The smallest set of indexes whose union contains every match (None: no match)."""
        options: list[tuple[list[SortedIds], int]] = []
        if projects is not None and states:
            parts = [self._by_project_state.get((p, s)) for p in projects for s in states]
            options.append(_union(parts))
        elif states:
            options.append(_union([self._by_state.get(s) for s in states]))
        elif projects is not None:
            options.append(_union([self._by_project.get(p) for p in projects]))
        for label in labels:
            options.append(_union([self._by_label.get(label)]))
        if not options:
            return [self._all], len(self._all)
        best = min(options, key=lambda option: option[1])
        if best[1] == 0:
            return None
        return best

    def projects(self, visible: frozenset[str] | None = None) -> list[ProjectSummary]:
        summaries: dict[str, ProjectSummary] = {}
        for (project, state), ids in sorted(self._by_project_state.items()):
            if not ids or (visible is not None and project not in visible):
                continue
            summary = summaries.setdefault(project, ProjectSummary(project=project, total=0, states={}))
            summary.states[state] = len(ids)
            summary.total += len(ids)
        return list(summaries.values())

    # ---------------------------------------------------------------- views

    def view(self, record: RunRecord) -> RunView:
        params = record.params
        progress = record.progress
        resources = params.resources
        return RunView(
            run_id=record.run_id,
            project=record.project,
            env=record.env,
            spec_id=record.spec_id,
            state=record.state,
            reason=record.reason,
            message=record.message,
            attempt=record.attempt,
            queue=self.queue_info(record.run_id) if record.state == "queued" else None,
            progress=ProgressView(
                phase=progress.phase,
                task=progress.task,
                finished=progress.finished,
                total=progress.total,
                message=progress.message,
                updated_at=progress.updated_at,
            ),
            created_at=record.created_at,
            queued_at=record.queued_at,
            started_at=record.started_at,
            finished_at=record.finished_at,
            exit_code=record.exit_code,
            cost_usd=record.cost_usd,
            tokens=TokensView(input=record.tokens.input, output=record.tokens.output),
            labels=dict(params.labels),
            priority=params.priority,
            template=params.template,
            resources=ResourcesView(
                cpu_request=resources.cpu_request,
                memory_request=resources.memory_request,
                cpu_limit=resources.cpu_limit,
                memory_limit=resources.memory_limit,
            ),
            timeout_seconds=params.timeout_seconds,
            budget_usd=params.budget_usd,
            image_digest=record.image_digest,
            requested_by=record.requested_by,
            recorded=record.run_id not in self._pending,
            schedule_id=params.schedule_id,
            schedule_slot=params.schedule_slot,
            health=HealthView(
                state=record.health.state,
                since=record.health.since,
                reason=record.health.reason,
                category=record.health.category,
                message=record.health.message,
                last_progress_at=record.health.last_progress_at,
                heals=record.health.heals,
                heals_total=record.health.heals_total,
            ),
        )

    def queue_info(self, run_id: str) -> QueueInfo:
        snapshot = self._queue
        index = self._queue_index.get(run_id)
        if snapshot is None or index is None:
            return QueueInfo(snapshot_at=snapshot.taken_at if snapshot else None)
        entry = snapshot.entries[index]
        ahead = [e.run_id for e in itertools.islice(snapshot.entries, min(index, self.queue_ahead_max))]
        return QueueInfo(
            position=index + 1,
            ahead_count=index,
            ahead=ahead,
            eta_seconds=entry.eta_seconds,
            eta=_eta(snapshot, entry),
            snapshot_at=snapshot.taken_at,
        )

    def queue_view(
        self, *, project: str | None = None, limit: int | None = None, visible: frozenset[str] | None = None
    ) -> QueueView:
        """The queue; `visible`: only these projects' runs, usage and limits (positions stay global)."""
        snapshot = self._queue
        if snapshot is None:
            return QueueView(taken_at=None, total=0, running=0, items=[], usage={}, limits={})
        items: list[QueueItem] = []
        for index, entry in enumerate(snapshot.entries):
            if project is not None and entry.project != project:
                continue
            if visible is not None and entry.project not in visible:
                continue
            if limit is not None and len(items) >= limit:
                break
            items.append(
                QueueItem(
                    position=index + 1,
                    run_id=entry.run_id,
                    project=entry.project,
                    priority=entry.priority,
                    eta_seconds=entry.eta_seconds,
                    eta=_eta(snapshot, entry),
                )
            )
        return QueueView(
            taken_at=snapshot.taken_at,
            total=snapshot.total,
            running=snapshot.running,
            items=items,
            usage=snapshot.usage
            if visible is None
            else {k: v for k, v in snapshot.usage.items() if k in visible},
            limits=snapshot.limits
            if visible is None
            else {k: v for k, v in snapshot.limits.items() if k in visible},
        )


def _eta(snapshot: QueueSnapshot, entry: QueueEntry) -> datetime | None:
    if entry.eta_seconds is None:
        return None
    return snapshot.taken_at + timedelta(seconds=entry.eta_seconds)


def _search_text(record: RunRecord) -> str:
    """What an operator searches a run by, case-folded, fields separated by a newline (which no
    search text holds, so that a match never spans two fields)."""
    fields = [
        record.run_id,
        record.project,
        record.env,
        record.spec_id or "",
        record.requested_by or "",
        record.reason or "",
        record.message or "",
        *(f"{k}={v}" for k, v in record.params.labels.items()),
    ]
    return "\n".join(fields).casefold()


def _union(parts: Sequence[SortedIds | None]) -> tuple[list[SortedIds], int]:
    present = [p for p in parts if p is not None and len(p)]
    return present, sum(len(p) for p in present)


def _discard(index: dict[K, SortedIds], key: K, run_id: str) -> None:
    ids = index.get(key)
    if ids is not None:
        ids.discard(run_id)
        if not ids:
            del index[key]
