"""A service with one slow, recording handler: what the shutdown and crash tests drive as a process.

Each handled event id is appended to $FABRIK_TEST_OUTPUT after $FABRIK_TEST_HANDLER_DELAY seconds.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from fabrik_common.bus import Context, Router
from fabrik_common.events import RunProgress
from fabrik_common.service import Service, run_service
from fabrik_common.settings import CommonSettings

router = Router()
OUTPUT = Path(os.environ["FABRIK_TEST_OUTPUT"])
DELAY = float(os.environ.get("FABRIK_TEST_HANDLER_DELAY", "0.01"))


@router.subscriber("fabrik.runs.progress.*", durable="recording-consumer", ack_wait=30.0, batch=64)
async def record(event: RunProgress, ctx: Context[None]) -> None:
    await asyncio.sleep(DELAY)
    with OUTPUT.open("a") as out:
        out.write(f"{event.event_id} {os.getpid()}\n")


def build(settings: CommonSettings) -> Service[None]:
    return Service("recording-consumer", settings, routers=[router])


if __name__ == "__main__":
    run_service(CommonSettings, build, "recording-consumer")
