"""Cancellation that sticks.

On Python 3.11, `asyncio.wait_for` (used inside nats-py's request/reply) can swallow a
cancellation that arrives just as its inner future completes (fixed in 3.12). A loop that
calls into NATS would then carry on and never stop. Long-running loops here therefore also
check `Task.cancelling()` and stop on their own, and shutdown cancels until tasks are done.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable


def cancel_requested() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def raise_if_cancel_requested() -> None:
    if cancel_requested():
        raise asyncio.CancelledError


async def stop_tasks(tasks: Iterable[asyncio.Task[None]], patience: float = 5.0) -> None:
    """Cancel until every task has ended (a swallowed cancellation is repeated)."""
    pending = {t for t in tasks if not t.done()}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + patience
    while pending and loop.time() < deadline:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.2)
