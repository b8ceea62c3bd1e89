"""asyncio helpers the services share."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

log = logging.getLogger(__name__)


async def cancel_all(tasks: Sequence[asyncio.Task[None]], patience: float = 0.5) -> None:
    """Cancel tasks and wait until they have ended, cancelling again those that keep going: a
    cancellation can be swallowed inside a library's `asyncio.wait_for` (nats-py on 3.11)."""
    pending = {t for t in tasks if not t.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=patience)
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            log.error("background task ended with an error", exc_info=task.exception())
