"""Budgets: definitions in the `config` KV, spend from the analytics store, alerts once per level.

Definitions (written only by the optimizer, on a `budgets.put` request):

- `budgets.global` and `budgets.project.<project>` in the `config` KV bucket, value JSON
  `{"llm_usd_per_month": 250.0, "compute_usd_per_month": 100.0, "warning": 0.8,
  "updated_by": "...", "updated_at": "..."}`. The llm-proxy reads `llm_usd_per_month` of project
  budgets (it also accepts a bare number, and so does this module) and refuses a project's calls
  once its own spend counter for the month reaches it: that is the block, lifted by the next
  month (a new counter) or a raised limit (the proxy watches the key).

Evaluation (`BudgetMonitor.evaluate`, throttled after ingest): per budget and kind (LLM, compute =
compute + storage), the spend of the current calendar month (UTC) from the analytics store; levels
`warning` (spent ≥ warning ratio * limit, default 0.8) and `limit` (spent ≥ limit). The projection
to month end is linear: spent / elapsed fraction of the month.

Crossing a level is announced once per level per period with `BudgetLevelCrossed` and
`AlertRaised`: a marker `budget_alerts.<period>.<scope>[.<project>].<kind>.<level>` is *created*
in the `limits` KV first (create-only: a second replica or a restart finds it and sends nothing);
its value holds the two events' ids, so a replica that died between the marker and the publish
lets the next evaluation publish them again with the same ids (JetStream drops the duplicate
within its dedupe window), after which the marker says `sent`.
"""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Literal

import msgspec
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from fabrik_common.events import AlertRaised, BudgetLevelCrossed, Event
from fabrik_common.ids import new_ulid
from fabrik_common.optimizer_rpc import (
    BudgetDefinition,
    BudgetKind,
    BudgetLine,
    BudgetScope,
    BudgetStatus,
    month_of,
)
from fabrik_optimizer.analytics.store import NANOS_PER_USD, nanos_to_usd

log = logging.getLogger(__name__)

GLOBAL_KEY = "budgets.global"
PROJECT_PREFIX = "budgets.project."
WATCH_KEYS = "budgets.>"
ALERT_PREFIX = "budget_alerts."
KINDS: tuple[BudgetKind, ...] = ("llm", "compute")
LEVELS: tuple[Literal["warning", "limit"], ...] = ("warning", "limit")
# A pending marker older than this is taken as left by a replica that died before publishing.
PENDING_GRACE_SECONDS = 30.0


def budget_key(scope: BudgetScope, project: str | None) -> str:
    return GLOBAL_KEY if scope == "global" else f"{PROJECT_PREFIX}{project}"


def scope_of(key: str) -> tuple[BudgetScope, str | None] | None:
    if key == GLOBAL_KEY:
        return "global", None
    if key.startswith(PROJECT_PREFIX) and len(key) > len(PROJECT_PREFIX):
        return "project", key[len(PROJECT_PREFIX) :]
    return None


def parse_definition(data: bytes) -> BudgetDefinition | None:
    """A stored budget; a bare number is an LLM limit (as the llm-proxy reads it), null is none."""
    value = msgspec.json.decode(data)
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return BudgetDefinition(llm_usd_per_month=float(value))
    return msgspec.convert(value, BudgetDefinition)


def month_bounds(period: str) -> tuple[datetime, datetime]:
    year, month = int(period[:4]), int(period[5:7])
    start = datetime(year, month, 1, tzinfo=UTC)
    end = datetime(year + 1, 1, 1, tzinfo=UTC) if month == 12 else datetime(year, month + 1, 1, tzinfo=UTC)
    return start, end


def elapsed_fraction(period: str, now: datetime) -> float:
    """How much of the month has passed at `now`: 0 before it, 1 after it."""
    start, end = month_bounds(period)
    if now <= start:
        return 0.0
    if now >= end:
        return 1.0
    return (now - start) / (end - start)


def days_in(period: str) -> int:
    return calendar.monthrange(int(period[:4]), int(period[5:7]))[1]


