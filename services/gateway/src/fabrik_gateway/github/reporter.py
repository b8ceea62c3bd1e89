"""Runs started from GitHub report back: a check run on the commit (or, with a plain token, a
commit status), updated as the run goes, and a comment with the outcome on the issue or PR.

Where a run came from is its *origin*, kept in the KV bucket `integrations` under
`github.<run_id>` (`GithubOrigin`). An origin holds what GitHub should show (`desired`, a
`Report`) and what it was last told (`reported`); run events and the reconciler only move
`desired` forward (a later attempt, or a later status of the same attempt:
queued < in_progress < completed; a completed report never changes), and `sync` pushes the
difference to GitHub. So a redelivered or out-of-order event changes nothing twice, and a GitHub
failure loses nothing: `desired` is durable, the push is retried (bus `Retry`, then the
reconciler) until `reported` equals it.

Pushes to GitHub for one run are serialized by a lease in the origin (`lease_owner`,
`lease_until`): whoever holds it pushes until nothing is left, and releases it only in the same
revision-checked write that sees nothing left, so a `desired` written meanwhile is never stranded.
Others just write `desired` and leave. A holder that dies loses the lease after `LEASE_SECONDS`.

Everything here is NATS-free: the store is an `OriginStore` (the KV bucket in production, a dict
in unit tests), the API a `GithubClient`.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final, Literal, Protocol

import msgspec
import nats.js.errors
from nats.js.kv import KeyValue

from fabrik_common.events import (
    TERMINAL_STATES,
    RunProgress,
    RunQueued,
    RunStarted,
    RunState,
    RunStateChanged,
)
from fabrik_common.ids import utcnow
from fabrik_common.runs import Progress, RunRecord
from fabrik_gateway.github.client import CheckConclusion, GithubApiError, GithubClient, StatusState

log = logging.getLogger(__name__)

CHECK_NAME: Final = "fabrik"
STATUS_CONTEXT: Final = "fabrik"
KEY_PREFIX: Final = "github."
PROGRESS_INTERVAL_SECONDS: Final = 10.0
"""At most one progress-only update per run this often (status changes are never held back)."""
LEASE_SECONDS: Final = 60.0
MAX_CAS_ATTEMPTS: Final = 20

ReportStatus = Literal["queued", "in_progress", "completed"]
_RANK: Final[dict[str, int]] = {"queued": 0, "in_progress": 1, "completed": 2}
CONCLUSIONS: Final[dict[str, CheckConclusion]] = {
    "succeeded": "success",
    "failed": "failure",
    "cancelled": "cancelled",
    "timed_out": "timed_out",
    "budget_exceeded": "failure",
}
_STATUS_STATES: Final[dict[str, StatusState]] = {
    "success": "success",
    "failure": "failure",
    "timed_out": "failure",
    "cancelled": "error",
}
_TITLES: Final[dict[str, str]] = {
    "queued": "Queued",
    "starting": "Starting",
    "running": "Running",
    "cancelling": "Cancelling",
    "succeeded": "Succeeded",
    "failed": "Failed",
    "cancelled": "Cancelled",
    "timed_out": "Timed out",
    "budget_exceeded": "Budget exceeded",
}
_ICONS: Final[dict[str, str]] = {
    "succeeded": "✅",
    "failed": "❌",
    "cancelled": "⏹️",
    "timed_out": "⏱️",
    "budget_exceeded": "💸",
}


class Report(msgspec.Struct, frozen=True, kw_only=True):
    """What GitHub should show for one attempt of a run."""

    attempt: int
    status: ReportStatus
    state: RunState
    conclusion: CheckConclusion | None = None
    title: str
    summary: str
    started_at: datetime | None = None
    completed_at: datetime | None = None


class GithubOrigin(msgspec.Struct, kw_only=True):
    """Value of `integrations` / `github.<run_id>`: where a run came from and what GitHub shows."""

    version: int = 1
    run_id: str
    project: str
    env: str = "dev"
    owner: str
    repo: str
    installation_id: int | None = None
    number: int
    """The issue or pull request the run was started from (the outcome comment goes there)."""
    is_pull: bool = False
    sha: str
    ref: str = ""
    clone_url: str = ""
    trigger: str
    sender: str
    delivery_id: str
    command: str = ""
    comment_id: int | None = None
    html_url: str = ""
    mode: Literal["check_run", "status"]
    desired: Report
    desired_at: datetime
    reported: Report | None = None
    check_runs: dict[str, int] = msgspec.field(default_factory=dict)
    """Check run id per attempt (keys are attempt numbers as text)."""
    commented_attempt: int = 0
    last_error: str | None = None
    lease_owner: str | None = None
    lease_until: datetime | None = None
    created_at: datetime
    updated_at: datetime

    @property
    def repository(self) -> str:
        return f"{self.owner}/{self.repo}"

    @property
    def push_due(self) -> bool:
        return self.reported != self.desired

    @property
    def comment_due(self) -> bool:
        return self.desired.status == "completed" and self.commented_attempt < self.desired.attempt

    @property
    def needs_work(self) -> bool:
        return self.push_due or self.comment_due

    def leased_by_other(self, holder: str, now: datetime) -> bool:
        return self.leased(now) and self.lease_owner != holder

    def leased(self, now: datetime) -> bool:
        """Whether someone holds the lease (it has not expired)."""
        return self.lease_owner is not None and self.lease_until is not None and self.lease_until > now


_origins = msgspec.json.Decoder(GithubOrigin)


def origin_key(run_id: str) -> str:
    return f"{KEY_PREFIX}{run_id}"


def decode_origin(data: bytes) -> GithubOrigin:
    return _origins.decode(data)


# ------------------------------------------------------------------------------------------------
# what a run event (or a run record) says


@dataclass(frozen=True)
class Observation:
    """A run's state at some point, from an event or from its record."""

    attempt: int
    state: RunState
    at: datetime
    reason: str | None = None
    message: str = ""
    progress: Progress | None = None


