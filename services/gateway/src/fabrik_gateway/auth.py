"""Who is calling. Authentication (bearer JWT, API tokens, roles) comes in a later issue; until then
every request is the anonymous principal. This module is the seam: handlers receive a `Principal`
through the `principal` dependency and record `principal.subject` as `requested_by`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Literal

from litestar import Request

Role = Literal["viewer", "developer", "maintainer", "admin"]


@dataclass(frozen=True)
class Principal:
    subject: str
    role: Role


ANONYMOUS: Final = Principal(subject="anonymous", role="admin")


async def current_principal(request: Request[Any, Any, Any]) -> Principal:
    """The caller of `request` (always anonymous until authentication exists)."""
    return ANONYMOUS
