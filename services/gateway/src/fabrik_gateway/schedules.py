"""Cron schedules at the edge: request and response bodies, validation, and the definitions.

Decision (docs/schedules.md): the gateway is the only writer of schedule *definitions* (KV
`schedules`, keys `def.<id>`, with revision checks); the scheduler leader is the only writer of
their *firing state* (`state.<id>`) and slot claims (`fired.<id>.<slot>`). The gateway reads
both to answer; it never fires anything. The cron, time-zone and policy rules are the ones the
scheduler fires by (`fabrik_common.schedules.model`).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Annotated, Any, Final

import msgspec
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from fabrik_common.events import Priority
from fabrik_common.ids import is_ulid, new_ulid, utcnow
from fabrik_common.schedules.model import (
    DEF_PREFIX,
    DEFAULT_CATCH_UP_LIMIT,
    KV_BUCKET,
    MAX_CATCH_UP_LIMIT,
    STATE_PREFIX,
    CatchUpPolicy,
    ConcurrencyPolicy,
    Expectations,
    ScheduleDefinition,
    ScheduleHealth,
    ScheduleState,
    SlotStatus,
    cron_errors,
    def_key,
    state_key,
)
from fabrik_common.schedules.store import (
    decode_definition,
    decode_state,
    encode,
    read_prefix,
)
from fabrik_common.schedules.timing import next_slot
from fabrik_common.specs import FieldError, Spec, Todo, collect_errors
from fabrik_gateway.auth import Principal
from fabrik_gateway.auth.principal import require_role
from fabrik_gateway.models import DnsLabel, RepoIn, ResourcesIn, SubmitRunRequest, WorkloadIn
from fabrik_gateway.problems import ProblemError, invalid, not_found
from fabrik_gateway.validation import SubmitLimits, decode_body, semantic_errors, to_parameters

WRITE_ATTEMPTS: Final = 5
ScheduleName = Annotated[
    str,
    msgspec.Meta(
        min_length=1,
        max_length=128,
        pattern=r"^[^\x00-\x1f]+$",
        extra={"rule": "must be 1 to 128 printable characters"},
    ),
]
CronText = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
TimezoneText = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
CatchUpLimit = Annotated[int, msgspec.Meta(ge=1, le=MAX_CATCH_UP_LIMIT)]


# --------------------------------------------------------------------------------------------
# Bodies


class RunTemplateIn(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What each run of the schedule is: the fields of `POST /api/v1/runs` but `project` (the
    schedule's own), with the same rules."""

    env: DnsLabel = "dev"
    spec: Spec | None = None
    spec_path: Annotated[str, msgspec.Meta(min_length=1, max_length=1024)] | None = None
    todo: Todo | None = None
    repo: RepoIn | None = None
    workload: WorkloadIn | None = None
    resources: ResourcesIn | None = None
    template: Annotated[str, msgspec.Meta(min_length=1, max_length=63)] | None = None
    timeout_seconds: Annotated[int, msgspec.Meta(ge=1, le=86400)] = 86400
    priority: Priority = "normal"
    budget_usd: Annotated[float, msgspec.Meta(ge=0)] | None = None
    labels: dict[str, str] = msgspec.field(default_factory=dict)


class CreateScheduleRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A new schedule: a run template fired at every slot of `cron` in `timezone`."""

    name: ScheduleName
    project: DnsLabel
    run: RunTemplateIn
    cron: CronText
    """5 fields (minute hour day-of-month month day-of-week) or @yearly, @annually, @monthly,
    @weekly, @daily, @midnight, @hourly."""
    timezone: TimezoneText = "UTC"
    concurrency: ConcurrencyPolicy = "allow"
    catch_up: CatchUpPolicy = "skip"
    catch_up_limit: CatchUpLimit = DEFAULT_CATCH_UP_LIMIT
    expectations: Expectations = msgspec.field(default_factory=Expectations)
    paused: bool = False


class PatchScheduleRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Fields to change; the others stay. `run` and `expectations` are replaced as a whole."""

    name: ScheduleName | None = None
    run: RunTemplateIn | None = None
    cron: CronText | None = None
    timezone: TimezoneText | None = None
    concurrency: ConcurrencyPolicy | None = None
    catch_up: CatchUpPolicy | None = None
    catch_up_limit: CatchUpLimit | None = None
    expectations: Expectations | None = None
    paused: bool | None = None
    expected_revision: Annotated[int, msgspec.Meta(ge=1)] | None = None
    """Refuse with 412 unless the schedule is at this revision."""


