"""`GET /api/v1/stream`: the live event stream, as a WebSocket or as server-sent events.

Decision (checked with Litestar 2.25 before writing this): a `@websocket` and a `@get` handler may
share one path. Litestar keeps HTTP and WebSocket routes apart by the connection's scope type, so
`ws://.../api/v1/stream` reaches `stream_websocket` and a plain `GET` (what `EventSource` sends,
`Accept: text/event-stream`) reaches `stream_events`. Two ordinary handlers, both behind
`api_guard`, sharing the query parsing and the hub (`fabrik_gateway.live`), were cleaner than one
raw ASGI handler dispatching on the scope type: the SSE side keeps the problem-details errors,
dependency injection and its OpenAPI entry.

Errors a browser can read:

- Over HTTP (SSE) every refusal is a problem document: 400 naming each bad query parameter (or
  `Last-Event-ID`), 404 for `logs=` naming a run the caller does not see, 503 before the hub runs;
  401/403/429 from the guard.
- A WebSocket refused by the guard (no or bad credentials) is refused during the handshake (the
  server answers HTTP 403; a browser sees only a failed connection, close code 1006). Everything
  else is reported **after** accepting, because a browser can read a close frame but not a
  refused handshake: first an `{"type": "error", "problem": {...}}` message with the whole
  problem document, then a close with code 1008 (policy violation: a bad request, do not retry
  as is; 1013 when the hub is not ready yet, retry) and the problem's detail as the reason
  (which names the parameters, e.g. `invalid query parameters: types, cursor`).

Ends: a slow subscriber is closed with 1013 `slow consumer` (SSE: `event: error`,
`{"reason": "slow consumer"}`); a stopping gateway closes with 1001 `going away` (SSE:
`event: end`, `{"reason": "going away"}`). Idle streams get `{"type": "heartbeat"}` (SSE: a
`: keep-alive` comment) every `FABRIK_STREAM_HEARTBEAT_SECONDS`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any, Final

import msgspec
from litestar import Request, WebSocket, get, websocket
from litestar.connection import ASGIConnection
from litestar.di import NamedDependency
from litestar.exceptions import WebSocketDisconnect
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import HeaderParameter, Parameter
from litestar.response import ServerSentEvent, ServerSentEventMessage
from litestar.response.base import ASGIResponse
from litestar.types import ControllerRouterHandler

from fabrik_common.ids import DNS1123_RULE, is_dns1123_label, is_ulid
from fabrik_gateway.api.params import QueryErrors
from fabrik_gateway.auth import Principal, current_principal
from fabrik_gateway.auth.guard import api_guard
from fabrik_gateway.gateway import Gateway
from fabrik_gateway.live import (
    CURSOR_RULE,
    GOING_AWAY,
    HEARTBEAT_TEXT,
    RUN_EVENT_TYPES,
    Closed,
    Cursor,
    Gap,
    Heartbeat,
    LiveHub,
    Message,
    StreamFilter,
    Subscription,
    parse_cursor,
)
from fabrik_gateway.problems import PROBLEM_JSON, Problem, ProblemError

STREAM_PATH: Final = "/api/v1/stream"
LIVE_STATE_KEY: Final = "live"
LAST_EVENT_ID: Final = "Last-Event-ID"
CLOSE_POLICY_VIOLATION: Final = 1008
CLOSE_INTERNAL_ERROR: Final = 1011
CLOSE_TRY_AGAIN_LATER: Final = 1013
MAX_CLOSE_REASON_BYTES: Final = 123
SLOW_CLOSE_GRACE_SECONDS: Final = 10.0
"""How long a dropped subscriber's socket may take to accept its close frame before it is cut."""
SHUTDOWN_CLOSE_GRACE_SECONDS: Final = 1.0
RUN_ID_RULE: Final = "must be a run id (a ULID)"
INTERNAL_ERROR: Final = Closed("internal error", CLOSE_INTERNAL_ERROR)

log = logging.getLogger(__name__)


class EventStream(ServerSentEvent):
    """Server-sent events whose media type survives the handler's default."""

    def to_asgi_response(self, *args: Any, **kwargs: Any) -> ASGIResponse:
        kwargs["media_type"] = self.media_type
        return super().to_asgi_response(*args, **kwargs)


def _problem(description: str) -> ResponseSpec:
    return ResponseSpec(
        data_container=Problem, description=description, media_type=PROBLEM_JSON, generate_examples=False
    )


@dataclass(frozen=True)
class StreamRequest:
    filter: StreamFilter
    cursor: Cursor | None


def _split(values: list[str] | None) -> list[str]:
    return [part.strip() for value in values or () for part in value.split(",") if part.strip()]


def _single(errors: QueryErrors, name: str, values: list[str] | None) -> str | None:
    present = [v for v in values or () if v != ""]
    if len(present) > 1:
        errors.add(name, "may be given once")
    return present[0] if present else None


