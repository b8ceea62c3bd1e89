"""Cron schedules: the stored definition, the scheduler's firing state, and their validation.

A definition (KV `schedules`, key `def.<id>`) is written by the gateway with revision checks; the
firing state (`state.<id>`) and the slot claims (`fired.<id>.<slot epoch>`) are written only by
the scheduler leader. This module is plain: no NATS, no clock, so the gateway validates with the
same rules the scheduler fires by.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Final, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec
from cronsim import CronSim, CronSimError

from fabrik_common.events import NonNegInt, RunParameters

FieldError = tuple[str, str]

ConcurrencyPolicy = Literal["allow", "forbid", "replace"]
CatchUpPolicy = Literal["skip", "latest", "all"]
ScheduleHealth = Literal["ok", "late", "missed", "failing", "too_fast", "too_slow"]
SlotStatus = Literal["fired", "skipped", "missed"]

CONCURRENCY_POLICIES: Final[tuple[str, ...]] = ("allow", "forbid", "replace")
CATCH_UP_POLICIES: Final[tuple[str, ...]] = ("skip", "latest", "all")
HEALTH_STATES: Final[tuple[str, ...]] = ("ok", "late", "missed", "failing", "too_fast", "too_slow")
# The order in which a schedule's conditions decide its one health state (first wins).
HEALTH_PRIORITY: Final[tuple[str, ...]] = ("failing", "too_slow", "late", "missed", "too_fast")

ALIASES: Final[dict[str, str]] = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
CRON_FIELDS: Final = ("minute", "hour", "day-of-month", "month", "day-of-week")
CRON_RULE: Final = (
    "must be a cron expression of 5 fields (minute hour day-of-month month day-of-week, e.g. "
    "'30 2 * * 1-5') or one of " + ", ".join(ALIASES)
)
TIMEZONE_RULE: Final = "must be an IANA time zone name such as 'UTC' or 'Europe/Berlin'"
_CRON_CHARS = re.compile(r"^[0-9A-Za-z*,/\-#? ]+$")
MAX_CATCH_UP_LIMIT: Final = 1000
DEFAULT_CATCH_UP_LIMIT: Final = 10
# History kept in the firing state (the newest slots).
HISTORY_LIMIT: Final = 100

KV_BUCKET: Final = "schedules"
DEF_PREFIX: Final = "def."
STATE_PREFIX: Final = "state."
FIRED_PREFIX: Final = "fired."


def def_key(schedule_id: str) -> str:
    return f"{DEF_PREFIX}{schedule_id}"


def state_key(schedule_id: str) -> str:
    return f"{STATE_PREFIX}{schedule_id}"


def fired_key(schedule_id: str, slot: datetime) -> str:
    return f"{FIRED_PREFIX}{schedule_id}.{slot_epoch(slot)}"


def slot_epoch(slot: datetime) -> int:
    return int(slot.timestamp())


# --------------------------------------------------------------------------------------------
# Cron and time zones


class CronError(ValueError):
    """An invalid cron expression; the message is the rule it breaks."""


def expand_cron(expression: str) -> str:
    """The 5-field expression for `expression` (an alias is mapped), or CronError."""
    text = " ".join(expression.split())
    if not text:
        raise CronError(CRON_RULE)
    if text.startswith("@"):
        mapped = ALIASES.get(text.lower())
        if mapped is None:
            raise CronError(f"unknown alias {text!r}: " + CRON_RULE)
        return mapped
    fields = text.split(" ")
    if len(fields) != 5:
        raise CronError(f"has {len(fields)} field(s); " + CRON_RULE)
    if not _CRON_CHARS.match(text):
        raise CronError("contains characters a cron expression cannot have; " + CRON_RULE)
    for name, value in zip(CRON_FIELDS, fields, strict=True):
        # Probe each field alone, so the error names the field that is wrong.
        probe = ["*"] * 5
        probe[CRON_FIELDS.index(name)] = value
        try:
            CronSim(" ".join(probe), datetime(2000, 1, 1, tzinfo=UTC))
        except (CronSimError, ValueError, IndexError) as exc:
            raise CronError(f"bad {name} field {value!r}: {CRON_RULE}") from exc
    try:
        next(iter(CronSim(text, datetime(2000, 1, 1, tzinfo=UTC))))
    except (CronSimError, ValueError, IndexError) as exc:
        # Each field is valid alone; together they name no date (e.g. 30 February).
        raise CronError(f"never fires: the fields name no date ({exc}); " + CRON_RULE) from exc
    except StopIteration as exc:
        raise CronError("never fires (no such date in 50 years): " + CRON_RULE) from exc
    return text


def zone(name: str) -> ZoneInfo:
    """The time zone `name`, or ValueError with the rule."""
    if not name or name.startswith(("/", ".")) or ".." in name:
        raise ValueError(TIMEZONE_RULE)
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError) as exc:
        raise ValueError(TIMEZONE_RULE) from exc


def cron_errors(cron: object, timezone: object, field_prefix: str = "") -> list[FieldError]:
    errors: list[FieldError] = []
    if isinstance(cron, str):
        try:
            expand_cron(cron)
        except CronError as exc:
            errors.append((f"{field_prefix}cron", str(exc)))
    if isinstance(timezone, str):
        try:
            zone(timezone)
        except ValueError as exc:
            errors.append((f"{field_prefix}timezone", str(exc)))
    return errors


# --------------------------------------------------------------------------------------------
# The definition


Seconds = Annotated[int, msgspec.Meta(ge=0, le=366 * 24 * 3600)]
PositiveSeconds = Annotated[int, msgspec.Meta(ge=1, le=366 * 24 * 3600)]
ChannelName = Annotated[
    str,
    msgspec.Meta(
        pattern=r"^[A-Za-z0-9][-A-Za-z0-9_.:]*$",
        max_length=128,
        extra={"rule": "must be a channel name: letters, digits, '-', '_', '.', ':'"},
    ),
]


class Expectations(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What a healthy slot looks like; breaking it makes the schedule's health (and alerts)."""

    start_grace_seconds: Seconds = 300
    """A slot's run must have started this long after the slot (else `late`); a slot the
    scheduler sees only after this is missed and handled by the catch-up policy."""
    expected_duration_seconds: PositiveSeconds | None = None
    """A run that ends later than this is `too_slow`."""
    max_runtime_seconds: PositiveSeconds | None = None
    """A run still running this long after it started is `too_slow` (while it runs)."""
    min_runtime_seconds: PositiveSeconds | None = None
    """A run that succeeds faster than this is `too_fast` (it probably did nothing)."""
    failure_tolerance: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 1
    """`failing` after this many consecutive failed runs."""
    realert_interval_seconds: Annotated[int, msgspec.Meta(ge=60, le=30 * 24 * 3600)] = 3600
    """An alert still open is raised again this often."""
    alert_channels: list[ChannelName] = msgspec.field(default_factory=list)
    """Names of alert channels; the alert routing resolves them."""