class ScheduleView(msgspec.Struct, kw_only=True):
    """A schedule as the API shows it: its definition and the scheduler's account of it."""

    id: str
    name: str
    project: str
    env: str
    cron: str
    timezone: str
    paused: bool
    next_fire_at: datetime | None
    last_fired_at: datetime | None
    """The slot of the newest run the schedule started."""
    last_success_at: datetime | None
    health: ScheduleHealth
    health_message: str
    conditions: list[str]
    consecutive_failures: int
    active_runs: list[str]
    concurrency: ConcurrencyPolicy
    catch_up: CatchUpPolicy
    catch_up_limit: int
    expectations: Expectations
    run: dict[str, Any]
    created_at: datetime
    created_by: str
    updated_at: datetime
    updated_by: str
    revision: int
    """Pass as `expected_revision` to PATCH to refuse lost updates."""
    observed: bool
    """false until the scheduler has looked at this version of the schedule."""


class ScheduleList(msgspec.Struct, kw_only=True):
    items: list[ScheduleView]


class SlotView(msgspec.Struct, kw_only=True):
    slot: datetime
    status: SlotStatus
    reason: str
    run_id: str | None
    outcome: str | None
    """The run's state (`queued` ... `succeeded`, `failed`, ...); null for a slot without a run."""
    started_at: datetime | None
    finished_at: datetime | None


class ScheduleHistory(msgspec.Struct, kw_only=True):
    id: str
    items: list[SlotView]
    """Newest first."""


class ScheduleDeleted(msgspec.Struct, kw_only=True):
    id: str
    deleted: bool


# --------------------------------------------------------------------------------------------
# Validation


PROJECT_IN_RUN_RULE: Final = "is the schedule's project: give `project` at the top level"


def _validate(obj: Any, model: type[msgspec.Struct], limits: SubmitLimits) -> list[FieldError]:
    """Every invalid field: the schema walk, the run rules of `POST /runs` (as `run.<field>`),
    and the cron expression and time zone."""
    errors = collect_errors(obj, model)
    if isinstance(obj, Mapping):
        run = obj.get("run")
        if isinstance(run, Mapping):
            if "project" in run:
                errors = [e for e in errors if e[0] != "run.project"]
                errors.append(("run.project", PROJECT_IN_RUN_RULE))
            rest = {k: v for k, v in run.items() if k != "project"}
            errors.extend((f"run.{f}", r) for f, r in semantic_errors(rest, limits))
        default_zone = "UTC" if model is CreateScheduleRequest else None
        errors.extend(cron_errors(obj.get("cron"), obj.get("timezone", default_zone)))
    return list(dict.fromkeys(errors))


def validate_create(raw: bytes, limits: SubmitLimits) -> CreateScheduleRequest:
    obj = decode_body(raw)
    errors = _validate(obj, CreateScheduleRequest, limits)
    if errors:
        raise invalid(errors)
    return msgspec.convert(obj, CreateScheduleRequest)


def validate_patch(raw: bytes, limits: SubmitLimits) -> PatchScheduleRequest:
    obj = decode_body(raw)
    errors = _validate(obj, PatchScheduleRequest, limits)
    if errors:
        raise invalid(errors)
    return msgspec.convert(obj, PatchScheduleRequest)


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _template_dict(run: RunTemplateIn) -> dict[str, object]:
    template: dict[str, object] = _without_nulls(msgspec.to_builtins(run))
    return template


