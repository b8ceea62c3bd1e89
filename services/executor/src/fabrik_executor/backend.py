"""The seam between the executor's handlers and where workloads actually run.

`LocalBackend` (processes on this machine) implements it now; a `KubernetesBackend` (a Job per
attempt, a PVC per run) slots in behind the same methods.
"""

from __future__ import annotations

from typing import Protocol

from fabrik_common.events import Event, RunCancelRequested, RunDispatched


class EventSink(Protocol):
    """Publishes an event durably: returns once JetStream acknowledged it."""

    async def publish(self, event: Event) -> None: ...


class Backend(Protocol):
    name: str

    async def recover(self) -> None:
        """At start: find the attempts this backend was running and reattach or finish them."""

    async def start(self, dispatch: RunDispatched) -> None:
        """Start the attempt (idempotent: a redelivered dispatch starts nothing twice).

        Returns once RunStarted (or, if it could not start, RunFinished) is published."""

    async def cancel(self, request: RunCancelRequested) -> None:
        """Stop the run's active attempt (SIGTERM, SIGKILL after the grace period), or remember
        the cancel for a dispatch that has not arrived yet."""

    async def maintain(self) -> None:
        """Periodic housekeeping (retention of finished runs); runs until cancelled."""

    async def close(self) -> None:
        """Stop watching (workloads keep running; `recover` picks them up again)."""
