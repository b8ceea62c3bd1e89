"""`GithubIntegration`: the gateway's GitHub edge, from a verified delivery to a run and back.

1. `receive` (the `/webhooks/github` route): verify the signature, publish the delivery as received
   to `fabrik.ingest.github.<event>` (event id derived from the delivery id), answer. Nothing else
   happens in the request.
2. `handle_delivery` (durable consumer on `INGEST`): decide whether the delivery asks for a run
   (`webhook.parse_trigger`), map the repository to a project, check the sender's write access,
   resolve the commit, build the submit body (`commands.submit_body`), validate and submit it
   through `Gateway` exactly like `POST /api/v1/runs` (Idempotency-Key `github:<delivery id>`),
   store the run's origin and create its check run.
3. `handle_run_event` (durable consumer on `RUNS`) and `maintain` (a background task: throttled
   progress, reconciliation with the run read model) keep GitHub up to date (`reporter`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Mapping
from datetime import timedelta
from typing import Any, Final

import httpx
import msgspec
import nats.errors
import nats.js.errors
from nats.js.kv import KeyValue
from prometheus_client import CollectorRegistry, Counter, Gauge

from fabrik_common.bus import PublishError, Retry
from fabrik_common.codec import encode
from fabrik_common.events import AuditRecorded, GithubDeliveryReceived, RunRequested
from fabrik_common.ids import derived_ulid, utcnow
from fabrik_common.service import Service
from fabrik_gateway.auth import Principal
from fabrik_gateway.gateway import IDEMPOTENCY_BUCKET, Gateway, IdempotencyRecord, idempotency_kv_key
from fabrik_gateway.github.client import GithubApiError, GithubClient
from fabrik_gateway.github.commands import (
    CommandError,
    RunCommand,
    find_command_line,
    option_for_field,
    parse_command,
    submit_body,
)
from fabrik_gateway.github.config import GithubConfig, load_config, public_url, run_link
from fabrik_gateway.github.reporter import (
    KEY_PREFIX,
    GithubOrigin,
    KvOriginStore,
    Reporter,
    decode_origin,
    is_ahead,
    new_origin,
    observe_record,
    report_for,
)
from fabrik_gateway.github.webhook import (
    DELIVERY_HEADER,
    EVENT_HEADER,
    HANDLED_EVENTS,
    SIGNATURE_HEADER,
    DeliveryError,
    PayloadError,
    Trigger,
    delivery_event,
    parse_trigger,
    verify_signature,
)
from fabrik_gateway.problems import ProblemError
from fabrik_gateway.settings import GatewaySettings
from fabrik_gateway.validation import is_label_value

log = logging.getLogger(__name__)

INTEGRATIONS_BUCKET: Final = "integrations"
IDEMPOTENCY_PREFIX: Final = "github:"
MAX_TRIGGER_AGE: Final = timedelta(hours=12)
"""A delivery whose triggering action is older starts nothing. With the `idempotency` bucket's
24 h, this makes a replayed delivery start nothing at any age (docs/github.md#deduplication)."""
WEBHOOK_PUBLISH_TIMEOUT_SECONDS: Final = 5.0
"""A healthy JetStream acks in milliseconds; the bound is under GitHub's 10 s delivery timeout,
because GitHub does not redeliver a failed delivery by itself."""
FLUSH_INTERVAL_SECONDS: Final = 1.0
RECONCILE_INTERVAL_SECONDS: Final = 15.0
REACTION: Final = "rocket"


class GithubMetrics:
    def __init__(self, registry: CollectorRegistry, unfinished: Any) -> None:
        self.webhooks = Counter(
            "fabrik_github_webhooks",
            "POST /webhooks/github answers, by GitHub event and outcome",
            ("event", "outcome"),
            registry=registry,
        )
        self.deliveries = Counter(
            "fabrik_github_deliveries",
            "Stored GitHub deliveries handled from INGEST, by event and outcome",
            ("event", "outcome"),
            registry=registry,
        )
        self.api_errors = Counter(
            "fabrik_github_api_errors",
            "GitHub API calls that failed, by whether they will be retried",
            ("retryable",),
            registry=registry,
        )
        self.unfinished = Gauge(
            "fabrik_github_runs_reporting",
            "Runs started from GitHub whose outcome is not reported yet",
            registry=registry,
        )
        self.unfinished.set_function(lambda: float(len(unfinished)))


class GithubIntegration:
    def __init__(
        self,
        settings: GatewaySettings,
        gateway: Gateway,
        *,
        config: GithubConfig | None = None,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self.settings = settings
        self.gateway = gateway
        self.config = config or load_config(settings)
        credentials = self.config.credentials
        self.client: GithubClient | None = (
            GithubClient(credentials, api_url=settings.github_api_url, http=http)
            if credentials is not None
            else None
        )
        self.metrics: GithubMetrics | None = None
        self._service: Service[Any] | None = None
        self._reporter: Reporter | None = None
        self._reporter_lock = asyncio.Lock()
        self.owner = f"gateway-{uuid.uuid4().hex[:12]}"
        """This replica, as the holder of reporting leases."""
        self._idempotency: KeyValue | None = None
        self.unfinished: dict[str, GithubOrigin] = {}
        """Origins whose outcome is not fully reported, from a watch of the bucket (for `maintain`)."""

    @property
    def enabled(self) -> bool:
        """Whether anything GitHub is configured (a webhook secret or credentials)."""
        return self.config.webhook_secret is not None or self.client is not None

    def attach(self, service: Service[Any]) -> None:
        self._service = service
        self.metrics = GithubMetrics(service.registry, self.unfinished)

    # ---------------------------------------------------------------- links

    @property
    def base_url(self) -> str:
        port = self._service.http.port if self._service is not None else self.settings.http_port
        return public_url(self.settings.public_url, port)

    def link(self, run_id: str) -> str:
        return run_link(self.base_url, run_id)

    async def reporter(self) -> Reporter:
        """The one reporter of this replica (its lease owner id and held-back progress are shared by
        the consumers and the background task)."""
        async with self._reporter_lock:
            if self._reporter is None:
                if self.client is None:
                    raise RuntimeError("no GitHub credentials")
                kv = await self.gateway.bus.js.key_value(INTEGRATIONS_BUCKET)
                self._reporter = Reporter(
                    KvOriginStore(kv),
                    self.client,
                    link=self.link,
                    lookup_run=self.gateway.readmodel.get,
                    owner=self.owner,
                )
            return self._reporter

    # ---------------------------------------------------------------- 1. the webhook

    async def receive(self, headers: Mapping[str, str], body: bytes) -> tuple[int, dict[str, Any]]:
        """Verify and store one delivery: (status, JSON answer), or a `ProblemError`."""
        event_name = headers.get(EVENT_HEADER) or "unknown"
        secret = self.config.webhook_secret
        if secret is None:
            self._count_webhook(event_name, "not_configured")
            raise ProblemError(
                503,
                "GitHub webhooks are not configured on this gateway: set FABRIK_GITHUB_WEBHOOK_SECRET "
                "(or FABRIK_GITHUB_WEBHOOK_SECRET_FILE)",
                slug="webhook-not-configured",
                title="Webhook not configured",
            )
        if not verify_signature(secret, body, headers.get(SIGNATURE_HEADER)):
            self._count_webhook(event_name, "bad_signature")
            raise ProblemError(
                401,
                f"the {SIGNATURE_HEADER} header is missing or is not the HMAC-SHA256 of the body with "
                "the webhook secret",
                slug="invalid-signature",
                title="Invalid signature",
            )
        try:
            event = delivery_event(
                event=headers.get(EVENT_HEADER), delivery_id=headers.get(DELIVERY_HEADER), body=body
            )
        except DeliveryError as exc:
            self._count_webhook(event_name, "invalid")
            raise ProblemError(
                400,
                str(exc),
                slug="invalid-request",
                title="Invalid request",
                errors=[(exc.header, exc.rule)],
            ) from None
        bus = self.gateway.bus  # 503 while not connected
        if len(encode(event)) + 1024 > bus.nc.max_payload:
            self._count_webhook(event.github_event, "too_large")
            raise ProblemError(
                413,
                f"the delivery is larger than the event bus accepts ({bus.nc.max_payload} bytes per message)",
                slug="payload-too-large",
                title="Request body too large",
            )
        try:
            ack = await asyncio.wait_for(bus.publish(event), WEBHOOK_PUBLISH_TIMEOUT_SECONDS)
        except (TimeoutError, PublishError, nats.errors.Error) as exc:
            self._count_webhook(event.github_event, "unavailable")
            log.warning(
                "GitHub delivery not stored",
                extra={"delivery_id": event.delivery_id, "event": event.github_event, "error": repr(exc)},
            )
            raise ProblemError(
                503,
                "the delivery could not be stored on the event bus; redeliver it",
                headers={"Retry-After": "1"},
            ) from exc
        duplicate = bool(ack.duplicate)
        self._count_webhook(event.github_event, "duplicate" if duplicate else "accepted")
        log.info(
            "GitHub delivery stored",
            extra={"delivery_id": event.delivery_id, "event": event.github_event, "duplicate": duplicate},
        )
        answer: dict[str, Any] = {
            "event": event.github_event,
            "delivery": event.delivery_id,
            "duplicate": duplicate,
        }
        if event.github_event == "ping":
            return 200, {"ok": True, **answer}
        return 202, {"accepted": True, **answer}

    def _count_webhook(self, event: str, outcome: str) -> None:
        if self.metrics is not None:
            name = event if event.replace("_", "").isalpha() and len(event) <= 64 else "invalid"
            self.metrics.webhooks.labels(name, outcome).inc()

    # ---------------------------------------------------------------- 2. deliveries -> runs

    async def handle_delivery(self, event: GithubDeliveryReceived, *, redelivered: bool = False) -> str:
        """Start the run a stored delivery asks for, if any. Returns the outcome (also counted).
        Raises `Retry` when GitHub or the event bus failed in a way worth retrying."""
        try:
            outcome = await self._handle_delivery(event)
        except GithubApiError as exc:
            self._count_api_error(exc)
            if exc.retryable:
                raise Retry(f"GitHub API: {exc}", exc.retry_after) from exc
            log.error(  # noqa: TRY400 - an answer from GitHub, no traceback needed
                "GitHub refused a call for a delivery; it starts nothing",
                extra={"delivery_id": event.delivery_id, "error": str(exc)},
            )
            outcome = "failed_github"
        if self.metrics is not None:
            self.metrics.deliveries.labels(event.github_event, outcome).inc()
        log.info(
            "GitHub delivery handled",
            extra={
                "delivery_id": event.delivery_id,
                "event": event.github_event,
                "outcome": outcome,
                "redelivered": redelivered,
            },
        )
        return outcome

    async def _handle_delivery(self, event: GithubDeliveryReceived) -> str:
        if event.github_event not in HANDLED_EVENTS:
            return "stored_only"
        try:
            trigger = parse_trigger(event.github_event, event.body, trigger_label=self.config.trigger_label)
        except PayloadError as exc:
            log.warning(
                "GitHub delivery payload not understood",
                extra={"delivery_id": event.delivery_id, "error": str(exc)},
            )
            return "bad_payload"
        if trigger is None:
            return "not_a_trigger"
        project = self.config.repositories.project_for(trigger.full_name)
        if project is None:
            log.info(
                "repository is not mapped to a project (FABRIK_GITHUB_REPOSITORIES)",
                extra={"repository": trigger.full_name, "delivery_id": event.delivery_id},
            )
            return "unmapped"
        age = utcnow() - trigger.at
        if age > MAX_TRIGGER_AGE:
            log.warning(
                "GitHub delivery too old to start a run (a replay?)",
                extra={"delivery_id": event.delivery_id, "age_s": int(age.total_seconds())},
            )
            return "stale"
        if self.client is None:
            log.warning(
                "a GitHub delivery asks for a run but no GitHub credentials are configured "
                "(FABRIK_GITHUB_APP_ID or FABRIK_GITHUB_TOKEN)",
                extra={"delivery_id": event.delivery_id},
            )
            return "no_credentials"
        key = IDEMPOTENCY_PREFIX + event.delivery_id
        existing = await self._existing_run(project, github_principal(trigger.sender).subject, key)
        if existing is not None:
            return await self._resume_existing(existing, trigger, project, event)

        client = self.client
        if not await client.can_write(
            trigger.owner, trigger.repo, trigger.sender, installation_id=trigger.installation_id
        ):
            log.info(
                "GitHub user without write access asked for a run; ignored",
                extra={
                    "user": trigger.sender,
                    "repository": trigger.full_name,
                    "delivery_id": event.delivery_id,
                },
            )
            return "no_permission"
        try:
            command = self._command(trigger)
        except CommandError as exc:
            await self._reply(trigger, f"@{trigger.sender} Fabrik cannot run this: {exc}")
            return "bad_command"
        sha, ref, clone_url = await self._resolve_head(trigger)
        try:
            body = submit_body(
                command,
                project=project,
                repo_url=clone_url,
                ref=sha,
                default_spec=self.config.default_spec,
                labels=origin_labels(trigger),
            )
        except CommandError as exc:
            await self._reply(trigger, f"@{trigger.sender} Fabrik cannot run this: {exc}")
            return "bad_command"
        try:
            valid, idempotency_key = self.gateway.validate_submit(json.dumps(body).encode(), key)
        except ProblemError as exc:
            await self._reply(trigger, rejection_text(trigger.sender, exc))
            return "invalid"
        principal = github_principal(trigger.sender)
        try:
            view, created = await self.gateway.submit(valid, idempotency_key, principal)
        except ProblemError as exc:
            if exc.status == 503:
                raise Retry(f"submit: {exc.detail}", 2.0) from exc
            # e.g. the key was claimed meanwhile for another body: the next delivery resumes it
            raise Retry(f"submit: {exc.detail}") from exc
        # As a submit through the API would be; the id is the delivery's, so it is stored once.
        await self.gateway.bus.publish(
            AuditRecorded(
                event_id=derived_ulid(f"audit:github-delivery:{event.delivery_id}"),
                actor=principal.subject,
                role=principal.role_name,
                action="run.submit",
                target=f"run:{view.run_id}",
                project=project,
                result="ok",
                details={"via": "github", "repository": trigger.full_name, "delivery_id": event.delivery_id},
            )
        )
        origin = self._origin(
            trigger,
            event=event,
            run_id=view.run_id,
            project=project,
            env=view.env,
            sha=sha,
            ref=ref,
            clone_url=clone_url,
            command=command,
        )
        reporter = await self.reporter()
        await reporter.start(origin)
        await self._react(trigger)
        log.info(
            "run started from GitHub",
            extra={
                "run_id": view.run_id,
                "project": project,
                "repository": trigger.full_name,
                "number": trigger.number,
                "user": trigger.sender,
                "new": created,
            },
        )
        return "started"

    async def _resume_existing(
        self, run_id: str, trigger: Trigger, project: str, event: GithubDeliveryReceived
    ) -> str:
        """The delivery started a run before (a redelivery or a replay): make sure its origin exists
        and is reported, start nothing."""
        reporter = await self.reporter()
        if await reporter.store.get(run_id) is not None:
            await reporter.sync(run_id)
            return "duplicate"
        # Submitted, but the origin was not stored (the handler stopped in between): rebuild it from
        # the run as submitted.
        record = self.gateway.readmodel.get(run_id)
        if record is None or record.params.repo is None:
            raise Retry(f"run {run_id} of delivery {event.delivery_id} is not in the read model yet", 2.0)
        command = self._command_or_default(trigger)
        origin = self._origin(
            trigger,
            event=event,
            run_id=run_id,
            project=project,
            env=record.env,
            sha=record.params.repo.ref,
            ref=record.params.repo.ref,
            clone_url=record.params.repo.url,
            command=command,
        )
        await reporter.start(origin)
        return "duplicate"

    async def _existing_run(self, project: str, subject: str, key: str) -> str | None:
        """The run an earlier handling of the same delivery submitted (the gateway's own
        Idempotency-Key record, kept 24 h), or None."""
        if self._idempotency is None:
            self._idempotency = await self.gateway.bus.js.key_value(IDEMPOTENCY_BUCKET)
        try:
            entry = await self._idempotency.get(idempotency_kv_key(project, subject, key))
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return None
        try:
            return msgspec.json.decode(entry.value or b"", type=IdempotencyRecord).run_id
        except msgspec.DecodeError:
            return None

    def _command(self, trigger: Trigger) -> RunCommand:
        """The `/fabrik run` command: the comment's, or for labels the issue/PR body's (if any)."""
        line = find_command_line(trigger.command_text)
        if line is None:
            return RunCommand()
        return parse_command(line)

    def _command_or_default(self, trigger: Trigger) -> RunCommand:
        try:
            return self._command(trigger)
        except CommandError:
            return RunCommand()

    async def _resolve_head(self, trigger: Trigger) -> tuple[str, str, str]:
        """(sha, ref, clone URL) the run works on: a pull request's head (from its fork, if it comes
        from one), else the head of the repository's default branch."""
        assert self.client is not None
        repository = trigger.repository
        if trigger.is_pull:
            if trigger.head_sha is not None:
                return (
                    trigger.head_sha,
                    trigger.head_ref or "",
                    trigger.head_clone_url or repository.clone_url,
                )
            pull = await self.client.pull(
                trigger.owner, trigger.repo, trigger.number, installation_id=trigger.installation_id
            )
            head_repo = pull.head.repo
            return (
                pull.head.sha,
                pull.head.ref,
                head_repo.clone_url if head_repo is not None else repository.clone_url,
            )
        branch = repository.default_branch
        sha = await self.client.commit_sha(
            trigger.owner, trigger.repo, branch, installation_id=trigger.installation_id
        )
        return sha, branch, repository.clone_url

    def _origin(
        self,
        trigger: Trigger,
        *,
        event: GithubDeliveryReceived,
        run_id: str,
        project: str,
        env: str,
        sha: str,
        ref: str,
        clone_url: str,
        command: RunCommand,
    ) -> GithubOrigin:
        assert self.client is not None
        return new_origin(
            run_id=run_id,
            project=project,
            env=env,
            owner=trigger.owner,
            repo=trigger.repo,
            installation_id=trigger.installation_id,
            number=trigger.number,
            is_pull=trigger.is_pull,
            sha=sha,
            ref=ref,
            clone_url=clone_url,
            trigger=trigger.kind,
            sender=trigger.sender,
            delivery_id=event.delivery_id,
            command=command.line if trigger.kind == "comment" else "",
            comment_id=trigger.comment_id,
            html_url=trigger.html_url,
            mode="check_run" if self.client.supports_check_runs else "status",
            link=self.link(run_id),
            now=utcnow(),
        )

    async def _reply(self, trigger: Trigger, text: str) -> None:
        assert self.client is not None
        await self.client.create_comment(
            trigger.owner, trigger.repo, trigger.number, text, installation_id=trigger.installation_id
        )

    async def _react(self, trigger: Trigger) -> None:
        """A 🚀 on the `/fabrik run` comment: seen and started. Best effort."""
        if trigger.comment_id is None or self.client is None:
            return
        try:
            await self.client.add_reaction(
                trigger.owner,
                trigger.repo,
                trigger.comment_id,
                REACTION,
                installation_id=trigger.installation_id,
            )
        except GithubApiError as exc:
            self._count_api_error(exc)
            log.warning("could not react to the comment", extra={"error": str(exc)})

    def _count_api_error(self, exc: GithubApiError) -> None:
        if self.metrics is not None:
            self.metrics.api_errors.labels("true" if exc.retryable else "false").inc()

    # ---------------------------------------------------------------- 3. run events -> GitHub

    async def handle_run_event(self, event: object) -> None:
        """A `RUNS` event: update GitHub for runs that came from it. Raises `Retry` when GitHub
        failed in a way worth retrying (what GitHub should show is kept in the origin meanwhile)."""
        if self.client is None or isinstance(event, RunRequested):
            return
        reporter = await self.reporter()
        run_id = getattr(event, "run_id", None)
        if not isinstance(run_id, str) or await reporter.store.get(run_id) is None:
            return
        try:
            await reporter.on_event(event)
        except GithubApiError as exc:
            self._count_api_error(exc)
            if exc.retryable:
                raise Retry(f"GitHub API: {exc}", exc.retry_after) from exc
            raise

    async def maintain(self, _: object = None) -> None:
        """Background task: flush throttled progress every second, and every 15 s reconcile each
        unfinished origin with the run read model (events missed or dead-lettered, pushes that
        failed for good, a replica that died holding a lease)."""
        if self.client is None:
            return
        reporter = await self.reporter()
        kv = await self.gateway.bus.js.key_value(INTEGRATIONS_BUCKET)
        watch: asyncio.Task[None] | None = None
        next_reconcile = time.monotonic() + RECONCILE_INTERVAL_SECONDS
        try:
            while True:
                if watch is None or watch.done():
                    if watch is not None and not watch.cancelled() and watch.exception() is not None:
                        log.warning(
                            "watching GitHub origins stopped; watching again", exc_info=watch.exception()
                        )
                    watch = asyncio.create_task(self._watch_origins(kv), name="github-origins")
                await asyncio.sleep(FLUSH_INTERVAL_SECONDS)
                try:
                    await reporter.flush_progress()
                except Exception:  # one bad origin must not stop the loop; the next round retries
                    log.warning("flushing GitHub progress failed", exc_info=True)
                if time.monotonic() >= next_reconcile:
                    await self.reconcile_all()
                    next_reconcile = time.monotonic() + RECONCILE_INTERVAL_SECONDS
        finally:
            if watch is not None:
                watch.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await watch
            await self.client.aclose()

    async def reconcile_all(self) -> None:
        if not self.gateway.readmodel.ready:
            return
        reporter = await self.reporter()
        now = utcnow()
        for origin in list(self.unfinished.values()):
            record = self.gateway.readmodel.get(origin.run_id)
            behind = record is not None and is_ahead(
                report_for(origin, observe_record(record), self.link(origin.run_id), record),
                origin.desired,
                same_status=False,
            )
            if not (behind or origin.needs_work) or origin.leased(now):
                continue
            try:
                await reporter.reconcile(origin)
            except GithubApiError as exc:
                self._count_api_error(exc)
                log.warning(
                    "reconciling a GitHub report failed; next round retries",
                    extra={"run_id": origin.run_id, "error": str(exc)},
                )
            except Exception:  # one bad origin must not stop the others; the next round retries
                log.warning(
                    "reconciling a GitHub report failed", extra={"run_id": origin.run_id}, exc_info=True
                )

    async def _watch_origins(self, kv: KeyValue) -> None:
        watcher = await kv.watch(f"{KEY_PREFIX}*")
        try:
            async for entry in watcher:
                if entry is None:
                    continue
                run_id = entry.key.removeprefix(KEY_PREFIX)
                if entry.operation in ("DEL", "PURGE"):
                    self.unfinished.pop(run_id, None)
                    continue
                try:
                    origin = decode_origin(entry.value or b"")
                except msgspec.DecodeError:
                    continue
                if origin.desired.status == "completed" and not origin.needs_work:
                    self.unfinished.pop(run_id, None)
                else:
                    self.unfinished[run_id] = origin
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()  # type: ignore[no-untyped-call]


def github_principal(login: str) -> Principal:
    """Who a GitHub-started run is requested by: the GitHub user, as a developer everywhere (the
    write-access check on the repository is the authorization)."""
    return Principal(
        subject=f"github:{login}", role="developer", project_roles={}, authenticated=True, kind="integration"
    )


def origin_labels(trigger: Trigger) -> dict[str, str]:
    """Labels naming where a run came from (valid Kubernetes label values, or left out)."""
    labels = {"trigger": "github", "github-pr" if trigger.is_pull else "github-issue": str(trigger.number)}
    repository = trigger.full_name.replace("/", ".")
    if len(repository) <= 63 and is_label_value(repository):
        labels["github-repo"] = repository
    return labels


def rejection_text(login: str, problem: ProblemError) -> str:
    lines = [f"@{login} Fabrik cannot start this run: {problem.detail}"]
    for field, rule in problem.errors or []:
        lines.append(f"- `{option_for_field(field)}` {rule}")
    return "\n".join(lines)
