"""Experiments: definitions and state in the `config` KV, their life cycle, the evaluation loop,
rollout and rollback of the run-configuration defaults, and the history of every change
(docs/optimizer.md).

The optimizer is the only writer of the `config` bucket. Every change is announced on the OPS
stream (`optimizer.experiment_changed`, `optimizer.decision`, `optimizer.config_changed`), which
is the history `fabrik optimizer history` reads.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import msgspec
from nats.js.client import JetStreamContext
from nats.js.errors import KeyNotFoundError, NoKeysError
from nats.js.kv import KeyValue

from fabrik_common import experiments as ex
from fabrik_common.codec import decode_any
from fabrik_common.events import ConfigChanged, Event, ExperimentChanged, ExperimentDecision
from fabrik_common.ids import new_ulid
from fabrik_common.optimizer_rpc import ArmStatus, ExperimentCreateRequest, RpcError
from fabrik_optimizer.analytics.rebuild import _Reader, last_sequence
from fabrik_optimizer.analytics.store import AnalyticsStore
from fabrik_optimizer.experiments.samples import arm_samples, p95
from fabrik_optimizer.experiments.stats import ArmSample, DecisionPolicy, Verdict, decide, emergency

log = logging.getLogger(__name__)

Publish = Callable[[Event], Awaitable[Any]]
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
# Decisions ranked: the first one found among the treatments wins.
_RANK = {"INVALID": 0, "ROLLBACK": 1, "SHIP": 2, "STOP": 3, "CONTINUE": 4}


class ExperimentError(Exception):
    """A request that cannot be served, as the `RpcError` to answer."""

    def __init__(self, status: int, rule: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.error = RpcError(status=status, rule=rule, message=message, field=field)


@dataclass(frozen=True)
class BusinessHours:
    """The window in which medium- and high-risk experiments may start."""

    start: time
    end: time
    days: frozenset[int]
    zone: ZoneInfo

    @classmethod
    def parse(cls, hours: str, days: str, zone: str) -> BusinessHours:
        try:
            first, _, last = hours.partition("-")
            start, end = time.fromisoformat(first.strip()), time.fromisoformat(last.strip())
        except ValueError as exc:
            raise ValueError(f"FABRIK_BUSINESS_HOURS={hours!r} must be HH:MM-HH:MM") from exc
        picked = {d.strip().lower() for d in days.split(",") if d.strip()}
        unknown = picked - set(DAYS)
        if unknown:
            raise ValueError(f"FABRIK_BUSINESS_DAYS={days!r}: unknown days {sorted(unknown)} (use mon..sun)")
        return cls(start, end, frozenset(DAYS.index(d) for d in picked), ZoneInfo(zone))

    def open(self, now: datetime) -> bool:
        local = now.astimezone(self.zone)
        return local.weekday() in self.days and self.start <= local.time().replace(tzinfo=None) < self.end


@dataclass(frozen=True)
class Limits:
    max_active: int = 3
    hours: BusinessHours | None = None


def arm_status(arm: ex.Arm, sample: ArmSample) -> ArmStatus:
    costs = list(sample.costs)
    return ArmStatus(
        name=arm.name,
        overrides=dict(arm.overrides),
        runs=sample.runs,
        successes=sample.successes,
        failures=sample.failures,
        ooms=sample.ooms,
        success_rate=sample.successes / sample.runs if sample.runs else None,
        cost_per_run_usd=sum(costs) / len(costs) if costs else None,
        duration_p95_seconds=p95(list(sample.durations)),
    )


def pair_share(experiment: ex.Experiment) -> float:
    """Expected share of one treatment among the runs of the control and that treatment."""
    each = experiment.treatment_share / len(experiment.treatments)
    return each / ((1 - experiment.treatment_share) + each)


def evaluate_samples(
    experiment: ex.Experiment, samples: dict[str, ArmSample], max_duration_elapsed: bool
) -> tuple[str, list[str], dict[str, Any], str | None]:
    """(decision, reasons, numbers, winning treatment) over every treatment against the control:
    emergency checks first (a hit is a ROLLBACK), then the sequential decision per treatment;
    the most severe decision wins, and among SHIPs the treatment with the highest success rate."""
    control = samples[experiment.control.name]
    policy = DecisionPolicy(
        expected_treatment_share=pair_share(experiment),
        min_runs_per_arm=experiment.min_runs_per_arm,
        guardrails=tuple(experiment.guardrails),
        max_duration_elapsed=max_duration_elapsed,
    )
    found: list[tuple[str, str, list[str], dict[str, Any]]] = []
    for arm in experiment.treatments:
        treatment = samples[arm.name]
        alarms = emergency(control, treatment, experiment.approved_cost_ceiling)
        verdict: Verdict = decide(control, treatment, policy)
        numbers: dict[str, Any] = dict(verdict.numbers)
        if alarms:
            found.append((arm.name, "ROLLBACK", [f"emergency: {a}" for a in alarms], numbers))
        else:
            found.append((arm.name, verdict.decision, list(verdict.reasons), numbers))
    found.sort(key=lambda f: _RANK[f[1]])
    decision = found[0][1]
    winner: str | None = None
    if decision == "SHIP":
        ships = [f[0] for f in found if f[1] == "SHIP"]
        winner = max(
            ships,
            key=lambda name: samples[name].successes / samples[name].runs if samples[name].runs else 0.0,
        )
    reasons = [f"{name}: {reason}" for name, d, rs, _ in found if d == decision for reason in rs]
    numbers = {"arms": {name: nums for name, _, _, nums in found}, "decisions": {f[0]: f[1] for f in found}}
    return decision, reasons, numbers, winner


class Experiments:
    """The optimizer's experiments. One instance per optimizer (a single replica writes `config`)."""

    def __init__(
        self,
        kv: KeyValue,
        publish: Publish,
        store: Callable[[], AnalyticsStore],
        clock: Callable[[], datetime],
        limits: Limits | None = None,
    ) -> None:
        self.kv = kv
        self.publish = publish
        self.store = store
        self.clock = clock
        self.limits = limits or Limits()
        self.lock = asyncio.Lock()
        # The keys of the experiments, listed once: this optimizer is the only writer of `config`, so
        # it learns every later key from its own puts. Listing keys costs a consumer on the bucket's
        # stream each time, too many for a loop that evaluates every minute (every tick in tests).
        self._experiment_keys: set[str] | None = None
        # Set by the app when a spec repository is configured: a winner whose change belongs in a
        # spec is proposed there (the pull request's URL) instead of changing the defaults.
        self.propose_change: Callable[[ex.Experiment], Awaitable[str | None]] | None = None

    # -- storage ------------------------------------------------------------------------------

    async def _get_raw(self, key: str) -> bytes | None:
        try:
            entry = await self.kv.get(key)
        except KeyNotFoundError:
            return None
        return entry.value or None

    async def get(self, experiment_id: str) -> ex.Experiment:
        data = await self._get_raw(ex.experiment_key(experiment_id))
        if data is None:
            raise ExperimentError(404, "not_found", f"no experiment {experiment_id}", "id")
        return ex.decode_experiment(data)

    async def _keys(self) -> set[str]:
        if self._experiment_keys is None:
            try:
                listed = await self.kv.keys()
            except NoKeysError:
                listed = []
            self._experiment_keys = {k for k in listed if k.startswith(ex.EXPERIMENT_PREFIX)}
        return self._experiment_keys

    async def all(self) -> list[ex.Experiment]:
        found = []
        for key in sorted(await self._keys()):
            data = await self._get_raw(key)
            if data is not None:
                found.append(ex.decode_experiment(data))
        return sorted(found, key=lambda e: (e.created_at, e.id))

    async def _put(self, experiment: ex.Experiment) -> ex.Experiment:
        key = ex.experiment_key(experiment.id)
        await self.kv.put(key, ex.encode(experiment))
        (await self._keys()).add(key)
        return experiment

    async def defaults(self) -> ex.Defaults:
        return ex.decode_defaults(await self._get_raw(ex.DEFAULTS_KEY))

    async def pause_state(self) -> ex.OptimizerPause:
        return ex.decode_pause(await self._get_raw(ex.PAUSE_KEY))

    async def _changed(
        self,
        experiment: ex.Experiment,
        status: str,
        by: str,
        message: str = "",
        numbers: dict[str, Any] | None = None,
    ) -> None:
        await self.publish(
            ExperimentChanged(
                experiment_id=experiment.id,
                status=status,  # type: ignore[arg-type]
                by=by,
                message=message,
                numbers=numbers or {},
                occurred_at=self.clock(),
            )
        )

    # -- life cycle ---------------------------------------------------------------------------

    async def create(self, request: ExperimentCreateRequest) -> ex.Experiment:
        now = self.clock()
        fields = msgspec.structs.asdict(request)
        start = fields.pop("start")
        actor = fields.pop("actor") or "unknown"
        experiment = ex.Experiment(id=new_ulid(), created_at=now, created_by=actor, **fields)
        errors = ex.validate(experiment)
        if errors:
            field, rule = errors[0]
            detail = "; ".join(f"{f}: {r}" for f, r in errors)
            raise ExperimentError(400, rule, detail, field)
        async with self.lock:
            await self._put(experiment)
            await self._changed(
                experiment,
                "created",
                actor,
                f"{experiment.parameter}: " + ", ".join(f"{a.name}={a.overrides}" for a in experiment.arms()),
                {"treatment_share": experiment.treatment_share, "risk": experiment.risk},
            )
            if start:
                experiment = await self._start(experiment, actor)
        return experiment

    async def _start(self, experiment: ex.Experiment, actor: str) -> ex.Experiment:
        """Activate `experiment` when its guardrails allow; else say what it waits for."""
        now = self.clock()
        if ex.needs_start_approval(experiment) and not experiment.approved("start"):
            if experiment.state != "pending_approval":
                experiment = await self._put(
                    msgspec.structs.replace(
                        experiment,
                        state="pending_approval",
                        reasons=["waits for a maintainer's approval to start"],
                    )
                )
                await self._changed(
                    experiment, "pending_approval", actor, "needs a maintainer's approval to start"
                )
            return experiment
        if experiment.risk != "low" and self.limits.hours is not None and not self.limits.hours.open(now):
            reason = "approved; starts within the business-hours window"
            if reason not in experiment.reasons:
                experiment = await self._put(
                    msgspec.structs.replace(experiment, state="pending_approval", reasons=[reason])
                )
            return experiment
        active = [e for e in await self.all() if e.state == "active" and e.id != experiment.id]
        if len(active) >= self.limits.max_active:
            raise ExperimentError(
                409,
                "too_many_active",
                f"{len(active)} experiments are active (at most {self.limits.max_active}); stop one first",
            )
        experiment = await self._put(
            msgspec.structs.replace(
                experiment,
                state="active",
                started_at=experiment.started_at or now,
                reasons=[],
            )
        )
        await self._changed(experiment, "running", actor)
        return experiment

    async def action(self, experiment_id: str, action: str, actor: str, reason: str = "") -> ex.Experiment:
        async with self.lock:
            experiment = await self.get(experiment_id)
            actor = actor or "unknown"
            if action == "approve":
                return await self._approve(experiment, actor)
            if action == "pause":
                if experiment.state != "active":
                    raise ExperimentError(409, "not_active", f"experiment is {experiment.state}, not active")
                experiment = await self._put(msgspec.structs.replace(experiment, state="paused"))
                await self._changed(experiment, "paused", actor, reason)
                return experiment
            if action == "resume":
                if experiment.state not in ("paused", "draft"):
                    raise ExperimentError(
                        409, "not_paused", f"experiment is {experiment.state}, not paused or draft"
                    )
                resumed = await self._start(experiment, actor)
                if resumed.state == "active" and experiment.state == "paused":
                    await self._changed(resumed, "resumed", actor, reason)
                return resumed
            if action == "stop":
                if experiment.state in ex.ENDED_STATES:
                    raise ExperimentError(409, "ended", f"experiment already ended ({experiment.state})")
                return await self._end(
                    experiment, "stopped", actor, [reason or f"stopped by {actor}"], {}, None
                )
            if action == "rollback":
                if experiment.state != "shipped":
                    raise ExperimentError(
                        409, "not_shipped", f"experiment is {experiment.state}, not shipped"
                    )
                await self._restore_defaults(experiment, actor, "rollback")
                return await self._end(
                    experiment, "rolled_back", actor, [reason or f"rolled back by {actor}"], {}, None
                )
            raise ExperimentError(400, "unknown action", f"unknown action {action}", "action")

    async def _approve(self, experiment: ex.Experiment, actor: str) -> ex.Experiment:
        if experiment.state != "pending_approval":
            raise ExperimentError(
                409, "nothing_to_approve", f"experiment is {experiment.state}; nothing waits for approval"
            )
        kind: ex.ApprovalKind = "ship" if experiment.winner is not None else "start"
        approval = ex.Approval(by=actor, at=self.clock(), kind=kind)
        experiment = await self._put(
            msgspec.structs.replace(experiment, approvals=[*experiment.approvals, approval])
        )
        await self._changed(experiment, "approved", actor, f"approved to {kind}")
        if kind == "ship":
            return await self._rollout(experiment, actor)
        return await self._start(experiment, actor)

    async def _end(
        self,
        experiment: ex.Experiment,
        state: ex.ExperimentState,
        by: str,
        reasons: list[str],
        numbers: dict[str, Any],
        decision: str | None,
    ) -> ex.Experiment:
        experiment = await self._put(
            msgspec.structs.replace(
                experiment,
                state=state,
                ended_at=self.clock(),
                reasons=reasons,
                numbers=numbers or experiment.numbers,
                decision=decision or experiment.decision,
            )
        )
        await self._changed(experiment, state, by, "; ".join(reasons), numbers)
        return experiment

    # -- defaults -----------------------------------------------------------------------------

    async def _write_defaults(
        self, new: ex.Defaults, old: ex.Defaults, experiment: ex.Experiment | None, decision: str, by: str
    ) -> None:
        await self.kv.put(ex.DEFAULTS_KEY, ex.encode(new))
        await self.publish(
            ConfigChanged(
                key=ex.DEFAULTS_KEY,
                old=dict(old.overrides),
                new=dict(new.overrides),
                experiment_id=experiment.id if experiment else None,
                decision=decision,
                approved_by=next((a.by for a in reversed(experiment.approvals) if a.kind == "ship"), None)
                if experiment
                else None,
                by=by,
                occurred_at=self.clock(),
            )
        )

    async def _rollout(self, experiment: ex.Experiment, by: str) -> ex.Experiment:
        """Make the winning arm's overrides the defaults of every run; remember what they replace."""
        assert experiment.winner is not None
        arm = experiment.arm(experiment.winner)
        assert arm is not None
        old = await self.defaults()
        previous = {path: old.overrides.get(path) for path in arm.overrides}
        new = ex.Defaults(
            overrides={**old.overrides, **arm.overrides},
            updated_at=self.clock(),
            updated_by=by,
            experiment_id=experiment.id,
            revision=old.revision + 1,
        )
        await self._write_defaults(new, old, experiment, "ship", by)
        numbers = {**experiment.numbers, "previous_defaults": previous}
        return await self._end(
            msgspec.structs.replace(experiment, numbers=numbers),
            "shipped",
            by,
            [f"{arm.name} rolled out: {arm.overrides}"],
            numbers,
            "SHIP",
        )

    async def _restore_defaults(self, experiment: ex.Experiment, by: str, decision: str) -> None:
        """Put back the defaults a rollout of `experiment` replaced (nothing when it rolled none out)."""
        previous = experiment.numbers.get("previous_defaults")
        if not isinstance(previous, dict):
            return
        old = await self.defaults()
        overrides = dict(old.overrides)
        for path, value in previous.items():
            if value is None:
                overrides.pop(path, None)
            else:
                overrides[path] = value
        new = ex.Defaults(
            overrides=overrides,
            updated_at=self.clock(),
            updated_by=by,
            experiment_id=experiment.id,
            revision=old.revision + 1,
        )
        await self._write_defaults(new, old, experiment, decision, by)

    # -- global pause -------------------------------------------------------------------------

    async def set_pause(self, paused: bool, reason: str, actor: str) -> ex.OptimizerPause:
        if paused and not reason.strip():
            raise ExperimentError(400, "required when pausing", "reason: required when pausing", "reason")
        async with self.lock:
            old = await self.pause_state()
            new = ex.OptimizerPause(paused=paused, reason=reason, by=actor or "unknown", at=self.clock())
            await self.kv.put(ex.PAUSE_KEY, ex.encode(new))
            await self.publish(
                ConfigChanged(
                    key=ex.PAUSE_KEY,
                    old=msgspec.to_builtins(old),
                    new=msgspec.to_builtins(new),
                    decision="pause" if paused else "resume",
                    by=actor or "unknown",
                    occurred_at=self.clock(),
                )
            )
            return new

    # -- reading ------------------------------------------------------------------------------

    async def status(self, experiment: ex.Experiment) -> list[ArmStatus]:
        samples = await self._samples(experiment)
        return [arm_status(arm, samples[arm.name]) for arm in experiment.arms()]

    async def _samples(self, experiment: ex.Experiment) -> dict[str, ArmSample]:
        """Read in a worker thread on its own connection (the in-memory store: on the loop)."""
        store = self.store()
        if store.path == ":memory:":
            return arm_samples(store, experiment)

        def work() -> dict[str, ArmSample]:
            reader = store.reader()
            try:
                return arm_samples(reader, experiment)
            finally:
                reader.close()

        return await asyncio.to_thread(work)

    # -- evaluation ---------------------------------------------------------------------------

    async def evaluate(self) -> list[ex.Experiment]:
        """One round: start approved experiments whose window opened, then decide every active one
        and act on the decision. Returns the experiments that changed state."""
        changed: list[ex.Experiment] = []
        async with self.lock:
            for experiment in await self.all():
                if (
                    experiment.state == "pending_approval"
                    and experiment.winner is None
                    and (experiment.approved("start"))
                ):
                    try:
                        started = await self._start(experiment, "optimizer")
                    except ExperimentError as exc:
                        log.info("approved experiment waits", extra={"id": experiment.id, "why": str(exc)})
                        continue
                    if started.state != experiment.state:
                        changed.append(started)
                elif experiment.state == "active":
                    after = await self._evaluate_one(experiment)
                    if after.state != experiment.state:
                        changed.append(after)
        return changed

    async def _evaluate_one(self, experiment: ex.Experiment) -> ex.Experiment:
        now = self.clock()
        samples = await self._samples(experiment)
        started = experiment.started_at or experiment.created_at
        elapsed = now - started >= timedelta(seconds=experiment.max_duration_seconds)
        decision, reasons, numbers, winner = evaluate_samples(experiment, samples, elapsed)
        numbers["sample_sizes"] = {name: s.runs for name, s in samples.items()}
        if decision == "CONTINUE":
            return await self._put(
                msgspec.structs.replace(
                    experiment, decision=decision, reasons=reasons, numbers=numbers, evaluated_at=now
                )
            )
        await self.publish(
            ExperimentDecision(
                experiment_id=experiment.id,
                decision=decision.lower(),  # type: ignore[arg-type]
                numbers={**numbers, "reasons": reasons, "winner": winner},
                occurred_at=now,
            )
        )
        log.info("experiment decided", extra={"id": experiment.id, "decision": decision, "reasons": reasons})
        experiment = msgspec.structs.replace(experiment, decision=decision, numbers=numbers, evaluated_at=now)
        if decision in ("ROLLBACK", "INVALID"):
            await self._restore_defaults(experiment, "optimizer", decision.lower())
            state: ex.ExperimentState = "rolled_back" if decision == "ROLLBACK" else "invalid"
            return await self._end(experiment, state, "optimizer", reasons, numbers, decision)
        if decision == "SHIP":
            experiment = msgspec.structs.replace(experiment, winner=winner)
            if self.propose_change is not None:
                proposed = await self._propose(msgspec.structs.replace(experiment, reasons=reasons))
                if proposed is not None:
                    return proposed
            if experiment.risk == "low":
                return await self._rollout(experiment, "optimizer")
            experiment = await self._put(
                msgspec.structs.replace(
                    experiment,
                    state="pending_approval",
                    reasons=[*reasons, f"{winner} won; a maintainer's approval rolls it out"],
                )
            )
            await self._changed(
                experiment,
                "pending_approval",
                "optimizer",
                f"{winner} won; waits for approval to ship",
                numbers,
            )
            return experiment
        return await self._end(
            experiment,
            "stopped",
            "optimizer",
            reasons or ["no winner within max duration"],
            numbers,
            decision,
        )

    async def _propose(self, experiment: ex.Experiment) -> ex.Experiment | None:
        """End a winner as shipped through a pull request (defaults untouched), when the hook
        opened one."""
        assert self.propose_change is not None
        try:
            url = await self.propose_change(experiment)
        except Exception as exc:  # noqa: BLE001 - any failure: the change waits for a person
            log.warning("proposing the change failed", extra={"id": experiment.id, "error": str(exc)})
            why = f"{experiment.winner} won; the pull request could not be opened ({exc})"
            experiment = await self._put(
                msgspec.structs.replace(
                    experiment,
                    state="pending_approval",
                    reasons=[*experiment.reasons, f"{why}; a maintainer's approval rolls it out"],
                )
            )
            await self._changed(experiment, "pending_approval", "optimizer", why, experiment.numbers)
            return experiment
        if url is None:
            return None
        numbers = {**experiment.numbers, "pull_request": url}
        arm = experiment.arm(experiment.winner or "")
        change = arm.overrides if arm is not None else {}
        return await self._end(
            msgspec.structs.replace(experiment, numbers=numbers),
            "shipped",
            "optimizer",
            [f"{experiment.winner} won; pull request {url} proposes {change} (defaults unchanged)"],
            numbers,
            "SHIP",
        )