def _line(
    kind: BudgetKind, limit: float | None, warning: float, spent_nanos: int, elapsed: float
) -> BudgetLine:
    spent = nanos_to_usd(spent_nanos)
    projected = (
        spent
        if elapsed <= 0 or elapsed >= 1
        else (spent / Decimal(repr(elapsed))).quantize(Decimal("0.000000001"))
    )
    if limit is None:
        return BudgetLine(
            kind=kind,
            limit_usd=None,
            warning_usd=None,
            spent_usd=spent,
            projected_usd=projected,
            used=None,
            level="none",
        )
    level = crossed_level(spent_nanos, limit, warning)
    return BudgetLine(
        kind=kind,
        limit_usd=limit,
        warning_usd=limit * warning,
        spent_usd=spent,
        projected_usd=projected,
        used=float(spent) / limit if limit > 0 else None,
        level=level or "ok",
    )


def crossed_level(spent_nanos: int, limit: float, warning: float) -> Literal["warning", "limit"] | None:
    """The highest level reached; compared exactly in nano-dollars."""
    limit_nanos = round(Decimal(repr(limit)) * NANOS_PER_USD)
    warning_nanos = round(Decimal(repr(limit)) * Decimal(repr(warning)) * NANOS_PER_USD)
    if spent_nanos >= limit_nanos:
        return "limit"
    if spent_nanos >= warning_nanos:
        return "warning"
    return None


def budget_status(
    scope: BudgetScope,
    project: str | None,
    definition: BudgetDefinition,
    period: str,
    spend_nanos: tuple[int, int],
    now: datetime,
) -> BudgetStatus:
    elapsed = elapsed_fraction(period, now)
    llm = _line("llm", definition.llm_usd_per_month, definition.warning, spend_nanos[0], elapsed)
    compute = _line("compute", definition.compute_usd_per_month, definition.warning, spend_nanos[1], elapsed)
    return BudgetStatus(
        scope=scope,
        project=project,
        period=period,
        elapsed_fraction=elapsed,
        warning=definition.warning,
        llm=llm,
        compute=compute,
        blocked=scope == "project" and llm.level == "limit",
    )


def spend_of(
    spend: dict[str | None, tuple[int, int]], scope: BudgetScope, project: str | None
) -> tuple[int, int]:
    if scope == "global":
        return sum(v[0] for v in spend.values()), sum(v[1] for v in spend.values())
    return spend.get(project, (0, 0))