def observe_event(event: object) -> Observation | None:
    """What a `RUNS` event says about the state GitHub should show; None for the others."""
    if isinstance(event, RunStateChanged):
        return Observation(
            attempt=event.attempt,
            state=event.to_state,
            at=event.occurred_at,
            reason=event.reason,
            message=event.message,
        )
    if isinstance(event, RunQueued):
        return Observation(attempt=event.attempt, state="queued", at=event.occurred_at)
    if isinstance(event, RunStarted):
        return Observation(attempt=event.attempt, state="running", at=event.occurred_at)
    if isinstance(event, RunProgress):
        return Observation(
            attempt=event.attempt,
            state="running",
            at=event.occurred_at,
            progress=Progress(
                phase=event.phase,
                task=event.task,
                finished=event.finished,
                total=event.total,
                message=event.message,
                updated_at=event.occurred_at,
            ),
        )
    return None


def observe_record(record: RunRecord) -> Observation:
    has_progress = any(
        v is not None for v in (record.progress.phase, record.progress.finished, record.progress.message)
    )
    return Observation(
        attempt=record.attempt,
        state=record.state,
        at=record.state_entered_at,
        reason=record.reason,
        message=record.message,
        progress=record.progress if has_progress and record.state not in TERMINAL_STATES else None,
    )


def status_of(state: str) -> ReportStatus:
    if state == "queued":
        return "queued"
    if state in TERMINAL_STATES:
        return "completed"
    return "in_progress"


# ------------------------------------------------------------------------------------------------
# rendering


def progress_line(progress: Progress) -> str:
    parts: list[str] = []
    if progress.phase:
        parts.append(progress.phase)
    if progress.task:
        parts.append(f"task {progress.task}")
    if progress.finished is not None and progress.total:
        parts.append(f"{progress.finished}/{progress.total} ({100 * progress.finished // progress.total}%)")
    elif progress.finished is not None:
        parts.append(str(progress.finished))
    return " · ".join(parts)


