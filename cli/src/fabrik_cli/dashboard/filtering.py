"""The `/` filter of the runs list: `project:NAME`, `state:A,B` and free text, all of them.

- `project:demo` (or `p:demo`): runs of that project; several `project:` terms are alternatives.
- `state:running,queued` (or `s:`): runs in any of those states; `state:active` stands for every
  state before the end, `state:done` for every final state.
- Any other word must occur (case-insensitively) in the run's id, project, env, spec, state,
  reason, phase, task or labels.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fabrik_common.events import TERMINAL_STATES

ACTIVE_STATES = frozenset({"queued", "starting", "running", "cancelling"})
STATE_GROUPS: dict[str, frozenset[str]] = {"active": ACTIVE_STATES, "done": frozenset(TERMINAL_STATES)}
PROJECT_KEYS = frozenset({"project", "p"})
STATE_KEYS = frozenset({"state", "s"})


@dataclass(frozen=True)
class RunFilter:
    projects: frozenset[str] = frozenset()
    states: frozenset[str] = frozenset()
    words: tuple[str, ...] = field(default=())

    @property
    def empty(self) -> bool:
        return not (self.projects or self.states or self.words)

    def describe(self) -> str:
        parts = []
        if self.projects:
            parts.append("project " + "|".join(sorted(self.projects)))
        if self.states:
            parts.append("state " + "|".join(sorted(self.states)))
        parts.extend(f'"{w}"' for w in self.words)
        return ", ".join(parts) if parts else "none"

    def matches(self, run: Mapping[str, Any]) -> bool:
        if self.projects and run.get("project") not in self.projects:
            return False
        if self.states and run.get("state") not in self.states:
            return False
        if self.words:
            haystack = searchable_text(run)
            return all(word in haystack for word in self.words)
        return True


def parse_filter(query: str) -> RunFilter:
    projects: set[str] = set()
    states: set[str] = set()
    words: list[str] = []
    for token in query.split():
        key, sep, value = token.partition(":")
        key = key.lower()
        if sep and key in PROJECT_KEYS and value:
            projects.update(v for v in value.split(",") if v)
        elif sep and key in STATE_KEYS and value:
            for state in value.lower().split(","):
                states.update(STATE_GROUPS.get(state, {state} if state else set()))
        else:
            words.append(token.lower())
    return RunFilter(frozenset(projects), frozenset(states), tuple(words))


def searchable_text(run: Mapping[str, Any]) -> str:
    parts: list[str] = [
        str(run.get(key) or "") for key in ("run_id", "project", "env", "spec_id", "state", "reason")
    ]
    progress = run.get("progress")
    if isinstance(progress, Mapping):
        parts.extend(str(progress.get(key) or "") for key in ("phase", "task"))
    labels = run.get("labels")
    if isinstance(labels, Mapping):
        parts.extend(f"{k}={v}" for k, v in labels.items())
    return " ".join(parts).lower()
