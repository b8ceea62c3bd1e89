"""Roles, ordered `viewer < developer < maintainer < admin` (DESIGN §4), and the `Principal` who
holds them. Kept free of web imports: the settings (and so the CLI, which reads them) need these
only; `fabrik_gateway.auth` adds the request side."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final, Literal, get_args

Role = Literal["viewer", "developer", "maintainer", "admin"]
AnonymousRole = Literal["none", "viewer", "developer", "maintainer", "admin"]
ROLES: Final[tuple[Role, ...]] = get_args(Role)

PrincipalKind = Literal["anonymous", "jwt", "token", "integration"]
ANONYMOUS_SUBJECT: Final = "anonymous"
ANONYMOUS_ROLE_VARIABLE: Final = "FABRIK_ANONYMOUS_ROLE"
PRINCIPAL_STATE_KEY: Final = "principal"


def role_rank(role: Role | None) -> int:
    return -1 if role is None else ROLES.index(role)


def higher_role(a: Role | None, b: Role | None) -> Role | None:
    return a if role_rank(a) >= role_rank(b) else b


@dataclass(frozen=True)
class Principal:
    subject: str
    """Who: `anonymous`, the JWT's `sub`, `token:<id>` for an API token, `github:<login>`, ..."""
    role: Role | None
    """The role in every project (None: none; then only `project_roles` apply)."""
    project_roles: Mapping[str, Role] = field(default_factory=dict)
    """Roles in single projects, on top of `role`."""
    authenticated: bool = False
    kind: PrincipalKind = "anonymous"
    token_id: str | None = None
    name: str = ""
    """A display name (the API token's name, the JWT's `name` or `email`)."""

    def role_in(self, project: str | None) -> Role | None:
        """The role in `project`; for None (no project in particular), the role everywhere."""
        if project is None:
            return self.role
        return higher_role(self.role, self.project_roles.get(project))

    def has_role(self, minimum: Role, project: str | None = None) -> bool:
        return role_rank(self.role_in(project)) >= ROLES.index(minimum)

    def can_see(self, project: str) -> bool:
        """Whether runs, logs and environments of `project` exist for this principal."""
        return self.role_in(project) is not None

    @property
    def all_projects(self) -> bool:
        """Whether it sees every project (it has a role that is not bound to projects)."""
        return self.role is not None

    @property
    def visible_projects(self) -> frozenset[str] | None:
        """The projects it sees; None: all of them."""
        return None if self.all_projects else frozenset(self.project_roles)

    @property
    def highest_role(self) -> Role | None:
        best = self.role
        for role in self.project_roles.values():
            best = higher_role(best, role)
        return best

    @property
    def role_name(self) -> str:
        """For audit records: the role everywhere, else the highest role in a project."""
        return self.highest_role or "none"


def anonymous(role: AnonymousRole) -> Principal:
    return Principal(subject=ANONYMOUS_SUBJECT, role=None if role == "none" else role)


# For code without settings at hand (tests of the domain logic).
ANONYMOUS: Final = Principal(subject=ANONYMOUS_SUBJECT, role="admin")