def duration_text(seconds: float) -> str:
    total = round(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


def title_for(observation: Observation) -> str:
    title = _TITLES.get(observation.state, observation.state)
    if observation.state == "failed" and observation.reason:
        title += f": {observation.reason.replace('_', ' ')}"
    if observation.progress is not None and observation.state == "running":
        line = progress_line(observation.progress)
        if line:
            title += f": {line}"
    return title


def summary_for(origin: GithubOrigin, observation: Observation, link: str, record: RunRecord | None) -> str:
    lines = [
        f"Fabrik run [`{origin.run_id}`]({link}) · project `{origin.project}` · env `{origin.env}` · "
        f"attempt {observation.attempt}",
        "",
        f"Started by @{origin.sender} {_how(origin)} on commit `{origin.sha[:12]}`.",
    ]
    progress = observation.progress
    if progress is not None:
        line = progress_line(progress)
        if line:
            lines += ["", f"**Progress:** {line}"]
        if progress.message:
            lines += ["", _quote(progress.message)]
    if observation.state in TERMINAL_STATES:
        lines += ["", f"**Outcome:** {_TITLES.get(observation.state, observation.state)}"]
        if observation.reason:
            lines[-1] += f" ({observation.reason})"
        if observation.message:
            lines += ["", _quote(observation.message)]
        facts = _facts(record)
        if facts:
            lines += ["", facts]
    return "\n".join(lines)


def comment_for(origin: GithubOrigin, report: Report, link: str, record: RunRecord | None) -> str:
    icon = _ICONS.get(report.state, "")
    head = f"{icon} **Fabrik run [`{origin.run_id}`]({link}) {report.title.lower()}**".replace("  ", " ")
    lines = [
        head.strip(),
        "",
        f"project `{origin.project}` · env `{origin.env}` · commit `{origin.sha[:12]}` · "
        f"attempt {report.attempt}",
    ]
    facts = _facts(record)
    if facts:
        lines[-1] += f" · {facts}"
    if record is not None and record.message and report.state != "succeeded":
        lines += ["", _quote(record.message)]
    lines += ["", f"<sub>Started by @{origin.sender} {_how(origin)}.</sub>"]
    return "\n".join(lines)


def _how(origin: GithubOrigin) -> str:
    if origin.trigger == "comment":
        return f"with `{origin.command}`" if origin.command else "with a comment"
    return "by labelling"


def _quote(text: str) -> str:
    return "\n".join(f"> {line}" for line in text.strip().splitlines()[:20])


def _facts(record: RunRecord | None) -> str:
    if record is None:
        return ""
    facts: list[str] = []
    if record.started_at is not None and record.finished_at is not None:
        facts.append(f"took {duration_text((record.finished_at - record.started_at).total_seconds())}")
    if record.cost_usd:
        facts.append(f"LLM cost ${record.cost_usd:.2f}")
    return " · ".join(facts)


def report_for(
    origin: GithubOrigin, observation: Observation, link: str, record: RunRecord | None = None
) -> Report:
    status = status_of(observation.state)
    return Report(
        attempt=observation.attempt,
        status=status,
        state=observation.state,
        conclusion=CONCLUSIONS.get(observation.state) if status == "completed" else None,
        title=title_for(observation),
        summary=summary_for(origin, observation, link, record),
        started_at=observation.at if status == "in_progress" else None,
        completed_at=observation.at if status == "completed" else None,
    )


# ------------------------------------------------------------------------------------------------
# moving `desired` forward


def is_ahead(new: Report, current: Report, *, same_status: bool) -> bool:
    """Whether `new` may replace `current`: a later attempt, a later status of the same attempt,
    or (with `same_status`) new progress of a running attempt. A completed report is final."""
    if new.attempt != current.attempt:
        return new.attempt > current.attempt
    if _RANK[new.status] != _RANK[current.status]:
        return _RANK[new.status] > _RANK[current.status]
    return (
        same_status
        and new.status == "in_progress"
        and (new.title, new.summary, new.state) != (current.title, current.summary, current.state)
    )


def advanced(
    origin: GithubOrigin, report: Report, now: datetime, *, same_status: bool = True
) -> GithubOrigin | None:
    """The origin with `report` as its desired state, or None when it is not ahead."""
    if not is_ahead(report, origin.desired, same_status=same_status):
        return None
    current = origin.desired
    if (
        report.attempt == current.attempt
        and report.status != "queued"
        and current.started_at is not None
        and (report.started_at is None or current.started_at < report.started_at)
    ):
        report = msgspec.structs.replace(report, started_at=current.started_at)
    return msgspec.structs.replace(origin, desired=report, desired_at=now, updated_at=now)


def is_progress_only(origin: GithubOrigin, report: Report) -> bool:
    """Same attempt, same running state: only the progress differs (what the throttle holds back)."""
    current = origin.desired
    return (
        report.attempt == current.attempt
        and report.status == current.status == "in_progress"
        and report.state == current.state
    )


# ------------------------------------------------------------------------------------------------
# the store


class OriginStore(Protocol):
    async def get(self, run_id: str) -> GithubOrigin | None: ...

    async def create(self, origin: GithubOrigin) -> bool:
        """Store a new origin; False when one exists already (it is kept)."""
        ...

    async def update(
        self, run_id: str, change: Callable[[GithubOrigin], GithubOrigin | None]
    ) -> tuple[GithubOrigin, bool] | None:
        """Apply `change` to the latest origin and store the result (revision-checked, retried on
        conflicts); `change` returning None stores nothing. Returns the latest origin and whether
        it was changed now; None when there is no origin for the run."""
        ...


class KvOriginStore:
    """The `integrations` KV bucket."""

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    async def _load(self, run_id: str) -> tuple[GithubOrigin, int] | None:
        try:
            entry = await self.kv.get(origin_key(run_id))
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return None
        try:
            return decode_origin(entry.value or b""), entry.revision or 0
        except msgspec.DecodeError as exc:
            log.warning("undecodable GitHub origin ignored", extra={"run_id": run_id, "error": str(exc)})
            return None

    async def get(self, run_id: str) -> GithubOrigin | None:
        loaded = await self._load(run_id)
        return loaded[0] if loaded else None

    async def create(self, origin: GithubOrigin) -> bool:
        try:
            await self.kv.create(origin_key(origin.run_id), msgspec.json.encode(origin))
        except nats.js.errors.KeyWrongLastSequenceError:
            return False
        return True

    async def update(
        self, run_id: str, change: Callable[[GithubOrigin], GithubOrigin | None]
    ) -> tuple[GithubOrigin, bool] | None:
        for _ in range(MAX_CAS_ATTEMPTS):
            loaded = await self._load(run_id)
            if loaded is None:
                return None
            origin, revision = loaded
            new = change(origin)
            if new is None:
                return origin, False
            try:
                await self.kv.update(origin_key(run_id), msgspec.json.encode(new), last=revision)
            except nats.js.errors.KeyWrongLastSequenceError:
                continue
            return new, True
        raise RuntimeError(f"GitHub origin of run {run_id} kept changing; giving up this time")


class MemoryOriginStore:
    """For tests: the same semantics in a dict (values are copied, like a real store)."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}

    async def get(self, run_id: str) -> GithubOrigin | None:
        data = self.data.get(run_id)
        return decode_origin(data) if data is not None else None

    async def create(self, origin: GithubOrigin) -> bool:
        if origin.run_id in self.data:
            return False
        self.data[origin.run_id] = msgspec.json.encode(origin)
        return True

    async def update(
        self, run_id: str, change: Callable[[GithubOrigin], GithubOrigin | None]
    ) -> tuple[GithubOrigin, bool] | None:
        current = await self.get(run_id)
        if current is None:
            return None
        new = change(current)
        if new is None:
            return current, False
        self.data[run_id] = msgspec.json.encode(new)
        return new, True


# ------------------------------------------------------------------------------------------------
# pushing to GitHub


class Reporter:
    def __init__(
        self,
        store: OriginStore,
        client: GithubClient,
        *,
        link: Callable[[str], str],
        lookup_run: Callable[[str], RunRecord | None] = lambda _: None,
        now: Callable[[], datetime] = utcnow,
        owner: str | None = None,
    ) -> None:
        self.store = store
        self.client = client
        self.link = link
        self.lookup_run = lookup_run
        self.now = now
        self.owner = owner or uuid.uuid4().hex
        """This replica; each `sync` holds the lease as `<owner>/<random>`."""
        self.pending_progress: dict[str, Report] = {}
        """Progress held back by the throttle, per run, flushed by `flush_progress`."""

    # ---------------------------------------------------------------- entry points

    async def start(self, origin: GithubOrigin) -> GithubOrigin:
        """Store a new origin (an existing one is kept), catch up with the run's current state,
        and push. Returns the stored origin."""
        created = await self.store.create(origin)
        if not created:
            log.info("GitHub origin exists already", extra={"run_id": origin.run_id})
        record = self.lookup_run(origin.run_id)
        if record is not None:
            await self.observe(origin.run_id, observe_record(record), same_status=False)
        await self.sync(origin.run_id)
        stored = await self.store.get(origin.run_id)
        return stored or origin

    async def on_event(self, event: object) -> None:
        """A `RUNS` event: move `desired` forward and push. Raises `GithubApiError` for a push
        that can be retried."""
        observation = observe_event(event)
        if observation is None:
            return
        run_id = getattr(event, "run_id", None)
        if not isinstance(run_id, str):
            return
        await self.observe(run_id, observation, same_status=True)
        await self.sync(run_id)

    async def observe(self, run_id: str, observation: Observation, *, same_status: bool) -> bool:
        """Move the run's `desired` forward; progress-only changes at most every
        `PROGRESS_INTERVAL_SECONDS` (the rest waits in `pending_progress`). Whether it changed."""
        record = self.lookup_run(run_id)
        now = self.now()
        held: list[Report] = []

        def change(origin: GithubOrigin) -> GithubOrigin | None:
            held.clear()
            report = report_for(origin, observation, self.link(run_id), record)
            if (
                same_status
                and is_progress_only(origin, report)
                and (now - origin.desired_at).total_seconds() < PROGRESS_INTERVAL_SECONDS
            ):
                if is_ahead(report, origin.desired, same_status=True):
                    held.append(report)
                return None
            return advanced(origin, report, now, same_status=same_status)

        result = await self.store.update(run_id, change)
        if held:
            self.pending_progress[run_id] = held[0]
        elif result is not None and result[1]:
            pending = self.pending_progress.get(run_id)
            if pending is not None and not is_ahead(pending, result[0].desired, same_status=True):
                del self.pending_progress[run_id]
        return bool(result and result[1])

    async def flush_progress(self) -> None:
        """Write held-back progress whose throttle interval has passed, and push it."""
        now = self.now()
        for run_id, report in list(self.pending_progress.items()):
            origin = await self.store.get(run_id)
            if origin is None or not is_ahead(report, origin.desired, same_status=True):
                self.pending_progress.pop(run_id, None)
                continue
            if (now - origin.desired_at).total_seconds() < PROGRESS_INTERVAL_SECONDS:
                continue
            self.pending_progress.pop(run_id, None)

            def change(current: GithubOrigin, report: Report = report) -> GithubOrigin | None:
                return advanced(current, report, now)

            await self.store.update(run_id, change)
            await self.sync(run_id)

    async def reconcile(self, origin: GithubOrigin) -> None:
        """Catch up with the run record (events missed before the origin existed, a dead-lettered
        event) and push what is due. For the periodic sweep."""
        record = self.lookup_run(origin.run_id)
        if record is not None:
            await self.observe(origin.run_id, observe_record(record), same_status=False)
        await self.sync(origin.run_id)

    # ---------------------------------------------------------------- the push

    async def sync(self, run_id: str) -> GithubOrigin | None:
        """Push `desired` (and the outcome comment) to GitHub, holding the run's lease. Returns the
        origin as last stored, or None when there is none or another replica holds the lease.
        Raises `GithubApiError` when GitHub failed in a way worth retrying (the lease is released
        first, `desired` stays for the retry).

        Each call is its own lease holder (`<owner>/<random>`), so concurrent calls in one replica
        (a consumer and the reconciler) are serialized like calls in different replicas."""
        now = self.now()
        holder = f"{self.owner}/{uuid.uuid4().hex[:8]}"

        def acquire(origin: GithubOrigin) -> GithubOrigin | None:
            if not origin.needs_work or origin.leased_by_other(holder, now):
                return None
            return msgspec.structs.replace(
                origin,
                lease_owner=holder,
                lease_until=now + timedelta(seconds=LEASE_SECONDS),
                updated_at=now,
            )

        result = await self.store.update(run_id, acquire)
        if result is None:
            return None
        origin, acquired = result
        if not acquired:
            return origin if not origin.needs_work else None
        try:
            while True:
                if origin.push_due:
                    origin = await self._push(origin)
                elif origin.comment_due:
                    origin = await self._comment(origin)
                released = await self._release_if_done(run_id, holder)
                if released is None:
                    return None
                origin, done = released
                if done:
                    return origin
        except BaseException:
            await self._release(run_id, holder)
            raise

    async def _release_if_done(self, run_id: str, holder: str) -> tuple[GithubOrigin, bool] | None:
        """Release the lease when nothing is left; otherwise renew it and go on."""
        now = self.now()

        def change(origin: GithubOrigin) -> GithubOrigin | None:
            if origin.lease_owner != holder:
                return None
            if origin.needs_work:
                return msgspec.structs.replace(origin, lease_until=now + timedelta(seconds=LEASE_SECONDS))
            return msgspec.structs.replace(origin, lease_owner=None, lease_until=None)

        result = await self.store.update(run_id, change)
        if result is None:
            return None
        origin, _ = result
        if origin.lease_owner is None:
            return origin, True  # released: nothing was left
        if origin.lease_owner != holder:
            return None  # lost the lease (expired and taken over): the new holder goes on
        return origin, False

    async def _release(self, run_id: str, holder: str) -> None:
        def change(origin: GithubOrigin) -> GithubOrigin | None:
            if origin.lease_owner != holder:
                return None
            return msgspec.structs.replace(origin, lease_owner=None, lease_until=None)

        try:
            await self.store.update(run_id, change)
        except Exception:  # the lease expires anyway
            log.warning("could not release the GitHub lease", extra={"run_id": run_id}, exc_info=True)

    async def _push(self, origin: GithubOrigin) -> GithubOrigin:
        report = origin.desired
        link = self.link(origin.run_id)
        check_run_id = origin.check_runs.get(str(report.attempt))
        error: str | None = None
        try:
            if origin.mode == "check_run":
                check_run_id = await self._push_check_run(origin, report, check_run_id, link)
            else:
                await self.client.create_status(
                    origin.owner,
                    origin.repo,
                    origin.sha,
                    installation_id=origin.installation_id,
                    state=_STATUS_STATES.get(report.conclusion or "", "pending")
                    if report.status == "completed"
                    else "pending",
                    target_url=link,
                    description=f"{report.title} (attempt {report.attempt})",
                    context=STATUS_CONTEXT,
                )
        except GithubApiError as exc:
            if exc.retryable:
                raise
            # GitHub will never accept this (permissions, a deleted repository): note it and go on,
            # rather than retrying forever.
            error = str(exc)
            log.error(  # noqa: TRY400 - an answer from GitHub, no traceback needed
                "GitHub refused a run report; not retrying",
                extra={"run_id": origin.run_id, "error": error},
            )
        now = self.now()

        def change(current: GithubOrigin) -> GithubOrigin | None:
            check_runs = dict(current.check_runs)
            if check_run_id is not None:
                check_runs[str(report.attempt)] = check_run_id
            return msgspec.structs.replace(
                current, reported=report, check_runs=check_runs, last_error=error, updated_at=now
            )

        result = await self.store.update(origin.run_id, change)
        if result is None:
            raise RuntimeError(f"the GitHub origin of run {origin.run_id} disappeared")
        return result[0]

    async def _push_check_run(
        self, origin: GithubOrigin, report: Report, check_run_id: int | None, link: str
    ) -> int:
        async def update(check_run: int) -> None:
            await self.client.update_check_run(
                origin.owner,
                origin.repo,
                check_run,
                installation_id=origin.installation_id,
                details_url=link,
                status=report.status,
                conclusion=report.conclusion,
                title=report.title,
                summary=report.summary,
                started_at=report.started_at,
                completed_at=report.completed_at,
            )

        if check_run_id is not None:
            try:
                await update(check_run_id)
                return check_run_id
            except GithubApiError as exc:
                if exc.status != 404:
                    raise
                log.warning("check run gone; creating a new one", extra={"run_id": origin.run_id})
        external_id = f"{origin.run_id}/{report.attempt}"
        # One created before a crash (its id never made it into the origin) is reused.
        existing = await self.client.find_check_run(
            origin.owner,
            origin.repo,
            origin.sha,
            installation_id=origin.installation_id,
            name=CHECK_NAME,
            external_id=external_id,
        )
        if existing is not None:
            await update(existing)
            return existing
        return await self.client.create_check_run(
            origin.owner,
            origin.repo,
            installation_id=origin.installation_id,
            name=CHECK_NAME,
            head_sha=origin.sha,
            external_id=external_id,
            details_url=link,
            status=report.status,
            conclusion=report.conclusion,
            title=report.title,
            summary=report.summary,
            started_at=report.started_at,
            completed_at=report.completed_at,
        )

    async def _comment(self, origin: GithubOrigin) -> GithubOrigin:
        report = origin.desired
        record = self.lookup_run(origin.run_id)
        error: str | None = origin.last_error
        try:
            await self.client.create_comment(
                origin.owner,
                origin.repo,
                origin.number,
                comment_for(origin, report, self.link(origin.run_id), record),
                installation_id=origin.installation_id,
            )
        except GithubApiError as exc:
            if exc.retryable:
                raise
            error = str(exc)
            log.error(  # noqa: TRY400 - an answer from GitHub, no traceback needed
                "GitHub refused the outcome comment; not retrying",
                extra={"run_id": origin.run_id, "error": error},
            )
        now = self.now()

        def change(current: GithubOrigin) -> GithubOrigin | None:
            return msgspec.structs.replace(
                current,
                commented_attempt=max(current.commented_attempt, report.attempt),
                last_error=error,
                updated_at=now,
            )

        result = await self.store.update(origin.run_id, change)
        if result is None:
            raise RuntimeError(f"the GitHub origin of run {origin.run_id} disappeared")
        return result[0]


def new_origin(
    *,
    run_id: str,
    project: str,
    env: str,
    owner: str,
    repo: str,
    installation_id: int | None,
    number: int,
    is_pull: bool,
    sha: str,
    ref: str,
    clone_url: str,
    trigger: str,
    sender: str,
    delivery_id: str,
    command: str,
    comment_id: int | None,
    html_url: str,
    mode: Literal["check_run", "status"],
    link: str,
    now: datetime,
) -> GithubOrigin:
    """An origin whose desired state is "queued, attempt 1"."""
    placeholder = Report(attempt=1, status="queued", state="queued", title="", summary="")
    origin = GithubOrigin(
        run_id=run_id,
        project=project,
        env=env,
        owner=owner,
        repo=repo,
        installation_id=installation_id,
        number=number,
        is_pull=is_pull,
        sha=sha,
        ref=ref,
        clone_url=clone_url,
        trigger=trigger,
        sender=sender,
        delivery_id=delivery_id,
        command=command,
        comment_id=comment_id,
        html_url=html_url,
        mode=mode,
        desired=placeholder,
        desired_at=now,
        created_at=now,
        updated_at=now,
    )
    origin.desired = report_for(origin, Observation(attempt=1, state="queued", at=now), link)
    return origin
