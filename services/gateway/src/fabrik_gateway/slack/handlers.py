"""The gateway's Slack subscribers: slash commands from `INGEST`, run notifications from `RUNS`.

Decision: the gateway, not the scheduler, consumes `fabrik.ingest.slack.*`: it holds the Slack
credentials, maps Slack users to roles and validates submits exactly as `POST /api/v1/runs` does;
the scheduler then sees an ordinary `run.requested`.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Final

from fabrik_common.bus import Context, Retry, Router
from fabrik_common.events import RunStateChanged, SlackCommandReceived
from fabrik_common.ids import utcnow
from fabrik_gateway.gateway import Gateway
from fabrik_gateway.slack.client import SlackApiError, respond
from fabrik_gateway.slack.commands import Answer, execute, refusal_audit, triage
from fabrik_gateway.slack.integration import slack_for

log = logging.getLogger(__name__)

COMMANDS_DURABLE: Final = "gateway-slack-commands"
NOTIFY_DURABLE: Final = "gateway-slack-notify"
COMMAND_MAX_AGE: Final = timedelta(minutes=30)
"""A command older than this is not carried out: its `response_url` has expired, and starting a run
half an hour after someone asked would surprise them (e.g. when the consumer was down)."""

router = Router()


@router.subscriber(
    SlackCommandReceived.SUBJECT,
    durable=COMMANDS_DURABLE,
    max_deliver=10,
    backoff=(1.0, 2.0, 5.0, 10.0, 30.0),
)
async def on_slack_command(event: SlackCommandReceived, ctx: Context[Gateway]) -> None:
    """Carry out a verified slash command and answer through its `response_url`."""
    slack = slack_for(ctx.state)
    decision = triage(event.text, event.user_id, slack.config.users, event.user_name)
    if isinstance(decision, Answer):
        # The webhook gave this answer already; a refused change is still audited.
        refusal = refusal_audit(event, slack.config.users)
        if refusal is not None:
            await ctx.bus.publish(refusal)
        return
    verb = type(decision.command).__name__.removesuffix("Command").lower()
    age = utcnow() - event.received_at
    if age > COMMAND_MAX_AGE:
        log.warning(
            "Slack command too old, not carried out",
            extra={"request_id": event.request_id, "age_s": age.total_seconds(), "user": event.user_id},
        )
        slack.metrics.command(verb, "expired")
        return
    done = await execute(decision, event, ctx.state, slack.config)
    if done.audit is not None:
        await ctx.bus.publish(done.audit)  # derived event id: a redelivery is stored once
    log.info(
        "Slack command handled",
        extra={"verb": verb, "user": event.user_id, "request_id": event.request_id, "delivery": ctx.delivery},
    )
    if not event.response_url:
        slack.metrics.command(verb, "done_no_response_url")
        return
    try:
        await respond(slack.http, event.response_url, done.answer.text, done.answer.response_type)
    except SlackApiError as exc:
        slack.metrics.api_error(exc.method, exc.error)
        if exc.retryable:
            # Doing the command again is harmless: the run submit replays the run it started (same
            # Idempotency-Key), a repeated cancel changes nothing, a status is read again.
            raise Retry(f"response_url: {exc.error}", delay=exc.retry_after or 2.0) from exc
        log.warning(
            "Slack command answer dropped", extra={"error": exc.error, "request_id": event.request_id}
        )
        slack.metrics.command(verb, "answer_failed")
        return
    slack.metrics.command(verb, "answered")


@router.subscriber(
    RunStateChanged.subject_filter(),
    durable=NOTIFY_DURABLE,
    max_deliver=8,
    backoff=(2.0, 5.0, 15.0, 30.0, 60.0, 120.0),
    deliver_new_only=True,
)
async def on_run_state_changed(event: RunStateChanged, ctx: Context[Gateway]) -> None:
    """Post a run's start and end to its project's Slack channel, threaded per run."""
    notifier = await slack_for(ctx.state).notifier(ctx.bus.js, ctx.state)
    await notifier.handle(event, delivery=ctx.delivery)