class BudgetBook:
    """The budget definitions, kept current from a watch of the `config` KV."""

    def __init__(self) -> None:
        self.definitions: dict[str, BudgetDefinition] = {}

    def observe(self, key: str, data: bytes | None, revision: int = 0) -> None:
        if scope_of(key) is None:
            return
        if data is None:
            self.definitions.pop(key, None)
            return
        try:
            definition = parse_definition(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.warning("unreadable budget; ignored", extra={"key": key, "error": str(exc)})
            return
        if definition is None:
            self.definitions.pop(key, None)
        else:
            self.definitions[key] = definition

    def items(self) -> list[tuple[BudgetScope, str | None, BudgetDefinition]]:
        result: list[tuple[BudgetScope, str | None, BudgetDefinition]] = []
        for key, definition in sorted(self.definitions.items()):
            found = scope_of(key)
            if found is not None:
                result.append((found[0], found[1], definition))
        return result


class AlertMarker(msgspec.Struct, kw_only=True):
    state: Literal["pending", "sent"]
    crossed_event_id: str
    alert_event_id: str
    alert_id: str
    created_at: datetime


def alert_marker_key(period: str, scope: BudgetScope, project: str | None, kind: str, level: str) -> str:
    who = "global" if scope == "global" else f"project.{project}"
    return f"{ALERT_PREFIX}{period}.{who}.{kind}.{level}"


Publish = Callable[[Event], Awaitable[Any]]


class BudgetMonitor:
    """Evaluates budgets against spend and announces crossed levels once per level per period."""

    def __init__(
        self,
        book: BudgetBook,
        limits: KeyValue,
        publish: Publish,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.book = book
        self.limits = limits
        self._publish = publish
        self.clock = clock
        self.dirty = asyncio.Event()
        self.announced: list[BudgetLevelCrossed] = []

    def statuses(
        self, spend: dict[str | None, tuple[int, int]], period: str, now: datetime, project: str | None = None
    ) -> list[BudgetStatus]:
        result = []
        for scope, name, definition in self.book.items():
            if project is not None and scope == "project" and name != project:
                continue
            result.append(budget_status(scope, name, definition, period, spend_of(spend, scope, name), now))
        return result

    async def evaluate(self, spend: dict[str | None, tuple[int, int]], now: datetime | None = None) -> int:
        """Announce every level crossed this period that has not been announced; how many were."""
        now = now or self.clock()
        period = month_of(now)
        sent = 0
        for status in self.statuses(spend, period, now):
            for line in (status.llm, status.compute):
                if line.level not in ("warning", "limit") or line.limit_usd is None:
                    continue
                # Reaching the limit also means the warning level was crossed: announce both.
                levels = LEVELS if line.level == "limit" else LEVELS[:1]
                for level in levels:
                    if await self._announce(status, line, level, now):
                        sent += 1
        return sent

    async def _announce(
        self, status: BudgetStatus, line: BudgetLine, level: Literal["warning", "limit"], now: datetime
    ) -> bool:
        key = alert_marker_key(status.period, status.scope, status.project, line.kind, level)
        marker = AlertMarker(
            state="pending",
            crossed_event_id=new_ulid(),
            alert_event_id=new_ulid(),
            alert_id=new_ulid(),
            created_at=now,
        )
        try:
            revision = await self.limits.create(key, msgspec.json.encode(marker))
        except KeyWrongLastSequenceError:
            # Announced (or being announced) by this or another replica. Finish a stale pending one.
            try:
                entry = await self.limits.get(key)
            except KeyNotFoundError:
                return False
            if entry.value is None or entry.revision is None:
                return False
            existing = msgspec.json.decode(entry.value, type=AlertMarker)
            if existing.state == "sent":
                return False
            if (now - existing.created_at).total_seconds() < PENDING_GRACE_SECONDS:
                return False
            marker, revision = existing, entry.revision
        await self._send(status, line, level, marker)
        done = msgspec.structs.replace(marker, state="sent")
        # Another replica may have finished it meanwhile: the same events, deduplicated.
        with contextlib.suppress(KeyWrongLastSequenceError):
            await self.limits.update(key, msgspec.json.encode(done), last=revision)
        return True

    async def _send(
        self, status: BudgetStatus, line: BudgetLine, level: Literal["warning", "limit"], marker: AlertMarker
    ) -> None:
        assert line.limit_usd is not None
        spent = float(line.spent_usd)
        crossed = BudgetLevelCrossed(
            event_id=marker.crossed_event_id,
            occurred_at=marker.created_at,
            scope=status.scope,
            project=status.project,
            kind=line.kind,
            level=level,
            period=status.period,
            spent_usd=spent,
            limit_usd=line.limit_usd,
        )
        who = "global" if status.scope == "global" else f"project {status.project}"
        what = "LLM" if line.kind == "llm" else "compute"
        pct = round(100 * spent / line.limit_usd) if line.limit_usd else 100
        consequence = (
            " LLM calls of the project are refused until next month or a raised limit."
            if level == "limit" and line.kind == "llm" and status.scope == "project"
            else ""
        )
        alert = AlertRaised(
            event_id=marker.alert_event_id,
            occurred_at=marker.created_at,
            alert_id=marker.alert_id,
            key=f"budget.{status.period}.{'global' if status.scope == 'global' else status.project}"
            f".{line.kind}.{level}",
            severity="critical" if level == "limit" else "warning",
            source="optimizer",
            title=f"{what} budget of {who}: {level} reached ({pct}% of ${line.limit_usd:g}, {status.period})",
            message=(
                f"Spent ${line.spent_usd} of ${line.limit_usd:g} in {status.period}; projected to month end "
                f"${line.projected_usd}.{consequence}"
            ),
            entity_kind="project" if status.scope == "project" else "budget",
            entity_id=status.project if status.scope == "project" else "global",
            project=status.project,
            labels={"scope": status.scope, "kind": line.kind, "level": level, "period": status.period},
        )
        await self._publish(crossed)
        await self._publish(alert)
        self.announced.append(crossed)
        log.info(
            "budget level crossed",
            extra={
                "scope": status.scope,
                "project": status.project,
                "kind": line.kind,
                "level": level,
                "period": status.period,
                "spent_usd": spent,
                "limit_usd": line.limit_usd,
            },
        )
