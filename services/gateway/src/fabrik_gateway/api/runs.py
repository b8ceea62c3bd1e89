"""`/api/v1/runs`: submit, list, show, cancel, resume, logs and events of runs."""

from __future__ import annotations

import base64
import binascii
from collections.abc import AsyncIterator
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, Response, get, post
from litestar.di import NamedDependency
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromPath, HeaderParameter, JSONBody, Parameter, QueryParameter
from litestar.response import ServerSentEvent, ServerSentEventMessage
from litestar.response.base import ASGIResponse

from fabrik_common.events import TERMINAL_STATES
from fabrik_common.ids import is_ulid
from fabrik_gateway.api.params import (
    QueryErrors,
    bool_param,
    cursor_param,
    encode_cursor,
    int_param,
    labels_param,
    project_param,
    states_param,
)
from fabrik_gateway.audit import DETAILS_KEY, PROJECT_KEY, TARGET_KEY
from fabrik_gateway.auth import Principal
from fabrik_gateway.auth.guard import api_guard
from fabrik_gateway.gateway import IDEMPOTENCY_HEADER, Gateway, normalize_run_id
from fabrik_gateway.models import (
    ActionAccepted,
    CancelRequest,
    RunEvents,
    RunLogs,
    RunPage,
    RunView,
    SubmitRunRequest,
)
from fabrik_gateway.problems import PROBLEM_JSON, Problem
from fabrik_gateway.streams import FollowEnd, FollowIdle, parse_log_cursor


class EventStream(ServerSentEvent):
    """Server-sent events whose media type survives a handler that otherwise answers JSON."""

    def to_asgi_response(self, *args: Any, **kwargs: Any) -> ASGIResponse:
        kwargs["media_type"] = self.media_type
        return super().to_asgi_response(*args, **kwargs)


def problem_spec(description: str) -> ResponseSpec:
    return ResponseSpec(
        data_container=Problem, description=description, media_type=PROBLEM_JSON, generate_examples=False
    )


BAD_QUERY = {400: problem_spec("Invalid query parameters, each named in `errors`")}
HEALTH_STATES = ("healthy", "stalled", "healing", "failed")
NOT_FOUND = {404: problem_spec("No such run")}
UNAVAILABLE = {503: problem_spec("Not connected to NATS yet, or the read model is still loading")}
TEXT_MAX = 200
_OLDEST_FIRST_CURSOR = "a1:"


def _oldest_first_cursor(run_id: str) -> str:
    return base64.urlsafe_b64encode((_OLDEST_FIRST_CURSOR + run_id).encode()).decode().rstrip("=")


def _page_cursor(errors: QueryErrors, text: str | None, oldest_first: bool) -> str | None:
    """The run id a cursor of this listing's order encodes (a cursor of the other order is refused)."""
    if not oldest_first or text is None or text == "":
        return cursor_param(errors, text)
    try:
        decoded = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        decoded = ""
    run_id = decoded.removeprefix(_OLDEST_FIRST_CURSOR)
    if not decoded.startswith(_OLDEST_FIRST_CURSOR) or not is_ulid(run_id):
        errors.add(
            "cursor", "is not a cursor of an order=oldest listing (use next_cursor of the previous page)"
        )
        return None
    return run_id


def health_param(errors: QueryErrors, values: list[str] | None) -> list[str]:
    """`health=stalled,healing` (or repeated): run health states, each checked."""
    healths: list[str] = []
    for value in values or ():
        for item in (v.strip() for v in value.split(",")):
            if not item:
                continue
            if item not in HEALTH_STATES:
                errors.add("health", f"{item!r} is not a run health; use one of: " + ", ".join(HEALTH_STATES))
            else:
                healths.append(item)
    return healths


async def validate_submit_body(request: Request[Any, Any, Any]) -> None:
    """`before_request` of POST /runs: validate the raw body (and the Idempotency-Key) before
    Litestar decodes it, naming every invalid field; the result waits in `request.state`."""
    gateway: Gateway = request.app.state.gateway
    request.state.submit = gateway.validate_submit(
        await request.body(), request.headers.get(IDEMPOTENCY_HEADER)
    )


