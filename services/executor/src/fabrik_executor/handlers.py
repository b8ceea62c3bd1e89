"""The executor service's subscribers: thin typed handlers; the work happens in the backend."""

from __future__ import annotations

from fabrik_common.bus import Context, Router
from fabrik_common.events import RunCancelRequested, RunDispatched
from fabrik_executor.state_types import ExecutorState

router = Router()


# Starting a workload waits on a clone and a process start; several starts run side by side
# (the backend serialises what belongs to one run).
@router.subscriber(
    RunDispatched.subject_filter(), durable="executor-dispatched", max_deliver=5, ack_wait=60.0, concurrency=8
)
async def on_dispatched(event: RunDispatched, ctx: Context[ExecutorState]) -> None:
    """Start the attempt; returns once RunStarted (or RunFinished when it could not start) is stored."""
    await ctx.state.backend.start(event)


@router.subscriber(RunCancelRequested.subject_filter(), durable="executor-cancel", max_deliver=10)
async def on_cancel_requested(event: RunCancelRequested, ctx: Context[ExecutorState]) -> None:
    """Stop the run's workload, or remember the cancel if its dispatch has not arrived yet."""
    await ctx.state.backend.cancel(event)
