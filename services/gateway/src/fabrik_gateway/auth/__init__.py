"""Who is calling, and what they may do (docs/auth.md).

- `principal.py`: the `Principal` (subject, roles per project) and `require_role`;
- `jwt.py`: bearer JWT verification (HS256 secret, or an OIDC issuer's JWKS);
- `tokens.py`: API tokens of service accounts, stored hashed in the `tokens` bucket;
- `guard.py`: authentication of every `/api/v1` connection, and the per-caller request rate.
"""

from fabrik_gateway.auth.principal import (
    ANONYMOUS,
    ANONYMOUS_ROLE_VARIABLE,
    ANONYMOUS_SUBJECT,
    ROLES,
    AnonymousRole,
    Principal,
    Role,
    anonymous,
    current_principal,
    require_role,
)

__all__ = [
    "ANONYMOUS",
    "ANONYMOUS_ROLE_VARIABLE",
    "ANONYMOUS_SUBJECT",
    "ROLES",
    "AnonymousRole",
    "Principal",
    "Role",
    "anonymous",
    "current_principal",
    "require_role",
]
