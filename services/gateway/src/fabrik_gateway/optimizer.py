"""Requests to the optimizer over core NATS request/reply (contract: `fabrik_common.optimizer_rpc`),
and its answers as the API shows them.

- No optimizer subscribed (NATS answers "no responders"), no answer in time, or a NATS failure:
  503 with `Retry-After` and a detail saying the optimizer is not answering.
- An `RpcError`: a problem with its status (400 — 422 for a request body —, 404, 409, 503 with
  `Retry-After`) naming its field and rule in `errors`; a 500 (a bug in the optimizer) or any other
  status, and a reply this gateway cannot decode, are a 502.
- Money: the optimizer's Decimals as exact fixed-point strings (`"0.000000005"`, never `"5E-9"`).

For a caller that sees only some projects (`Principal.visible_projects`), costs are narrowed to
those projects here: `merge_costs` adds up per-project answers group by group and recomputes the
totals over what is left.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from decimal import Decimal
from typing import Any, Final, TypeVar

import msgspec
import nats.errors
from nats.aio.client import Client as NatsClient

from fabrik_common import optimizer_rpc as rpc
from fabrik_gateway.problems import ProblemError, invalid

log = logging.getLogger(__name__)

R = TypeVar("R")
T = TypeVar("T")

RETRY_AFTER: Final = "2"
PASSED_STATUSES: Final = frozenset({400, 404, 409, 503})
"""RpcError statuses answered as they are; anything else (a 500: a bug) becomes a 502."""
PER_PROJECT_CONCURRENCY: Final = 8


def not_answering(detail: str) -> ProblemError:
    return ProblemError(
        503,
        f"the optimizer is not answering: {detail}",
        slug="optimizer-unavailable",
        title="Optimizer unavailable",
        headers={"Retry-After": RETRY_AFTER},
    )


def rpc_problem(error: rpc.RpcError, *, invalid_status: int = 400) -> ProblemError:
    """An optimizer's `RpcError` as the problem the API answers."""
    field = error.field or "$"
    if error.status == 400:
        return invalid([(field, error.rule)], status=invalid_status, detail=error.message)
    if error.status not in PASSED_STATUSES:
        log.error(
            "optimizer failed", extra={"status": error.status, "rule": error.rule, "error": error.message}
        )
        return ProblemError(
            502, f"the optimizer failed: {error.message}", slug="optimizer-failed", title="Bad gateway"
        )
    headers = {"Retry-After": RETRY_AFTER} if error.status == 503 else None
    errors = [(field, error.rule)] if error.field else None
    titles = {404: "Not found", 409: "Conflict", 503: "Optimizer unavailable"}
    return ProblemError(
        error.status,
        error.message,
        slug=f"optimizer-{error.rule}" if error.rule.isidentifier() else None,
        title=titles.get(error.status),
        errors=errors,
        headers=headers,
    )


async def ask(
    nc: NatsClient,
    subject: str,
    request: msgspec.Struct,
    response_type: type[R],
    *,
    seconds: float,
    invalid_status: int = 400,
    on_timeout: str | None = None,
) -> R:
    """Send `request` on `subject` and wait for the reply, as `response_type`; raises the
    `ProblemError` the API answers otherwise (see the module's docstring). `invalid_status`: the
    status of an invalid request (422 for a body); `on_timeout`: the detail when no answer came."""
    try:
        reply = await nc.request(subject, rpc.encode(request), timeout=seconds)
    except nats.errors.NoRespondersError:
        raise not_answering(
            "no optimizer is subscribed to its requests (is the optimizer service running?)"
        ) from None
    except nats.errors.TimeoutError:
        raise not_answering(on_timeout or f"no answer within {seconds:g} s") from None
    except nats.errors.Error as exc:
        raise not_answering(f"NATS: {exc}") from None
    try:
        decoded = rpc.decode_response(reply.data, response_type)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        log.error(  # noqa: TRY400 - the reply is logged, not a traceback
            "undecodable optimizer reply", extra={"subject": subject, "error": str(exc)}
        )
        raise ProblemError(
            502, f"the optimizer's answer cannot be read: {exc}", slug="optimizer-failed", title="Bad gateway"
        ) from None
    if isinstance(decoded, rpc.RpcError):
        raise rpc_problem(decoded, invalid_status=invalid_status)
    return decoded


