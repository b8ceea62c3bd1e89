"""`POST /webhooks/github`: GitHub webhook deliveries.

Not behind the API's authentication: the `X-Hub-Signature-256` signature is the authentication.
The handler only verifies and stores the delivery (`GithubIntegration.receive`); what it starts
happens from the `INGEST` stream. Answers: 200 (`ping`), 202 (stored; `duplicate: true` when
JetStream already had this delivery), 400 (a header missing or malformed), 401 (bad signature,
nothing stored), 413, 503 (no webhook secret configured, or the event bus is unavailable).
Not in the OpenAPI document of `/api/v1` (docs/github.md describes it).
"""

from __future__ import annotations

from typing import Any, Final

from litestar import Request, Response, post
from litestar.handlers import HTTPRouteHandler

from fabrik_gateway.github.integration import GithubIntegration

PATH: Final = "/webhooks/github"
OPT_PUBLIC: Final = {"public": True, "webhook": "github"}
"""Route `opt`: authenticated by its signature, not by the API guard."""


def github_webhook_route(integration: GithubIntegration) -> HTTPRouteHandler:
    @post(PATH, include_in_schema=False, status_code=202, opt=OPT_PUBLIC)
    async def github_webhook(request: Request[Any, Any, Any]) -> Response[dict[str, Any]]:
        body = await request.body()
        status, answer = await integration.receive(request.headers, body)
        return Response(answer, status_code=status)

    return github_webhook
