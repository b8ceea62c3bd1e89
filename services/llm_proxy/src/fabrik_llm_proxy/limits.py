"""Counters shared by every replica in the `limits` KV bucket, and the rate limits built on them.

Each counter is one KV key holding `{"start": <unix s>, "value": <n>}`. Windowed counters
(requests and tokens per minute) use a fixed window that starts with the first use after the
previous one ended; spend counters have no window.

Two ways to change a counter, chosen by what the number guards:

* `reserve` (requests per minute) is exact across replicas: every replica collects the calls
  waiting for the same counter into one batch and writes `value + granted` with a
  compare-and-set on the key's revision (`kv.update(..., last=revision)`), retrying on a
  conflict with the fresh value. The KV never holds more than the limit, so N replicas admit
  the limit, not N times it. Cost: one KV round trip per batch of concurrent calls per counter
  (only when such a limit is configured).
* `add` (tokens, spend) is lazy: the delta counts locally at once and is written in the
  background every `flush_interval` (again by compare-and-set, so no update is lost), and a
  watch on the bucket brings every replica the others' writes. These numbers are known only
  after a call, so a check before the next call is the best any design can do; between
  replicas they lag by about one flush interval.

Decision: no per-replica quota leases for requests per minute. A lease (taking k units ahead)
saves round trips but strands units on a replica that stops receiving calls, so another
replica would refuse calls while quota is left: the limit would no longer be exact.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
import nats.errors
import nats.js.errors
from nats.js.kv import KeyValue

from fabrik_common import kvwatch
from fabrik_llm_proxy.aio import cancel_requested
from fabrik_llm_proxy.config import LimitsConfig

log = logging.getLogger(__name__)

MAX_CAS_ATTEMPTS = 200


class CounterValue(msgspec.Struct, frozen=True):
    start: float = 0.0
    value: float = 0.0


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(CounterValue).decode


@dataclass(slots=True)
class _Cached:
    start: float
    value: float
    revision: int


class CounterConflictError(RuntimeError):
    pass


class SharedCounters:
    def __init__(self, kv: KeyValue, *, clock: Callable[[], float] = time.time) -> None:
        self.kv = kv
        self._clock = clock
        self._cache: dict[str, _Cached] = {}
        self._pending: dict[str, float] = {}
        self._pending_window: dict[str, float | None] = {}
        self._waiting: dict[str, list[asyncio.Future[tuple[bool, float]]]] = {}
        self._running: set[str] = set()
        self._limits: dict[str, tuple[int, float]] = {}
        self._flush_lock = asyncio.Lock()
        self.kv_ops = 0

    # -- local views ------------------------------------------------------------------------

    def current(self, key: str, window: float | None = None) -> tuple[float, float]:
        """(value, window start): the last known shared value plus this replica's unwritten delta."""
        now = self._clock()
        cached = self._cache.get(key)
        value, start = 0.0, now
        if cached is not None and (window is None or now < cached.start + window):
            value, start = cached.value, cached.start
        return value + self._pending.get(key, 0.0), start

    def _store(self, key: str, value: CounterValue, revision: int) -> None:
        cached = self._cache.get(key)
        if cached is None or revision > cached.revision:
            self._cache[key] = _Cached(value.start, value.value, revision)

    def observe(self, key: str, data: bytes | None, revision: int) -> None:
        """A KV entry seen by the watch (another replica's write, or our own)."""
        if data is None:
            value = CounterValue()
        else:
            try:
                value = _decode(data)
            except (msgspec.DecodeError, msgspec.ValidationError):
                log.warning("unreadable counter in the limits bucket", extra={"key": key})
                return
        self._store(key, value, revision)

    async def _load(self, key: str) -> _Cached:
        self.kv_ops += 1
        try:
            entry = await self.kv.get(key)
        except nats.js.errors.KeyNotFoundError as exc:
            revision = exc.entry.revision if exc.entry is not None else 0
            self._cache[key] = _Cached(0.0, 0.0, revision or 0)
            return self._cache[key]
        value = _decode(entry.value) if entry.value else CounterValue()
        self._cache[key] = _Cached(value.start, value.value, entry.revision or 0)
        return self._cache[key]

    async def _cas(
        self, key: str, make: Callable[[_Cached, float], CounterValue | None]
    ) -> CounterValue | None:
        """Compare-and-set: `make(current, now)` gives the new value (None: nothing to write)."""
        cached = self._cache.get(key) or await self._load(key)
        for _ in range(MAX_CAS_ATTEMPTS):
            new = make(cached, self._clock())
            if new is None:
                return None
            self.kv_ops += 1
            try:
                revision = await self.kv.update(key, _encode(new), last=cached.revision)
            except nats.js.errors.KeyWrongLastSequenceError:
                cached = await self._load(key)
                continue
            self._store(key, new, revision)
            return new
        raise CounterConflictError(f"counter {key} kept changing under {MAX_CAS_ATTEMPTS} attempts")

    # -- exact reservations -----------------------------------------------------------------

    async def reserve(self, key: str, limit: int, window: float) -> tuple[bool, float]:
        """Take one unit if the window has one left: (granted, seconds until the window resets)."""
        future: asyncio.Future[tuple[bool, float]] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(key, []).append(future)
        self._limits[key] = (limit, window)
        if key not in self._running:
            self._running.add(key)
            asyncio.create_task(self._serve(key), name=f"reserve {key}")  # noqa: RUF006 - awaited via futures
        granted, window_end = await future
        return granted, 0.0 if granted else max(0.0, window_end - self._clock())

    async def _serve(self, key: str) -> None:
        try:
            while self._waiting.get(key):
                waiters = self._waiting.pop(key)
                limit, window = self._limits[key]
                try:
                    granted, start = await self._reserve_batch(key, len(waiters), limit, window)
                except Exception as exc:  # noqa: BLE001 - handed to every waiter of the batch
                    for fut in waiters:
                        if not fut.done():
                            fut.set_exception(exc)
                    continue
                for i, fut in enumerate(waiters):
                    if not fut.done():
                        fut.set_result((i < granted, start + window))
        finally:
            self._running.discard(key)

    async def _reserve_batch(self, key: str, n: int, limit: int, window: float) -> tuple[int, float]:
        outcome = {"granted": 0, "start": 0.0}

        def make(cached: _Cached, now: float) -> CounterValue | None:
            if now >= cached.start + window:
                start, used = now, 0.0
            else:
                start, used = cached.start, cached.value
            grant = max(0, min(n, limit - math.ceil(used)))
            outcome["granted"], outcome["start"] = grant, start
            if grant == 0:
                return None
            return CounterValue(start, used + grant)

        cached = self._cache.get(key)
        if cached is not None:
            probe = make(cached, self._clock())
            if probe is None:
                # Full by our (possibly old) copy: read the real value before refusing anyone.
                await self._load(key)
        await self._cas(key, make)
        return int(outcome["granted"]), float(outcome["start"])

    # -- lazy additions ---------------------------------------------------------------------

    def add(self, key: str, delta: float, window: float | None = None) -> None:
        if delta == 0:
            return
        self._pending[key] = self._pending.get(key, 0.0) + delta
        self._pending_window[key] = window

    async def flush(self) -> None:
        """Write every pending delta (compare-and-set, so concurrent replicas lose nothing)."""
        async with self._flush_lock:
            for key in list(self._pending):
                delta = self._pending.get(key, 0.0)
                if delta == 0:
                    continue
                window = self._pending_window.get(key)

                def make(
                    cached: _Cached, now: float, delta: float = delta, window: float | None = window
                ) -> CounterValue | None:
                    if window is not None and now >= cached.start + window:
                        # A new window: a give-back (negative delta) has nothing left to give back to.
                        return CounterValue(now, delta) if delta > 0 else None
                    return CounterValue(cached.start or now, max(0.0, cached.value + delta))

                try:
                    await self._cas(key, make)
                except (TimeoutError, nats.errors.Error, CounterConflictError) as exc:
                    log.warning(
                        "counter flush failed; kept for the next one", extra={"key": key, "error": repr(exc)}
                    )
                    return
                remaining = self._pending.get(key, 0.0) - delta
                if abs(remaining) < 1e-12:
                    self._pending.pop(key, None)
                    self._pending_window.pop(key, None)
                else:
                    self._pending[key] = remaining

    async def flush_loop(self, interval: float) -> None:
        while not cancel_requested():
            await asyncio.sleep(interval)
            if self._pending:
                await self.flush()
        raise asyncio.CancelledError

    async def watch(self) -> None:
        """Mirror every write to the bucket (all replicas' counters) into the local cache."""
        await kvwatch.follow(self.kv, ">", self.observe)


