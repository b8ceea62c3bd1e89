"""Reading the `schedules` KV bucket: definitions, firing states and slot claims by key prefix."""

from __future__ import annotations

import msgspec
from nats.js.kv import KeyValue

from fabrik_common import kvwatch
from fabrik_common.schedules.model import ScheduleDefinition, ScheduleState, SlotRecord

encode = msgspec.json.Encoder().encode
decode_definition = msgspec.json.Decoder(ScheduleDefinition).decode
decode_state = msgspec.json.Decoder(ScheduleState).decode
decode_slot = msgspec.json.Decoder(SlotRecord).decode


async def read_prefix(kv: KeyValue, prefix: str) -> dict[str, tuple[bytes, int]]:
    """The current value and revision of every key starting with `prefix` (deleted ones left
    out), read through one short-lived watcher rather than a request per key. It ends on the
    entry that says nothing follows (`kvwatch.load`): nats-py's "initial values done" marker can
    come while values are still on their way, and a definition missed at start is a schedule
    that does not fire."""
    entries: dict[str, tuple[bytes, int]] = {}

    def take(key: str, value: bytes | None, revision: int) -> None:
        if value:
            entries[key] = (value, revision)
        else:
            entries.pop(key, None)

    await kvwatch.load(kv, f"{prefix}>", take, settle=0.1)
    return entries
