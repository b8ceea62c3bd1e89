"""The run list of the dashboard: runs by id, kept current by live events, and their rows.

The list starts from a page of `GET /api/v1/runs` and is then changed by the messages of the live
stream (`GET /api/v1/stream`). An event is applied at most once (by `event_id`); an event of an
older attempt does not move a resumed run back. Where an event does not carry everything a row
shows (cost, timings of a new run), `apply` asks for the run to be read again (`RunChange.fetch`),
so the list converges to what the API says.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from fabrik_cli.output import NONE, format_age, format_cost, format_state, text
from fabrik_common.events import TERMINAL_STATES

COLUMNS: tuple[str, ...] = ("STATE", "PROJECT", "SPEC", "PHASE / TASK", "PROGRESS", "AGE", "COST", "RUN ID")
"""The columns of the runs list, in order."""

RUN_EVENT_PREFIX = "run."
LOG_CHUNK = "log.chunk"
REFETCH_EVENTS = frozenset({"run.requested", "run.state_changed", "run.finished", "run.started"})
"""Events after which the run is read again: they change fields no event carries (cost, timings)."""


def as_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def is_terminal(run: Mapping[str, Any]) -> bool:
    return run.get("state") in TERMINAL_STATES


# --------------------------------------------------------------------------------------------
# Rows


def phase_task(progress: Any) -> str:
    """`implement · 16:impl`, or `-`."""
    if not isinstance(progress, Mapping):
        return NONE
    words = [str(progress[k]) for k in ("phase", "task") if progress.get(k)]
    return " · ".join(words) or NONE


def progress_cell(progress: Any, width: int = 10) -> str:
    """`█████░░░░░  50% 3/6`, or `-` without counts."""
    if not isinstance(progress, Mapping):
        return NONE
    finished, total = as_int(progress.get("finished")), as_int(progress.get("total"))
    if finished is None or not total:
        return NONE if finished is None else str(finished)
    fraction = min(max(finished / total, 0.0), 1.0)
    filled = int(fraction * width)
    return f"{'█' * filled}{'░' * (width - filled)} {fraction * 100:3.0f}% {finished}/{total}"


def run_row(run: Mapping[str, Any], now: datetime) -> tuple[str, ...]:
    """The cells of one run, in `COLUMNS` order."""
    return (
        format_state(run),
        text(run.get("project")),
        text(run.get("spec_id")),
        phase_task(run.get("progress")),
        progress_cell(run.get("progress")),
        format_age(run.get("created_at"), now),
        format_cost(run.get("cost_usd")),
        text(run.get("run_id")),
    )


# --------------------------------------------------------------------------------------------
# Live events


@dataclass(frozen=True)
class RunChange:
    """What one message did to the list: which run changed, and whether to read it again."""

    run_id: str
    changed: bool
    fetch: bool
    added: bool = False


def event_body(message: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The event of a stream message (`{cursor, subject, type, event}`)."""
    body = message.get("event")
    return body if isinstance(body, Mapping) else None


def _spec_id(params: Any) -> str | None:
    if not isinstance(params, Mapping):
        return None
    spec = params.get("spec")
    if isinstance(spec, Mapping) and isinstance(spec.get("id"), str):
        return str(spec["id"])
    return None


def run_from_request(event: Mapping[str, Any]) -> dict[str, Any]:
    """A provisional run from its `run.requested` event, until the API is read."""
    params = event.get("params") if isinstance(event.get("params"), Mapping) else {}
    assert isinstance(params, Mapping)
    return {
        "run_id": event.get("run_id"),
        "project": event.get("project"),
        "env": event.get("env"),
        "spec_id": _spec_id(params),
        "state": "queued",
        "reason": None,
        "message": "",
        "attempt": 1,
        "progress": None,
        "created_at": event.get("occurred_at"),
        "started_at": None,
        "finished_at": None,
        "cost_usd": None,
        "priority": params.get("priority"),
        "labels": params.get("labels") or {},
        "requested_by": event.get("requested_by"),
    }


