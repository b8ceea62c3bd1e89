"""The caller of a request, and the one role check.

A principal has a role everywhere (`role`, may be None) and roles in single projects
(`project_roles`); its role in a project is the higher of the two. Roles are ordered
`viewer < developer < maintainer < admin` (DESIGN §4): viewers read, developers submit, cancel and
resume runs and write non-protected environments, maintainers also write protected environments
and approve optimizer changes, admins also manage API tokens and read the audit trail.

A principal sees a project only where it has a role there: a run of another project is
"not found" for it, in lists, single reads, logs and the live stream alike.
"""

from __future__ import annotations

from typing import Any

from litestar.connection import ASGIConnection

from fabrik_gateway.problems import ProblemError
from fabrik_gateway.roles import (
    ANONYMOUS,
    ANONYMOUS_ROLE_VARIABLE,
    ANONYMOUS_SUBJECT,
    PRINCIPAL_STATE_KEY,
    ROLES,
    AnonymousRole,
    Principal,
    PrincipalKind,
    Role,
    anonymous,
    higher_role,
    role_rank,
)

__all__ = [
    "ANONYMOUS",
    "ANONYMOUS_ROLE_VARIABLE",
    "ANONYMOUS_SUBJECT",
    "PRINCIPAL_STATE_KEY",
    "ROLES",
    "AnonymousRole",
    "Principal",
    "PrincipalKind",
    "Role",
    "anonymous",
    "current_principal",
    "higher_role",
    "require_role",
    "role_rank",
]


async def current_principal(request: ASGIConnection[Any, Any, Any, Any]) -> Principal:
    """The `principal` dependency: who the guard of the route authenticated."""
    principal = request.scope.get("state", {}).get(PRINCIPAL_STATE_KEY)
    if isinstance(principal, Principal):
        return principal
    raise ProblemError(500, "the route has no authentication guard", slug="internal", title="Internal error")


def require_role(principal: Principal, minimum: Role, action: str, project: str | None = None) -> None:
    """Raise 401/403 unless `principal` has at least `minimum` (in `project`, when given); `action`
    completes "... is needed to <action>"."""
    if principal.has_role(minimum, project):
        return
    if not principal.authenticated and principal.role is None:
        raise ProblemError(
            401,
            f"authentication is required to {action}: send `Authorization: Bearer <token>` "
            f"(anonymous access is off: {ANONYMOUS_ROLE_VARIABLE}=none)",
            slug="unauthorized",
            title="Authentication required",
            headers={"WWW-Authenticate": 'Bearer realm="fabrik"'},
        )
    hint = (
        f" (anonymous callers have the role set by {ANONYMOUS_ROLE_VARIABLE})"
        if not principal.authenticated
        else ""
    )
    where = f" in project {project}" if project is not None else ""
    held = principal.role_in(project)
    has = f"the {held} role" if held is not None else "no role"
    raise ProblemError(
        403,
        f"the {minimum} role{where} is needed to {action}; {principal.subject} has {has}{where}{hint}",
        slug="forbidden",
        title="Forbidden",
    )
