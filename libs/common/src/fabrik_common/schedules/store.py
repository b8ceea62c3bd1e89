"""Reading the `schedules` KV bucket: definitions, firing states and slot claims by key prefix."""

from __future__ import annotations

import msgspec
from nats.js.kv import KeyValue

from fabrik_common.schedules.model import ScheduleDefinition, ScheduleState, SlotRecord

encode = msgspec.json.Encoder().encode
decode_definition = msgspec.json.Decoder(ScheduleDefinition).decode
decode_state = msgspec.json.Decoder(ScheduleState).decode
decode_slot = msgspec.json.Decoder(SlotRecord).decode


async def read_prefix(kv: KeyValue, prefix: str) -> dict[str, tuple[bytes, int]]:
    """The current value and revision of every key starting with `prefix` (deleted ones left
    out), read through one short-lived watcher rather than a request per key."""
    watcher = await kv.watch(f"{prefix}>", ignore_deletes=True)
    entries: dict[str, tuple[bytes, int]] = {}
    try:
        async for entry in watcher:
            if entry is None:
                break
            if entry.value and entry.revision is not None:
                entries[entry.key] = (entry.value, entry.revision)
            if entry.delta == 0:
                break
    finally:
        await watcher.stop()  # type: ignore[no-untyped-call]
    return entries
