"""Shared by tests/integration/test_executor_kubernetes.py (against the API double) and
tests/e2e/test_kubernetes_e2e.py (against a real cluster): the scheduler's side of the executor
(publish dispatches and cancels, read what the executor publishes) and the run builders.

Loaded by path (`load_harness()`), since test directories are not packages.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import nats.errors
from nats.js import JetStreamContext

from fabrik_common.bus import Bus
from fabrik_common.codec import decode_any
from fabrik_common.events import (
    AnyEvent,
    Event,
    RepoRef,
    Resources,
    RunCancelRequested,
    RunDispatched,
    RunFinished,
    RunLogChunk,
    RunParameters,
    RunStarted,
    Workload,
)
from fabrik_common.ids import new_ulid, utcnow

DIGEST = "sha256:" + "5e" * 32
IMAGE = "registry.test/fabrik/agent@" + DIGEST


class Recorder:
    """Everything published on RUNS and LOGS, read through two durable pull consumers."""

    def __init__(self, js: JetStreamContext, name: str = "k8s") -> None:
        self.js = js
        self.name = name
        self.events: list[AnyEvent] = []
        self._subs: list[Any] = []

    async def start(self) -> None:
        self._subs = [
            await self.js.pull_subscribe("fabrik.runs.>", durable=f"rec-{self.name}-runs", stream="RUNS"),
            await self.js.pull_subscribe("fabrik.logs.>", durable=f"rec-{self.name}-logs", stream="LOGS"),
        ]

    async def poll(self) -> None:
        for sub in self._subs:
            while True:
                try:
                    msgs = await sub.fetch(256, timeout=0.05)
                except (TimeoutError, nats.errors.Error):
                    break
                for msg in msgs:
                    self.events.append(decode_any(msg.data))
                    await msg.ack()
                if len(msgs) < 256:
                    break

    def of(self, run_id: str, kind: type[Event] | None = None, attempt: int | None = None) -> list[Any]:
        return [
            e
            for e in self.events
            if getattr(e, "run_id", None) == run_id
            and (kind is None or isinstance(e, kind))
            and (attempt is None or getattr(e, "attempt", None) == attempt)
        ]

    async def wait_for(self, predicate: Callable[[], Any], timeout: float = 20.0, what: str = "") -> Any:
        deadline = time.monotonic() + timeout
        while True:
            await self.poll()
            result = predicate()
            if result:
                return result
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out waiting for {what or predicate}; last events: {self.events[-15:]}"
                )
            await asyncio.sleep(0.05)

    async def finished(self, run_id: str, attempt: int = 1, timeout: float = 20.0) -> RunFinished:
        found = await self.wait_for(
            lambda: self.of(run_id, RunFinished, attempt), timeout, f"RunFinished of {run_id}/{attempt}"
        )
        return found[0]  # type: ignore[no-any-return]

    async def started(self, run_id: str, attempt: int = 1, timeout: float = 20.0) -> RunStarted:
        found = await self.wait_for(
            lambda: self.of(run_id, RunStarted, attempt), timeout, f"RunStarted of {run_id}/{attempt}"
        )
        return found[0]  # type: ignore[no-any-return]

    def log_lines(self, run_id: str, attempt: int = 1) -> list[tuple[int, str, str]]:
        """(number, stream, text) of every line, a re-published chunk's duplicates removed
        (and checked: a line number never carries two different texts)."""
        seen: dict[int, tuple[str, str]] = {}
        for chunk in self.of(run_id, RunLogChunk, attempt):
            for i, line in enumerate(chunk.lines):
                number = chunk.first_line + i
                if number in seen:
                    assert seen[number] == (line.stream, line.text), f"line {number} published differently"
                seen[number] = (line.stream, line.text)
        return [(n, *seen[n]) for n in sorted(seen)]

    def texts(self, run_id: str, attempt: int = 1, stream: str | None = None) -> list[str]:
        return [t for _, s, t in self.log_lines(run_id, attempt) if stream is None or s == stream]


async def cancel(bus: Bus, run_id: str) -> None:
    await bus.publish(RunCancelRequested(run_id=run_id, requested_by="test", reason="test cancel"))


def dispatch(
    *,
    run_id: str | None = None,
    attempt: int = 1,
    image: str | None = IMAGE,
    image_digest: str | None = None,
    command: tuple[str, ...] = (),
    args: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    memory: str = "256Mi",
    deadline_s: float = 60.0,
    repo: RepoRef | None = None,
    labels: dict[str, str] | None = None,
    spec: dict[str, Any] | None = None,
    project: str = "demo",
    env_name: str = "dev",
) -> RunDispatched:
    return RunDispatched(
        run_id=run_id or new_ulid(),
        project=project,
        env=env_name,
        attempt=attempt,
        image_digest=image_digest,
        params=RunParameters(
            spec=spec,
            repo=repo,
            workload=Workload(image=image, command=command, args=args, env=env or {}),
            resources=Resources(
                cpu_request="100m", memory_request=memory, cpu_limit="500m", memory_limit=memory
            ),
            timeout_seconds=max(1, int(deadline_s)),
            labels=labels or {},
        ),
        deadline=utcnow() + timedelta(seconds=deadline_s),
    )
