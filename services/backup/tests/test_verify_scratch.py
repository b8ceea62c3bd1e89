"""The deep verify's scratch nats-server never outlives the verify, even when it is cancelled
while the server is still starting."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from pathlib import Path

from fabrik_backup.verify import scratch_server


def nats_children() -> list[int]:
    """Child processes of this one that are nats-servers (from /proc: no extra dependency)."""
    found = []
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            name = stat[stat.index("(") + 1 : stat.rindex(")")]
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        except (OSError, ValueError):
            continue
        if ppid == me and "nats-server" in name:
            found.append(int(entry.name))
    return found


async def test_cancelled_while_starting_stops_the_server_and_removes_its_directory() -> None:
    seen: list[Path] = []

    async def verify() -> None:
        async with scratch_server() as server:
            seen.append(server.store_dir)
            await asyncio.sleep(60)

    for delay in (0.0, 0.02, 0.3):  # during the start, and after it
        task = asyncio.create_task(verify())
        await asyncio.sleep(delay)
        started = time.monotonic()
        # cancelled again and again, as the operations' stop does, until it has ended
        while not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=0.05)
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert time.monotonic() - started < 15
        assert nats_children() == []
    assert seen and all(not path.exists() for path in seen)
