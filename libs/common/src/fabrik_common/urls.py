"""URLs as they may be shown: in logs, errors and status output."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

NATS_SCHEMES = frozenset({"nats", "tls", "ws", "wss"})


def redact_url(url: str) -> str:
    """`url` with any password replaced by `***`; a comma-separated list (NATS servers) element by
    element. Text that does not parse as a URL is returned as it is."""
    return ",".join(_redact_one(part) for part in url.split(","))


def _redact_one(url: str) -> str:
    try:
        parts = urlsplit(url.strip())
    except ValueError:
        return url
    if "@" not in parts.netloc:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    if parts.password is None:
        # NATS reads a user part alone as an authentication token
        if parts.scheme in NATS_SCHEMES:
            return urlunsplit(parts._replace(netloc=f"***@{host}"))
        return url
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))
