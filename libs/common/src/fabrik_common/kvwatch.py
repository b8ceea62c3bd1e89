"""Typed wrappers around nats-py KV watches (the library's watcher methods are untyped)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import nats.errors
from nats.js.kv import KeyValue

# on_entry(key, value or None when deleted/purged, revision)
OnEntry = Callable[[str, bytes | None, int], None]


def _deleted(operation: str | None) -> bool:
    return operation in ("DEL", "PURGE")


async def load(kv: KeyValue, keys: str, on_entry: OnEntry, wait: float = 5.0, settle: float = 0.25) -> None:
    """Feed the current value of every matching key, then return.

    nats-py's "initial values done" marker can come before values still on their way, so the
    load ends with the value that says nothing is pending after it; a bare marker is believed
    only when no value follows it within `settle` seconds (no matching key).
    """
    watcher = await kv.watch(keys)
    marker_seen = False
    try:
        while True:
            try:
                entry = await watcher.updates(timeout=settle if marker_seen else wait)  # type: ignore[no-untyped-call]
            except nats.errors.TimeoutError:
                if marker_seen:
                    return
                raise
            if entry is None:
                marker_seen = True
                continue
            on_entry(entry.key, None if _deleted(entry.operation) else entry.value, entry.revision or 0)
            if entry.delta == 0:
                return
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
