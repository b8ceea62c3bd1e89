"""What the caller may do, from `GET /api/v1/whoami`: roles `viewer < developer < maintainer <
admin`, everywhere (`role`) or per project (`project_roles`, on top of `role`). Submitting,
cancelling and resuming need the developer role in the run's project."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

ROLES: tuple[str, ...] = ("viewer", "developer", "maintainer", "admin")
ACTION_ROLES: dict[str, str] = {"cancel": "developer", "resume": "developer", "submit": "developer"}
ACTION_WORDS: dict[str, str] = {"cancel": "cancel runs", "resume": "resume runs", "submit": "start runs"}


def role_rank(role: str | None) -> int:
    return ROLES.index(role) if role in ROLES else -1


@dataclass(frozen=True)
class Caller:
    subject: str
    name: str = ""
    role: str | None = None
    project_roles: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_whoami(cls, data: Any) -> Caller:
        if not isinstance(data, Mapping):
            raise TypeError(f"unexpected answer to GET /whoami: {data!r}"[:200])
        roles = data.get("project_roles")
        role = data.get("role")
        return cls(
            subject=str(data.get("subject") or "?"),
            name=str(data.get("name") or ""),
            role=role if isinstance(role, str) else None,
            project_roles={str(k): str(v) for k, v in roles.items()} if isinstance(roles, Mapping) else {},
        )

    def role_in(self, project: str | None) -> str | None:
        """The higher of the role everywhere and the role in `project`."""
        best = self.role
        if project is not None:
            other = self.project_roles.get(project)
            if role_rank(other) > role_rank(best):
                best = other
        return best

    def refusal(self, action: str, project: str | None) -> str | None:
        """Why the caller may not do `action` in `project`; None when it may."""
        needed = ACTION_ROLES[action]
        have = self.role_in(project)
        if role_rank(have) >= role_rank(needed):
            return None
        where = f"in project {project}" if project else "here"
        what = f"the role {have}" if have else "no role"
        return f"{self.describe()} has {what} {where}; to {ACTION_WORDS[action]} it takes {needed} or higher"

    def may_anywhere(self, action: str) -> bool:
        """Whether some project exists where the caller may do `action`."""
        needed = role_rank(ACTION_ROLES[action])
        ranks = [role_rank(self.role), *(role_rank(r) for r in self.project_roles.values())]
        return max(ranks) >= needed

    def describe(self) -> str:
        return self.name or self.subject

    def roles_text(self) -> str:
        parts = [f"{self.role} everywhere"] if self.role else []
        parts.extend(f"{role} in {project}" for project, role in sorted(self.project_roles.items()))
        return ", ".join(parts) or "no role"
