"""Sending one notice to one channel: Slack (app or incoming webhook), a webhook, e-mail.

A send either returns (the channel accepted the message) or raises `DeliveryError`, saying
whether trying again may help (timeouts, connection errors, HTTP 429 and 5xx, Slack's
`ratelimited`, SMTP 4xx) or not (other 4xx, Slack's permanent errors, SMTP 5xx, bad addresses).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Literal

import aiosmtplib
import httpx

from fabrik_scheduler.alerting.render import Notice, email_message, slack_text, webhook_body
from fabrik_scheduler.alerting.rules import (
    ChannelConfig,
    EmailChannel,
    SlackChannel,
    SlackWebhookChannel,
    WebhookChannel,
)

# Slack answers these with `ok: false` when trying again will not help.
SLACK_PERMANENT = frozenset(
    {
        "channel_not_found",
        "not_in_channel",
        "is_archived",
        "invalid_auth",
        "not_authed",
        "token_revoked",
        "account_inactive",
        "missing_scope",
        "msg_too_long",
        "no_text",
        "invalid_blocks",
        "restricted_action",
        "thread_not_found",
    }
)


class DeliveryError(Exception):
    def __init__(self, message: str, *, retryable: bool, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.retry_after = retry_after


@dataclass(frozen=True)
class SmtpConfig:
    host: str = ""
    port: int = 587
    security: Literal["starttls", "tls", "none"] = "starttls"
    username: str = ""
    password: str = ""
    sender: str = "fabrik@localhost"
    timeout: float = 30.0
    verify_tls: bool = True


@dataclass(frozen=True)
class SlackConfig:
    bot_token: str = ""
    api_url: str = "https://slack.com/api"


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After", "")
    try:
        return max(float(value), 0.0) if value else None
    except ValueError:
        return None


def _check_http(response: httpx.Response, what: str) -> None:
    status = response.status_code
    if 200 <= status < 300:
        return
    detail = response.text[:300].strip()
    retryable = status == 429 or status >= 500 or status == 408
    raise DeliveryError(
        f"{what} answered HTTP {status}" + (f": {detail}" if detail else ""),
        retryable=retryable,
        retry_after=_retry_after(response),
    )


class ChannelSender:
    """Sends notices; one HTTP client for all HTTP channels."""

    def __init__(self, http: httpx.AsyncClient, slack: SlackConfig, smtp: SmtpConfig) -> None:
        self.http = http
        self.slack = slack
        self.smtp = smtp

    async def send(self, config: ChannelConfig, notice: Notice, thread_ts: str | None = None) -> str | None:
        """Send `notice`; returns the Slack message `ts` for the Slack app (to thread later notices)."""
        try:
            if isinstance(config, SlackChannel):
                return await self._slack_app(config, notice, thread_ts)
            if isinstance(config, SlackWebhookChannel):
                await self._post(config.url, {"text": slack_text(notice)}, {}, "the Slack webhook")
                return None
            if isinstance(config, WebhookChannel):
                headers = {"X-Fabrik-Delivery-Id": notice.delivery_id, **config.headers}
                await self._post(config.url, webhook_body(notice), headers, "the webhook")
                return None
            await self._email(config, notice)
            return None
        except httpx.TimeoutException as exc:
            raise DeliveryError(f"timed out: {exc!r}", retryable=True) from exc
        except httpx.TransportError as exc:
            raise DeliveryError(f"connection failed: {exc!r}", retryable=True) from exc

    async def _post(self, url: str, body: object, headers: dict[str, str], what: str) -> None:
        response = await self.http.post(url, json=body, headers=headers)
        _check_http(response, what)

    async def _slack_app(self, config: SlackChannel, notice: Notice, thread_ts: str | None) -> str:
        if not self.slack.bot_token:
            raise DeliveryError(
                "no Slack bot token: set FABRIK_ALERT_SLACK_BOT_TOKEN (or _FILE)", retryable=False
            )
        body: dict[str, object] = {"channel": config.channel, "text": slack_text(notice)}
        if thread_ts:
            body["thread_ts"] = thread_ts
            if notice.kind in ("resolved", "escalated"):
                body["reply_broadcast"] = True
        response = await self.http.post(
            f"{self.slack.api_url.rstrip('/')}/chat.postMessage",
            json=body,
            headers={
                "Authorization": f"Bearer {self.slack.bot_token}",
                "Content-Type": "application/json; charset=utf-8",
            },
        )
        _check_http(response, "Slack chat.postMessage")
        try:
            answer = response.json()
        except ValueError:
            raise DeliveryError(
                f"Slack chat.postMessage answered something that is not JSON: {response.text[:200]!r}",
                retryable=True,
            ) from None
        if not isinstance(answer, dict):
            raise DeliveryError("Slack chat.postMessage answered JSON that is not an object", retryable=True)
        if not answer.get("ok"):
            error = str(answer.get("error", "unknown_error"))
            raise DeliveryError(f"Slack chat.postMessage: {error}", retryable=error not in SLACK_PERMANENT)
        return str(answer.get("ts", ""))

    async def _email(self, config: EmailChannel, notice: Notice) -> None:
        smtp = self.smtp
        if not smtp.host:
            raise DeliveryError("no SMTP server: set FABRIK_SMTP_HOST", retryable=False)
        message = email_message(notice, smtp.sender, list(config.to))
        context = ssl.create_default_context()
        if not smtp.verify_tls:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        try:
            await aiosmtplib.send(
                message,
                hostname=smtp.host,
                port=smtp.port,
                username=smtp.username or None,
                password=smtp.password or None,
                use_tls=smtp.security == "tls",
                start_tls=smtp.security == "starttls",
                tls_context=context,
                timeout=smtp.timeout,
            )
        except aiosmtplib.SMTPRecipientsRefused as exc:
            raise DeliveryError(f"SMTP refused every recipient: {exc}", retryable=False) from exc
        except aiosmtplib.SMTPResponseException as exc:
            raise DeliveryError(f"SMTP {exc.code}: {exc.message}", retryable=exc.code < 500) from exc
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            raise DeliveryError(f"SMTP failed: {exc!r}", retryable=True) from exc