async def evaluation_loop(experiments: Experiments, interval: float) -> None:
    """Evaluate every `interval` seconds (emergency rollback within one interval)."""
    while True:
        try:
            await experiments.evaluate()
        except Exception:
            log.exception("experiment evaluation failed; tried again next round")
        await asyncio.sleep(interval)


def history_entry(event: Event) -> dict[str, Any] | None:
    """A history row from an `optimizer.*` event (None for the others, e.g. budget crossings)."""
    at = event.occurred_at
    if isinstance(event, ExperimentChanged):
        return {
            "at": at,
            "type": "experiment",
            "experiment_id": event.experiment_id,
            "status": event.status,
            "by": event.by,
            "message": event.message,
            "numbers": event.numbers,
        }
    if isinstance(event, ExperimentDecision):
        return {
            "at": at,
            "type": "decision",
            "experiment_id": event.experiment_id,
            "decision": event.decision,
            "by": event.approved_by or "optimizer",
            "numbers": event.numbers,
        }
    if isinstance(event, ConfigChanged):
        return {
            "at": at,
            "type": "config",
            "experiment_id": event.experiment_id,
            "decision": event.decision,
            "by": event.by or event.approved_by,
            "key": event.key,
            "old": event.old,
            "new": event.new,
            "message": f"approved by {event.approved_by}" if event.approved_by else "",
        }
    return None


def keep_last(rows: Sequence[dict[str, Any]], limit: int, experiment_id: str | None) -> list[dict[str, Any]]:
    picked = [r for r in rows if experiment_id is None or r.get("experiment_id") == experiment_id]
    return picked[-limit:]


async def read_history(js: JetStreamContext, experiment_id: str | None, limit: int) -> list[dict[str, Any]]:
    """The `optimizer.*` events of the OPS stream as history rows, oldest first, the last `limit`."""
    end = await last_sequence(js, "OPS")
    rows: list[dict[str, Any]] = []
    if end == 0:
        return rows
    reader = _Reader(js, "OPS", "fabrik.optimizer.>", 1)
    await reader.start()
    try:
        while True:
            batch = await reader.read(1000)
            if not batch:
                break
            for _, msg in batch:
                try:
                    event = decode_any(msg.data)
                except (msgspec.ValidationError, msgspec.DecodeError) as exc:
                    log.warning(
                        "an optimizer event does not decode; left out of the history",
                        extra={"error": str(exc)},
                    )
                    continue
                row = history_entry(event)
                if row is not None:
                    rows.append(row)
            if batch[-1][0] >= end:
                break
    finally:
        await reader.close()
    return keep_last(rows, limit, experiment_id)
