"""Requests to the backup service over core NATS request/reply (contract: `fabrik_common.backup_rpc`).

- No backup service subscribed (NATS answers "no responders") or a NATS failure: 503 with
  `Retry-After` and a detail saying the backup service is not answering.
- No answer within `FABRIK_BACKUP_TIMEOUT_SECONDS`: 504.
- An `RpcError`: a problem with its status (400 — 422 for a request body —, 404, 409) naming its
  field and rule in `errors`; a 500 (a bug in the backup service) or any other status, and a reply
  this gateway cannot decode, are a 502.
"""

from __future__ import annotations

import logging
from typing import Final, TypeVar

import msgspec
import nats.errors
from nats.aio.client import Client as NatsClient

from fabrik_common import backup_rpc as rpc
from fabrik_gateway.problems import ProblemError, invalid

log = logging.getLogger(__name__)

R = TypeVar("R")

RETRY_AFTER: Final = "2"
PASSED_STATUSES: Final = frozenset({400, 404, 409})
"""RpcError statuses answered as they are; anything else (a 500: a bug) becomes a 502."""


def not_answering(detail: str) -> ProblemError:
    return ProblemError(
        503,
        f"the backup service is not answering: {detail}",
        slug="backup-unavailable",
        title="Backup service unavailable",
        headers={"Retry-After": RETRY_AFTER},
    )


def timed_out(seconds: float) -> ProblemError:
    return ProblemError(
        504,
        f"the backup service did not answer within {seconds:g} s (FABRIK_BACKUP_TIMEOUT_SECONDS); "
        "an operation it was asked to start may still have started: list the operations",
        slug="backup-timeout",
        title="Gateway timeout",
        headers={"Retry-After": RETRY_AFTER},
    )


def rpc_problem(error: rpc.RpcError, *, invalid_status: int = 400) -> ProblemError:
    """A backup service's `RpcError` as the problem the API answers."""
    field = error.field or "$"
    if error.status == 400:
        return invalid([(field, error.rule)], status=invalid_status, detail=error.message)
    if error.status not in PASSED_STATUSES:
        log.error(
            "backup service failed",
            extra={"status": error.status, "rule": error.rule, "error": error.message},
        )
        return ProblemError(
            502, f"the backup service failed: {error.message}", slug="backup-failed", title="Bad gateway"
        )
    titles = {404: "Not found", 409: "Conflict"}
    return ProblemError(
        error.status,
        error.message,
        slug="not-found" if error.status == 404 else "conflict",
        title=titles[error.status],
        errors=[(field, error.rule)] if error.field else None,
    )


async def ask(
    nc: NatsClient,
    subject: str,
    request: msgspec.Struct,
    response_type: type[R],
    *,
    seconds: float,
    invalid_status: int = 400,
) -> R:
    """Send `request` on `subject` and wait for the reply, as `response_type`; raises the
    `ProblemError` the API answers otherwise (see the module's docstring)."""
    try:
        reply = await nc.request(subject, rpc.encode(request), timeout=seconds)
    except nats.errors.NoRespondersError:
        raise not_answering(
            "no backup service is subscribed to its requests (is the backup service running?)"
        ) from None
    except nats.errors.TimeoutError:
        raise timed_out(seconds) from None
    except nats.errors.Error as exc:
        raise not_answering(f"NATS: {exc}") from None
    try:
        decoded = rpc.decode_response(reply.data, response_type)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        log.error(  # noqa: TRY400 - the reply is logged, not a traceback
            "undecodable backup service reply", extra={"subject": subject, "error": str(exc)}
        )
        raise ProblemError(
            502,
            f"the backup service's answer cannot be read: {exc}",
            slug="backup-failed",
            title="Bad gateway",
        ) from None
    if isinstance(decoded, rpc.RpcError):
        raise rpc_problem(decoded, invalid_status=invalid_status)
    return decoded
