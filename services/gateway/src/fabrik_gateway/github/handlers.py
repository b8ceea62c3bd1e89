"""The GitHub integration's durable subscribers: stored deliveries (`INGEST`) and run events (`RUNS`).

Decision: the gateway, not the scheduler, consumes `fabrik.ingest.github.*`: it holds the GitHub
credentials (the write-access check, the head commit, the reply comments) and the submit
validation, so a GitHub-started run goes through exactly what `POST /api/v1/runs` does and is
published as the same `RunRequested`. The scheduler sees nothing GitHub-specific.

`github_router(integration)` makes the router (the handlers close over the integration, which
holds the GitHub client and the origin store).
"""

from __future__ import annotations

from typing import Any, Final

from fabrik_common.bus import Context, Router
from fabrik_common.events import GithubDeliveryReceived, RunEvent
from fabrik_gateway.github.integration import GithubIntegration

INGEST_DURABLE: Final = "gateway-github-ingest"
RUNS_DURABLE: Final = "gateway-github-runs"


def github_router(integration: GithubIntegration) -> Router:
    router = Router()

    @router.subscriber(
        "fabrik.ingest.github.*",
        durable=INGEST_DURABLE,
        max_deliver=8,
        backoff=(2.0, 10.0, 30.0, 60.0, 120.0, 300.0),
        ack_wait=60.0,
        concurrency=4,
    )
    async def on_github_delivery(event: GithubDeliveryReceived, ctx: Context[Any]) -> None:
        """A verified delivery: start the run it asks for (idempotent per delivery id)."""
        await integration.handle_delivery(event, redelivered=ctx.redelivered)

    @router.subscriber(
        "fabrik.runs.>",
        durable=RUNS_DURABLE,
        # GitHub may be down for a while: retry for about two hours before the dead letter (and the
        # reconciler goes on from the origin's desired state even after that).
        max_deliver=30,
        backoff=(1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0),
        ack_wait=60.0,
        deliver_new_only=True,
        concurrency=8,
    )
    async def on_run_event(event: RunEvent, ctx: Context[Any]) -> None:
        """A run event: update the check run / status and comment of runs started from GitHub."""
        await integration.handle_run_event(event)

    return router
