"""The audit trail: every state-changing request becomes an `AuditRecorded` event on the OPS stream
(subject `fabrik.audit.recorded`), and admins read it back through `GET /api/v1/audit`.

`audit_middleware` records each POST, PUT, PATCH and DELETE under `/api/v1` once its answer is
sent: who (the principal, or `anonymous@<address>` when authentication failed), with which role,
what (the route's `audit_action` option, else `<METHOD> <route>`), on which target (what the
handler put in `request.state.audit_target`, else the path), and the result (`ok` below 400,
`denied` for 401/403, `failed` otherwise, with the status). Routes that audit themselves in more
detail (environments: `opt={"self_audited": True}`) are left to do so, except for refusals that
happen before the handler ran (401/403/429 from the guard).

Reading: a short-lived ordered consumer on the audit subject from a stream sequence (`after`) or a
time (`since`), filtered in the gateway, at most `audit_max_scan` events per request; `next_cursor`
continues where the scan stopped.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, Final, Literal

import msgspec
import nats.errors
from litestar.enums import ScopeType
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from nats.js import JetStreamContext, api

from fabrik_common.codec import EventCodec, EventDecodeError
from fabrik_common.events import AuditRecorded, Event
from fabrik_gateway.auth.principal import PRINCIPAL_STATE_KEY, Principal

log = logging.getLogger(__name__)

OPS_STREAM: Final = "OPS"
AUDIT_SUBJECT: Final = AuditRecorded.SUBJECT
CHANGING_METHODS: Final = frozenset({"POST", "PUT", "PATCH", "DELETE"})
TARGET_KEY: Final = "audit_target"
PROJECT_KEY: Final = "audit_project"
DETAILS_KEY: Final = "audit_details"
READ_TIMEOUT: Final = 5.0
_codec: EventCodec[AuditRecorded] = EventCodec(AuditRecorded)

Result = Literal["ok", "denied", "failed"]


def result_of(status: int) -> Result:
    if status < 400:
        return "ok"
    return "denied" if status in (401, 403) else "failed"


class AuditTrail:
    """Publishes audit events; a failed publish is logged with the whole record (the request
    itself has already been answered, its change stored)."""

    def __init__(self) -> None:
        self.publish: Callable[[Event], Awaitable[object]] | None = None

    async def record(self, event: AuditRecorded) -> None:
        if self.publish is None:
            log.error("audit event before start", extra={"record": msgspec.to_builtins(event)})
            return
        try:
            await self.publish(event)
        except Exception as exc:  # noqa: BLE001 - never lose the trail: it goes to the log instead
            log.error(  # noqa: TRY400
                "audit event could not be published",
                extra={"record": msgspec.to_builtins(event), "error": str(exc)},
            )


def audit_middleware(trail: Callable[[], AuditTrail | None]) -> Callable[[ASGIApp], ASGIApp]:
    def middleware(app: ASGIApp) -> ASGIApp:
        async def audited(scope: Scope, receive: Receive, send: Send) -> None:
            if (
                scope["type"] != ScopeType.HTTP
                or scope.get("method") not in CHANGING_METHODS
                or not str(scope.get("path", "")).startswith("/api/v1/")
            ):
                await app(scope, receive, send)
                return
            status = 500

            async def capture(message: Message) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = int(message["status"])
                await send(message)

            try:
                await app(scope, receive, capture)
            finally:
                current = trail()
                if current is not None:
                    event = audit_event(scope, status)
                    if event is not None:
                        await current.record(event)

        return audited

    return middleware


def audit_event(scope: Scope, status: int) -> AuditRecorded | None:
    """The record of one answered request, or None when its handler audits it itself."""
    state: dict[str, Any] = scope.get("state", {})
    handler = scope.get("route_handler")
    opt: dict[str, Any] = getattr(handler, "opt", {}) or {}
    if opt.get("self_audited") and status not in (401, 403, 429):
        return None
    principal = state.get(PRINCIPAL_STATE_KEY)
    client = scope.get("client")
    address = client[0] if client else "unknown"
    path = str(scope.get("path", ""))
    method = str(scope.get("method", ""))
    if isinstance(principal, Principal):
        actor, role = principal.subject, principal.role_name
    else:
        actor, role = f"anonymous@{address}", "none"
    route = getattr(handler, "paths", None)
    route_path = sorted(route)[0] if route else path
    action = str(opt.get("audit_action") or f"{method} {route_path}")
    details: dict[str, Any] = {"status": status, "method": method, "path": path, "client": address}
    details.update(state.get(DETAILS_KEY) or {})
    return AuditRecorded(
        actor=actor,
        role=role,
        action=action,
        target=str(state.get(TARGET_KEY) or path),
        project=state.get(PROJECT_KEY),
        result=result_of(status),
        details=details,
    )


class AuditQuery(msgspec.Struct, frozen=True, kw_only=True):
    actor: str | None = None
    project: str | None = None
    action: str | None = None
    result: Result | None = None
    since: datetime | None = None
    until: datetime | None = None

    def matches(self, event: AuditRecorded) -> bool:
        return (
            (self.actor is None or event.actor == self.actor)
            and (self.project is None or event.project == self.project)
            and (self.action is None or event.action == self.action)
            and (self.result is None or event.result == self.result)
            and (self.until is None or event.occurred_at < self.until)
        )


class AuditReader:
    def __init__(self, js: JetStreamContext, stream: str = OPS_STREAM) -> None:
        self.js = js
        self.stream = stream

    async def read(
        self, query: AuditQuery, *, after: int, limit: int, max_scan: int
    ) -> tuple[list[tuple[int, AuditRecorded]], int | None]:
        """Matching events (with their stream sequence) in stream order after sequence `after`
        (or from `query.since`), at most `limit`; and the cursor to continue from, if any."""
        if after:
            config = api.ConsumerConfig(
                deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=after + 1
            )
        elif query.since is not None:
            config = api.ConsumerConfig(
                deliver_policy=api.DeliverPolicy.BY_START_TIME,
                opt_start_time=query.since,
            )
        else:
            config = api.ConsumerConfig(deliver_policy=api.DeliverPolicy.ALL)
        sub = await self.js.subscribe(
            AUDIT_SUBJECT, stream=self.stream, ordered_consumer=True, config=config, inactive_threshold=30.0
        )
        items: list[tuple[int, AuditRecorded]] = []
        last_seq = after
        scanned = 0
        try:
            info = await sub.consumer_info()
            # Pushed messages leave num_pending: nothing to read only if nothing was pushed either.
            if info.num_pending == 0 and (info.delivered is None or info.delivered.consumer_seq == 0):
                return [], None
            while len(items) < limit and scanned < max_scan:
                try:
                    msg = await sub.next_msg(timeout=READ_TIMEOUT)
                except nats.errors.TimeoutError:
                    return items, last_seq if items or scanned else None
                scanned += 1
                last_seq = int(msg.metadata.sequence.stream)
                pending = msg.metadata.num_pending
                try:
                    event = _codec.decode(msg.data)
                except EventDecodeError as exc:
                    log.warning("undecodable audit event skipped", extra={"seq": last_seq, "error": str(exc)})
                    event = None
                if event is not None:
                    if query.until is not None and event.occurred_at >= query.until:
                        return items, None
                    if query.matches(event):
                        items.append((last_seq, event))
                if pending == 0:
                    return items, None
            return items, last_seq
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