class ScheduleDefinition(msgspec.Struct, kw_only=True):
    """A schedule as stored (KV `schedules`, key `def.<schedule_id>`)."""

    schedule_id: str
    name: str
    project: str
    env: str = "dev"
    run: dict[str, object] = msgspec.field(default_factory=dict)
    """The run template as given (for display and PATCH), without `project`."""
    params: RunParameters
    """The template resolved to what each run receives (resources from `resources` or `template`)."""
    cron: str
    timezone: str = "UTC"
    concurrency: ConcurrencyPolicy = "allow"
    catch_up: CatchUpPolicy = "skip"
    catch_up_limit: Annotated[int, msgspec.Meta(ge=1, le=MAX_CATCH_UP_LIMIT)] = DEFAULT_CATCH_UP_LIMIT
    expectations: Expectations = msgspec.field(default_factory=Expectations)
    paused: bool = False
    created_at: datetime
    created_by: str = ""
    updated_at: datetime
    updated_by: str = ""
    generation: Annotated[int, msgspec.Meta(ge=1)] = 1
    """Bumped by every change; the scheduler re-plans when it sees a new one."""
    active_since: datetime
    """Slots after this time belong to the schedule: creation, or the last resume or cron change."""

    @property
    def expression(self) -> str:
        return expand_cron(self.cron)


# --------------------------------------------------------------------------------------------
# The firing state (scheduler leader only)


class SlotRecord(msgspec.Struct, kw_only=True):
    """What became of one slot."""

    slot: datetime
    status: SlotStatus
    reason: str = ""
    run_id: str | None = None
    outcome: str | None = None
    """The run's state: `queued`...`running` while it is active, then its terminal state."""
    started_at: datetime | None = None
    finished_at: datetime | None = None
    recorded_at: datetime


class AlertEpisode(msgspec.Struct, kw_only=True):
    alert_id: str
    condition: str
    opened_at: datetime
    last_sent_at: datetime
    sent: NonNegInt = 1
    message: str = ""


class ScheduleState(msgspec.Struct, kw_only=True):
    """The scheduler's account of a schedule (KV `schedules`, key `state.<schedule_id>`)."""

    schedule_id: str
    generation: int = 0
    cursor: datetime
    """Every slot up to and including this time has been decided (fired, skipped or missed)."""
    next_fire_at: datetime | None = None
    last_slot: datetime | None = None
    last_fired_at: datetime | None = None
    last_success_at: datetime | None = None
    consecutive_failures: NonNegInt = 0
    active_runs: list[str] = msgspec.field(default_factory=list)
    history: list[SlotRecord] = msgspec.field(default_factory=list)
    health: ScheduleHealth = "ok"
    conditions: list[str] = msgspec.field(default_factory=list)
    """Every condition that holds now; `health` is the first of them by priority."""
    health_message: str = ""
    alerts: dict[str, AlertEpisode] = msgspec.field(default_factory=dict)
    claims: list[int] = msgspec.field(default_factory=list)
    """Slot epochs whose `fired.` keys still exist (removed after a day)."""
    updated_at: datetime | None = None
