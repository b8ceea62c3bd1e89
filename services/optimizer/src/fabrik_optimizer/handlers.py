"""The optimizer service's subscribers: one typed async function per subject.

Both feed the analytics store. Writes are idempotent (upserts by run_id / call_id), so a
redelivery after a crash between write and ack changes nothing. SQLite writes are local and short,
so they run on the event loop, under the state's write lock (a rebuild holds it while it swaps
stores). Each write marks the budgets for a (throttled) evaluation.
"""

from __future__ import annotations

from fabrik_common.bus import Context, Router
from fabrik_common.events import LlmUsage, RunEvent
from fabrik_optimizer.analytics.ingest import RUN_SUBJECTS, apply_llm_usage, apply_run_event
from fabrik_optimizer.state import OptimizerState

router = Router()


# One consumer over the run subjects keeps each run's events in stream order.
@router.subscriber(*RUN_SUBJECTS, durable="optimizer-runs", max_deliver=10, batch=256)
async def on_run_event(event: RunEvent, ctx: Context[OptimizerState]) -> None:
    state = ctx.state
    async with state.write_lock:
        if apply_run_event(state.store, event, state.costing):
            state.dirty.set()


@router.subscriber("fabrik.llm.usage", durable="optimizer-llm-usage", max_deliver=10, batch=256)
async def on_llm_usage(event: LlmUsage, ctx: Context[OptimizerState]) -> None:
    state = ctx.state
    async with state.write_lock:
        apply_llm_usage(state.store, event)
    state.dirty.set()