async def ask_each(
    nc: NatsClient,
    subject: str,
    requests: Sequence[msgspec.Struct],
    response_type: type[R],
    *,
    seconds: float,
) -> list[R]:
    """`ask` for each request, a few at a time; the answers in the order of the requests."""
    limit = asyncio.Semaphore(PER_PROJECT_CONCURRENCY)

    async def one(request: msgspec.Struct) -> R:
        async with limit:
            return await ask(nc, subject, request, response_type, seconds=seconds)

    return list(await asyncio.gather(*(one(r) for r in requests)))


# ------------------------------------------------------------------------------------------------
# answers as the API shows them


def money(value: Decimal) -> str:
    """An exact fixed-point string: `Decimal("5E-9")` → `"0.000000005"`, `Decimal("0E-9")` → `"0"`."""
    text = format(value.normalize(), "f")
    return "0" if text in ("-0", "") else text


def _plain(value: Any) -> Any:
    if isinstance(value, Decimal):
        return money(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def view(message: msgspec.Struct, view_type: type[T], **extra: Any) -> T:
    """An RPC answer converted to the API's struct `view_type` (Decimals as exact strings; the
    `kind` tag and any field the view does not have are dropped; `extra` adds fields)."""
    data = _plain(msgspec.to_builtins(message, builtin_types=(Decimal,)))
    data.update(extra)
    return msgspec.convert(data, view_type)


_SUMMED: Final = (
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "tokens",
    "calls",
    "runs",
    "compute_runs",
)


def _add(a: Decimal | None, b: Decimal | None) -> Decimal | None:
    if a is None:
        return b
    return a if b is None else a + b


def merge_cost_rows(answers: Iterable[Iterable[rpc.CostRow]]) -> list[rpc.CostRow]:
    """Rows of several answers (one per project) added up group by group, most expensive first
    (the optimizer's order). A run belongs to one project, so distinct-run counts add up too."""
    merged: dict[str | None, rpc.CostRow] = {}
    for rows in answers:
        for row in rows:
            seen = merged.get(row.group)
            if seen is None:
                merged[row.group] = row
                continue
            merged[row.group] = msgspec.structs.replace(
                seen,
                llm_cost_usd=seen.llm_cost_usd + row.llm_cost_usd,
                compute_cost_usd=_add(seen.compute_cost_usd, row.compute_cost_usd),
                storage_cost_usd=_add(seen.storage_cost_usd, row.storage_cost_usd),
                total_cost_usd=seen.total_cost_usd + row.total_cost_usd,
                **{k: getattr(seen, k) + getattr(row, k) for k in _SUMMED},
            )
    return sorted(merged.values(), key=lambda r: (-r.total_cost_usd, "" if r.group is None else r.group))


def totals_of(rows: Iterable[rpc.CostRow]) -> rpc.CostTotals:
    """As the optimizer computes them: sums over the rows."""
    rows = list(rows)
    llm = sum((r.llm_cost_usd for r in rows), Decimal(0))
    compute = sum((r.compute_cost_usd or Decimal(0) for r in rows), Decimal(0))
    storage = sum((r.storage_cost_usd or Decimal(0) for r in rows), Decimal(0))
    return rpc.CostTotals(
        llm_cost_usd=llm,
        compute_cost_usd=compute,
        storage_cost_usd=storage,
        total_cost_usd=llm + compute + storage,
    )


def narrowed_costs(
    answers: Sequence[rpc.CostsResponse], visible: frozenset[str] | None = None
) -> rpc.CostsResponse:
    """One answer from several (per project), or one answer's rows of `visible` projects only
    (grouped by project), with totals recomputed over the rows kept."""
    first = answers[0]
    rows = merge_cost_rows(a.rows for a in answers)
    if visible is not None:
        rows = [r for r in rows if r.group is not None and r.group in visible]
    return msgspec.structs.replace(first, rows=rows, totals=totals_of(rows))