def parse_stream_request(
    *,
    project: list[str] | None,
    run_id: list[str] | None,
    types: list[str] | None,
    logs: list[str] | None,
    cursor: list[str] | None,
    last_event_id: str | None = None,
) -> StreamRequest:
    """The filters and the cursor, or a 400 naming every invalid parameter. `Last-Event-ID` (sent
    by a reconnecting `EventSource`) takes precedence over `cursor`."""
    errors = QueryErrors()
    projects = _split(project)
    for name in projects:
        if not is_dns1123_label(name):
            errors.add("project", f"{name!r} {DNS1123_RULE}")
    event_types = _split(types)
    for name in event_types:
        if name not in RUN_EVENT_TYPES:
            errors.add(
                "types", f"{name!r} is not a run event type; use some of: " + ", ".join(RUN_EVENT_TYPES)
            )
    run = _single(errors, "run_id", run_id)
    if run is not None and not is_ulid(run):
        errors.add("run_id", RUN_ID_RULE)
    log_run = _single(errors, "logs", logs)
    if log_run is not None and not is_ulid(log_run):
        errors.add("logs", RUN_ID_RULE)
    position: Cursor | None = None
    if last_event_id is not None and last_event_id.strip():
        position = parse_cursor(last_event_id)
        if position is None:
            errors.add(LAST_EVENT_ID, CURSOR_RULE)
    else:
        text = _single(errors, "cursor", cursor)
        if text is not None:
            position = parse_cursor(text)
            if position is None:
                errors.add("cursor", CURSOR_RULE)
    errors.raise_if_any()
    return StreamRequest(
        StreamFilter(
            projects=frozenset(projects) if projects else None,
            run_id=run.upper() if run else None,
            types=frozenset(event_types) if event_types else None,
            logs=log_run.upper() if log_run else None,
        ),
        position,
    )


def live_hub(connection: ASGIConnection[Any, Any, Any, Any]) -> LiveHub:
    hub = connection.app.state.get(LIVE_STATE_KEY)
    if not isinstance(hub, LiveHub):
        raise ProblemError(
            503, "the live stream is not enabled on this gateway", headers={"Retry-After": "1"}
        )
    return hub


# ------------------------------------------------------------------------------------ WebSocket


@websocket(STREAM_PATH, guards=[api_guard], name="stream-websocket")
async def stream_websocket(socket: WebSocket[Any, Any, Any]) -> None:
    """The live stream over a WebSocket: one JSON text message per event (see docs/api.md)."""
    gateway: Gateway = socket.app.state.gateway
    principal = await current_principal(socket)
    await socket.accept()
    query = socket.query_params
    try:
        request = parse_stream_request(
            project=query.getall("project", []),
            run_id=query.getall("run_id", []),
            types=query.getall("types", []),
            logs=query.getall("logs", []),
            cursor=query.getall("cursor", []),
        )
        subscription = await live_hub(socket).subscribe(principal, request.filter, request.cursor)
    except ProblemError as exc:
        await _refuse(socket, exc)
        return
    gateway.follower_started()
    try:
        await _serve(socket, subscription, gateway.settings.stream_heartbeat_seconds)
    finally:
        subscription.close()
        gateway.follower_ended()


async def _refuse(socket: WebSocket[Any, Any, Any], exc: ProblemError) -> None:
    problem = msgspec.json.encode({"type": "error", "problem": exc.problem(socket.url.path)}).decode()
    if exc.status == 503:
        code = CLOSE_TRY_AGAIN_LATER
    elif exc.status >= 500:
        code = CLOSE_INTERNAL_ERROR
    else:
        code = CLOSE_POLICY_VIOLATION
    with contextlib.suppress(WebSocketDisconnect, OSError):
        await socket.send_text(problem)
        await socket.close(code, close_reason(exc.detail))


def close_reason(text: str) -> str:
    """At most the 123 bytes a close frame carries."""
    data = text.encode()
    if len(data) <= MAX_CLOSE_REASON_BYTES:
        return text
    return data[: MAX_CLOSE_REASON_BYTES - 3].decode(errors="ignore") + "..."


async def _serve(socket: WebSocket[Any, Any, Any], subscription: Subscription, heartbeat: float) -> None:
    """Send until the stream ends or the client leaves; a dropped subscriber whose socket does
    not take its close frame in time is cut off."""
    tasks = {
        asyncio.create_task(_send_all(socket, subscription, heartbeat)),
        asyncio.create_task(_until_disconnect(socket)),
        asyncio.create_task(_cut_off_after_close(subscription)),
    }
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _send_all(socket: WebSocket[Any, Any, Any], subscription: Subscription, heartbeat: float) -> None:
    with contextlib.suppress(WebSocketDisconnect, OSError):
        try:
            async with contextlib.aclosing(subscription.outputs(heartbeat)) as outputs:
                async for out in outputs:
                    if isinstance(out, Message):
                        await socket.send_text(out.text)
                    elif isinstance(out, Heartbeat):
                        await socket.send_text(HEARTBEAT_TEXT)
                    elif isinstance(out, Gap):
                        await socket.send_text(out.text)
                    else:
                        await socket.close(out.code, out.reason)
                        return
        except (WebSocketDisconnect, OSError):
            raise
        except Exception:
            log.exception("live stream failed")
            await socket.close(INTERNAL_ERROR.code, INTERNAL_ERROR.reason)