def _parameters(project: str, run: RunTemplateIn) -> Any:
    request = msgspec.convert({**msgspec.to_builtins(run), "project": project}, SubmitRunRequest)
    return to_parameters(request)


# --------------------------------------------------------------------------------------------
# The definitions


class Schedules:
    """Definitions in the KV bucket, and views joined with the scheduler's firing state."""

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    async def _definition(self, schedule_id: str) -> tuple[ScheduleDefinition, int] | None:
        if not is_ulid(schedule_id):
            return None
        try:
            entry = await self.kv.get(def_key(schedule_id.upper()))
        except KeyNotFoundError:
            return None
        if not entry.value or entry.revision is None:
            return None
        return decode_definition(entry.value), entry.revision

    async def _state(self, schedule_id: str) -> ScheduleState | None:
        try:
            entry = await self.kv.get(state_key(schedule_id))
        except KeyNotFoundError:
            return None
        return decode_state(entry.value) if entry.value else None

    async def find(self, schedule_id: str, principal: Principal) -> tuple[ScheduleDefinition, int]:
        """The schedule, or 404 (also for a schedule of a project the caller does not see)."""
        found = await self._definition(schedule_id)
        if found is None or not principal.can_see(found[0].project):
            raise not_found(f"schedule {schedule_id}")
        return found

    async def list(self, principal: Principal, project: str | None = None) -> ScheduleList:
        definitions = await read_prefix(self.kv, DEF_PREFIX)
        states = await read_prefix(self.kv, STATE_PREFIX)
        items: list[ScheduleView] = []
        for value, revision in definitions.values():
            definition = decode_definition(value)
            if not principal.can_see(definition.project):
                continue
            if project is not None and definition.project != project:
                continue
            state_entry = states.get(state_key(definition.schedule_id))
            state = decode_state(state_entry[0]) if state_entry else None
            items.append(view(definition, revision, state))
        items.sort(key=lambda v: (v.project, v.name, v.id))
        return ScheduleList(items=items)

    async def show(self, schedule_id: str, principal: Principal) -> ScheduleView:
        definition, revision = await self.find(schedule_id, principal)
        return view(definition, revision, await self._state(definition.schedule_id))

    async def history(self, schedule_id: str, principal: Principal, limit: int) -> ScheduleHistory:
        definition, _ = await self.find(schedule_id, principal)
        state = await self._state(definition.schedule_id)
        records = list(reversed(state.history))[:limit] if state is not None else []
        return ScheduleHistory(
            id=definition.schedule_id,
            items=[
                SlotView(
                    slot=r.slot,
                    status=r.status,
                    reason=r.reason,
                    run_id=r.run_id,
                    outcome=r.outcome,
                    started_at=r.started_at,
                    finished_at=r.finished_at,
                )
                for r in records
            ],
        )

    async def create(self, request: CreateScheduleRequest, principal: Principal) -> ScheduleView:
        require_role(principal, "developer", "create schedules", request.project)
        now = utcnow()
        definition = ScheduleDefinition(
            schedule_id=new_ulid(),
            name=request.name,
            project=request.project,
            env=request.run.env,
            run=_template_dict(request.run),
            params=_parameters(request.project, request.run),
            cron=" ".join(request.cron.split()),
            timezone=request.timezone,
            concurrency=request.concurrency,
            catch_up=request.catch_up,
            catch_up_limit=request.catch_up_limit,
            expectations=request.expectations,
            paused=request.paused,
            created_at=now,
            created_by=principal.subject,
            updated_at=now,
            updated_by=principal.subject,
            active_since=now,
        )
        revision = await self.kv.create(def_key(definition.schedule_id), encode(definition))
        return view(definition, revision, None)

    async def update(
        self, schedule_id: str, patch: PatchScheduleRequest, principal: Principal
    ) -> ScheduleView:
        for _ in range(WRITE_ATTEMPTS):
            definition, revision = await self.find(schedule_id, principal)
            require_role(principal, "developer", "change schedules", definition.project)
            if patch.expected_revision is not None and patch.expected_revision != revision:
                raise ProblemError(
                    412,
                    f"schedule {definition.schedule_id} is at revision {revision}, "
                    f"not {patch.expected_revision}",
                    slug="revision-mismatch",
                    title="Revision mismatch",
                    errors=[("expected_revision", f"must be the current revision {revision}")],
                )
            changed = apply_patch(definition, patch, principal.subject, utcnow())
            if changed is None:
                return view(definition, revision, await self._state(definition.schedule_id))
            try:
                revision = await self.kv.update(def_key(changed.schedule_id), encode(changed), last=revision)
            except KeyWrongLastSequenceError:
                continue  # changed meanwhile: apply to the new version (or 412 next round)
            return view(changed, revision, await self._state(changed.schedule_id))
        raise ProblemError(409, f"schedule {schedule_id} kept changing; retry", slug="conflict")

    async def delete(self, schedule_id: str, principal: Principal) -> ScheduleDeleted:
        for _ in range(WRITE_ATTEMPTS):
            definition, revision = await self.find(schedule_id, principal)
            require_role(principal, "developer", "delete schedules", definition.project)
            try:
                await self.kv.delete(def_key(definition.schedule_id), last=revision)
            except KeyWrongLastSequenceError:
                continue
            return ScheduleDeleted(id=definition.schedule_id, deleted=True)
        raise ProblemError(409, f"schedule {schedule_id} kept changing; retry", slug="conflict")


