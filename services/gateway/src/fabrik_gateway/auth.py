"""Who is calling, and what they may do.

Authentication (bearer JWT, API tokens) comes in a later issue; until then every request is the
anonymous principal, whose role is the gateway setting `FABRIK_ANONYMOUS_ROLE` (`viewer` unless
set; `fabrik up` sets `admin` for the local stack, and the gateway logs a warning when anonymous
callers may change protected environments). This module is the seam:

- `current_principal` (the `principal` dependency of every handler) says who calls; the
  authentication issue replaces its body, nothing else;
- `require_role(principal, minimum, action)` is the one role check: 401 when the caller has no
  role at all (anonymous access off), 403 naming the role needed otherwise.

Roles are ordered `viewer < developer < maintainer < admin` (DESIGN §4).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Literal, get_args

from litestar import Request

from fabrik_gateway.problems import ProblemError

Role = Literal["viewer", "developer", "maintainer", "admin"]
AnonymousRole = Literal["none", "viewer", "developer", "maintainer", "admin"]
ROLES: Final[tuple[Role, ...]] = get_args(Role)
ANONYMOUS_SUBJECT: Final = "anonymous"
ANONYMOUS_ROLE_VARIABLE: Final = "FABRIK_ANONYMOUS_ROLE"


@dataclass(frozen=True)
class Principal:
    subject: str
    role: Role | None
    """None: no access (anonymous callers when `FABRIK_ANONYMOUS_ROLE=none`)."""
    authenticated: bool = False

    def has_role(self, minimum: Role) -> bool:
        return self.role is not None and ROLES.index(self.role) >= ROLES.index(minimum)

    @property
    def role_name(self) -> str:
        return self.role or "none"


def anonymous(role: AnonymousRole) -> Principal:
    return Principal(subject=ANONYMOUS_SUBJECT, role=None if role == "none" else role)


# Until authentication exists, and for code without settings at hand.
ANONYMOUS: Final = Principal(subject=ANONYMOUS_SUBJECT, role="admin")


async def current_principal(request: Request[Any, Any, Any]) -> Principal:
    """The caller of `request`: the anonymous principal with the configured role (for now)."""
    gateway = getattr(request.app.state, "gateway", None)
    settings = getattr(gateway, "settings", None)
    role: AnonymousRole = getattr(settings, "anonymous_role", "admin")
    return anonymous(role)


def require_role(principal: Principal, minimum: Role, action: str) -> None:
    """Raise 401/403 unless `principal` has at least `minimum`; `action` completes
    "... is needed to <action>"."""
    if principal.has_role(minimum):
        return
    if principal.role is None:
        raise ProblemError(
            401,
            f"authentication is required to {action}: anonymous access is off "
            f"({ANONYMOUS_ROLE_VARIABLE}=none)",
            slug="unauthorized",
            title="Authentication required",
        )
    hint = (
        f" (anonymous callers have the role set by {ANONYMOUS_ROLE_VARIABLE})"
        if not principal.authenticated
        else ""
    )
    raise ProblemError(
        403,
        f"the {minimum} role is needed to {action}; {principal.subject} has the {principal.role} role{hint}",
        slug="forbidden",
        title="Forbidden",
    )