def _audit_target(request: Request[Any, Any, Any], gateway: Gateway, run_id: str) -> None:
    normalized = normalize_run_id(run_id) or run_id
    request.state[TARGET_KEY] = f"run:{normalized}"
    record = gateway.readmodel.get(normalized)
    if record is not None:
        request.state[PROJECT_KEY] = record.project


class RunsController(Controller):
    path = "/api/v1/runs"
    tags = ["runs"]
    guards = [api_guard]

    @post(
        "/",
        status_code=201,
        summary="Submit a run",
        opt={"audit_action": "run.submit"},
        description=(
            "Validates the run (every invalid field is named in a 422), publishes `run.requested` and "
            "answers 201 with the run in state `queued`. With an `Idempotency-Key` header, a retry with "
            "the same body answers 200 with the same run (header `Idempotent-Replayed: true`) and "
            "publishes nothing; the same key with a different body is a 422."
        ),
        before_request=validate_submit_body,
        responses={
            200: ResponseSpec(
                data_container=RunView,
                description="Idempotent replay: the run created before",
                generate_examples=False,
            ),
            400: problem_spec("Malformed JSON or an invalid Idempotency-Key header"),
            413: problem_spec("Body larger than the configured maximum"),
            422: problem_spec("Invalid fields, each named in `errors`"),
            **UNAVAILABLE,
        },
    )
    async def submit(
        self,
        request: Request[Any, Any, Any],
        data: JSONBody[SubmitRunRequest],
        gateway: NamedDependency[Gateway],
        principal: NamedDependency[Principal],
        idempotency_key: Annotated[
            str | None,
            HeaderParameter(
                name=IDEMPOTENCY_HEADER,
                required=False,
                description="Makes a retried submit return the same run instead of a second one (kept 24 h)",
            ),
        ] = None,
    ) -> Response[RunView]:
        # `data` documents the body; `validate_submit_body` has validated the raw body before
        # Litestar decoded it, so that every invalid field is named, not only the first one.
        valid, key = request.state.submit
        request.state[PROJECT_KEY] = valid.request.project
        view, created = await gateway.submit(valid, key, principal)
        request.state[TARGET_KEY] = f"run:{view.run_id}"
        request.state[DETAILS_KEY] = {"created": created}
        headers = {"Location": f"{self.path}/{view.run_id}"}
        if not created:
            headers["Idempotent-Replayed"] = "true"
        return Response(view, status_code=201 if created else 200, headers=headers)

    @get(
        "/",
        summary="List runs",
        description=(
            "Newest first (`order=oldest`: oldest first). Filters combine with AND; `state` and `label` may "
            "repeat (`state` also takes a comma-separated list: any of them); `q` keeps runs mentioning a "
            "text. Pass `next_cursor` as `cursor` for the next page (with the same `order`)."
        ),
        responses={**BAD_QUERY, **UNAVAILABLE},
    )
    async def list_runs(
        self,
        gateway: NamedDependency[Gateway],
        principal: NamedDependency[Principal],
        project: Annotated[str | None, Parameter(description="Only this project")] = None,
        state_filter: Annotated[
            list[str] | None, QueryParameter(name="state", description="Only runs in one of these states")
        ] = None,
        label: Annotated[
            list[str] | None, Parameter(description="`key=value`: only runs with this label (repeatable)")
        ] = None,
        limit: Annotated[
            str | None,
            Parameter(
                description="Page size (default 50, at most 500)",
                schema_extra={"oneOf": None, "type": "integer", "minimum": 1},
            ),
        ] = None,
        cursor: Annotated[str | None, Parameter(description="`next_cursor` of the previous page")] = None,
        health_filter: Annotated[
            list[str] | None,
            QueryParameter(
                name="health",
                description=(
                    "Only runs in one of these health states (`healthy`, `stalled`, `healing`, `failed`; "
                    "repeatable or comma-separated)"
                ),
            ),
        ] = None,
        q: Annotated[
            str | None,
            Parameter(
                description=(
                    "Only runs where this text occurs (case-insensitive) in the id, project, env, spec, "
                    f"requester, reason, message or a `key=value` label; at most {TEXT_MAX} characters"
                ),
            ),
        ] = None,
        order: Annotated[
            str | None,
            Parameter(
                description="`newest` (default) or `oldest` first",
                schema_extra={"enum": ["newest", "oldest"]},
            ),
        ] = None,
    ) -> RunPage:
        settings = gateway.settings
        errors = QueryErrors()
        project_name = project_param(errors, project)
        states = states_param(errors, state_filter)
        labels = labels_param(errors, label)
        healths = health_param(errors, health_filter)
        page_size = int_param(
            errors,
            "limit",
            limit,
            default=settings.list_default_limit,
            minimum=1,
            maximum=settings.list_max_limit,
        )
        if order not in (None, "", "newest", "oldest"):
            errors.add("order", "must be newest or oldest")
        oldest_first = order == "oldest"
        before = _page_cursor(errors, cursor, oldest_first)
        text = (q or "").strip() or None
        if text is not None and len(text) > TEXT_MAX:
            errors.add("q", f"must be at most {TEXT_MAX} characters")
        errors.raise_if_any()
        gateway.require_ready()
        assert page_size is not None
        records, next_id = gateway.readmodel.query(
            project=project_name,
            states=states,
            labels=labels,
            before=before,
            limit=page_size,
            visible=principal.visible_projects,
            text=text,
            oldest_first=oldest_first,
            healths=healths,
        )
        if next_id is None:
            next_cursor = None
        else:
            next_cursor = _oldest_first_cursor(next_id) if oldest_first else encode_cursor(next_id)
        return RunPage(items=[gateway.readmodel.view(r) for r in records], next_cursor=next_cursor)

    @get("/{run_id:str}", summary="Show a run", responses={**NOT_FOUND, **UNAVAILABLE})
    async def get_run(
        self, gateway: NamedDependency[Gateway], principal: NamedDependency[Principal], run_id: FromPath[str]
    ) -> RunView:
        return gateway.readmodel.view(gateway.find(run_id, principal))

    @post(
        "/{run_id:str}/cancel",
        status_code=202,
        summary="Cancel a run",
        opt={"audit_action": "run.cancel"},
        description="Idempotent while the run is not finished; 409 once it is.",
        responses={409: problem_spec("The run has finished"), **NOT_FOUND, **UNAVAILABLE},
    )
    async def cancel(
        self,
        request: Request[Any, Any, Any],
        gateway: NamedDependency[Gateway],
        principal: NamedDependency[Principal],
        run_id: FromPath[str],
        data: JSONBody[CancelRequest | None] = None,
    ) -> ActionAccepted:
        _audit_target(request, gateway, run_id)
        return await gateway.cancel(run_id, principal, data.reason if data is not None else "")

    @post(
        "/{run_id:str}/resume",
        status_code=202,
        summary="Resume a run",
        opt={"audit_action": "run.resume"},
        description=(
            "Only a failed, timed-out or cancelled run can be resumed, and never an imported run: "
            "it has no workspace or image digest to resume from (409 otherwise)."
        ),
        responses={
            409: problem_spec("The run is not failed, timed_out or cancelled, or it was imported"),
            **NOT_FOUND,
            **UNAVAILABLE,
        },
    )
    async def resume(
        self,
        request: Request[Any, Any, Any],
        gateway: NamedDependency[Gateway],
        principal: NamedDependency[Principal],
        run_id: FromPath[str],
    ) -> ActionAccepted:
        _audit_target(request, gateway, run_id)
        return await gateway.resume(run_id, principal)

    @get(
        "/{run_id:str}/logs",
        summary="A run's log",
        description=(
            "Without `follow`: JSON, the last `tail` lines (default and cap: the configured maximum). "
            "With `follow=true`: `text/event-stream`, one `line` event per line (data: the line as JSON, "
            "id: resumable with `Last-Event-ID`), `: keep-alive` comments while idle, and a final `end` "
            "event once the run has finished and its log is drained. Without `tail`, following starts at "
            "the first line."
        ),
        responses={**BAD_QUERY, **NOT_FOUND, **UNAVAILABLE},
    )
    async def logs(
        self,
        gateway: NamedDependency[Gateway],
        principal: NamedDependency[Principal],
        run_id: FromPath[str],
        tail: Annotated[
            str | None,
            Parameter(
                description="Only the last N lines",
                schema_extra={"oneOf": None, "type": "integer", "minimum": 0},
            ),
        ] = None,
        follow: Annotated[
            str | None,
            Parameter(
                description="Stream new lines as server-sent events",
                schema_extra={"oneOf": None, "type": "boolean"},
            ),
        ] = None,
        last_event_id: Annotated[
            str | None,
            HeaderParameter(name="Last-Event-ID", required=False, description="Resume a followed stream"),
        ] = None,
    ) -> RunLogs:
        settings = gateway.settings
        errors = QueryErrors()
        lines = int_param(errors, "tail", tail, default=None, minimum=0, maximum=None)
        following = bool_param(errors, "follow", follow, default=False)
        resume_after = parse_log_cursor(last_event_id) if following and last_event_id else None
        if following and last_event_id and resume_after is None:
            errors.add("Last-Event-ID", "must be an event id this stream sent (`<seq>-<index>`)")
        errors.raise_if_any()
        record = gateway.find(run_id, principal)
        reader = gateway.logs
        if not following:
            wanted = min(lines if lines is not None else settings.logs_max_lines, settings.logs_max_lines)
            out, truncated = await reader.tail(record.run_id, wanted)
            return RunLogs(run_id=record.run_id, lines=out, truncated=truncated)

        run_key = record.run_id

        def finished() -> bool:
            current = gateway.readmodel.get(run_key)
            return current is None or current.state in TERMINAL_STATES

        async def events() -> AsyncIterator[ServerSentEventMessage]:
            gateway.follower_started()
            try:
                async for message in stream_lines():
                    yield message
            finally:
                gateway.follower_ended()

        async def stream_lines() -> AsyncIterator[ServerSentEventMessage]:
            async for item in reader.follow(
                run_key,
                tail=lines,
                resume_after=resume_after,
                finished=finished,
                stopping=lambda: gateway.stopping,
                heartbeat_seconds=settings.logs_heartbeat_seconds,
                grace_seconds=settings.logs_follow_grace_seconds,
            ):
                if isinstance(item, FollowIdle):
                    yield ServerSentEventMessage(data=None, comment="keep-alive")
                elif isinstance(item, FollowEnd):
                    current = gateway.readmodel.get(run_key)
                    state = current.state if current is not None else None
                    payload = msgspec.json.encode({"reason": item.reason, "state": state}).decode()
                    yield ServerSentEventMessage(data=payload, event="end")
                else:
                    yield ServerSentEventMessage(
                        data=msgspec.json.encode(item.line).decode(), event="line", id=item.cursor
                    )

        return EventStream(events())  # type: ignore[return-value]

    @get(
        "/{run_id:str}/events",
        summary="A run's lifecycle events",
        description="In the order they were stored on the RUNS stream; page with `after` = `next_cursor`.",
        responses={**BAD_QUERY, **NOT_FOUND, **UNAVAILABLE},
    )
    async def events(
        self,
        gateway: NamedDependency[Gateway],
        principal: NamedDependency[Principal],
        run_id: FromPath[str],
        after: Annotated[
            str | None, Parameter(description="`next_cursor` of the previous page (a stream sequence)")
        ] = None,
        limit: Annotated[
            str | None,
            Parameter(
                description="Page size (default 1000)",
                schema_extra={"oneOf": None, "type": "integer", "minimum": 1},
            ),
        ] = None,
    ) -> RunEvents:
        settings = gateway.settings
        errors = QueryErrors()
        after_seq = int_param(errors, "after", after, default=0, minimum=0, maximum=None)
        page_size = int_param(
            errors,
            "limit",
            limit,
            default=settings.events_default_limit,
            minimum=1,
            maximum=settings.events_max_limit,
        )
        errors.raise_if_any()
        record = gateway.find(run_id, principal)
        assert after_seq is not None and page_size is not None
        items, next_cursor = await gateway.events.events(record.run_id, after=after_seq, limit=page_size)
        return RunEvents(run_id=record.run_id, items=items, next_cursor=next_cursor)
