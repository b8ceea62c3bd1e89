"""What every answer at the edge carries: security headers, CORS (off unless origins are
configured), and the OpenAPI description of the refusals the authentication guard can answer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from litestar import Litestar
from litestar.config.cors import CORSConfig
from litestar.enums import ScopeType
from litestar.openapi.spec import OpenAPIMediaType, OpenAPIResponse, Operation, Reference
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from fabrik_gateway.problems import PROBLEM_JSON
from fabrik_gateway.settings import GatewaySettings

API_PREFIX: Final = "/api/v1/"
UNGUARDED: Final = frozenset({"/api/v1/openapi.json"})

BASE_HEADERS: Final[tuple[tuple[bytes, bytes], ...]] = (
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
)
# The API answers data, never pages: nothing in it may load or run anything.
API_HEADERS: Final[tuple[tuple[bytes, bytes], ...]] = (
    (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'"),
)
HSTS: Final = (b"strict-transport-security", b"max-age=31536000; includeSubDomains")


def security_headers_middleware(settings: GatewaySettings) -> Callable[[ASGIApp], ASGIApp]:
    https = settings.public_url.startswith("https://")

    def middleware(app: ASGIApp) -> ASGIApp:
        async def with_headers(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != ScopeType.HTTP:
                await app(scope, receive, send)
                return
            path = str(scope.get("path", ""))
            extra = list(BASE_HEADERS)
            if path.startswith(API_PREFIX):
                extra.extend(API_HEADERS)
            if https:
                extra.append(HSTS)

            async def send_with_headers(message: Message) -> None:
                if message["type"] == "http.response.start":
                    headers = list(message.get("headers", []))
                    present = {name.lower() for name, _ in headers}
                    headers.extend(h for h in extra if h[0] not in present)
                    if path.startswith(API_PREFIX) and b"cache-control" not in present:
                        headers.append((b"cache-control", b"no-store"))
                    message["headers"] = headers
                await send(message)

            await app(scope, receive, send_with_headers)

        return with_headers

    return middleware


def cors_config(settings: GatewaySettings) -> CORSConfig | None:
    origins = [o.strip() for o in settings.cors_allow_origins.split(",") if o.strip()]
    if not origins:
        return None
    return CORSConfig(
        allow_origins=origins,
        allow_methods=["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"],
        allow_headers=[
            "Authorization",
            "Content-Type",
            "Idempotency-Key",
            "Last-Event-ID",
            "X-Fabrik-Confirm",
        ],
        expose_headers=["Location", "Retry-After", "Idempotent-Replayed"],
        allow_credentials=False,
        max_age=600,
    )


def _problem_response(description: str) -> OpenAPIResponse:
    return OpenAPIResponse(
        description=description,
        content={PROBLEM_JSON: OpenAPIMediaType(schema=Reference(ref="#/components/schemas/Problem"))},
    )


REFUSALS: Final = {
    "401": "No credentials (anonymous access off), or a credential that does not verify",
    "403": "The caller's role is not enough for this",
    "429": "Too many requests from this caller; see `Retry-After`",
}


BODY_REFUSALS: Final = {
    "400": "The body is not valid JSON",
    "413": "The body is larger than the configured maximum",
    "422": "Invalid fields in the body, each named in `errors`",
}


def guarded_responses(app: Litestar) -> None:
    """Document the guard's 401/403/429 on every operation of the API, and the refusals of a body
    on every operation that takes one (in the cached document)."""
    document = app.openapi_schema
    schemas = document.components.schemas if document.components else None
    if schemas is None or "Problem" not in schemas:
        return
    for path, item in (document.paths or {}).items():
        if not path.startswith(API_PREFIX) or path in UNGUARDED:
            continue
        for operation in (item.get, item.post, item.put, item.patch, item.delete):
            if not isinstance(operation, Operation):
                continue
            responses = operation.responses if operation.responses is not None else {}
            refusals = dict(REFUSALS)
            if operation.request_body is not None:
                refusals.update(BODY_REFUSALS)
            for status, description in refusals.items():
                responses.setdefault(status, _problem_response(description))
            for status, response in responses.items():
                # Litestar documents its own 400 as application/json; every error is a problem.
                if (
                    status[0] in "45"
                    and isinstance(response, OpenAPIResponse)
                    and PROBLEM_JSON not in (response.content or {})
                ):
                    response.content = _problem_response("").content
            operation.responses = responses
