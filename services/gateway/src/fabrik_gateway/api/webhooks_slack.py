"""`POST /webhooks/slack`: Slack's slash commands, verified, recorded, acknowledged at once.

Not behind the API's authentication: the request signature (signing secret, v0 scheme, 5-minute
window) is the authentication. A request that fails it is answered 401 and publishes nothing.
A verified command is published to `INGEST` (`fabrik.ingest.slack.command`, event id derived from
the `trigger_id`, so Slack's retries are stored once) and answered within Slack's 3 seconds with
an ephemeral message; the work happens in the ingest consumer (`fabrik_gateway.slack.handlers`),
which answers through the command's `response_url`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Final
from urllib.parse import parse_qsl

import nats.errors
from litestar import Request, Response, post
from litestar.di import NamedDependency

from fabrik_common.bus import PublishError
from fabrik_common.ids import utcnow
from fabrik_gateway.gateway import Gateway
from fabrik_gateway.problems import ProblemError
from fabrik_gateway.slack.commands import Answer, command_event, triage
from fabrik_gateway.slack.integration import slack_for
from fabrik_gateway.slack.signature import RETRY_NUM_HEADER, SignatureError, verify_headers

log = logging.getLogger(__name__)

SLACK_WEBHOOK_PATH: Final = "/webhooks/slack"
PUBLISH_TIMEOUT: Final = 2.0
"""Slack gives up after 3 s; the publish must be acknowledged well before."""
_FORM = "application/x-www-form-urlencoded"


def _ephemeral(text: str) -> Response[dict[str, str]]:
    return Response(
        {"response_type": "ephemeral", "text": text}, status_code=200, media_type="application/json"
    )


@post(
    SLACK_WEBHOOK_PATH,
    status_code=200,
    include_in_schema=False,
    summary="Slack slash commands",
    opt={"public": True, "webhook": "slack"},
)
async def slack_webhook(request: Request[Any, Any, Any], gateway: NamedDependency[Gateway]) -> Response[Any]:
    slack = slack_for(gateway)
    secret = slack.config.signing_secret
    if not secret:
        raise ProblemError(
            503,
            "Slack is not configured on this gateway: set FABRIK_SLACK_SIGNING_SECRET (or _FILE)",
            slug="slack-not-configured",
            title="Slack not configured",
        )
    raw = await request.body()
    try:
        verify_headers(secret, request.headers, raw)
    except SignatureError as exc:
        slack.metrics.command("-", "refused")
        log.warning("Slack request refused", extra={"reason": exc.reason, "client": _client(request)})
        raise ProblemError(
            401,
            f"the Slack signature is not valid: {exc.reason}",
            slug="invalid-signature",
            title="Unauthorized",
        ) from None
    content_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if content_type != _FORM:
        raise ProblemError(415, f"a Slack slash command is {_FORM}", slug="unsupported-media-type")
    form = dict(parse_qsl(raw.decode("utf-8", errors="replace"), keep_blank_values=True))
    if form.get("ssl_check") == "1":
        return Response(b"", status_code=200, media_type="text/plain")
    if not form.get("command") or not form.get("user_id"):
        raise ProblemError(
            400,
            "not a slash command: `command` and `user_id` are required",
            slug="invalid-request",
            errors=[(name, "is required") for name in ("command", "user_id") if not form.get(name)],
        )

    event = command_event(form, raw, utcnow())
    decision = triage(event.text, event.user_id, slack.config.users, event.user_name)
    answer = decision if isinstance(decision, Answer) else decision.acknowledgement
    verb = (
        "-"
        if isinstance(decision, Answer)
        else type(decision.command).__name__.removesuffix("Command").lower()
    )
    started = time.monotonic()
    try:
        await asyncio.wait_for(gateway.bus.publish(event), PUBLISH_TIMEOUT)
    except (ProblemError, PublishError, TimeoutError, nats.errors.Error) as exc:
        log.warning("Slack command not recorded", extra={"error": repr(exc), "request_id": event.request_id})
        slack.metrics.command(verb, "unavailable")
        if isinstance(decision, Answer):
            return _ephemeral(answer.text)  # nothing to do later anyway
        return _ephemeral(
            ":warning: Fabrik could not accept this command right now (its event bus is not reachable). "
            "Please try again in a moment."
        )
    log.info(
        "Slack command received",
        extra={
            "request_id": event.request_id,
            "user": event.user_id,
            "verb": verb,
            "retry": request.headers.get(RETRY_NUM_HEADER),
            "publish_ms": round((time.monotonic() - started) * 1000, 1),
        },
    )
    slack.metrics.command(verb, "answered" if isinstance(decision, Answer) else "accepted")
    return _ephemeral(answer.text)


def _client(request: Request[Any, Any, Any]) -> str:
    return request.client.host if request.client is not None else ""
