"""Alert delivery without NATS: rules, rendering, and the episode engine over an in-memory KV
bucket with a recording sender and a manual clock."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import msgspec
import pytest
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NoKeysError
from prometheus_client import CollectorRegistry

from fabrik_common.clock import ManualClock
from fabrik_common.events import AlertRaised, AlertResolved
from fabrik_scheduler.alerting.channels import ChannelSender, DeliveryError, SlackConfig, SmtpConfig
from fabrik_scheduler.alerting.engine import AlertEngine, AlertMetrics, Episode, RetryPolicy
from fabrik_scheduler.alerting.render import Notice, dashboard_link, email_message, slack_text, webhook_body
from fabrik_scheduler.alerting.rules import (
    AlertRules,
    ChannelConfig,
    EmailChannel,
    RulesError,
    SlackChannel,
    WebhookChannel,
    load_rules,
    parse_rules,
    route,
)
from fabrik_scheduler.settings import SchedulerSettings

T0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)

RULES = """
{
  "channels": {
    "ops": {"type": "slack", "channel": "C0OPS"},
    "hook": {"type": "webhook", "url": "http://127.0.0.1:1/alerts", "headers": {"Authorization": "Bearer x"}},
    "mail": {"type": "email", "to": ["oncall@example.com"]},
    "web-team": {"type": "slack_webhook", "url": "https://hooks.slack.com/services/T/B/x"}
  },
  "rules": [
    {"name": "critical", "match": {"min_severity": "critical"}, "channels": ["mail", "ops"],
     "realert_seconds": 3600},
    {"name": "web", "match": {"project": ["web"]}, "channels": ["ops", "web-team"], "stop": true},
    {"name": "everything", "channels": ["hook"]}
  ],
  "default_realert_seconds": 7200
}
"""


def alert(**changes: Any) -> AlertRaised:
    base = AlertRaised(
        alert_id="a1",
        key="schedule.nightly.failing",
        severity="warning",
        source="scheduler",
        title="Schedule nightly is failing",
        message="3 consecutive failures",
        entity_kind="schedule",
        entity_id="nightly",
        project="demo",
        labels={"kind": "schedule"},
    )
    return msgspec.structs.replace(base, **changes)


# ---------------------------------------------------------------------------------- rules


def test_rules_route_by_severity_project_and_stop() -> None:
    rules = parse_rules(RULES)
    r, unknown = route(rules, alert())
    assert (r.channels, r.realert_seconds, r.rules, unknown) == (("hook",), 7200, ("everything",), [])
    r, _ = route(rules, alert(severity="critical"))
    assert r.channels == ("mail", "ops", "hook") and r.realert_seconds == 3600
    r, _ = route(rules, alert(severity="critical", project="web"))
    # "web" stops: "everything" does not apply; "ops" is not repeated.
    assert r.channels == ("mail", "ops", "web-team") and r.rules == ("critical", "web")


def test_alert_names_its_own_channels_and_interval() -> None:
    rules = parse_rules(RULES)
    r, unknown = route(rules, alert(labels={"channels": "mail, nope ,hook", "realert_seconds": "600"}))
    assert r.channels == ("hook", "mail") and unknown == ["nope"] and r.realert_seconds == 600
    r, _ = route(rules, alert(labels={"realert_seconds": "0"}))
    assert r.realert_seconds == 0


def test_match_on_kind_labels_key_prefix_and_source() -> None:
    rules = parse_rules(
        '{"channels": {"h": {"type": "webhook", "url": "https://x"}}, "rules": ['
        '{"match": {"kind": ["budget"], "source": ["optimizer"], "key_prefix": "budget.", '
        '"labels": {"level": "limit"}, "entity_kind": null}, "channels": ["h"]}]}'
    )
    budget = alert(
        key="budget.2026-03.global.llm.limit", source="optimizer", labels={"kind": "budget", "level": "limit"}
    )
    assert route(rules, budget)[0].channels == ("h",)
    assert route(rules, msgspec.structs.replace(budget, source="scheduler"))[0].channels == ()
    assert route(rules, msgspec.structs.replace(budget, labels={"kind": "budget"}))[0].channels == ()
    assert route(rules, msgspec.structs.replace(budget, key="x"))[0].channels == ()


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("{", "not valid JSON"),
        ('{"rules": [{"channels": ["ghost"]}]}', "names the channel 'ghost', which is not defined"),
        ('{"channels": {"x": {"type": "pager"}}}', "Invalid value 'pager'"),
        ('{"channels": {"m": {"type": "email", "to": ["not-an-address"]}}}', "at `$.channels[...].to[0]`"),
        ('{"channels": {}, "routes": []}', "unknown field `routes`"),
        ('{"rules": [{"match": {"severity": ["loud"]}, "channels": []}]}', "$.rules[0].match.severity"),
    ],
)
def test_bad_rules_are_refused_with_the_place(text: str, problem: str) -> None:
    with pytest.raises(RulesError) as info:
        parse_rules(text)
    assert problem in str(info.value)
    assert str(info.value).startswith("FABRIK_ALERT_RULES:")


def test_rules_from_a_file_and_settings_check_them(tmp_path: Any) -> None:
    path = tmp_path / "rules.json"
    path.write_text(RULES)
    assert set(load_rules("", str(path)).channels) == {"ops", "hook", "mail", "web-team"}
    with pytest.raises(RulesError, match="not both"):
        load_rules(RULES, str(path))
    with pytest.raises(RulesError, match="cannot be read"):
        load_rules("", str(tmp_path / "missing.json"))
    assert load_rules("", "") == AlertRules()
    with pytest.raises(RulesError, match="ghost"):
        SchedulerSettings(alert_rules='{"rules": [{"channels": ["ghost"]}]}')
    secret = tmp_path / "password"
    secret.write_text("s3cret\n")
    assert SchedulerSettings(smtp_password_file=str(secret)).secret("smtp_password") == "s3cret"
    with pytest.raises(ValueError, match="FABRIK_SMTP_PASSWORD or FABRIK_SMTP_PASSWORD_FILE"):
        SchedulerSettings(smtp_password="x", smtp_password_file=str(secret))


# ---------------------------------------------------------------------------------- rendering


def notice(kind: str = "raised", **changes: Any) -> Notice:
    base = Notice(
        delivery_id="d-1",
        kind=kind,  # type: ignore[arg-type]
        episode=2,
        alert=alert(entity_kind="run", entity_id="01JRUN", title="Run <x> & co stalled"),
        opened_at=T0,
        created_at=T0 + timedelta(hours=2, minutes=5),
        dashboard_url="https://fabrik.example.com/runs/01JRUN",
        subject={"run_id": "01JRUN", "state": "running"},
    )
    return msgspec.structs.replace(base, **changes) if changes else base  # type: ignore[type-var]


def test_dashboard_links() -> None:
    base = "https://fabrik.example.com/"
    assert dashboard_link(alert(), base) == "https://fabrik.example.com/schedules#nightly"
    assert (
        dashboard_link(alert(entity_kind="run", entity_id="R1"), base) == "https://fabrik.example.com/runs/R1"
    )
    budget = alert(entity_kind=None, entity_id=None, key="budget.x", labels={"kind": "budget"})
    assert dashboard_link(budget, base) == "https://fabrik.example.com/costs"
    assert dashboard_link(alert(link="https://elsewhere/x"), base) == "https://elsewhere/x"
    assert dashboard_link(alert(), "") is None


def test_slack_text_escapes_and_links() -> None:
    text = slack_text(notice())
    assert text.startswith("⚠️ *[WARNING] Run &lt;x&gt; &amp; co stalled*")
    assert "3 consecutive failures" in text
    assert "<https://fabrik.example.com/runs/01JRUN|Open in Fabrik>" in text
    realert = slack_text(Notice(**{**notice().__dict__, "kind": "realert", "repeat": 2}))
    assert "Still open" in realert and "- for 2h 5m, reminder 2" in realert
    resolved = slack_text(
        Notice(
            **{
                **notice().__dict__,
                "kind": "resolved",
                "resolved_message": "healthy again",
                "resolved_at": T0 + timedelta(minutes=30),
            }
        )
    )
    assert resolved.startswith("✅ *Resolved: Run &lt;x&gt; &amp; co stalled - open for 30m*")
    assert "healthy again" in resolved


def test_webhook_body_carries_alert_subject_and_link() -> None:
    body = webhook_body(notice())
    assert body["event"] == "alert.raised" and body["status"] == "open"
    assert body["delivery_id"] == "d-1" and body["episode"] == 2
    assert body["alert"]["key"] == "schedule.nightly.failing"
    assert body["run"] == {"run_id": "01JRUN", "state": "running"}
    assert body["dashboard_url"] == "https://fabrik.example.com/runs/01JRUN"
    resolved = webhook_body(Notice(**{**notice().__dict__, "kind": "resolved", "resolved_message": "ok"}))
    assert resolved["status"] == "resolved" and resolved["resolved"]["message"] == "ok"


def test_email_message() -> None:
    message = email_message(
        notice(), "Fabrik <alerts@fabrik.example.com>", ["a@example.com", "b@example.com"]
    )
    assert message["Subject"] == "[Fabrik] [WARNING] Run <x> & co stalled"
    assert message["To"] == "a@example.com, b@example.com"
    assert message["Message-ID"] == "<d-1@fabrik.example.com>"
    assert "https://fabrik.example.com/runs/01JRUN" in message.get_content()
    resolved = email_message(Notice(**{**notice().__dict__, "kind": "resolved"}), "x@y.z", ["a@example.com"])
    assert resolved["In-Reply-To"] == resolved["References"]


# ---------------------------------------------------------------------------------- the engine


@dataclass
class Entry:
    key: str
    value: bytes
    revision: int


class MemoryKV:
    def __init__(self) -> None:
        self.data: dict[str, Entry] = {}
        self.seq = 0
        self.writes = 0

    async def keys(self) -> list[str]:
        if not self.data:
            raise NoKeysError
        return list(self.data)

    async def get(self, key: str) -> Entry:
        if key not in self.data:
            raise KeyNotFoundError
        return self.data[key]

    async def create(self, key: str, value: bytes) -> int:
        if key in self.data:
            raise KeyWrongLastSequenceError
        return self._put(key, value)

    async def update(self, key: str, value: bytes, last: int) -> int:
        if key not in self.data or self.data[key].revision != last:
            raise KeyWrongLastSequenceError
        return self._put(key, value)

    def _put(self, key: str, value: bytes) -> int:
        self.seq += 1
        self.writes += 1
        self.data[key] = Entry(key, value, self.seq)
        return self.seq

    def episodes(self) -> list[Episode]:
        return [msgspec.json.decode(e.value, type=Episode) for e in self.data.values()]


@dataclass
class FakeSender:
    sent: list[tuple[str, str, str | None]] = field(default_factory=list)
    failures: list[DeliveryError] = field(default_factory=list)
    rules: AlertRules | None = None

    async def send(self, config: ChannelConfig, notice: Notice, thread_ts: str | None = None) -> str | None:
        if self.failures:
            raise self.failures.pop(0)
        name = next(n for n, c in (self.rules.channels.items() if self.rules else ()) if c == config)
        self.sent.append((name, notice.kind, thread_ts))
        return f"ts-{len(self.sent)}"


def engine(rules_text: str = RULES, **retry: Any) -> tuple[AlertEngine, MemoryKV, FakeSender, ManualClock]:
    kv, clock = MemoryKV(), ManualClock(T0)
    rules = parse_rules(rules_text)
    sender = FakeSender(rules=rules)
    e = AlertEngine(
        kv,  # type: ignore[arg-type]
        rules,
        sender,  # type: ignore[arg-type]
        clock=clock,
        metrics=AlertMetrics(CollectorRegistry()),
        base_url="https://fabrik.example.com",
        retry=RetryPolicy(**retry),
    )
    return e, kv, sender, clock


async def test_an_episode_is_delivered_once_realerted_and_resolved() -> None:
    e, kv, sender, clock = engine()
    a = alert(severity="critical")
    assert await e.on_event(a, 1) == "opened"
    # A redelivery, and the source raising it again, change nothing.
    assert await e.on_event(a, 1) == "redelivered"
    assert await e.on_event(alert(severity="critical", alert_id="a2"), 2) == "duplicate"
    assert await e.tick() == 3
    assert sorted(s[:2] for s in sender.sent) == [("hook", "raised"), ("mail", "raised"), ("ops", "raised")]
    assert await e.tick() == 0
    clock.advance(timedelta(minutes=59))
    assert await e.tick() == 0
    clock.advance(timedelta(minutes=1))
    assert await e.tick() == 3  # the critical rule's interval: 1 h
    assert sorted(s[1] for s in sender.sent[3:]) == ["realert"] * 3
    # Slack replies in the thread of the first message.
    assert ("ops", "realert", "ts-" + str(1 + [s[0] for s in sender.sent].index("ops"))) in sender.sent
    assert await e.on_event(AlertResolved(alert_id="a3", key=a.key, source="scheduler", message="ok"), 3) == (
        "resolved"
    )
    assert await e.on_event(AlertResolved(alert_id="a3", key=a.key, source="scheduler"), 4) == "duplicate"
    assert await e.tick() == 3
    assert sorted(s[1] for s in sender.sent[6:]) == ["resolved"] * 3
    clock.advance(timedelta(hours=5))
    assert await e.tick() == 0  # no re-alert of a resolved episode
    (episode,) = kv.episodes()
    assert (episode.status, episode.number, episode.repeats) == ("resolved", 1, 1)
    # The same key raised again is a new episode.
    assert await e.on_event(alert(severity="critical", alert_id="a4"), 5) == "opened"
    assert kv.episodes()[0].number == 2
    assert await e.tick() == 3


async def test_a_restarted_engine_continues_from_the_bucket() -> None:
    e, kv, sender, clock = engine()
    await e.on_event(alert(), 1)
    await e.tick()
    second = AlertEngine(
        kv,  # type: ignore[arg-type]
        e.rules,
        sender,  # type: ignore[arg-type]
        clock=clock,
        metrics=AlertMetrics(CollectorRegistry()),
    )
    await second.load()
    assert await second.on_event(alert(), 1) == "redelivered"
    assert await second.tick() == 0
    assert len(sender.sent) == 1


async def test_failures_are_retried_with_backoff_then_given_up_loudly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    e, kv, sender, clock = engine(max_attempts=3, base_seconds=10)
    sender.failures = [DeliveryError("HTTP 503", retryable=True)] * 2
    await e.on_event(alert(), 1)
    assert await e.tick() == 0
    clock.advance(timedelta(seconds=9))
    assert await e.tick() == 0 and not sender.failures[1:]
    clock.advance(timedelta(seconds=1))
    assert await e.tick() == 0  # second failure; next try in 20 s
    clock.advance(timedelta(seconds=20))
    assert await e.tick() == 1
    assert sender.sent == [("hook", "raised", None)]
    # A permanent error is not retried; it is logged and counted.
    sender.failures = [DeliveryError("HTTP 404", retryable=False)]
    await e.on_event(AlertResolved(alert_id="r", key=alert().key, source="scheduler"), 2)
    assert await e.tick() == 0
    (episode,) = kv.episodes()
    assert [(d.kind, d.status, d.attempts) for d in episode.deliveries] == [
        ("raised", "sent", 3),
        ("resolved", "failed", 1),
    ]
    assert "alert delivery failed for good" in caplog.text
    sample = e.metrics.notifications.labels("webhook", "resolved", "failed")._value.get()
    assert sample == 1


async def test_escalation_is_delivered_within_the_episode() -> None:
    e, _, sender, _ = engine()
    await e.on_event(alert(project="web"), 1)
    await e.tick()
    assert sorted(sender.sent) == [("ops", "raised", None), ("web-team", "raised", None)]
    assert await e.on_event(alert(project="web", severity="critical"), 2) == "escalated"
    await e.tick()
    # The critical rule now applies too: its channel joins the episode.
    assert sorted(s[:2] for s in sender.sent[2:]) == [
        ("mail", "escalated"),
        ("ops", "escalated"),
        ("web-team", "escalated"),
    ]


async def test_an_unrouted_alert_is_said_in_the_log(caplog: pytest.LogCaptureFixture) -> None:
    e, *_ = engine('{"channels": {}, "rules": []}')
    assert await e.on_event(alert(), 1) == "unrouted"
    assert "matched no rule" in caplog.text
    assert await e.tick() == 0


# ---------------------------------------------------------------------------------- channels


def sender_answering(handler: Any) -> ChannelSender:
    http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return ChannelSender(
        http, SlackConfig(bot_token="xoxb-1", api_url="https://slack.test/api"), SmtpConfig()
    )


@pytest.mark.parametrize(
    ("status", "body", "headers", "retryable", "retry_after", "text"),
    [
        (200, {"ok": False, "error": "channel_not_found"}, {}, False, None, "channel_not_found"),
        (200, {"ok": False, "error": "ratelimited"}, {}, True, None, "ratelimited"),
        (429, {"ok": False, "error": "ratelimited"}, {"Retry-After": "7"}, True, 7.0, "HTTP 429"),
        (503, None, {}, True, None, "HTTP 503"),
        (404, None, {}, False, None, "HTTP 404"),
        (200, "<html>", {}, True, None, "not JSON"),
    ],
)
async def test_slack_answers_are_classified(
    status: int, body: Any, headers: dict[str, str], retryable: bool, retry_after: float | None, text: str
) -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        assert request.headers["Authorization"] == "Bearer xoxb-1"
        if isinstance(body, str):
            return httpx.Response(status, text=body, headers=headers)
        return httpx.Response(status, json=body, headers=headers)

    with pytest.raises(DeliveryError) as info:
        await sender_answering(answer).send(SlackChannel(channel="C1"), notice())
    assert (info.value.retryable, info.value.retry_after) == (retryable, retry_after)
    assert text in str(info.value)


async def test_slack_threads_and_webhooks_carry_the_delivery_id() -> None:
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"ok": True, "ts": "171.5"})

    sender = sender_answering(answer)
    assert await sender.send(SlackChannel(channel="C1"), notice("resolved"), thread_ts="170.1") == "171.5"
    body = json.loads(seen[0].content)
    assert (body["channel"], body["thread_ts"], body["reply_broadcast"]) == ("C1", "170.1", True)
    await sender.send(WebhookChannel(url="https://hooks.test/x", headers={"X-Token": "t"}), notice())
    assert seen[1].headers["X-Fabrik-Delivery-Id"] == "d-1" and seen[1].headers["X-Token"] == "t"


async def test_unreachable_endpoints_and_missing_configuration() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    with pytest.raises(DeliveryError) as info:
        await sender_answering(refuse).send(WebhookChannel(url="https://hooks.test/x"), notice())
    assert info.value.retryable and "connection failed" in str(info.value)
    no_token = ChannelSender(httpx.AsyncClient(), SlackConfig(), SmtpConfig())
    with pytest.raises(DeliveryError, match="FABRIK_ALERT_SLACK_BOT_TOKEN") as info:
        await no_token.send(SlackChannel(channel="C1"), notice())
    assert not info.value.retryable
    with pytest.raises(DeliveryError, match="FABRIK_SMTP_HOST") as info:
        await no_token.send(EmailChannel(to=["a@example.com"]), notice())
    assert not info.value.retryable
