"""The gateway's state: read model, feeds from the `runs` and `queue` buckets, and the commands
(submit, cancel, resume) that publish requests. The HTTP layer (`api/`) only translates."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import logging
from datetime import datetime
from typing import Final

import msgspec
import nats.js.errors
from nats.js.kv import KeyValue

from fabrik_common.bus import Bus, PublishError
from fabrik_common.envs import EnvKeyMissingError, require_key_if_used
from fabrik_common.events import TERMINAL_STATES, Event, RunCancelRequested, RunRequested, RunResumeRequested
from fabrik_common.ids import is_ulid, new_ulid
from fabrik_common.runs import QueueSnapshot, RunRecord, resume_refusal
from fabrik_common.service import Service
from fabrik_gateway.auth import Principal, require_role
from fabrik_gateway.auth.guard import Authenticator, RateLimiter
from fabrik_gateway.auth.jwt import JwtSettings
from fabrik_gateway.auth.tokens import TokenStore
from fabrik_gateway.envs import EnvService
from fabrik_gateway.metrics import GatewayMetrics
from fabrik_gateway.models import ActionAccepted, RunView
from fabrik_gateway.problems import ProblemError, not_found
from fabrik_gateway.readmodel import ReadModel
from fabrik_gateway.settings import GatewaySettings
from fabrik_gateway.streams import EventReader, LogReader
from fabrik_gateway.validation import (
    SubmitLimits,
    ValidSubmit,
    check_idempotency_key,
    to_parameters,
    validate_submit,
)

log = logging.getLogger(__name__)

RUNS_BUCKET: Final = "runs"
QUEUE_BUCKET: Final = "queue"
QUEUE_KEY: Final = "snapshot"
IDEMPOTENCY_BUCKET: Final = "idempotency"
TOKENS_BUCKET: Final = "tokens"
IDEMPOTENCY_HEADER: Final = "Idempotency-Key"
_DELETES: Final = ("DEL", "PURGE")
FOLLOWERS_GRACE_SECONDS: Final = 2.0

_records = msgspec.json.Decoder(RunRecord)
_snapshots = msgspec.json.Decoder(QueueSnapshot)


class IdempotencyRecord(msgspec.Struct, frozen=True, kw_only=True):
    """Value of the `idempotency` bucket: the run an Idempotency-Key created, and the request."""

    run_id: str
    body_hash: str
    event_id: str
    requested_at: datetime


_idempotency = msgspec.json.Decoder(IdempotencyRecord)


def idempotency_kv_key(project: str, subject: str, key: str) -> str:
    """Keys are scoped by project and by caller: another caller's key never answers their run."""
    digest = hashlib.sha256(subject.encode() + b"\0" + key.encode()).hexdigest()
    return f"{project}.{digest}"


def normalize_run_id(text: str) -> str | None:
    """A run id as stored (upper case), or None when it cannot be a ULID."""
    return text.upper() if is_ulid(text) else None


def pending_record(event: RunRequested) -> RunRecord:
    spec_id = event.params.spec.get("id") if event.params.spec else None
    return RunRecord(
        run_id=event.run_id,
        project=event.project,
        env=event.env,
        spec_id=spec_id if isinstance(spec_id, str) else None,
        params=event.params,
        state="queued",
        attempt=1,
        requested_by=event.requested_by,
        idempotency_key=event.idempotency_key,
        created_at=event.occurred_at,
        state_entered_at=event.occurred_at,
    )


