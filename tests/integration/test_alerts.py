"""Alerts that reach people, over a real NATS server with the real scheduler (manual clock):
`AlertRaised` / `AlertResolved` published as the optimizer or a schedule would, delivered by the
routing rules to a local webhook, a Slack incoming webhook, the Slack app (the Slack double) and
an SMTP server (aiosmtpd, STARTTLS and a password from a file) — once per episode, again after
the re-alert interval, and resolved; across a leader failover, and through failures.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import email.policy
import ipaddress
import json
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from email import message_from_bytes
from email.message import Message
from pathlib import Path
from typing import Any

import msgspec
import nats.js.errors
from aiohttp import web
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from prometheus_client import CollectorRegistry

from fabrik_common.bus import Bus, BusOptions
from fabrik_common.clock import ManualClock
from fabrik_common.events import AlertRaised, AlertResolved
from fabrik_common.ids import new_ulid, utcnow
from fabrik_common.metrics import BusMetrics
from fabrik_common.natsserver import free_port
from fabrik_common.service import Service
from fabrik_common.testing import running_service
from fabrik_common.testing.http_double import HttpDouble
from fabrik_common.testing.slack_double import SlackDouble
from fabrik_common.topology import ensure_topology
from fabrik_scheduler.app import build
from fabrik_scheduler.settings import SchedulerSettings
from fabrik_scheduler.state import SchedulerState

CHANNEL = "C0ALERTS"
SMTP_USER = "fabrik"
SMTP_PASSWORD = "smtp-password-in-a-file"


class Receiver(HttpDouble):
    """A generic webhook and a Slack incoming webhook; `fail` answers the next posts with 503."""

    def __init__(self) -> None:
        super().__init__()
        self.hook: list[dict[str, Any]] = []
        self.hook_headers: list[dict[str, str]] = []
        self.slack: list[dict[str, Any]] = []
        self.fail = 0
        self.failed = 0

    def make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/hook", self._hook)
        app.router.add_post("/services/T0/B0/secret", self._slack)
        return app

    async def _hook(self, request: web.Request) -> web.Response:
        if self.fail:
            self.fail -= 1
            self.failed += 1
            return web.Response(status=503, text="try later")
        self.hook.append(await request.json())
        self.hook_headers.append(dict(request.headers))
        return web.json_response({"ok": True})

    async def _slack(self, request: web.Request) -> web.Response:
        self.slack.append(await request.json())
        return web.Response(text="ok")


@dataclass
class Mailbox:
    messages: list[Message] = field(default_factory=list)
    logins: list[str] = field(default_factory=list)
    tls: list[bool] = field(default_factory=list)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:  # noqa: N802
        assert isinstance(envelope.content, bytes)
        self.messages.append(message_from_bytes(envelope.content, policy=email.policy.default))
        self.tls.append(session.ssl is not None)
        return "250 OK"

    def authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        if isinstance(data, LoginPassword) and (data.login, data.password) == (
            SMTP_USER.encode(),
            SMTP_PASSWORD.encode(),
        ):
            self.logins.append(data.login.decode())
            return AuthResult(success=True)
        return AuthResult(success=False, handled=False)


def self_signed(tmp: Path) -> ssl.SSLContext:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .sign(key, hashes.SHA256())
    )
    (tmp / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp / "cert.pem", tmp / "key.pem")
    return context


async def until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not met within {timeout} s")
        await asyncio.sleep(0.02)


@dataclass
class Env:
    bus: Bus
    clock: ManualClock
    receiver: Receiver
    slack: SlackDouble
    mailbox: Mailbox
    settings: SchedulerSettings
    service: Service[SchedulerState] | None = None

    def counts(self) -> tuple[int, int, int, int]:
        return (
            len(self.receiver.hook),
            len(self.receiver.slack),
            len(self.slack.messages(CHANNEL)),
            len(self.mailbox.messages),
        )

    async def all_reach(self, n: int, what: str) -> None:
        await until(lambda: self.counts() == (n, n, n, n), what=f"{what} (counts {self.counts()})")
        # ... and nothing more comes.
        await asyncio.sleep(0.3)
        assert self.counts() == (n, n, n, n), what


@contextlib.asynccontextmanager
async def environment(nats_url: str, tmp_path: Path) -> AsyncIterator[Env]:
    bus = Bus(BusOptions(url=nats_url), BusMetrics(CollectorRegistry()))
    await bus.connect()
    await ensure_topology(bus.js)
    mailbox = Mailbox()
    smtp_port = free_port()
    controller = Controller(
        mailbox,
        hostname="127.0.0.1",
        port=smtp_port,
        tls_context=self_signed(tmp_path),
        require_starttls=True,
        authenticator=mailbox.authenticate,
        auth_required=True,
    )
    controller.start()
    password_file = tmp_path / "smtp-password"
    password_file.write_text(SMTP_PASSWORD + "\n")
    try:
        async with Receiver() as receiver, SlackDouble(channels=(CHANNEL,)) as slack:
            rules = {
                "channels": {
                    "hook": {"type": "webhook", "url": f"{receiver.url}/hook", "headers": {"X-Token": "t0"}},
                    "team-slack": {"type": "slack_webhook", "url": f"{receiver.url}/services/T0/B0/secret"},
                    "ops": {"type": "slack", "channel": CHANNEL},
                    "oncall": {"type": "email", "to": ["oncall@example.com"]},
                },
                "rules": [
                    {"name": "budget", "match": {"key_prefix": "budget."}, "channels": ["hook", "ops"]},
                    {"name": "critical", "match": {"min_severity": "critical"}, "channels": ["oncall"]},
                ],
                "default_realert_seconds": 3600,
            }
            settings = SchedulerSettings(
                nats_url=nats_url,
                http_port=0,
                log_format="text",
                lease_ttl_seconds=2.0,
                alert_interval_seconds=0.05,
                alert_retry_base_seconds=5.0,
                alert_rules=json.dumps(rules),
                public_url="https://fabrik.example.com",
                alert_slack_bot_token=slack.token,
                alert_slack_api_url=slack.api_url,
                smtp_host="127.0.0.1",
                smtp_port=smtp_port,
                smtp_security="starttls",
                smtp_verify_tls=False,
                smtp_username=SMTP_USER,
                smtp_password_file=str(password_file),
                smtp_from="Fabrik <alerts@fabrik.example.com>",
            )
            yield Env(bus, ManualClock(utcnow()), receiver, slack, mailbox, settings)
    finally:
        controller.stop()
        await bus.close()


@contextlib.asynccontextmanager
async def scheduler(env: Env) -> AsyncIterator[Service[SchedulerState]]:
    service = build(env.settings, clock=env.clock)
    async with running_service(service):
        await until(lambda: service.is_leader, what="scheduler leads")
        await alert_consumer_bound(env.bus)
        env.service = service
        yield service


async def alert_consumer_bound(bus: Bus) -> None:
    """The alert consumer starts at new messages when first created: publish only once it exists."""
    deadline = time.monotonic() + 10
    while True:
        try:
            await bus.js.consumer_info("OPS", "scheduler-alerts")
            return
        except nats.js.errors.NotFoundError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


def budget_alert(**changes: Any) -> AlertRaised:
    alert_id = new_ulid()
    values: dict[str, Any] = {
        "event_id": alert_id,
        "alert_id": alert_id,
        "key": "budget.2026-03.project.web.llm.limit",
        "severity": "critical",
        "source": "optimizer",
        "title": "Project web reached its LLM budget",
        "message": "$100.00 of $100.00 spent in 2026-03",
        "project": "web",
        "labels": {"kind": "budget", "channels": "team-slack"},
        **changes,
    }
    return AlertRaised(**values)


async def test_alerts_reach_every_channel_once_per_episode_realert_and_resolve(
    nats_url: str, tmp_path: Path
) -> None:
    async with environment(nats_url, tmp_path) as env, contextlib.AsyncExitStack() as stack:
        first = build(msgspec.structs.replace(env.settings, instance_id="scheduler-a"), clock=env.clock)
        second = build(msgspec.structs.replace(env.settings, instance_id="scheduler-b"), clock=env.clock)
        await first.start()
        first_running = True

        async def stop_first() -> None:
            if first_running:
                await first.stop()

        stack.push_async_callback(stop_first)
        await until(lambda: first.is_leader, what="the first replica leads")
        await alert_consumer_bound(env.bus)
        alert = budget_alert()
        await env.bus.publish(alert)
        await env.all_reach(1, "the raise")
        # The source raising the same episode again sends nothing.
        await env.bus.publish(budget_alert())
        await asyncio.sleep(0.3)
        assert env.counts() == (1, 1, 1, 1)

        # A standby; the leader stops: the standby takes over and continues the episode.
        await second.start()
        stack.push_async_callback(second.stop)
        await asyncio.sleep(0.3)
        assert not second.is_leader
        await first.stop()
        first_running = False
        await until(lambda: second.is_leader, what="the standby takes over")

        body, headers = env.receiver.hook[0], env.receiver.hook_headers[0]
        assert (body["event"], body["status"], body["key"], body["severity"]) == (
            "alert.raised",
            "open",
            alert.key,
            "critical",
        )
        assert body["alert"]["message"] == "$100.00 of $100.00 spent in 2026-03"
        assert body["dashboard_url"] == "https://fabrik.example.com/costs"
        assert headers["X-Token"] == "t0" and headers["X-Fabrik-Delivery-Id"] == body["delivery_id"]
        assert "Project web reached its LLM budget" in env.receiver.slack[0]["text"]
        (posted,) = env.slack.messages(CHANNEL)
        assert "🚨 *[CRITICAL] Project web reached its LLM budget*" in posted.text
        (mail,) = env.mailbox.messages
        assert mail["Subject"] == "[Fabrik] [CRITICAL] Project web reached its LLM budget"
        assert mail["To"] == "oncall@example.com"
        assert env.mailbox.logins == [SMTP_USER] and env.mailbox.tls == [True]

        # The new leader sends nothing again...
        await asyncio.sleep(0.5)
        assert env.counts() == (1, 1, 1, 1)
        # ... until the re-alert interval (1 h) has passed.
        env.clock.advance(timedelta(minutes=59))
        await asyncio.sleep(0.3)
        assert env.counts() == (1, 1, 1, 1)
        env.clock.advance(timedelta(minutes=1))
        await env.all_reach(2, "the re-alert")
        assert env.receiver.hook[1]["event"] == "alert.realert"
        assert "Still open: Project web reached its LLM budget" in env.mailbox.messages[1]["Subject"]
        # Slack app messages after the first go to its thread.
        reminder = env.slack.messages(CHANNEL)[1]
        assert reminder.thread_ts == posted.ts

        await env.bus.publish(
            AlertResolved(alert_id=new_ulid(), key=alert.key, source="optimizer", message="raised")
        )
        await env.all_reach(3, "the resolution")
        assert env.receiver.hook[2]["event"] == "alert.resolved"
        assert env.receiver.hook[2]["resolved"]["message"] == "raised"
        # (a long subject is folded; unfolding keeps the whitespace of the fold)
        assert env.mailbox.messages[2]["Subject"].strip() == (
            "[Fabrik] Resolved: Project web reached its LLM budget - open for 1h 0m"
        )
        thread = env.mailbox.messages[0]["References"]
        assert thread.startswith("<alert-") and thread.endswith("-1@fabrik.example.com>")
        assert env.mailbox.messages[2]["In-Reply-To"] == thread
        # Resolved: no more re-alerts.
        env.clock.advance(timedelta(hours=5))
        await asyncio.sleep(0.3)
        assert env.counts() == (3, 3, 3, 3)

        # The next episode of the same key is delivered again.
        await env.bus.publish(budget_alert())
        await env.all_reach(4, "the next episode")
        assert env.receiver.hook[3]["episode"] == 2


async def test_a_failing_channel_is_retried_with_backoff_without_holding_up_the_others(
    nats_url: str, tmp_path: Path
) -> None:
    async with environment(nats_url, tmp_path) as env, scheduler(env) as service:

        def retries() -> float | None:
            labels = {"channel_type": "webhook", "kind": "raised", "outcome": "retry"}
            return service.registry.get_sample_value("fabrik_alert_notifications_total", labels)

        env.receiver.fail = 2
        await env.bus.publish(budget_alert(severity="warning", labels={"kind": "budget"}))
        await until(lambda: len(env.slack.messages(CHANNEL)) == 1, what="Slack, at once")
        await until(lambda: retries() == 1, what="the first webhook try")
        assert env.receiver.hook == [] and env.receiver.failed == 1
        env.clock.advance(timedelta(seconds=5))  # the backoff: 5 s, then 10 s
        await until(lambda: retries() == 2, what="the second webhook try")
        env.clock.advance(timedelta(seconds=9))
        await asyncio.sleep(0.3)
        assert env.receiver.hook == []
        env.clock.advance(timedelta(seconds=1))
        await until(lambda: len(env.receiver.hook) == 1, what="the webhook, third time lucky")
        assert env.mailbox.messages == []  # a warning: the critical rule does not apply
        assert retries() == 2 and env.receiver.failed == 2