# -------------------------------------------------------------------------------------------
# Rate limits per project and per run


@dataclass(frozen=True, slots=True)
class LimitRefusal:
    scope: str  # "project" or "run"
    metric: str  # "rpm" or "tpm"
    limit: int
    retry_after: float


def rpm_key(scope: str, ident: str) -> str:
    return f"rpm.{scope}.{ident}"


def tpm_key(scope: str, ident: str) -> str:
    return f"tpm.{scope}.{ident}"


class RateLimiter:
    def __init__(self, counters: SharedCounters, config: Callable[[], LimitsConfig]) -> None:
        self.counters = counters
        self._config = config

    def _scopes(
        self, project: str | None, run_id: str | None
    ) -> list[tuple[str, str, int | None, int | None]]:
        cfg = self._config()
        scopes: list[tuple[str, str, int | None, int | None]] = []
        if project:
            limit = cfg.for_project(project)
            scopes.append(("project", project, limit.rpm, limit.tpm))
        if run_id:
            scopes.append(("run", run_id, cfg.run.rpm, cfg.run.tpm))
        return scopes

    async def admit(self, project: str | None, run_id: str | None) -> LimitRefusal | None:
        window = self._config().window_seconds
        scopes = self._scopes(project, run_id)
        # Tokens per minute: refuse once the window's tokens reached the limit (local view).
        for scope, ident, _, tpm in scopes:
            if tpm is None:
                continue
            used, start = self.counters.current(tpm_key(scope, ident), window)
            if used >= tpm:
                return LimitRefusal(scope, "tpm", tpm, max(0.0, start + window - time.time()))
        # Requests per minute: exact, one unit per call; project and run counters at the same time.
        wanted = [(scope, rpm_key(scope, ident), rpm) for scope, ident, rpm, _ in scopes if rpm is not None]
        if not wanted:
            return None
        if len(wanted) == 1:
            results = [await self.counters.reserve(wanted[0][1], wanted[0][2], window)]
        else:
            results = list(
                await asyncio.gather(*(self.counters.reserve(key, rpm, window) for _, key, rpm in wanted))
            )
        refusal: LimitRefusal | None = None
        for (scope, _, rpm), (ok, retry_after) in zip(wanted, results, strict=True):
            if not ok and refusal is None:
                refusal = LimitRefusal(scope, "rpm", rpm, retry_after)
        if refusal is not None:
            for (_, key, _), (ok, _) in zip(wanted, results, strict=True):
                if ok:  # give back what this refused call took
                    self.counters.add(key, -1, window)
        return refusal

    def record_tokens(self, project: str | None, run_id: str | None, tokens: int) -> None:
        if tokens <= 0:
            return
        window = self._config().window_seconds
        for scope, ident, _, tpm in self._scopes(project, run_id):
            if tpm is not None:
                self.counters.add(tpm_key(scope, ident), tokens, window)
