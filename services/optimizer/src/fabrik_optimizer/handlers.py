"""The optimizer's subscribers: run events and LLM usage, applied to the analytics store in batches.

Both are batch subscribers (`Router.batch_subscriber`): the bus hands over up to `BATCH` fetched
messages, which are folded in one transaction and committed once (group commit); the bus acks
them only after the handler has returned, i.e. after the commit, so no message is acked before its
data is durable. Writes are idempotent (upserts by run_id / call_id), so a batch redelivered after
a crash between commit and acks changes nothing. An event that cannot be folded is marked for a
retry on its own (the rest of its batch is committed) and, after `MAX_DELIVER` deliveries, goes to
the dead-letter subject with the reason; a failing commit (database locked, disk full) raises, and
the bus naks the whole batch. Writes run on the event loop, under the state's write lock (a
rebuild holds it while it swaps stores): SQLite's are local and short; PostgreSQL's are one
transaction per batch through the synchronous driver, its statements pipelined (a batch of 1,000
events holds the loop for about a tenth of a second on the 2-core benchmark machine). A batch that
changed the store marks the budgets for a (throttled) evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fabrik_common.bus import BatchContext, Delivery, Router
from fabrik_common.events import LlmUsage, RunEvent
from fabrik_optimizer.analytics.ingest import apply_events
from fabrik_optimizer.state import OptimizerState

# Messages per fetch and commit. Larger batches commit less often; each batch is held in memory
# and the bus asks for the next one while a batch is applied.
BATCH = 1000
MAX_DELIVER = 10
# Room for the batch being applied and the one fetched ahead, plus redeliveries.
MAX_ACK_PENDING = 4 * BATCH

router = Router()


async def apply_deliveries(deliveries: Sequence[Delivery[Any]], state: OptimizerState) -> None:
    """Apply a batch in one transaction; the events that cannot be applied are retried on their own."""
    events = [d.event for d in deliveries]
    async with state.write_lock:
        # The store after the lock: a rebuild may have swapped it meanwhile.
        applied = apply_events(state.store, events, state.costing)
    for index, error in applied.failed.items():
        deliveries[index].retry(f"could not be applied: {error!r}")
    if applied.changed:
        state.dirty.set()


# One consumer over every run subject keeps each run's events in stream order. The filter is the
# stream's own subject: filtering on the subjects the store folds (six when measured; one subject
# per run and kind in the stream) made nats-server 2.15 serve about 1,200 messages/s at 100,000
# messages in the stream, 14 times fewer than this filter, and fewer still as the stream grows.
# The other kinds (progress, results, ...) are decoded and skipped.
@router.batch_subscriber(
    "fabrik.runs.>",
    event=RunEvent,
    durable="optimizer-runs",
    max_deliver=MAX_DELIVER,
    batch=BATCH,
    max_ack_pending=MAX_ACK_PENDING,
)
async def on_run_events(deliveries: Sequence[Delivery[RunEvent]], ctx: BatchContext[OptimizerState]) -> None:
    await apply_deliveries(deliveries, ctx.state)


@router.batch_subscriber(
    "fabrik.llm.usage",
    event=LlmUsage,
    durable="optimizer-llm-usage",
    max_deliver=MAX_DELIVER,
    batch=BATCH,
    max_ack_pending=MAX_ACK_PENDING,
)
async def on_llm_usage(deliveries: Sequence[Delivery[LlmUsage]], ctx: BatchContext[OptimizerState]) -> None:
    await apply_deliveries(deliveries, ctx.state)
