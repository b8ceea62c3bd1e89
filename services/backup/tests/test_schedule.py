"""Scheduled backups: slots, a claim per slot across replicas, late firing within the grace."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import nats
import pytest

from fabrik_backup.schedule import cron_problem, iter_slots, last_slot_before, run_schedule, slot_backup_id
from fabrik_common.testing import NatsServerLike
from fabrik_common.topology import ensure_topology


def test_slots_and_validation() -> None:
    after = datetime(2026, 3, 28, 23, 30, tzinfo=UTC)
    slots = iter_slots("0 3 * * *", "Europe/Berlin", after)
    # 03:00 Berlin is 02:00 UTC before the switch to summer time, 01:00 UTC after it.
    assert [next(slots), next(slots)] == [
        datetime(2026, 3, 29, 1, 0, tzinfo=UTC),
        datetime(2026, 3, 30, 1, 0, tzinfo=UTC),
    ]
    assert slot_backup_id(datetime(2026, 3, 29, 1, 0, tzinfo=UTC)) == "20260329T010000Z-scheduled"
    now = datetime(2026, 11, 29, 3, 20, tzinfo=UTC)
    assert last_slot_before("0 3 * * *", "UTC", now, timedelta(hours=1)) == datetime(
        2026, 11, 29, 3, tzinfo=UTC
    )
    assert last_slot_before("0 3 * * *", "UTC", now, timedelta(minutes=10)) is None
    assert cron_problem("0 3 * * *", "UTC") is None
    assert "invalid cron" in (cron_problem("61 * * * *", "UTC") or "")
    assert "time zone" in (cron_problem("0 3 * * *", "Mars/Olympus") or "")


async def test_a_slot_fires_once_across_replicas(nats_server: NatsServerLike) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        await ensure_topology(nc.jetstream())
        kv = await nc.jetstream().key_value("backups")
        started: list[tuple[str, str]] = []
        fired = asyncio.Event()

        def starter(instance: str) -> Callable[[str], Awaitable[None]]:
            async def start(backup_id: str) -> None:
                started.append((instance, backup_id))
                fired.set()

            return start

        now = datetime.now(UTC).replace(second=30)  # 30 s into a minute: its slot is 30 s old
        replicas = [
            asyncio.create_task(run_schedule(kv, "* * * * *", "UTC", name, starter(name), clock=lambda: now))
            for name in ("a", "b")
        ]
        await asyncio.wait_for(fired.wait(), 5)
        await asyncio.sleep(0.2)
        for task in replicas:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        slot = now.replace(second=0, microsecond=0)
        assert len(started) == 1 and started[0][1] == slot_backup_id(slot)
    finally:
        await nc.close()


@pytest.mark.parametrize("cron", ["", "0 3 * *"])
def test_settings_reject_a_bad_schedule(cron: str) -> None:
    from fabrik_backup.settings import BackupSettings

    if not cron:
        assert BackupSettings().backup_schedule == ""
        return
    with pytest.raises(ValueError, match="FABRIK_BACKUP_SCHEDULE"):
        BackupSettings(backup_schedule=cron)