class RunStore:
    """Runs by id, newest first, changed by REST pages and live events."""

    def __init__(self, *, remember_events: int = 10_000) -> None:
        self.runs: dict[str, dict[str, Any]] = {}
        self._seen: set[str] = set()
        self._seen_order: deque[str] = deque()
        self._remember = remember_events

    def __len__(self) -> int:
        return len(self.runs)

    def get(self, run_id: str) -> dict[str, Any] | None:
        return self.runs.get(run_id)

    def ordered(self) -> list[dict[str, Any]]:
        """Newest first: run ids are ULIDs, so their order is the creation order."""
        return [self.runs[k] for k in sorted(self.runs, reverse=True)]

    def load(self, items: Iterable[Mapping[str, Any]]) -> None:
        """A page read from the API: each run replaces what the list had of it."""
        for item in items:
            self.upsert(item)

    def upsert(self, run: Mapping[str, Any]) -> bool:
        """A run as the API answered it; returns whether it was new."""
        run_id = run.get("run_id")
        if not isinstance(run_id, str):
            return False
        added = run_id not in self.runs
        self.runs[run_id] = dict(run)
        return added

    def remove(self, run_id: str) -> None:
        self.runs.pop(run_id, None)

    def _first_time(self, event_id: Any) -> bool:
        if not isinstance(event_id, str):
            return True
        if event_id in self._seen:
            return False
        self._seen.add(event_id)
        self._seen_order.append(event_id)
        if len(self._seen_order) > self._remember:
            self._seen.discard(self._seen_order.popleft())
        return True

    def apply(self, message: Mapping[str, Any]) -> RunChange | None:
        """One stream message; None when it is not a run event or was applied before."""
        kind = message.get("type")
        body = event_body(message)
        if not isinstance(kind, str) or not kind.startswith(RUN_EVENT_PREFIX) or body is None:
            return None
        run_id = body.get("run_id")
        if not isinstance(run_id, str) or not self._first_time(body.get("event_id")):
            return None
        fetch = kind in REFETCH_EVENTS
        run = self.runs.get(run_id)
        if run is None:
            if kind == "run.requested":
                self.runs[run_id] = run_from_request(body)
                return RunChange(run_id, changed=True, fetch=True, added=True)
            # a run this list has not read yet (older than the page, or from before the stream)
            return RunChange(run_id, changed=False, fetch=True)
        attempt = as_int(body.get("attempt"))
        current = as_int(run.get("attempt")) or 0
        if attempt is not None and attempt < current:
            return RunChange(run_id, changed=False, fetch=False)  # news of an earlier attempt
        changed = _apply_to(run, kind, body)
        if attempt is not None and attempt > current:
            run["attempt"] = attempt
            changed = True
        return RunChange(run_id, changed=changed, fetch=fetch)


def _apply_to(run: dict[str, Any], kind: str, event: Mapping[str, Any]) -> bool:
    when = event.get("occurred_at")
    if kind == "run.state_changed":
        to_state = event.get("to_state")
        if not isinstance(to_state, str):
            return False
        run["state"] = to_state
        run["reason"] = event.get("reason")
        run["message"] = event.get("message") or ""
        if to_state in TERMINAL_STATES:
            run.setdefault("finished_at", None)
            run["finished_at"] = run["finished_at"] or when
        elif to_state == "queued":
            run["finished_at"] = None
            run["started_at"] = None
        if to_state != "queued":
            run["queue"] = None
        return True
    if kind == "run.queued":
        if is_terminal(run):
            return False
        run["state"] = "queued"
        return True
    if kind == "run.started":
        run["started_at"] = when
        if event.get("image_digest"):
            run["image_digest"] = event["image_digest"]
        return True
    if kind == "run.progress":
        run["progress"] = {
            "phase": event.get("phase"),
            "task": event.get("task"),
            "finished": event.get("finished"),
            "total": event.get("total"),
            "message": event.get("message"),
            "updated_at": when,
        }
        return True
    if kind == "run.finished":
        run["exit_code"] = event.get("exit_code")
        run["finished_at"] = run.get("finished_at") or when
        return True
    return False
