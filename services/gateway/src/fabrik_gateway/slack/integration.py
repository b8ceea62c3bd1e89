"""The gateway's Slack state: parsed settings, the HTTP client, the thread store, the metrics.

One `SlackIntegration` per `Gateway`, found with `slack_for(gateway)` (created from the gateway's
settings on first use; `install()` creates it with the service's metrics registry, which is what
`app.build` does). `run()` is a background task of the service: it says once at start what is
enabled and checks the bot token (`auth.test`), and closes the HTTP client when the service stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from typing import TYPE_CHECKING, Final

import httpx
from nats.js import JetStreamContext
from prometheus_client import CollectorRegistry, Counter

from fabrik_gateway.slack.client import SlackApiError, SlackClient
from fabrik_gateway.slack.config import SlackConfig
from fabrik_gateway.slack.notifier import KvThreadStore, Notifier

if TYPE_CHECKING:
    from fabrik_gateway.gateway import Gateway

log = logging.getLogger(__name__)

INTEGRATIONS_BUCKET: Final = "integrations"
HTTP_TIMEOUT: Final = httpx.Timeout(10.0, connect=5.0)


class SlackMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.commands = Counter(
            "fabrik_slack_commands",
            "Slash commands by verb and outcome (accepted, answered, refused, invalid_signature, stale, ...)",
            ("verb", "outcome"),
            registry=registry,
        )
        self.notifications = Counter(
            "fabrik_slack_notifications",
            "Run notifications by outcome (posted, replied, duplicate, failed, no_channel, ...)",
            ("outcome",),
            registry=registry,
        )
        self.api_errors = Counter(
            "fabrik_slack_api_errors",
            "Failed Slack calls by method and Slack error code",
            ("method", "error"),
            registry=registry,
        )

    def command(self, verb: str, outcome: str) -> None:
        self.commands.labels(verb, outcome).inc()

    def notification(self, outcome: str) -> None:
        self.notifications.labels(outcome).inc()

    def api_error(self, method: str, error: str) -> None:
        # Transport errors carry the exception name; keep the label set small.
        self.api_errors.labels(method, error.split(":", 1)[0]).inc()


class SlackIntegration:
    def __init__(self, config: SlackConfig, registry: CollectorRegistry | None = None) -> None:
        self.config = config
        self.metrics = SlackMetrics(registry if registry is not None else CollectorRegistry())
        self._http: httpx.AsyncClient | None = None
        self._store: KvThreadStore | None = None

    @property
    def http(self) -> httpx.AsyncClient:
        if self._http is None or self._http.is_closed:
            self._http = httpx.AsyncClient(timeout=HTTP_TIMEOUT, follow_redirects=False)
        return self._http

    @property
    def client(self) -> SlackClient | None:
        """The Web API client, or None without a bot token (no notifications)."""
        if not self.config.bot_token:
            return None
        return SlackClient(self.http, self.config.api_url, self.config.bot_token)

    async def notifier(self, js: JetStreamContext, gateway: Gateway) -> Notifier:
        if self._store is None:
            self._store = KvThreadStore(await js.key_value(INTEGRATIONS_BUCKET))
        return Notifier(
            self.client if self.config.notifications_enabled else None,
            self.config.channels,
            self._store,
            self.config.run_url,
            lookup=gateway.readmodel.get,
            metrics=self.metrics,
        )

    def describe(self) -> str:
        config = self.config
        commands = "on" if config.commands_enabled else "off (no FABRIK_SLACK_SIGNING_SECRET: 503)"
        if not config.bot_token:
            notifications = "off (no FABRIK_SLACK_BOT_TOKEN)"
        elif not config.channels:
            notifications = "off (no FABRIK_SLACK_CHANNELS)"
        else:
            notifications = "on"
        return f"slash commands {commands}; run notifications {notifications}"

    async def run(self) -> None:
        """Background task: log once what is enabled, check the token, then hold the HTTP client
        until the service stops (the task is cancelled after the consumers have stopped)."""
        log.info("Slack: %s", self.describe())
        try:
            client = self.client
            if client is not None and self.config.notifications_enabled:
                await self._check_token(client)
            await asyncio.Event().wait()
        finally:
            await self.aclose()

    async def _check_token(self, client: SlackClient) -> None:
        try:
            who = await client.auth_test()
        except SlackApiError as exc:
            self.metrics.api_error(exc.method, exc.error)
            level = logging.WARNING if exc.retryable else logging.ERROR
            log.log(level, "Slack bot token check failed: %s (notifications will be tried anyway)", exc.error)
            return
        log.info("Slack bot token works", extra={"team": who.get("team"), "bot_user": who.get("user")})

    async def aclose(self) -> None:
        if self._http is not None:
            with contextlib.suppress(Exception):
                await self._http.aclose()
            self._http = None


_integrations: weakref.WeakKeyDictionary[Gateway, SlackIntegration] = weakref.WeakKeyDictionary()


def install(gateway: Gateway, registry: CollectorRegistry | None = None) -> SlackIntegration:
    """Create the gateway's Slack integration (metrics on `registry`, the service's)."""
    integration = SlackIntegration(SlackConfig.from_settings(gateway.settings), registry)
    _integrations[gateway] = integration
    return integration


def slack_for(gateway: Gateway) -> SlackIntegration:
    """The gateway's Slack integration (created on first use when `install` was not called)."""
    integration = _integrations.get(gateway)
    if integration is None:
        integration = install(gateway)
    return integration


async def run_slack(gateway: Gateway) -> None:
    """The background task to add to the gateway service."""
    await slack_for(gateway).run()
