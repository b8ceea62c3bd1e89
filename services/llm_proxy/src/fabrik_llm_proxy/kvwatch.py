"""Typed wrappers around nats-py KV watches (the library's watcher methods are untyped)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from nats.js.kv import KeyValue

# on_entry(key, value or None when deleted/purged, revision)
OnEntry = Callable[[str, bytes | None, int], None]


def _deleted(operation: str | None) -> bool:
    return operation in ("DEL", "PURGE")


async def load(kv: KeyValue, keys: str, on_entry: OnEntry, wait: float = 5.0) -> None:
    """Feed the current value of every matching key, then return."""
    watcher = await kv.watch(keys)
    try:
        while True:
            entry = await watcher.updates(timeout=wait)  # type: ignore[no-untyped-call]
            if entry is None:
                return
            on_entry(entry.key, None if _deleted(entry.operation) else entry.value, entry.revision or 0)
    finally:
        with contextlib.suppress(Exception):
            await watcher.stop()  # type: ignore[no-untyped-call]


async def follow(kv: KeyValue, keys: str, on_entry: OnEntry) -> None:
    """Feed the current value of every matching key and then every change, until cancelled."""
    watcher = await kv.watch(keys)
    try:
        async for entry in watcher:
            if entry is None:
                continue
            on_entry(entry.key, None if _deleted(entry.operation) else entry.value, entry.revision or 0)
    finally:
        with contextlib.suppress(Exception):
            await watcher.stop()  # type: ignore[no-untyped-call]
