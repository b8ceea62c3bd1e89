"""Leader election through a lease in the `leases` KV bucket.

The leader renews its lease every `renew_interval`; a standby takes the lease over when it has not
been renewed for `ttl` seconds. Every write is a compare-and-set on the entry's revision, so two
candidates can never both win, and a leader that cannot renew in time (partitioned from NATS)
steps down before its lease could be taken over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

import msgspec
import nats.errors
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

log = logging.getLogger(__name__)


class LeaseValue(msgspec.Struct, frozen=True):
    holder: str
    expires_at: float
    acquired_at: float


_codec_enc = msgspec.json.Encoder()
_codec_dec = msgspec.json.Decoder(LeaseValue)


class LeaderLease:
    def __init__(
        self,
        kv: KeyValue,
        name: str,
        holder: str,
        *,
        ttl: float = 6.0,
        renew_interval: float = 1.5,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if renew_interval * 2 >= ttl:
            raise ValueError("renew_interval must be well below the lease ttl")
        self.kv = kv
        self.name = name
        self.holder = holder
        self.ttl = ttl
        self.renew_interval = renew_interval
        self.clock = clock
        self.is_leader = False
        self._revision: int | None = None
        self._renewed_at = 0.0

    async def try_acquire(self) -> bool:
        """One round of the election; True while this candidate holds the lease."""
        now = self.clock()
        value = _codec_enc.encode(LeaseValue(self.holder, now + self.ttl, now))
        try:
            try:
                entry = await self.kv.get(self.name)
            except KeyNotFoundError:
                self._revision = await self.kv.create(self.name, value)
                return self._became(True, now)
            current = _codec_dec.decode(entry.value) if entry.value else None
            if current is not None and current.holder == self.holder and self.is_leader:
                renewed = LeaseValue(self.holder, now + self.ttl, current.acquired_at)
                self._revision = await self.kv.update(
                    self.name, _codec_enc.encode(renewed), last=entry.revision
                )
                return self._became(True, now)
            if current is None or current.expires_at <= now or current.holder == self.holder:
                self._revision = await self.kv.update(self.name, value, last=entry.revision)
                return self._became(True, now)
            return self._became(False, now)
        except KeyWrongLastSequenceError:
            return self._became(False, now)
        except (TimeoutError, nats.errors.Error) as exc:
            # Cannot reach NATS: keep leading only while the lease we hold is certainly still ours.
            still_ours = self.is_leader and now < self._renewed_at + self.ttl - self.renew_interval
            log.warning(
                "lease round failed", extra={"lease": self.name, "error": repr(exc), "leader": still_ours}
            )
            return self._became(still_ours, self._renewed_at if still_ours else now)

    def _became(self, leader: bool, now: float) -> bool:
        if leader:
            self._renewed_at = now
        if leader != self.is_leader:
            log.info(
                "leadership changed", extra={"lease": self.name, "leader": leader, "holder": self.holder}
            )
        self.is_leader = leader
        return leader

    async def release(self) -> None:
        """Give the lease up at once (clean shutdown), so a standby need not wait for the ttl."""
        if not self.is_leader or self._revision is None:
            return
        self.is_leader = False
        expired = _codec_enc.encode(LeaseValue(self.holder, 0.0, 0.0))
        with contextlib.suppress(nats.errors.Error, KeyWrongLastSequenceError, asyncio.TimeoutError):
            await self.kv.update(self.name, expired, last=self._revision)

    async def run(
        self,
        on_elected: Callable[[], Awaitable[None]],
        on_deposed: Callable[[], Awaitable[None]],
        stop: asyncio.Event,
    ) -> None:
        """Campaign until `stop` is set, calling the callbacks on every change of leadership."""
        leading = False
        while not stop.is_set():
            now_leader = await self.try_acquire()
            if now_leader and not leading:
                leading = True
                await on_elected()
            elif not now_leader and leading:
                leading = False
                await on_deposed()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(
                    stop.wait(), self.renew_interval if leading else self.renew_interval / 2
                )
        if leading:
            await on_deposed()
        await self.release()
