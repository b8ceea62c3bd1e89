"""Run notifications in Slack: a thread per run in the project's channel.

The scheduler's `run.state_changed` events drive it: a run that starts running (`started`, and
each resumed attempt) and a run that ends (`succeeded`, `failed`, `cancelled`, `timed_out`,
`budget_exceeded`). The first notification of a run is posted to the channel (`chat.postMessage`)
and its `ts` kept in the KV bucket `integrations` under `slack.<run_id>`; later notifications are
replies in that thread (`thread_ts`), and when the run ends the first message is also updated
(`chat.update`) to show the final state, so the channel shows each run's outcome at a glance.

Exactly one thread per run, also with several gateway replicas: the record is *claimed* with a
create-only write before the first message is posted, and a replica that finds a claim without a
`ts` waits (bus `Retry`) until the claimant has stored it, or takes the claim over once it is
older than `CLAIM_TTL_SECONDS` (the claimant died). Each notification has a key
(`<state>#<attempt>`) that is recorded in the thread record after it was posted: a redelivered or
re-announced event posts nothing twice. (The one gap: a replica that dies between Slack's answer
and the record's update lets the next delivery post that message again. Slack offers no
idempotency key for `chat.postMessage`.)

Everything here is free of NATS: the thread store is a small protocol (`KvThreadStore` over the
bucket, `MemoryThreadStore` for tests) and Slack is reached through `SlackClient`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final, Literal, Protocol

import msgspec
import nats.js.errors
from nats.js.kv import KeyValue

from fabrik_common.bus import Retry
from fabrik_common.events import TERMINAL_STATES, RunStateChanged, UtcDatetime
from fabrik_common.ids import utcnow
from fabrik_common.runs import RunRecord
from fabrik_gateway.slack.client import PostedMessage, SlackApiError
from fabrik_gateway.slack.commands import duration_text, esc, spec_name
from fabrik_gateway.slack.config import ChannelMap

log = logging.getLogger(__name__)

KEY_PREFIX: Final = "slack."
CLAIM_TTL_SECONDS: Final = 60.0
WAIT_FOR_CLAIM_SECONDS: Final = 1.0
MAX_RETRY_DELAY: Final = 300.0

Outcome = Literal[
    "posted", "replied", "duplicate", "not_notified", "disabled", "no_channel", "out_of_order", "failed"
]

EMOJI: Final[dict[str, str]] = {
    "running": ":arrow_forward:",
    "succeeded": ":white_check_mark:",
    "failed": ":x:",
    "cancelled": ":no_entry_sign:",
    "timed_out": ":hourglass:",
    "budget_exceeded": ":money_with_wings:",
}
VERBS: Final[dict[str, str]] = {
    "succeeded": "succeeded",
    "failed": "failed",
    "cancelled": "was cancelled",
    "timed_out": "timed out",
    "budget_exceeded": "ran out of budget",
}


class SlackThread(msgspec.Struct, kw_only=True):
    """Value of `integrations` / `slack.<run_id>`."""

    channel: str
    ts: str | None = None
    """The first message of the run (the thread's parent); None while it is being posted."""
    claimed_by: str
    """The event whose handling posts the first message."""
    claimed_at: UtcDatetime
    sent: list[str] = msgspec.field(default_factory=list)
    """Keys of the notifications posted (`running#1`, `failed#1`, ...)."""


_threads = msgspec.json.Decoder(SlackThread)


class ThreadStore(Protocol):
    async def get(self, run_id: str) -> tuple[SlackThread, int] | None: ...

    async def create(self, run_id: str, thread: SlackThread) -> int | None:
        """Store unless it exists: the revision, or None when another record is there."""
        ...

    async def update(self, run_id: str, thread: SlackThread, revision: int) -> int | None:
        """Store if the record is still at `revision`: the new revision, or None."""
        ...

    async def delete(self, run_id: str, revision: int) -> None: ...


class KvThreadStore:
    """Thread records in the KV bucket `integrations`, written with revision checks."""

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    async def get(self, run_id: str) -> tuple[SlackThread, int] | None:
        try:
            entry = await self.kv.get(KEY_PREFIX + run_id)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return None
        try:
            return _threads.decode(entry.value or b""), entry.revision or 0
        except msgspec.DecodeError:
            log.warning("undecodable Slack thread record ignored", extra={"run_id": run_id})
            return None

    async def create(self, run_id: str, thread: SlackThread) -> int | None:
        try:
            return await self.kv.create(KEY_PREFIX + run_id, msgspec.json.encode(thread))
        except nats.js.errors.KeyWrongLastSequenceError:
            return None

    async def update(self, run_id: str, thread: SlackThread, revision: int) -> int | None:
        try:
            return await self.kv.update(KEY_PREFIX + run_id, msgspec.json.encode(thread), last=revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            return None

    async def delete(self, run_id: str, revision: int) -> None:
        with contextlib.suppress(nats.js.errors.KeyWrongLastSequenceError):
            await self.kv.delete(KEY_PREFIX + run_id, last=revision)


class MemoryThreadStore:
    """The same semantics in memory (unit tests)."""

    def __init__(self) -> None:
        self.records: dict[str, tuple[SlackThread, int]] = {}
        self._revision = 0

    def _next(self) -> int:
        self._revision += 1
        return self._revision

    async def get(self, run_id: str) -> tuple[SlackThread, int] | None:
        found = self.records.get(run_id)
        return (msgspec.structs.replace(found[0]), found[1]) if found else None

    async def create(self, run_id: str, thread: SlackThread) -> int | None:
        if run_id in self.records:
            return None
        revision = self._next()
        self.records[run_id] = (msgspec.structs.replace(thread), revision)
        return revision

    async def update(self, run_id: str, thread: SlackThread, revision: int) -> int | None:
        found = self.records.get(run_id)
        if found is None or found[1] != revision:
            return None
        new = self._next()
        self.records[run_id] = (msgspec.structs.replace(thread), new)
        return new

    async def delete(self, run_id: str, revision: int) -> None:
        found = self.records.get(run_id)
        if found is not None and found[1] == revision:
            del self.records[run_id]


class SlackPoster(Protocol):
    async def post_message(
        self, channel: str, text: str, *, thread_ts: str | None = None
    ) -> PostedMessage: ...

    async def update_message(self, channel: str, ts: str, text: str) -> None: ...


# ------------------------------------------------------------------------------------------------
# What to say


@dataclass(frozen=True)
class Notification:
    key: str
    """`<state>#<attempt>`: what has been said about the run."""
    text: str
    final: bool
    attempt: int

    @property
    def parent_key(self) -> str:
        """Recorded once the thread's first message shows this (final) notification."""
        return f"{self.key}:parent"

    def done(self, sent: list[str]) -> bool:
        return self.key in sent and (not self.final or self.parent_key in sent)


def render(event: RunStateChanged, record: RunRecord | None, url: str) -> Notification | None:
    """The message for a state change, or None when it is not notified."""
    state = event.to_state
    if state != "running" and state not in TERMINAL_STATES:
        return None
    link = f"<{url}|{event.run_id}>"
    project = esc(event.project)
    details: list[str] = []
    if record is not None and record.run_id == event.run_id:
        spec = spec_name(record)
        if spec:
            details.append(f"spec `{esc(spec)}`")
        if state == "running" and record.requested_by:
            details.append(f"requested by {esc(record.requested_by)}")
    if state == "running":
        attempt = f" (attempt {event.attempt})" if event.attempt > 1 else ""
        head = f"{EMOJI['running']} Run {link} in *{project}* started{attempt}"
    else:
        reason = f" ({esc(event.reason)})" if event.reason and state != "succeeded" else ""
        head = f"{EMOJI[state]} Run {link} in *{project}* {VERBS[state]}{reason}"
        if record is not None and record.run_id == event.run_id:
            if record.started_at is not None and record.finished_at is not None:
                details.append(
                    f"ran {duration_text((record.finished_at - record.started_at).total_seconds())}"
                )
            if record.cost_usd:
                details.append(f"cost ${record.cost_usd:.2f}")
    text = head + (" — " + ", ".join(details) if details else "")
    if event.message and state != "running":
        text += f"\n> {esc(event.message[:500])}"
    return Notification(
        key=f"{state}#{event.attempt}", text=text, final=state in TERMINAL_STATES, attempt=event.attempt
    )


# ------------------------------------------------------------------------------------------------
# Saying it


class NotifierMetrics(Protocol):
    def notification(self, outcome: str) -> None: ...

    def api_error(self, method: str, error: str) -> None: ...


class _NoMetrics:
    def notification(self, outcome: str) -> None:
        pass

    def api_error(self, method: str, error: str) -> None:
        pass


class Notifier:
    def __init__(
        self,
        client: SlackPoster | None,
        channels: ChannelMap,
        store: ThreadStore,
        run_url: Callable[[str], str],
        lookup: Callable[[str], RunRecord | None] = lambda _: None,
        metrics: NotifierMetrics | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.client = client
        self.channels = channels
        self.store = store
        self.run_url = run_url
        self.lookup = lookup
        self.metrics = metrics or _NoMetrics()
        self.clock = clock

    async def handle(self, event: RunStateChanged, *, delivery: int = 1) -> Outcome:
        """Notify `event`; idempotent. Raises the bus `Retry` when Slack asks to try again later."""
        outcome = await self._handle(event, delivery)
        self.metrics.notification(outcome)
        return outcome

    async def _handle(self, event: RunStateChanged, delivery: int) -> Outcome:
        if self.client is None:
            return "disabled"
        note = render(event, self.lookup(event.run_id), self.run_url(event.run_id))
        if note is None:
            return "not_notified"
        channel = self.channels.channel_for(event.project)
        if channel is None:
            return "no_channel"
        for _ in range(10):  # each turn re-reads after a lost race
            found = await self.store.get(event.run_id)
            if found is None:
                claim = SlackThread(channel=channel, claimed_by=event.event_id, claimed_at=self.clock())
                revision = await self.store.create(event.run_id, claim)
                if revision is None:
                    continue
                return await self._start_thread(event, note, claim, revision, delivery)
            thread, revision = found
            if note.done(thread.sent):
                return "duplicate"
            if thread.ts is None:
                mine = thread.claimed_by == event.event_id
                stale = self.clock() - thread.claimed_at > timedelta(seconds=CLAIM_TTL_SECONDS)
                if not (mine or stale):
                    raise Retry(
                        f"the Slack thread of run {event.run_id} is being started",
                        delay=WAIT_FOR_CLAIM_SECONDS,
                    )
                claim = SlackThread(
                    channel=thread.channel,
                    claimed_by=event.event_id,
                    claimed_at=self.clock(),
                    sent=thread.sent,
                )
                new_revision = await self.store.update(event.run_id, claim, revision)
                if new_revision is None:
                    continue
                return await self._start_thread(event, note, claim, new_revision, delivery)
            if not note.final and any(
                key.endswith(f"#{note.attempt}") and key.split("#", 1)[0] in TERMINAL_STATES
                for key in thread.sent
            ):
                return "out_of_order"  # the start of an attempt that has already ended
            return await self._reply(event, note, thread, revision, delivery)
        raise Retry(f"the Slack thread record of run {event.run_id} keeps changing", delay=1.0)

    async def _start_thread(
        self, event: RunStateChanged, note: Notification, claim: SlackThread, revision: int, delivery: int
    ) -> Outcome:
        assert self.client is not None
        try:
            posted = await self.client.post_message(claim.channel, note.text)
        except SlackApiError as exc:
            await self.store.delete(event.run_id, revision)  # let the next event start the thread
            return self._failed(exc, event, delivery)
        thread = SlackThread(
            channel=posted.channel,
            ts=posted.ts,
            claimed_by=claim.claimed_by,
            claimed_at=claim.claimed_at,
            sent=[*claim.sent, note.key, *([note.parent_key] if note.final else [])],
        )
        if await self.store.update(event.run_id, thread, revision) is None:
            log.warning(
                "Slack thread record changed while its first message was posted",
                extra={"run_id": event.run_id, "ts": posted.ts},
            )
        return "posted"

    async def _reply(
        self, event: RunStateChanged, note: Notification, thread: SlackThread, revision: int, delivery: int
    ) -> Outcome:
        """The reply in the thread, then (final notifications) the update of the first message;
        each recorded once done, so a retry after a failure of the second does not repeat the first."""
        assert self.client is not None and thread.ts is not None
        channel, ts = thread.channel, thread.ts
        try:
            if note.key not in thread.sent:
                await self.client.post_message(channel, note.text, thread_ts=ts)
                thread, revision = await self._record_sent(event.run_id, note.key, thread, revision)
            if note.final and note.parent_key not in thread.sent:
                await self.client.update_message(channel, ts, note.text)
                await self._record_sent(event.run_id, note.parent_key, thread, revision)
        except SlackApiError as exc:
            return self._failed(exc, event, delivery)
        return "replied"

    async def _record_sent(
        self, run_id: str, key: str, thread: SlackThread, revision: int
    ) -> tuple[SlackThread, int]:
        """Add `key` to the record's `sent` (re-reading after a concurrent change); the record after."""
        for _ in range(5):
            if key in thread.sent:
                return thread, revision
            updated = msgspec.structs.replace(thread, sent=[*thread.sent, key])
            new_revision = await self.store.update(run_id, updated, revision)
            if new_revision is not None:
                return updated, new_revision
            found = await self.store.get(run_id)
            if found is None:
                break
            thread, revision = found
        log.warning("could not record a sent Slack notification", extra={"run_id": run_id, "key": key})
        return thread, revision

    def _failed(self, exc: SlackApiError, event: RunStateChanged, delivery: int) -> Outcome:
        self.metrics.api_error(exc.method, exc.error)
        if exc.retryable:
            delay = exc.retry_after if exc.retry_after is not None else min(2.0**delivery, MAX_RETRY_DELAY)
            log.info(
                "Slack call failed, retrying",
                extra={"run_id": event.run_id, "method": exc.method, "error": exc.error, "retry_in_s": delay},
            )
            raise Retry(f"Slack {exc.method}: {exc.error}", delay=delay) from exc
        log.error(
            "Slack notification dropped: the error is permanent",
            extra={
                "run_id": event.run_id,
                "method": exc.method,
                "error": exc.error,
                "project": event.project,
            },
        )
        return "failed"
