"""Firing and watching schedules: what the scheduler leader does on every schedule tick.

Per tick, for every definition: follow the runs its slots started (outcome, durations, failures),
decide the slots that came due since the state's `cursor` (fire, skip by concurrency, or miss by
the catch-up policy), evaluate the schedule's health, raise or resolve its alerts, and write the
state back with a revision check. Exactly once per slot, also across a leader failover:

1. the decision about a slot is taken by *creating* the key `fired.<schedule>.<slot epoch>` (a
   create-only write: of two leaders, one wins; a new leader finds the decision of the old one);
2. the run id is a function of (schedule, slot) (`derived_ulid`), and its `run.requested` carries a
   message id of the same kind: published again by a new leader, it is de-duplicated by JetStream
   and, beyond the duplicate window, by the create-only run record of the state machine.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Protocol

import msgspec
from nats.js.errors import KeyWrongLastSequenceError
from nats.js.kv import KeyValue
from prometheus_client import CollectorRegistry, Gauge

from fabrik_common.bus import MSG_ID
from fabrik_common.clock import Clock
from fabrik_common.events import (
    TERMINAL_STATES,
    AlertRaised,
    AlertResolved,
    Event,
    RunCancelRequested,
    RunRequested,
)
from fabrik_common.ids import derived_ulid
from fabrik_common.runs import RunRecord
from fabrik_common.schedules.model import (
    DEF_PREFIX,
    FIRED_PREFIX,
    HEALTH_STATES,
    HISTORY_LIMIT,
    STATE_PREFIX,
    AlertEpisode,
    ScheduleDefinition,
    ScheduleState,
    SlotRecord,
    SlotStatus,
    fired_key,
    slot_epoch,
    state_key,
)
from fabrik_common.schedules.store import (
    decode_definition,
    decode_slot,
    decode_state,
    encode,
    read_prefix,
)
from fabrik_common.schedules.timing import due_slots, next_slot, plan_slots
from fabrik_scheduler.schedules.health import FAILED_OUTCOMES, evaluate

log = logging.getLogger(__name__)

CLAIM_RETENTION: Final = timedelta(days=1)
# A fired run the state machine has not recorded after this long is given up on.
UNRECORDED_GIVE_UP: Final = timedelta(hours=1)
REQUESTED_BY_PREFIX: Final = "schedule:"
_CROCKFORD: Final = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"

_encode = encode
_decode_def = decode_definition
_decode_state = decode_state
_decode_slot = decode_slot


class Publisher(Protocol):
    async def publish(self, event: Event, *, headers: Mapping[str, str] | None = None) -> Any: ...


RunLookup = Callable[[str], Awaitable[RunRecord | None]]


def run_id_for(schedule_id: str, slot: datetime) -> str:
    """The run of a slot: the same id whoever fires it, however often. Its random part is
    `derived_ulid` of (schedule, slot); its time part is the slot's, so that the run sorts among
    the others by when it was meant to start (run ids order run listings)."""
    derived = derived_ulid(f"schedule:{schedule_id}:{slot_epoch(slot)}")
    millis = int(slot.timestamp() * 1000)
    # A ULID's first 10 characters are its 48-bit time, the other 16 its 80 random bits.
    time_part = "".join(_CROCKFORD[(millis >> (5 * i)) & 31] for i in reversed(range(10)))
    return time_part + derived[10:]


def alert_key(schedule_id: str, condition: str) -> str:
    return f"schedule.{schedule_id}.{condition}"


class ScheduleMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.health = Gauge(
            "fabrik_schedule_health",
            "1 for the schedule's current health state, 0 for the others",
            ["schedule", "project", "state"],
            registry=registry,
        )
        self.last_success = Gauge(
            "fabrik_schedule_last_success_timestamp_seconds",
            "When the schedule's last successful run finished (Unix time; 0: never)",
            ["schedule", "project"],
            registry=registry,
        )
        self.failures = Gauge(
            "fabrik_schedule_consecutive_failures",
            "Failed runs of the schedule in a row",
            ["schedule", "project"],
            registry=registry,
        )
        self.schedules = Gauge("fabrik_schedules", "Schedules defined", registry=registry)
        self._known: dict[str, str] = {}

    def observe(self, definition: ScheduleDefinition, state: ScheduleState) -> None:
        sid, project = definition.schedule_id, definition.project
        old_project = self._known.get(sid)
        if old_project is not None and old_project != project:
            self.forget(sid)
        self._known[sid] = project
        for name in HEALTH_STATES:
            self.health.labels(sid, project, name).set(1 if state.health == name else 0)
        success = state.last_success_at.timestamp() if state.last_success_at else 0
        self.last_success.labels(sid, project).set(success)
        self.failures.labels(sid, project).set(state.consecutive_failures)
        self.schedules.set(len(self._known))

    def forget_all(self) -> None:
        for schedule_id in list(self._known):
            self.forget(schedule_id)

    def forget(self, schedule_id: str) -> None:
        project = self._known.pop(schedule_id, None)
        if project is None:
            return
        for name in HEALTH_STATES:
            self.health.remove(schedule_id, project, name)
        self.last_success.remove(schedule_id, project)
        self.failures.remove(schedule_id, project)
        self.schedules.set(len(self._known))


class ScheduleEngine:
    def __init__(
        self,
        kv: KeyValue,
        publisher: Publisher,
        lookup: RunLookup,
        clock: Clock,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.kv = kv
        self.publisher = publisher
        self.lookup = lookup
        self.clock = clock
        self.metrics = ScheduleMetrics(registry or CollectorRegistry())
        self.states: dict[str, tuple[ScheduleState, int]] = {}
        # States that did not decode: rebuilt, and written over at this revision.
        self._overwrite: dict[str, int] = {}
        self.loaded = False
        self.ticks = 0

    def reset(self) -> None:
        """Forget the cached states (on becoming leader: another leader may have written since)."""
        self.states = {}
        self.loaded = False

    async def _load_states(self) -> None:
        self.states = {}
        self._overwrite = {}
        for key, (value, revision) in (await read_prefix(self.kv, STATE_PREFIX)).items():
            try:
                state = _decode_state(value)
            except msgspec.DecodeError:
                log.exception("undecodable schedule state; it is rebuilt", extra={"key": key})
                self._overwrite[key.removeprefix(STATE_PREFIX)] = revision
                continue
            self.states[state.schedule_id] = (state, revision)
        self.loaded = True

    async def definitions(self) -> dict[str, ScheduleDefinition]:
        found: dict[str, ScheduleDefinition] = {}
        for key, (value, _) in (await read_prefix(self.kv, DEF_PREFIX)).items():
            try:
                definition = _decode_def(value)
            except msgspec.DecodeError:
                log.exception("undecodable schedule definition; skipped", extra={"key": key})
                continue
            found[definition.schedule_id] = definition
        return found

    async def tick(self) -> None:
        if not self.loaded:
            await self._load_states()
        now = self.clock.now()
        definitions = await self.definitions()
        for schedule_id, definition in definitions.items():
            try:
                await self._tick_one(definition, now)
            except ValueError:
                # A definition the gateway would not accept now (a time zone gone from the system's
                # database, a cron rule tightened): the others go on; this one is logged each tick.
                log.exception("schedule cannot be planned", extra={"schedule": schedule_id})
        for schedule_id in set(self.states) - set(definitions):
            await self._retire(schedule_id)
        self.ticks += 1

    # ------------------------------------------------------------------ one schedule

    async def _tick_one(self, definition: ScheduleDefinition, now: datetime) -> None:
        sid = definition.schedule_id
        cached = self.states.get(sid)
        if cached is None:
            state = ScheduleState(
                schedule_id=sid, generation=definition.generation, cursor=definition.active_since
            )
            revision = self._overwrite.pop(sid, 0)
        else:
            state, revision = msgspec.structs.replace(cached[0]), cached[1]
            state.history = [msgspec.structs.replace(r) for r in state.history]
            state.alerts = {k: msgspec.structs.replace(v) for k, v in state.alerts.items()}
            state.active_runs = list(state.active_runs)
            state.claims = list(state.claims)
        before = _encode(state)
        if state.generation != definition.generation:
            state.generation = definition.generation
            state.cursor = max(state.cursor, definition.active_since)

        await self._follow_runs(state, now)
        if definition.paused:
            state.cursor = max(state.cursor, now)
        else:
            await self._decide_slots(definition, state, now)
        state.next_fire_at = (
            None
            if definition.paused
            else next_slot(definition.cron, definition.timezone, max(state.cursor, now))
        )
        health = evaluate(state.history, state.consecutive_failures, definition.expectations, now)
        state.health = health.state
        state.conditions = [c for c in health.conditions]
        state.health_message = health.message
        await self._alerts(definition, state, health.conditions, now)
        state.history = state.history[-HISTORY_LIMIT:]
        expired = [e for e in state.claims if now - datetime.fromtimestamp(e, UTC) > CLAIM_RETENTION]
        state.claims = [e for e in state.claims if e not in expired]

        if _encode(state) != before or cached is None:
            state.updated_at = now
            try:
                revision = await self._store(state, revision)
            except KeyWrongLastSequenceError:
                # Written by someone else (a previous leader finishing its last tick): reload and
                # decide again next tick; the slot claims keep every decision either of us made.
                log.warning("schedule state changed under us; reloading", extra={"schedule": sid})
                self.loaded = False
                return
        self.states[sid] = (state, revision)
        self.metrics.observe(definition, state)
        for epoch in expired:
            await self.kv.purge(f"{FIRED_PREFIX}{sid}.{epoch}")

    async def _store(self, state: ScheduleState, revision: int) -> int:
        key = state_key(state.schedule_id)
        if revision == 0:
            return await self.kv.create(key, _encode(state))
        return await self.kv.update(key, _encode(state), last=revision)

    async def _follow_runs(self, state: ScheduleState, now: datetime) -> None:
        still_active: list[str] = []
        for run_id in state.active_runs:
            slot = next((r for r in reversed(state.history) if r.run_id == run_id), None)
            record = await self.lookup(run_id)
            if record is None:
                if slot is not None and now - slot.slot > UNRECORDED_GIVE_UP:
                    slot.outcome = "lost"
                    log.warning("a scheduled run was never recorded", extra={"run_id": run_id})
                    continue
                still_active.append(run_id)
                continue
            if slot is not None:
                slot.outcome = record.state
                slot.started_at = record.started_at
                slot.finished_at = record.finished_at
            if record.state not in TERMINAL_STATES:
                still_active.append(run_id)
                continue
            if record.state == "succeeded":
                state.consecutive_failures = 0
                state.last_success_at = record.finished_at or now
            elif record.state in FAILED_OUTCOMES:
                state.consecutive_failures += 1
        state.active_runs = still_active

    async def _decide_slots(
        self, definition: ScheduleDefinition, state: ScheduleState, now: datetime
    ) -> None:
        grace = timedelta(seconds=definition.expectations.start_grace_seconds)
        due, dropped = due_slots(
            definition.cron,
            definition.timezone,
            state.cursor,
            now,
            max(definition.catch_up_limit, HISTORY_LIMIT),
        )
        if not due:
            return
        plan = plan_slots(
            due,
            now,
            grace=grace,
            policy=definition.catch_up,
            limit=definition.catch_up_limit,
            dropped=dropped,
        )
        if plan.missed_beyond_limit:
            log.warning(
                "schedule missed more slots than its catch-up bound; the oldest are not listed",
                extra={"schedule": definition.schedule_id, "unlisted": plan.missed_beyond_limit},
            )
        fire = set(plan.fire)
        for slot in sorted([*plan.fire, *plan.missed]):
            if slot in fire:
                await self._fire(definition, state, slot, now)
            else:
                await self._record(
                    definition,
                    state,
                    slot,
                    now,
                    "missed",
                    f"missed while no scheduler was leading (catch-up policy {definition.catch_up})",
                )
            state.cursor = max(state.cursor, slot)
        state.cursor = max(state.cursor, due[-1])

    async def _claim(
        self, definition: ScheduleDefinition, state: ScheduleState, record: SlotRecord
    ) -> SlotRecord:
        """Create the slot's claim; if it exists, the decision stored there stands."""
        key = fired_key(definition.schedule_id, record.slot)
        try:
            await self.kv.create(key, _encode(record))
        except KeyWrongLastSequenceError:
            entry = await self.kv.get(key)
            assert entry.value is not None
            existing = _decode_slot(entry.value)
            log.info(
                "slot already decided",
                extra={"schedule": definition.schedule_id, "slot": record.slot.isoformat()},
            )
            record = existing
        epoch = slot_epoch(record.slot)
        if epoch not in state.claims:
            state.claims.append(epoch)
        return record

    async def _record(
        self,
        definition: ScheduleDefinition,
        state: ScheduleState,
        slot: datetime,
        now: datetime,
        status: SlotStatus,
        reason: str,
    ) -> SlotRecord:
        decided = await self._claim(
            definition, state, SlotRecord(slot=slot, status=status, reason=reason, recorded_at=now)
        )
        self._remember(state, decided)
        return decided

    def _remember(self, state: ScheduleState, record: SlotRecord) -> None:
        if any(r.slot == record.slot for r in state.history):
            return
        state.history.append(record)
        state.history.sort(key=lambda r: r.slot)
        state.last_slot = max(state.last_slot or record.slot, record.slot)

    async def _fire(
        self, definition: ScheduleDefinition, state: ScheduleState, slot: datetime, now: datetime
    ) -> None:
        sid = definition.schedule_id
        run_id = run_id_for(sid, slot)
        active = [r for r in state.active_runs if r != run_id]
        if active and definition.concurrency == "forbid":
            await self._record(
                definition,
                state,
                slot,
                now,
                "skipped",
                f"concurrency forbid: run {', '.join(active)} still active",
            )
            return
        replaced = active if definition.concurrency == "replace" else []
        reason = f"replaces run {', '.join(replaced)}" if replaced else ""
        decided = await self._claim(
            definition,
            state,
            SlotRecord(
                slot=slot, status="fired", reason=reason, run_id=run_id, outcome="requested", recorded_at=now
            ),
        )
        self._remember(state, decided)
        if decided.status != "fired" or decided.run_id is None:
            return
        if decided.reason.startswith("replaces run "):
            # Cancel what it replaces (again, if a previous leader already did: de-duplicated).
            for old in decided.reason.removeprefix("replaces run ").split(", "):
                await self._emit(
                    RunCancelRequested(
                        event_id=derived_ulid(f"schedule-replace:{old}"),
                        run_id=old,
                        requested_by=f"{REQUESTED_BY_PREFIX}{sid}",
                        reason=f"replaced by the slot {slot.isoformat()} of schedule {definition.name}",
                    ),
                    f"cancel-schedule-{old}",
                )
        await self._emit(
            RunRequested(
                event_id=derived_ulid(f"schedule-request:{decided.run_id}"),
                run_id=decided.run_id,
                project=definition.project,
                env=definition.env,
                params=msgspec.structs.replace(definition.params, schedule_id=sid, schedule_slot=slot),
                requested_by=f"{REQUESTED_BY_PREFIX}{sid}",
            ),
            f"schedule-{sid}-{slot_epoch(slot)}",
        )
        if decided.run_id not in state.active_runs:
            state.active_runs.append(decided.run_id)
        state.last_fired_at = max(state.last_fired_at or slot, slot)

    # ------------------------------------------------------------------ alerts

    async def _alerts(
        self, definition: ScheduleDefinition, state: ScheduleState, conditions: dict[str, str], now: datetime
    ) -> None:
        sid = definition.schedule_id
        interval = timedelta(seconds=definition.expectations.realert_interval_seconds)
        for condition, message in conditions.items():
            episode = state.alerts.get(condition)
            if episode is None:
                episode = AlertEpisode(
                    alert_id=derived_ulid(f"{alert_key(sid, condition)}:{now.isoformat()}"),
                    condition=condition,
                    opened_at=now,
                    last_sent_at=now,
                    message=message,
                )
                state.alerts[condition] = episode
            elif now - episode.last_sent_at >= interval:
                episode.sent += 1
                episode.last_sent_at = now
                episode.message = message
            else:
                continue
            await self._raise(definition, episode, message)
        for condition in [c for c in state.alerts if c not in conditions]:
            episode = state.alerts.pop(condition)
            await self._emit(
                AlertResolved(
                    event_id=derived_ulid(f"resolve:{episode.alert_id}"),
                    alert_id=episode.alert_id,
                    key=alert_key(sid, condition),
                    source="scheduler",
                    message=f"schedule {definition.name}: {condition.replace('_', ' ')} no more",
                ),
                f"alert-resolved-{episode.alert_id}",
            )

    async def _raise(self, definition: ScheduleDefinition, episode: AlertEpisode, message: str) -> None:
        sid = definition.schedule_id
        labels = {
            "kind": "schedule",
            "schedule": sid,
            "condition": episode.condition,
            "schedule_name": definition.name,
            # How often the delivery repeats an open episode (the schedule's re-alert interval).
            "realert_seconds": str(definition.expectations.realert_interval_seconds),
        }
        if definition.expectations.alert_channels:
            labels["channels"] = ",".join(definition.expectations.alert_channels)
        await self._emit(
            AlertRaised(
                event_id=derived_ulid(f"raise:{episode.alert_id}:{episode.sent}"),
                alert_id=episode.alert_id,
                key=alert_key(sid, episode.condition),
                severity="critical" if episode.condition == "failing" else "warning",
                source="scheduler",
                title=f"schedule {definition.name} ({definition.project}): "
                f"{episode.condition.replace('_', ' ')}",
                message=message,
                entity_kind="schedule",
                entity_id=sid,
                project=definition.project,
                labels=labels,
            ),
            f"alert-{episode.alert_id}-{episode.sent}",
        )

    # ------------------------------------------------------------------ removal

    async def _retire(self, schedule_id: str) -> None:
        """The definition was deleted: resolve its open alerts, drop its state and claims."""
        state, _ = self.states.pop(schedule_id)
        for condition, episode in state.alerts.items():
            await self._emit(
                AlertResolved(
                    event_id=derived_ulid(f"resolve:{episode.alert_id}"),
                    alert_id=episode.alert_id,
                    key=alert_key(schedule_id, condition),
                    source="scheduler",
                    message="the schedule was deleted",
                ),
                f"alert-resolved-{episode.alert_id}",
            )
        for epoch in state.claims:
            await self.kv.purge(f"{FIRED_PREFIX}{schedule_id}.{epoch}")
        await self.kv.purge(state_key(schedule_id))
        self.metrics.forget(schedule_id)

    async def _emit(self, event: Event, message_id: str) -> None:
        await self.publisher.publish(event, headers={MSG_ID: message_id})
