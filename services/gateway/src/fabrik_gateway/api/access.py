"""`/api/v1/tokens`, `/api/v1/whoami` and `/api/v1/audit`: API tokens, the caller, the audit trail."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, delete, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody, Parameter

from fabrik_common.ids import is_ulid
from fabrik_gateway.api.params import QueryErrors, int_param, project_param
from fabrik_gateway.api.runs import BAD_QUERY, UNAVAILABLE, problem_spec
from fabrik_gateway.audit import TARGET_KEY, AuditQuery, AuditReader
from fabrik_gateway.auth import Principal, require_role
from fabrik_gateway.auth.guard import api_guard
from fabrik_gateway.auth.tokens import ApiToken
from fabrik_gateway.gateway import Gateway
from fabrik_gateway.models import (
    AuditItem,
    AuditPage,
    CreatedToken,
    CreateTokenRequest,
    TokenList,
    TokenView,
    WhoAmI,
)
from fabrik_gateway.problems import not_found

NO_TOKEN = {404: problem_spec("No such token")}
FORBIDDEN = {403: problem_spec("The caller is not an admin")}


def token_view(token: ApiToken) -> TokenView:
    return TokenView(
        token_id=token.token_id,
        name=token.name,
        role=token.role,
        projects=token.projects,
        created_by=token.created_by,
        created_at=token.created_at,
        expires_at=token.expires_at,
        revoked_at=token.revoked_at,
        revoked_by=token.revoked_by,
        last_used_at=token.last_used_at,
    )


def _token_id(text: str) -> str:
    if not is_ulid(text):
        raise not_found(f"token {text}")
    return text.upper()


class AccessController(Controller):
    path = "/api/v1"
    tags = ["access"]
    guards = [api_guard]

    @get("/whoami", summary="The caller", description="Who the credential of this request is, and its roles.")
    async def whoami(self, principal: NamedDependency[Principal]) -> WhoAmI:
        return WhoAmI(
            subject=principal.subject,
            kind=principal.kind,
            authenticated=principal.authenticated,
            name=principal.name,
            role=principal.role,
            project_roles=dict(principal.project_roles),
            token_id=principal.token_id,
        )

    @post(
        "/tokens",
        status_code=201,
        summary="Create an API token",
        description=(
            "For a service account (admins only). The answer holds the secret `token` this once; it is "
            "stored hashed. With `projects`, the role holds only in those projects."
        ),
        opt={"audit_action": "token.create"},
        responses={**FORBIDDEN, **UNAVAILABLE},
    )
    async def create_token(
        self,
        request: Request[Any, Any, Any],
        gateway: NamedDependency[Gateway],
        principal: NamedDependency[Principal],
        data: JSONBody[CreateTokenRequest],
    ) -> CreatedToken:
        require_role(principal, "admin", "manage API tokens")
        gateway.bus  # noqa: B018 - 503 while not connected
        record, secret = await gateway.tokens.create(
            name=data.name,
            role=data.role,
            projects=data.projects,
            expires_in_days=data.expires_in_days,
            created_by=principal.subject,
        )
        request.state[TARGET_KEY] = f"token:{record.token_id}"
        view = token_view(record)
        return CreatedToken(**msgspec.structs.asdict(view), token=secret)

    @get(
        "/tokens",
        summary="List API tokens",
        description="Admins only; secrets are never shown.",
        responses=FORBIDDEN,
    )
    async def list_tokens(
        self, gateway: NamedDependency[Gateway], principal: NamedDependency[Principal]
    ) -> TokenList:
        require_role(principal, "admin", "list API tokens")
        return TokenList(items=[token_view(t) for t in gateway.tokens.all()])

    @get("/tokens/{token_id:str}", summary="Show an API token", responses={**FORBIDDEN, **NO_TOKEN})
    async def get_token(
        self,
        gateway: NamedDependency[Gateway],
        principal: NamedDependency[Principal],
        token_id: FromPath[str],
    ) -> TokenView:
        require_role(principal, "admin", "read API tokens")
        record = await gateway.tokens.get(_token_id(token_id))
        if record is None:
            raise not_found(f"token {token_id}")
        return token_view(record)

    @delete(
        "/tokens/{token_id:str}",
        status_code=200,
        summary="Revoke an API token",
        description="Idempotent: revoking a revoked token answers the token as it is.",
        opt={"audit_action": "token.revoke"},
        responses={**FORBIDDEN, **NO_TOKEN, **UNAVAILABLE},
    )
    async def revoke_token(
        self,
        request: Request[Any, Any, Any],
        gateway: NamedDependency[Gateway],
        principal: NamedDependency[Principal],
        token_id: FromPath[str],
    ) -> TokenView:
        require_role(principal, "admin", "revoke API tokens")
        gateway.bus  # noqa: B018
        request.state[TARGET_KEY] = f"token:{token_id}"
        record = await gateway.tokens.revoke(_token_id(token_id), principal.subject)
        if record is None:
            raise not_found(f"token {token_id}")
        return token_view(record)

    @get(
        "/audit",
        summary="The audit trail",
        description=(
            "Admins only. State-changing requests in the order they were recorded, from `since` (or the "
            "beginning), filtered; pass `next_cursor` as `after` for more."
        ),
        responses={**BAD_QUERY, **FORBIDDEN, **UNAVAILABLE},
    )
    async def audit(
        self,
        gateway: NamedDependency[Gateway],
        principal: NamedDependency[Principal],
        actor: Annotated[str | None, Parameter(description="Only this actor")] = None,
        project: Annotated[str | None, Parameter(description="Only this project")] = None,
        action: Annotated[str | None, Parameter(description="Only this action, e.g. `run.submit`")] = None,
        result: Annotated[
            str | None,
            Parameter(
                description="`ok`, `denied` or `failed`", schema_extra={"enum": ["ok", "denied", "failed"]}
            ),
        ] = None,
        since: Annotated[
            str | None, Parameter(description="RFC 3339 time: only events at or after it")
        ] = None,
        until: Annotated[str | None, Parameter(description="RFC 3339 time: only events before it")] = None,
        after: Annotated[
            str | None,
            Parameter(
                description="`next_cursor` of the previous page",
                schema_extra={"oneOf": None, "type": "string"},
            ),
        ] = None,
        limit: Annotated[
            str | None,
            Parameter(description="Page size", schema_extra={"oneOf": None, "type": "integer", "minimum": 1}),
        ] = None,
    ) -> AuditPage:
        require_role(principal, "admin", "read the audit trail")
        settings = gateway.settings
        errors = QueryErrors()
        project_name = project_param(errors, project)
        if result is not None and result not in ("ok", "denied", "failed"):
            errors.add("result", "must be one of ok, denied, failed")
        since_at = _time_param(errors, "since", since)
        until_at = _time_param(errors, "until", until)
        after_seq = int_param(errors, "after", after, default=0, minimum=0, maximum=None)
        page = int_param(
            errors,
            "limit",
            limit,
            default=settings.audit_default_limit,
            minimum=1,
            maximum=settings.audit_max_limit,
        )
        errors.raise_if_any()
        assert after_seq is not None and page is not None
        query = AuditQuery(
            actor=actor,
            project=project_name,
            action=action,
            result=result,  # type: ignore[arg-type]
            since=since_at,
            until=until_at,
        )
        reader = AuditReader(gateway.bus.js)
        found, cursor = await reader.read(
            query, after=after_seq, limit=page, max_scan=settings.audit_max_scan
        )
        return AuditPage(
            items=[
                AuditItem(
                    seq=seq,
                    event_id=e.event_id,
                    occurred_at=e.occurred_at,
                    actor=e.actor,
                    role=e.role,
                    action=e.action,
                    target=e.target,
                    project=e.project,
                    result=e.result,
                    details=e.details,
                )
                for seq, e in found
            ],
            next_cursor=str(cursor) if cursor is not None else None,
        )


def _time_param(errors: QueryErrors, name: str, value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        errors.add(name, "must be an RFC 3339 time with a UTC offset, e.g. 2026-01-31T12:00:00Z")
        return None
    if parsed.tzinfo is None:
        errors.add(name, "must carry a UTC offset (`Z` or `+hh:mm`)")
        return None
    return parsed