async def _until_disconnect(socket: WebSocket[Any, Any, Any]) -> None:
    """Messages from the client are ignored; this returns when it disconnects."""
    with contextlib.suppress(WebSocketDisconnect, OSError):
        while (await socket.receive())["type"] != "websocket.disconnect":
            pass


async def _cut_off_after_close(subscription: Subscription) -> None:
    closed = await subscription.subscriber.wait_closed()
    await asyncio.sleep(
        SHUTDOWN_CLOSE_GRACE_SECONDS if closed.reason == GOING_AWAY else SLOW_CLOSE_GRACE_SECONDS
    )


# ------------------------------------------------------------------------------------ SSE


def _sse_end(closed: Closed) -> ServerSentEventMessage:
    data = msgspec.json.encode({"reason": closed.reason}).decode()
    return ServerSentEventMessage(data=data, event="end" if closed.reason == GOING_AWAY else "error")


@get(
    STREAM_PATH,
    guards=[api_guard],
    name="stream-events",
    tags=["stream"],
    media_type="text/event-stream",
    response_description="Server-sent events; each `data` is a JSON message, each `id` its cursor",
    summary="Live event stream",
    description=(
        "Run lifecycle events (and, with `logs`, one run's log chunks) as they are stored, filtered to "
        "what the caller may see. Open it as a WebSocket (the same path, `ws://`), or as server-sent "
        "events with a plain GET: each event's `data` is the JSON message "
        '`{"cursor", "subject", "type", "event"}` and its `id` the cursor; `EventSource` resumes with '
        "`Last-Event-ID` without gaps or duplicates. `: keep-alive` comments while idle; a final "
        '`event: error` (`{"reason": "slow consumer"}`) when the client does not keep up, '
        "`event: end` when the gateway stops. Browsers, which cannot set headers here, may pass the "
        "credential as `access_token`."
    ),
    responses={
        400: _problem("Invalid query parameters (or `Last-Event-ID`), each named in `errors`"),
        404: _problem("`logs` names a run the caller does not see"),
        503: _problem("The live stream is not connected to NATS yet"),
    },
)
async def stream_events(
    request: Request[Any, Any, Any],
    gateway: NamedDependency[Gateway],
    principal: NamedDependency[Principal],
    project: Annotated[
        list[str] | None, Parameter(description="Only these projects (repeatable, or comma-separated)")
    ] = None,
    run_id: Annotated[list[str] | None, Parameter(description="Only this run")] = None,
    types: Annotated[
        list[str] | None,
        Parameter(description="Only these event types, e.g. `run.state_changed,run.finished`"),
    ] = None,
    logs: Annotated[list[str] | None, Parameter(description="Also this run's log chunks")] = None,
    cursor: Annotated[
        list[str] | None, Parameter(description="Resume after this cursor (a message's `cursor`)")
    ] = None,
    last_event_id: Annotated[
        str | None,
        HeaderParameter(name=LAST_EVENT_ID, required=False, description="Resume (sent by EventSource)"),
    ] = None,
) -> ServerSentEvent:
    parsed = parse_stream_request(
        project=project, run_id=run_id, types=types, logs=logs, cursor=cursor, last_event_id=last_event_id
    )
    subscription = await live_hub(request).subscribe(principal, parsed.filter, parsed.cursor)
    return EventStream(_sse(subscription, gateway))


async def _sse(subscription: Subscription, gateway: Gateway) -> AsyncIterator[ServerSentEventMessage]:
    gateway.follower_started()
    try:
        async with contextlib.aclosing(
            subscription.outputs(gateway.settings.stream_heartbeat_seconds)
        ) as outputs:
            async for out in outputs:
                if isinstance(out, Message):
                    yield ServerSentEventMessage(data=out.text, id=out.cursor)
                elif isinstance(out, Heartbeat):
                    yield ServerSentEventMessage(comment="keep-alive")
                elif isinstance(out, Gap):
                    yield ServerSentEventMessage(data=out.text, event="gap")
                else:
                    yield _sse_end(out)
                    return
    except Exception:
        log.exception("live stream failed")
        yield _sse_end(INTERNAL_ERROR)
    finally:
        subscription.close()
        gateway.follower_ended()


route_handlers: Final[list[ControllerRouterHandler]] = [stream_websocket, stream_events]
"""What `app.py` registers."""