def apply_patch(
    definition: ScheduleDefinition, patch: PatchScheduleRequest, by: str, now: datetime
) -> ScheduleDefinition | None:
    """The changed definition (generation + 1), or None when the patch changes nothing."""
    changes: dict[str, Any] = {}
    for name in ("name", "timezone", "concurrency", "catch_up", "catch_up_limit", "expectations", "paused"):
        value = getattr(patch, name)
        if value is not None and value != getattr(definition, name):
            changes[name] = value
    if patch.cron is not None and " ".join(patch.cron.split()) != definition.cron:
        changes["cron"] = " ".join(patch.cron.split())
    if patch.run is not None:
        template = _template_dict(patch.run)
        if template != definition.run:
            changes["run"] = template
            changes["env"] = patch.run.env
            changes["params"] = _parameters(definition.project, patch.run)
    if not changes:
        return None
    # Slots after a resume or a new timing belong to the schedule; those before are not caught up.
    if changes.get("paused") is False or {"cron", "timezone"} & set(changes):
        changes["active_since"] = now
    return msgspec.structs.replace(
        definition, **changes, updated_at=now, updated_by=by, generation=definition.generation + 1
    )


def view(definition: ScheduleDefinition, revision: int, state: ScheduleState | None) -> ScheduleView:
    now = utcnow()
    current = state if state is not None and state.generation == definition.generation else None
    after = max(now, current.cursor) if current is not None else max(now, definition.active_since)
    return ScheduleView(
        id=definition.schedule_id,
        name=definition.name,
        project=definition.project,
        env=definition.env,
        cron=definition.cron,
        timezone=definition.timezone,
        paused=definition.paused,
        next_fire_at=None if definition.paused else next_slot(definition.cron, definition.timezone, after),
        last_fired_at=state.last_fired_at if state else None,
        last_success_at=state.last_success_at if state else None,
        health=state.health if state else "ok",
        health_message=state.health_message if state else "",
        conditions=list(state.conditions) if state else [],
        consecutive_failures=state.consecutive_failures if state else 0,
        active_runs=list(state.active_runs) if state else [],
        concurrency=definition.concurrency,
        catch_up=definition.catch_up,
        catch_up_limit=definition.catch_up_limit,
        expectations=definition.expectations,
        run=dict(definition.run),
        created_at=definition.created_at,
        created_by=definition.created_by,
        updated_at=definition.updated_at,
        updated_by=definition.updated_by,
        revision=revision,
        observed=current is not None,
    )


async def schedules_of(js: Any) -> Schedules:
    return Schedules(await js.key_value(KV_BUCKET))
