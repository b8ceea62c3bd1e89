"""Alert episodes: de-duplication, routing, re-alerts, resolution and delivery with retries.

An *episode* is the time between an `AlertRaised` and the `AlertResolved` of the same `key`. Its
record in the KV bucket `alerts` (key `ep.<sha256 of the alert key>`) holds the alert, the
channels it was routed to, and an outbox of *deliveries* — one per (channel, notice) — each
`pending`, `sent` or `failed`. Events only change records (a raise opens an episode or is a
duplicate, a resolve closes it); the delivery pass sends what is pending and marks it sent.
Everything is written with revision checks, by the scheduler leader only. docs/alerts.md gives
the argument why each notice reaches each channel once.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

import msgspec
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NoKeysError
from nats.js.kv import KeyValue
from prometheus_client import CollectorRegistry, Counter, Gauge

from fabrik_common.bus import Retry
from fabrik_common.events import AlertRaised, AlertResolved, Severity
from fabrik_scheduler.alerting.channels import ChannelSender, DeliveryError
from fabrik_scheduler.alerting.render import Notice, NoticeKind, dashboard_link
from fabrik_scheduler.alerting.rules import AlertRules, route, severity_rank

log = logging.getLogger(__name__)

KEY_PREFIX = "ep."
KEEP_DONE = 20
"""Delivered (or given up) deliveries kept per episode, newest last, for inspection."""


class Delivery(msgspec.Struct, kw_only=True):
    id: str
    channel: str
    kind: NoticeKind
    repeat: int = 0
    created_at: datetime
    status: Literal["pending", "sent", "failed"] = "pending"
    attempts: int = 0
    next_try_at: datetime
    sent_at: datetime | None = None
    error: str = ""


class Episode(msgspec.Struct, kw_only=True):
    key: str
    number: int
    status: Literal["open", "resolved"]
    alert: AlertRaised
    severity: Severity
    opened_at: datetime
    resolved_at: datetime | None = None
    resolved_message: str = ""
    channels: list[str] = msgspec.field(default_factory=list)
    realert_seconds: int = 0
    last_notified_at: datetime | None = None
    repeats: int = 0
    last_seq: int = 0
    """Stream sequence of the last alert event applied (a redelivery at or below it is a no-op)."""
    slack_ts: dict[str, str] = msgspec.field(default_factory=dict)
    deliveries: list[Delivery] = msgspec.field(default_factory=list)


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(Episode).decode


def episode_kv_key(alert_key: str) -> str:
    return KEY_PREFIX + hashlib.sha256(alert_key.encode()).hexdigest()[:40]


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 8
    base_seconds: float = 2.0
    max_seconds: float = 600.0

    def delay(self, attempts: int, retry_after: float | None) -> float:
        backoff: float = min(self.base_seconds * 2.0 ** max(attempts - 1, 0), self.max_seconds)
        return max(backoff, retry_after or 0.0)


SubjectLookup = Callable[[str, str], Awaitable[dict[str, Any] | None]]


class AlertMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.events = Counter(
            "fabrik_alert_events_total",
            "Alert events handled, by what they did",
            ["event", "outcome"],
            registry=registry,
        )
        self.notifications = Counter(
            "fabrik_alert_notifications_total",
            "Notices sent to channels, by channel type, notice kind and outcome",
            ["channel_type", "kind", "outcome"],
            registry=registry,
        )
        self.open_episodes = Gauge("fabrik_alert_open_episodes", "Alert episodes open now", registry=registry)


class AlertEngine:
    def __init__(
        self,
        kv: KeyValue,
        rules: AlertRules,
        sender: ChannelSender,
        *,
        clock: Callable[[], datetime],
        metrics: AlertMetrics,
        base_url: str = "",
        lookup: SubjectLookup | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.kv = kv
        self.rules = rules
        self.sender = sender
        self.clock = clock
        self.metrics = metrics
        self.base_url = base_url
        self.lookup = lookup
        self.retry = retry or RetryPolicy()
        self.episodes: dict[str, tuple[Episode, int]] = {}
        self.lock = asyncio.Lock()
        metrics.open_episodes.set_function(
            lambda: sum(1 for episode, _ in self.episodes.values() if episode.status == "open")
        )

    # ------------------------------------------------------------------ state

    async def load(self) -> None:
        """Every episode from the KV bucket (on becoming leader)."""
        async with self.lock:
            self.episodes = {}
            try:
                keys = await self.kv.keys()
            except NoKeysError:
                keys = []
            for key in keys:
                if not key.startswith(KEY_PREFIX):
                    continue
                await self._reload(key)
        log.info("alert episodes loaded", extra={"episodes": len(self.episodes)})

    async def _reload(self, kv_key: str) -> Episode | None:
        try:
            entry = await self.kv.get(kv_key)
        except KeyNotFoundError:
            self.episodes.pop(kv_key, None)
            return None
        if not entry.value:
            self.episodes.pop(kv_key, None)
            return None
        episode = _decode(entry.value)
        self.episodes[kv_key] = (episode, entry.revision or 0)
        return episode

    async def _save(self, kv_key: str, episode: Episode, revision: int) -> None:
        """Write with a revision check; a conflict means someone else wrote: reload and retry."""
        try:
            if revision == 0:
                new_revision = await self.kv.create(kv_key, _encode(episode))
            else:
                new_revision = await self.kv.update(kv_key, _encode(episode), last=revision)
        except KeyWrongLastSequenceError:
            await self._reload(kv_key)
            raise Retry("alert episode changed underneath; applying again", delay=0.5) from None
        self.episodes[kv_key] = (episode, new_revision)

    # ------------------------------------------------------------------ events

    async def on_event(self, event: AlertRaised | AlertResolved, sequence: int) -> str:
        async with self.lock:
            if isinstance(event, AlertRaised):
                outcome = await self._on_raised(event, sequence)
                self.metrics.events.labels("raised", outcome).inc()
            else:
                outcome = await self._on_resolved(event, sequence)
                self.metrics.events.labels("resolved", outcome).inc()
            return outcome

    async def _on_raised(self, alert: AlertRaised, sequence: int) -> str:
        kv_key = episode_kv_key(alert.key)
        current = self.episodes.get(kv_key)
        now = self.clock()
        if current is not None:
            episode, revision = current
            if sequence and sequence <= episode.last_seq:
                return "redelivered"
            if episode.status == "open":
                escalated = severity_rank(alert.severity) > severity_rank(episode.severity)
                # The latest raise may say how often to repeat it (and reach more channels).
                target, _ = route(self.rules, alert)
                updated = msgspec.structs.replace(
                    episode, alert=alert, last_seq=sequence, realert_seconds=target.realert_seconds
                )
                if escalated:
                    updated.severity = alert.severity
                    updated.channels = [
                        *episode.channels,
                        *(c for c in target.channels if c not in episode.channels),
                    ]
                    updated.deliveries = [
                        *episode.deliveries,
                        *self._notices(updated, "escalated", updated.channels, now),
                    ]
                    updated.last_notified_at = now
                await self._save(kv_key, updated, revision)
                return "escalated" if escalated else "duplicate"
            number = episode.number + 1
        else:
            revision, number = 0, 1
        target, unknown = route(self.rules, alert)
        if unknown:
            log.error(
                "alert names channels that are not defined",
                extra={"key": alert.key, "channels": unknown},
            )
        episode = Episode(
            key=alert.key,
            number=number,
            status="open",
            alert=alert,
            severity=alert.severity,
            opened_at=now,
            channels=list(target.channels),
            realert_seconds=target.realert_seconds,
            last_notified_at=now,
            last_seq=sequence,
        )
        episode.deliveries = self._notices(episode, "raised", episode.channels, now)
        await self._save(kv_key, episode, revision)
        if not episode.channels:
            log.warning(
                "alert matched no rule and named no channel: not delivered",
                extra={"key": alert.key, "severity": alert.severity, "title": alert.title},
            )
            return "unrouted"
        log.info(
            "alert episode opened",
            extra={"key": alert.key, "episode": number, "channels": episode.channels, "rules": target.rules},
        )
        return "opened"

    async def _on_resolved(self, event: AlertResolved, sequence: int) -> str:
        kv_key = episode_kv_key(event.key)
        current = self.episodes.get(kv_key)
        if current is None:
            return "unknown"
        episode, revision = current
        if sequence and sequence <= episode.last_seq:
            return "redelivered"
        if episode.status != "open":
            return "duplicate"
        now = self.clock()
        updated = msgspec.structs.replace(
            episode,
            status="resolved",
            resolved_at=now,
            resolved_message=event.message,
            last_seq=sequence,
            # A reminder not sent yet says nothing the resolution does not.
            deliveries=[d for d in episode.deliveries if not (d.status == "pending" and d.kind == "realert")],
        )
        updated.deliveries = [*updated.deliveries, *self._notices(updated, "resolved", updated.channels, now)]
        await self._save(kv_key, updated, revision)
        log.info("alert episode resolved", extra={"key": event.key, "episode": episode.number})
        return "resolved"

    def _notices(
        self, episode: Episode, kind: NoticeKind, channels: list[str], now: datetime
    ) -> list[Delivery]:
        repeat = episode.repeats if kind == "realert" else 0
        suffix = f"{kind}-{repeat}" if kind == "realert" else kind
        if kind == "escalated":
            suffix = f"escalated-{episode.severity}"
        base = hashlib.sha256(f"{episode.key}#{episode.number}".encode()).hexdigest()[:16]
        return [
            Delivery(
                id=f"{base}-{episode.number}-{channel}-{suffix}",
                channel=channel,
                kind=kind,
                repeat=repeat,
                created_at=now,
                next_try_at=now,
            )
            for channel in channels
        ]

    # ------------------------------------------------------------------ the delivery pass

    async def tick(self) -> int:
        """Add due re-alerts, then send every due delivery (per channel in order). Returns how
        many were sent."""
        async with self.lock:
            now = self.clock()
            await self._add_realerts(now)
            due = self._due(now)
        if not due:
            return 0
        results = await asyncio.gather(*(self._send(kv_key, d) for kv_key, d in due))
        sent = 0
        async with self.lock:
            for (kv_key, delivery), (ts, error) in zip(due, results, strict=True):
                sent += await self._settle(kv_key, delivery, ts, error)
        return sent

    async def _add_realerts(self, now: datetime) -> None:
        for kv_key, (episode, revision) in list(self.episodes.items()):
            if episode.status != "open" or episode.realert_seconds <= 0 or not episode.channels:
                continue
            last = episode.last_notified_at or episode.opened_at
            if now < last + timedelta(seconds=episode.realert_seconds):
                continue
            waiting = {d.channel for d in episode.deliveries if d.status == "pending"}
            updated = msgspec.structs.replace(episode, repeats=episode.repeats + 1, last_notified_at=now)
            channels = [c for c in updated.channels if c not in waiting]
            updated.deliveries = [*episode.deliveries, *self._notices(updated, "realert", channels, now)]
            try:
                await self._save(kv_key, updated, revision)
            except Retry:
                continue

    def _due(self, now: datetime) -> list[tuple[str, Delivery]]:
        due: list[tuple[str, Delivery]] = []
        for kv_key, (episode, _) in self.episodes.items():
            seen: set[str] = set()
            for delivery in episode.deliveries:
                if delivery.status != "pending" or delivery.channel in seen:
                    continue
                seen.add(delivery.channel)  # a channel's notices go out in order
                if delivery.next_try_at <= now:
                    due.append((kv_key, delivery))
        return due

    async def _send(self, kv_key: str, delivery: Delivery) -> tuple[str | None, DeliveryError | None]:
        current = self.episodes.get(kv_key)
        if current is None:
            return None, DeliveryError("episode vanished", retryable=False)
        episode = current[0]
        config = self.rules.channels.get(delivery.channel)
        if config is None:
            return None, DeliveryError(f"channel {delivery.channel!r} is no longer defined", retryable=False)
        subject = None
        if self.lookup is not None and episode.alert.entity_kind and episode.alert.entity_id:
            try:
                subject = await self.lookup(episode.alert.entity_kind, episode.alert.entity_id)
            except Exception:
                log.exception("could not read what the alert concerns", extra={"key": episode.key})
        notice = Notice(
            delivery_id=delivery.id,
            kind=delivery.kind,
            episode=episode.number,
            alert=episode.alert,
            opened_at=episode.opened_at,
            created_at=delivery.created_at,
            repeat=delivery.repeat,
            resolved_message=episode.resolved_message,
            resolved_at=episode.resolved_at,
            dashboard_url=dashboard_link(episode.alert, self.base_url),
            subject=subject,
        )
        try:
            ts = await self.sender.send(config, notice, episode.slack_ts.get(delivery.channel))
        except DeliveryError as exc:
            return None, exc
        return ts, None

    async def _settle(
        self, kv_key: str, delivery: Delivery, ts: str | None, error: DeliveryError | None
    ) -> int:
        current = self.episodes.get(kv_key)
        if current is None:
            return 0
        episode, revision = current
        config = self.rules.channels.get(delivery.channel)
        channel_type = type(config).__struct_config__.tag if config is not None else "unknown"
        now = self.clock()
        deliveries = list(episode.deliveries)
        index = next((i for i, d in enumerate(deliveries) if d.id == delivery.id), None)
        if index is None:
            return 0
        item = msgspec.structs.replace(deliveries[index], attempts=deliveries[index].attempts + 1)
        slack_ts = dict(episode.slack_ts)
        fields = {
            "key": episode.key,
            "channel": delivery.channel,
            "kind": delivery.kind,
            "delivery": delivery.id,
        }
        if error is None:
            item.status, item.sent_at, item.error = "sent", now, ""
            if ts and delivery.channel not in slack_ts:
                slack_ts[delivery.channel] = ts
            outcome = "sent"
            log.info("alert delivered", extra=fields)
        elif error.retryable and item.attempts < self.retry.max_attempts:
            delay = self.retry.delay(item.attempts, error.retry_after)
            item.next_try_at = now + timedelta(seconds=delay)
            item.error = str(error)
            outcome = "retry"
            log.warning(
                "alert delivery failed; will retry",
                extra={**fields, "error": str(error), "attempt": item.attempts, "retry_in_s": delay},
            )
        else:
            item.status, item.error = "failed", str(error)
            outcome = "failed"
            log.error(
                "alert delivery failed for good",
                extra={**fields, "error": str(error), "attempts": item.attempts},
            )
        deliveries[index] = item
        pending = [d for d in deliveries if d.status == "pending"]
        done = [d for d in deliveries if d.status != "pending"][-KEEP_DONE:]
        order = {d.id: i for i, d in enumerate(deliveries)}
        kept = sorted([*done, *pending], key=lambda d: order[d.id])
        updated = msgspec.structs.replace(episode, deliveries=kept, slack_ts=slack_ts)
        try:
            await self._save(kv_key, updated, revision)
        except Retry:
            log.warning(
                "alert episode changed while sending; the outcome is applied on the next pass", extra=fields
            )
            return 0
        self.metrics.notifications.labels(channel_type, delivery.kind, outcome).inc()
        return 1 if outcome == "sent" else 0