class Gateway:
    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.readmodel = ReadModel(queue_ahead_max=settings.queue_ahead_max)
        self.limits = SubmitLimits(
            require_image_digest=settings.require_image_digest, max_labels=settings.max_labels
        )
        self.metrics: GatewayMetrics | None = None
        self.envs = EnvService(
            encryption_key=settings.env_encryption_key,
            encryption_key_file=settings.env_encryption_key_file,
            max_value_bytes=settings.env_max_value_bytes,
            max_keys=settings.env_max_keys,
            max_total_bytes=settings.env_max_total_bytes,
        )
        self.tokens = TokenStore(settings.token_last_used_interval_seconds)
        self.auth = Authenticator(
            anonymous_role=settings.anonymous_role,
            jwt=JwtSettings(
                hs256_secret=settings.secret("jwt_hs256_secret").encode(),
                oidc_issuer=settings.oidc_issuer,
                oidc_jwks_url=settings.oidc_jwks_url,
                hs256_issuer=settings.jwt_issuer,
                audience=settings.jwt_audience,
                roles_claim=settings.jwt_roles_claim,
                leeway_seconds=settings.jwt_leeway_seconds,
                jwks_refresh_seconds=settings.jwks_refresh_seconds,
            ),
            tokens=self.tokens,
            limiter=RateLimiter(settings.rate_limit_per_minute, settings.rate_limit_burst),
        )
        self._service: Service[Gateway] | None = None
        self._idempotency: KeyValue | None = None
        self._logs: LogReader | None = None
        self._events: EventReader | None = None
        self.stopping = False
        self.followers = 0
        """Log streams being followed right now (they end when the service stops)."""
        self._no_followers = asyncio.Event()
        self._no_followers.set()

    # ---------------------------------------------------------------- lifecycle

    def attach(self, service: Service[Gateway]) -> None:
        self._service = service
        self.metrics = GatewayMetrics(service.registry, lambda: len(self.readmodel))
        service.probe.add_check("read_model", lambda: self.readmodel.ready)

    async def on_start(self, service: Service[Gateway]) -> Gateway:
        js = service.bus.js
        self._idempotency = await js.key_value(IDEMPOTENCY_BUCKET)
        self.tokens.attach(await js.key_value(TOKENS_BUCKET))
        self._logs = LogReader(js)
        self._events = EventReader(js)
        try:
            await require_key_if_used(js, self.envs.cipher, "gateway")
        except EnvKeyMissingError as exc:
            log.critical("cannot start: %s", exc)
            raise SystemExit(2) from None
        await self.envs.start(js, service.bus.publish)
        self.stopping = False
        return self

    async def on_stop(self, _: Gateway) -> None:
        """Followed log streams end (with an `end` event) before the NATS connection closes."""
        self.stopping = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._no_followers.wait(), FOLLOWERS_GRACE_SECONDS)
        await self.tokens.close()

    def follower_started(self) -> None:
        self.followers += 1
        self._no_followers.clear()

    def follower_ended(self) -> None:
        self.followers -= 1
        if self.followers == 0:
            self._no_followers.set()

    @property
    def bus(self) -> Bus:
        if self._service is None or not self._service.bus.connected or self._idempotency is None:
            raise ProblemError(
                503, "the gateway is not connected to NATS yet; retry shortly", headers={"Retry-After": "1"}
            )
        return self._service.bus

    @property
    def logs(self) -> LogReader:
        self.bus  # noqa: B018 - raises 503 while not connected
        assert self._logs is not None
        return self._logs

    @property
    def events(self) -> EventReader:
        self.bus  # noqa: B018
        assert self._events is not None
        return self._events

    # ---------------------------------------------------------------- feeds (background tasks)

    async def watch_runs(self) -> None:
        """Every run record: the initial content (then the model is ready), then each change.

        The watcher's "initial values done" marker can come before values already on their way,
        so the initial content ends with the value that says nothing is pending after it; the
        marker is trusted only for a bucket that was empty.
        """
        kv = await self.bus.js.key_value(RUNS_BUCKET)
        bucket_was_empty = (await kv.status()).values == 0
        watcher = await kv.watchall()
        initial: dict[str, RunRecord] | None = {}

        def finish_initial() -> None:
            nonlocal initial
            if initial is not None:
                self.readmodel.load(initial.values())
                log.info("read model loaded", extra={"runs": len(initial)})
                initial = None
                # The loaded records live as long as the gateway: moved out of the collector's
                # generations, full collections no longer walk them (a 100k-run model made
                # each one a several-hundred-millisecond pause of every live stream).
                gc.collect()
                gc.freeze()

        try:
            async for entry in watcher:
                if entry is None:
                    if bucket_was_empty:
                        finish_initial()
                    elif initial is not None and not initial:
                        # Emptied between the status and the watch: do not wait for values forever.
                        asyncio.get_running_loop().call_later(5.0, finish_initial)
                    continue
                if entry.operation in _DELETES:
                    if initial is not None:
                        initial.pop(entry.key, None)
                    else:
                        self.readmodel.remove(entry.key)
                else:
                    try:
                        record = _records.decode(entry.value or b"")
                    except msgspec.DecodeError as exc:  # ValidationError is a DecodeError
                        self._undecodable(RUNS_BUCKET, entry.key, exc)
                        record = None
                    if record is not None:
                        if initial is not None:
                            initial[entry.key] = record
                        else:
                            self.readmodel.upsert(record)
                if initial is not None and entry.delta == 0:
                    finish_initial()
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()  # type: ignore[no-untyped-call]

    async def watch_tokens(self) -> None:
        """API token records (created or revoked on any replica)."""
        self.bus  # noqa: B018 - connected
        await self.tokens.watch()

    async def watch_queue(self) -> None:
        """The scheduler's queue snapshot, whenever it changes."""
        kv = await self.bus.js.key_value(QUEUE_BUCKET)
        watcher = await kv.watch(QUEUE_KEY)
        try:
            async for entry in watcher:
                if entry is None:
                    continue
                if entry.operation in _DELETES:
                    self.readmodel.set_queue(None)
                    continue
                try:
                    self.readmodel.set_queue(_snapshots.decode(entry.value or b""))
                except msgspec.DecodeError as exc:
                    self._undecodable(QUEUE_BUCKET, entry.key, exc)
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()  # type: ignore[no-untyped-call]

    def _undecodable(self, bucket: str, key: str, exc: Exception) -> None:
        log.warning("undecodable record skipped", extra={"bucket": bucket, "key": key, "error": str(exc)})
        if self.metrics is not None:
            self.metrics.undecodable.labels(bucket).inc()

    # ---------------------------------------------------------------- reads

    def require_ready(self) -> None:
        if not self.readmodel.ready:
            raise ProblemError(
                503, "the run read model is still loading; retry shortly", headers={"Retry-After": "1"}
            )

    def find(self, run_id: str, principal: Principal) -> RunRecord:
        """A run by id (case-insensitive), or 404. A malformed id is simply an unknown run, and so
        is a run of a project `principal` does not see."""
        self.require_ready()
        normalized = normalize_run_id(run_id)
        record = self.readmodel.get(normalized) if normalized else None
        if record is None or not principal.can_see(record.project):
            raise not_found(f"run {run_id}")
        return record

    # ---------------------------------------------------------------- commands

    def validate_submit(self, raw: bytes, idempotency_key: str | None) -> tuple[ValidSubmit, str | None]:
        """The request and its Idempotency-Key, or a ProblemError naming every invalid field."""
        try:
            return validate_submit(raw, self.limits), check_idempotency_key(idempotency_key)
        except ProblemError:
            self.count_submit("rejected")
            raise

    async def submit(self, valid: ValidSubmit, key: str | None, principal: Principal) -> tuple[RunView, bool]:
        """Publish a RunRequested for a validated request. Returns the run and whether it was
        created now (False: an Idempotency-Key replay of an earlier submit, nothing published)."""
        request = valid.request
        require_role(principal, "developer", "submit runs", request.project)
        event = RunRequested(
            run_id=new_ulid(),
            project=request.project,
            env=request.env,
            params=to_parameters(request),
            requested_by=principal.subject,
            idempotency_key=key,
        )
        if key is not None:
            previous = await self._claim(
                idempotency_kv_key(request.project, principal.subject, key),
                IdempotencyRecord(
                    run_id=event.run_id,
                    body_hash=valid.body_hash,
                    event_id=event.event_id,
                    requested_at=event.occurred_at,
                ),
            )
            if previous is not None:
                if previous.body_hash != valid.body_hash:
                    self.count_submit("rejected")
                    raise ProblemError(
                        422,
                        f"the {IDEMPOTENCY_HEADER} was already used with a different request body",
                        slug="idempotency-key-reused",
                        title="Idempotency-Key reused",
                        errors=[
                            (IDEMPOTENCY_HEADER, "was already used for a different request; use a new key")
                        ],
                    )
                event = msgspec.structs.replace(
                    event,
                    run_id=previous.run_id,
                    event_id=previous.event_id,
                    occurred_at=previous.requested_at,
                )
                if self.readmodel.get(event.run_id) is None:
                    # The first submit may have failed to publish: publish the very same event
                    # again (same id: JetStream stores it once).
                    await self._publish(event)
                self.readmodel.add_pending(pending_record(event))
                self.count_submit("replayed")
                return self._view(event.run_id), False
        await self._publish(event)
        self.readmodel.add_pending(pending_record(event))
        self.count_submit("created")
        return self._view(event.run_id), True

    async def cancel(self, run_id: str, principal: Principal, reason: str) -> ActionAccepted:
        record = self.find(run_id, principal)
        require_role(principal, "developer", "cancel runs", record.project)
        if record.state in TERMINAL_STATES:
            raise ProblemError(
                409,
                f"run {record.run_id} has already finished ({record.state}); there is nothing to cancel",
                slug="run-finished",
                title="Run already finished",
            )
        event = RunCancelRequested(run_id=record.run_id, requested_by=principal.subject, reason=reason)
        await self._publish(event)
        return ActionAccepted(
            run_id=record.run_id, action="cancel", state=record.state, event_id=event.event_id
        )

    async def resume(self, run_id: str, principal: Principal) -> ActionAccepted:
        record = self.find(run_id, principal)
        require_role(principal, "developer", "resume runs", record.project)
        refusal = resume_refusal(record)
        if refusal is not None:
            raise ProblemError(409, refusal, slug="run-not-resumable", title="Run cannot be resumed")
        event = RunResumeRequested(run_id=record.run_id, requested_by=principal.subject)
        await self._publish(event)
        return ActionAccepted(
            run_id=record.run_id, action="resume", state=record.state, event_id=event.event_id
        )

    def _view(self, run_id: str) -> RunView:
        record = self.readmodel.get(run_id)
        assert record is not None
        return self.readmodel.view(record)

    async def _publish(self, event: Event) -> None:
        try:
            await self.bus.publish(event)
        except (PublishError, nats.errors.Error) as exc:
            log.warning("publish failed", extra={"type": event.event_type(), "error": str(exc)})
            raise ProblemError(
                503,
                "the request could not be stored on the event bus; retry (with the same Idempotency-Key)",
                headers={"Retry-After": "1"},
            ) from exc

    async def _claim(self, key: str, record: IdempotencyRecord) -> IdempotencyRecord | None:
        """Store `record` under `key` unless the key exists; then return the existing record."""
        assert self._idempotency is not None
        value = msgspec.json.encode(record)
        for _ in range(3):
            try:
                await self._idempotency.create(key, value)
                return None
            except nats.js.errors.KeyWrongLastSequenceError:
                pass
            try:
                entry = await self._idempotency.get(key)
            except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
                continue  # expired in between: claim again
            try:
                return _idempotency.decode(entry.value or b"")
            except msgspec.DecodeError:
                log.warning("undecodable idempotency record replaced", extra={"key": key})
                await self._idempotency.put(key, value)
                return None
        raise ProblemError(503, "could not record the Idempotency-Key; retry", headers={"Retry-After": "1"})

    def count_submit(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.submits.labels(outcome).inc()
