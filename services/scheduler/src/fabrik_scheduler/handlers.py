"""The scheduler's subscriber: every input of the state machine, through one consumer.

One durable consumer over all the subjects keeps each run's events in stream order (a run's
`finished` is never handled before its `started`) and serialises every decision.
"""

from __future__ import annotations

from fabrik_common.bus import Context, Router
from fabrik_common.events import AlertRaised, AlertResolved, LlmUsage, RunImported
from fabrik_scheduler.imports import apply_import
from fabrik_scheduler.scheduler import SchedulerInput
from fabrik_scheduler.state import SchedulerState

router = Router()

INPUT_SUBJECTS = (
    "fabrik.runs.requested.*",
    "fabrik.runs.cancel_requested.*",
    "fabrik.runs.resume_requested.*",
    "fabrik.runs.started.*",
    "fabrik.runs.progress.*",
    "fabrik.runs.result.*",
    "fabrik.runs.finished.*",
    "fabrik.runs.budget_exceeded.*",
)


@router.subscriber(*INPUT_SUBJECTS, durable="scheduler-inputs", max_deliver=10, batch=256)
async def on_run_input(event: SchedulerInput, ctx: Context[SchedulerState]) -> None:
    async with ctx.state.lock:
        await ctx.state.scheduler.handle(event, redelivered=ctx.redelivered)
        await ctx.state.scheduler.dispatch()


# Imported runs (docs/migration.md): records created only if absent, under the decision lock.
@router.subscriber("fabrik.runs.imported.*", durable="scheduler-imports", max_deliver=10, batch=64)
async def on_run_imported(event: RunImported, ctx: Context[SchedulerState]) -> None:
    async with ctx.state.lock:
        scheduler = ctx.state.scheduler
        await apply_import(scheduler.store, scheduler.publisher, event, redelivered=ctx.redelivered)


# One message at a time, in stream order: what makes the per-run `usage_seq` check exact.
@router.subscriber(
    "fabrik.llm.usage", durable="scheduler-llm-usage", batch=1, max_ack_pending=1, max_deliver=10
)
async def on_llm_usage(event: LlmUsage, ctx: Context[SchedulerState]) -> None:
    async with ctx.state.lock:
        await ctx.state.scheduler.apply_usage(event, ctx.stream_sequence)


# Alerts to deliver: one at a time in stream order, on the leader; an episode's record keeps the
# stream sequence of the last event applied, so a redelivery changes nothing (docs/alerts.md).
@router.subscriber(
    "fabrik.alerts.>",
    durable="scheduler-alerts",
    batch=1,
    max_ack_pending=1,
    max_deliver=10,
    deliver_new_only=True,
)
async def on_alert(event: AlertRaised | AlertResolved, ctx: Context[SchedulerState]) -> None:
    if ctx.state.alerts is not None:
        await ctx.state.alerts.on_event(event, ctx.stream_sequence)
