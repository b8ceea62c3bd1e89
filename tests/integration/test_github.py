"""GitHub over a real NATS server, with the real gateway service in this process and the GitHub
double playing the GitHub REST API; webhook deliveries are the payloads GitHub sends
(`fixtures/github/`), signed with the webhook secret.

The scheduler is not running: the tests assert the `run.requested` a delivery publishes, then
publish the run's lifecycle events and write its records into the `runs` bucket as the scheduler
would, and assert what the GitHub double recorded (check run states, comments).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import msgspec
import nats
import pytest
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from fabrik_common.codec import encode
from fabrik_common.events import (
    Event,
    GithubDeliveryReceived,
    RunProgress,
    RunQueued,
    RunRequested,
    RunStarted,
    RunStateChanged,
)
from fabrik_common.ids import utcnow
from fabrik_common.runs import RunRecord
from fabrik_common.service import Service
from fabrik_common.testing import running_service
from fabrik_common.testing.github_double import GithubDouble
from fabrik_gateway.api.webhooks_github import PATH
from fabrik_gateway.app import build
from fabrik_gateway.gateway import Gateway
from fabrik_gateway.github import integration as integration_module
from fabrik_gateway.github import reporter as reporter_module
from fabrik_gateway.github.handlers import INGEST_DURABLE, RUNS_DURABLE
from fabrik_gateway.github.integration import GithubIntegration
from fabrik_gateway.github.reporter import GithubOrigin, decode_origin, origin_key
from fabrik_gateway.github.webhook import sign
from fabrik_gateway.settings import GatewaySettings

FIXTURES = Path(__file__).parent / "fixtures" / "github"
REPO = "octo-org/hello-world"
CLONE_URL = f"https://github.com/{REPO}.git"
INSTALLATION = 4242
SECRET = "It's a Secret to Everybody"
PR_HEAD = "6dcb09b5b57875f334f61aebed695e2e4193db5e"
FAST_ENOUGH = 1.0
"""The webhook answers within a second: it verifies and publishes, nothing else."""


def fixture(name: str) -> dict[str, Any]:
    return dict(json.loads((FIXTURES / f"{name}.json").read_text()))


def fresh(payload: dict[str, Any], *, age: timedelta = timedelta(0)) -> dict[str, Any]:
    """The payload as if the triggering action happened `age` ago (fixtures carry fixed times)."""
    moment = (utcnow() - age).strftime("%Y-%m-%dT%H:%M:%SZ")
    for key in ("comment", "issue", "pull_request"):
        part = payload.get(key)
        if isinstance(part, dict):
            part["updated_at"] = moment
            if key == "comment":
                part["created_at"] = moment
    return payload


def comment_payload(name: str, body: str | None = None, *, sender: str = "octocat") -> dict[str, Any]:
    payload = fresh(fixture(name))
    payload["comment"]["id"] += uuid.uuid4().int % 100_000  # each test comment its own
    if body is not None:
        payload["comment"]["body"] = body
    payload["sender"] = {**payload["sender"], "login": sender}
    payload["comment"]["user"] = {**payload["comment"]["user"], "login": sender}
    return payload


# ------------------------------------------------------------------------------------------------
# harness


@dataclass
class Env:
    service: Service[Gateway]
    integration: GithubIntegration
    github: GithubDouble
    http: httpx.AsyncClient
    nc: NatsClient
    js: JetStreamContext
    runs_kv: KeyValue
    integrations_kv: KeyValue

    @property
    def gateway(self) -> Gateway:
        return self.service.state

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.service.http.port}"

    async def deliver(
        self,
        event: str,
        payload: dict[str, Any] | bytes,
        *,
        delivery_id: str | None = None,
        secret: str = SECRET,
        signature: str | None = None,
    ) -> httpx.Response:
        """POST a delivery as GitHub does (headers of GitHub-Hookshot, body signed with `secret`)."""
        body = payload if isinstance(payload, bytes) else json.dumps(payload, indent=2).encode()
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "GitHub-Hookshot/4f5e2a1",
            "X-GitHub-Event": event,
            "X-GitHub-Delivery": delivery_id or str(uuid.uuid4()),
            "X-GitHub-Hook-ID": "548123977",
            "X-GitHub-Hook-Installation-Target-ID": "424242",
            "X-GitHub-Hook-Installation-Target-Type": "integration",
            "X-Hub-Signature": "sha1=ignored-by-fabrik",
            "X-Hub-Signature-256": signature if signature is not None else sign(secret, body),
        }
        return await self.http.post(PATH, content=body, headers=headers)

    async def stored(self, stream: str, subject: str) -> list[Any]:
        info = await self.js.stream_info(stream, subjects_filter=subject)
        count = sum((info.state.subjects or {}).values())
        if count == 0:
            return []
        sub = await self.js.subscribe(subject, ordered_consumer=True)
        try:
            return [await sub.next_msg(timeout=5) for _ in range(count)]
        finally:
            await sub.unsubscribe()

    async def requested(self) -> list[RunRequested]:
        return [
            msgspec.json.decode(m.data, type=RunRequested)
            for m in await self.stored("RUNS", "fabrik.runs.requested.*")
        ]

    async def one_run(self) -> RunRequested:
        await wait_until(lambda: self._count_requested(1))
        (run,) = await self.requested()
        return run

    async def _count_requested(self, count: int) -> bool:
        return len(await self.requested()) == count

    async def idle(self, durable: str = INGEST_DURABLE, stream: str = "INGEST") -> None:
        """Wait until the consumer has handled (acked) everything its stream holds."""

        async def caught_up() -> bool:
            info = await self.js.consumer_info(stream, durable)
            last = (await self.js.stream_info(stream)).state.last_seq
            return (
                info.num_pending == 0
                and info.num_ack_pending == 0
                and (info.ack_floor.stream_seq or 0) >= last
            )

        await wait_until(caught_up)

    async def publish(self, event: Event) -> None:
        await self.js.publish(event.subject(), encode(event), headers={"Nats-Msg-Id": event.event_id})

    async def put(self, record: RunRecord) -> None:
        await self.runs_kv.put(record.run_id, msgspec.json.encode(record))

        def seen() -> bool:
            current = self.gateway.readmodel.get(record.run_id)
            return (
                current is not None and current.state == record.state and current.revision == record.revision
            )

        await wait_until(seen)

    async def origin(self, run_id: str) -> GithubOrigin:
        entry = await self.integrations_kv.get(origin_key(run_id))
        return decode_origin(entry.value or b"")

    def check_runs(self) -> list[dict[str, Any]]:
        return sorted(self.github.check_runs_for(REPO), key=lambda c: c["id"])


async def wait_until(predicate: Callable[[], bool | Awaitable[bool]], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def integration_of(service: Service[Gateway]) -> GithubIntegration:
    integration = service.http_app.state.get("github")
    assert isinstance(integration, GithubIntegration)
    return integration


@pytest.fixture
async def env(nats_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Env]:
    monkeypatch.setattr(reporter_module, "PROGRESS_INTERVAL_SECONDS", 0.3)
    monkeypatch.setattr(integration_module, "RECONCILE_INTERVAL_SECONDS", 0.5)
    async with started(nats_url, tmp_path) as value:
        yield value


class started:  # noqa: N801 - used like a function
    def __init__(self, nats_url: str, tmp_path: Path, **overrides: Any) -> None:
        self.nats_url = nats_url
        self.tmp_path = tmp_path
        self.overrides = overrides

    async def __aenter__(self) -> Env:
        self.github = await GithubDouble().start()
        self.github.add_repo(REPO, installation_id=INSTALLATION)
        self.github.set_permission(REPO, "octocat", "write")
        self.github.set_permission(REPO, "hubot", "triage")
        key = self.tmp_path / "github-app.pem"
        key.write_text(self.github.app_private_key_pem)
        settings = GatewaySettings(
            **{
                "nats_url": self.nats_url,
                "http_port": 0,
                "log_format": "text",
                "github_webhook_secret": SECRET,
                "github_app_id": self.github.app_id,
                "github_app_private_key_file": str(key),
                "github_api_url": self.github.url,
                "github_repositories": f"{REPO}=demo",
                "github_default_spec": "hello",
                **self.overrides,
            }
        )
        service = build(settings)
        self.integration = integration_of(service)
        self.service = service
        self._running = running_service(service)
        await self._running.__aenter__()
        await wait_until(lambda: service.state.readmodel.ready)
        self.nc = await nats.connect(self.nats_url)
        js = self.nc.jetstream()
        self.http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{service.http.port}", timeout=20)
        return Env(
            service=service,
            integration=self.integration,
            github=self.github,
            http=self.http,
            nc=self.nc,
            js=js,
            runs_kv=await js.key_value("runs"),
            integrations_kv=await js.key_value("integrations"),
        )

    async def __aexit__(self, *exc: object) -> None:
        await self.http.aclose()
        await self.nc.close()
        await self._running.__aexit__(None, None, None)
        await self.github.stop()


def record_of(run: RunRequested, state: str, revision: int, **fields: Any) -> RunRecord:
    now = utcnow()
    return RunRecord(
        run_id=run.run_id,
        project=run.project,
        env=run.env,
        params=run.params,
        state=state,  # type: ignore[arg-type]
        requested_by=run.requested_by,
        idempotency_key=run.idempotency_key,
        created_at=run.occurred_at,
        state_entered_at=now,
        revision=revision,
        **fields,
    )


def changed(
    run: RunRequested, from_state: str | None, to_state: str, *, attempt: int = 1, **fields: Any
) -> RunStateChanged:
    return RunStateChanged(
        run_id=run.run_id,
        project=run.project,
        attempt=attempt,
        from_state=from_state,  # type: ignore[arg-type]
        to_state=to_state,  # type: ignore[arg-type]
        **fields,
    )


async def play(
    env: Env, run: RunRequested, final: str, *, reason: str | None = None, message: str = ""
) -> None:
    """The scheduler's and executor's part: queued, starting, running with progress, then `final`."""
    await env.put(record_of(run, "queued", 1))
    await env.publish(RunQueued(run_id=run.run_id, project=run.project, attempt=1))
    await env.publish(changed(run, "queued", "starting"))
    await env.put(record_of(run, "starting", 2))
    started_at = utcnow()
    await env.publish(RunStarted(run_id=run.run_id, attempt=1, backend="local", workload_ref="local:4242"))
    await env.publish(changed(run, "starting", "running"))
    await env.put(record_of(run, "running", 3, started_at=started_at))
    await wait_until(lambda: env.check_runs()[-1]["status"] == "in_progress")
    await env.publish(
        RunProgress(
            run_id=run.run_id,
            attempt=1,
            phase="implement",
            task="16:impl",
            finished=150,
            total=192,
            message="writing the handler",
        )
    )
    await wait_until(lambda: "150/192" in (env.check_runs()[-1]["output"]["title"] or ""))
    await env.put(
        record_of(
            run,
            final,
            4,
            started_at=started_at,
            finished_at=utcnow(),
            reason=reason,
            message=message,
            cost_usd=0.42,
        )
    )
    await env.publish(changed(run, "running", final, reason=reason, message=message))
    await wait_until(lambda: env.check_runs()[-1]["status"] == "completed")
    await wait_until(lambda: len(env.github.comments_on(REPO, run_number(run), by_app=True)) == 1)


def run_number(run: RunRequested) -> int:
    labels = run.params.labels
    return int(labels.get("github-pr") or labels["github-issue"])


# ------------------------------------------------------------------------------------------------
# runs from the three kinds of deliveries


async def _has_audit(env: Env) -> bool:
    return bool(await env.stored("OPS", "fabrik.audit.recorded"))


async def test_a_pr_comment_starts_a_run_reported_as_a_check_run(env: Env) -> None:
    env.github.add_pull(REPO, 7, head_sha=PR_HEAD, head_ref="greeting")
    payload = comment_payload("issue_comment.created.pull_request")
    env.github.add_issue_comment(REPO, 7, payload["comment"]["body"], comment_id=payload["comment"]["id"])
    # GitHub answers slowly: the webhook must not wait for it
    env.github.delay("GET", r"/collaborators/", 1.5)
    started = time.perf_counter()
    response = await env.deliver("issue_comment", payload)
    elapsed = time.perf_counter() - started
    assert response.status_code == 202, response.text
    assert response.json()["accepted"] is True
    assert elapsed < FAST_ENOUGH

    run = await env.one_run()
    assert run.project == "demo"
    assert run.env == "staging"
    assert run.requested_by == "github:octocat"
    assert run.params.repo is not None
    assert run.params.repo.url == CLONE_URL
    assert run.params.repo.ref == PR_HEAD  # the PR's head, fetched from the pulls API
    await wait_until(lambda: _has_audit(env))
    (audit,) = [msgspec.json.decode(m.data) for m in await env.stored("OPS", "fabrik.audit.recorded")]
    assert audit["actor"] == "github:octocat" and audit["action"] == "run.submit"
    assert audit["target"] == f"run:{run.run_id}" and audit["details"]["via"] == "github"
    assert run.params.spec_path == ".fabrik/specs/greeting.json"
    assert run.params.priority == "high"
    assert run.params.timeout_seconds == 3600
    assert run.params.labels == {
        "team": "core",
        "trigger": "github",
        "github-pr": "7",
        "github-repo": "octo-org.hello-world",
    }
    assert run.idempotency_key is not None and run.idempotency_key.startswith("github:")

    await wait_until(lambda: len(env.check_runs()) == 1)
    (check,) = env.check_runs()
    assert check["head_sha"] == PR_HEAD
    assert check["status"] == "queued"
    assert check["name"] == "fabrik"
    assert check["details_url"] == f"{env.base_url}/runs/{run.run_id}"
    assert check["external_id"] == f"{run.run_id}/1"
    await wait_until(lambda: len(env.github.reactions) == 1)
    assert env.github.reactions[0]["content"] == "rocket"

    await play(env, run, "succeeded")
    (check,) = env.check_runs()
    statuses = [h["status"] for h in check["history"]]
    assert statuses[0] == "queued"
    assert "in_progress" in statuses
    progress = [h for h in check["history"] if "150/192" in (h["output"]["title"] or "")]
    assert progress and "writing the handler" in progress[0]["output"]["summary"]
    assert check["status"] == "completed"
    assert check["conclusion"] == "success"
    assert check["completed_at"] is not None
    assert check["details_url"] == f"{env.base_url}/runs/{run.run_id}"
    (comment,) = env.github.comments_on(REPO, 7, by_app=True)
    assert comment["user"]["login"].endswith("[bot]")
    assert "succeeded" in comment["body"]
    assert f"{env.base_url}/runs/{run.run_id}" in comment["body"]
    # every call authenticated with an installation token, with GitHub's headers
    for call in [c for c in env.github.calls if c.path.startswith("/repos/")]:
        assert call.headers["authorization"].startswith("Bearer ghs_")
        assert call.headers["x-github-api-version"] == "2022-11-28"


async def test_an_issue_label_starts_a_run_on_the_default_branch(env: Env) -> None:
    env.github.add_issue(REPO, 12)
    main = env.github.repo(REPO).branches["main"]
    response = await env.deliver("issues", fresh(fixture("issues.labeled")))
    assert response.status_code == 202

    run = await env.one_run()
    assert run.params.repo is not None
    assert run.params.repo.url == CLONE_URL
    assert run.params.repo.ref == main
    assert run.env == "dev"
    assert run.params.spec_path == ".fabrik/specs/greeting.json"  # from the issue body's /fabrik run
    assert run.params.budget_usd == 3
    assert run.params.labels["github-issue"] == "12"

    await wait_until(lambda: len(env.check_runs()) == 1)
    assert env.check_runs()[0]["head_sha"] == main
    await play(env, run, "failed", reason="workload_error", message="tests failed: 3 of 41")
    (check,) = env.check_runs()
    assert check["conclusion"] == "failure"
    assert check["output"]["title"] == "Failed: workload error"
    assert "tests failed: 3 of 41" in check["output"]["summary"]
    (comment,) = env.github.comments_on(REPO, 12, by_app=True)
    assert "failed" in comment["body"] and "tests failed: 3 of 41" in comment["body"]


@pytest.mark.parametrize(("final", "conclusion"), [("cancelled", "cancelled"), ("timed_out", "timed_out")])
async def test_a_pull_request_label_starts_a_run_on_its_head(env: Env, final: str, conclusion: str) -> None:
    env.github.add_pull(REPO, 7, head_sha=PR_HEAD, head_ref="greeting")
    env.github.add_repo("octo-org/other")
    response = await env.deliver("pull_request", fresh(fixture("pull_request.labeled")))
    assert response.status_code == 202

    run = await env.one_run()
    assert run.params.repo is not None
    assert run.params.repo.ref == PR_HEAD  # from the payload: no pulls API call needed
    assert run.params.repo.url == CLONE_URL
    assert env.github.calls_to("GET", r"/pulls/") == []
    assert run.params.spec_path == ".fabrik/specs/hello.json"  # FABRIK_GITHUB_DEFAULT_SPEC

    await wait_until(lambda: len(env.check_runs()) == 1)
    await play(env, run, final)
    (check,) = env.check_runs()
    assert check["conclusion"] == conclusion
    assert len(env.github.comments_on(REPO, 7, by_app=True)) == 1


# ------------------------------------------------------------------------------------------------
# what starts nothing


async def test_a_bad_signature_is_401_and_stores_nothing(env: Env) -> None:
    payload = comment_payload("issue_comment.created.issue")
    response = await env.deliver("issue_comment", payload, secret="not the secret")
    assert response.status_code == 401
    assert response.headers["content-type"].startswith("application/problem+json")
    problem = response.json()
    assert problem["type"] == "https://fabrik.sh/problems/invalid-signature"
    assert problem["instance"] == PATH
    response = await env.deliver("issue_comment", payload, signature="")
    assert response.status_code == 401
    # a body changed after signing
    body = json.dumps(payload).encode()
    response = await env.deliver("issue_comment", body + b" ", signature=sign(SECRET, body))
    assert response.status_code == 401
    assert await env.stored("INGEST", "fabrik.ingest.github.>") == []
    assert await env.requested() == []


async def test_a_replayed_delivery_starts_nothing(env: Env) -> None:
    env.github.add_issue(REPO, 12)
    payload = comment_payload("issue_comment.created.issue")
    delivery = str(uuid.uuid4())
    first = await env.deliver("issue_comment", payload, delivery_id=delivery)
    assert first.status_code == 202 and first.json()["duplicate"] is False
    run = await env.one_run()
    # GitHub's "Redeliver" (same delivery id) within JetStream's dedupe window: stored once
    again = await env.deliver("issue_comment", payload, delivery_id=delivery)
    assert again.status_code == 202 and again.json()["duplicate"] is True
    assert len(await env.stored("INGEST", "fabrik.ingest.github.issue_comment")) == 1

    # ... and after the window (JetStream stores it again): the Idempotency-Key of the delivery
    (stored,) = await env.stored("INGEST", "fabrik.ingest.github.issue_comment")
    replay = msgspec.json.decode(stored.data, type=GithubDeliveryReceived)
    await env.js.publish(replay.subject(), encode(replay), headers={"Nats-Msg-Id": "after-the-window"})
    assert len(await env.stored("INGEST", "fabrik.ingest.github.issue_comment")) == 2
    await env.idle()
    assert [r.run_id for r in await env.requested()] == [run.run_id]
    assert len(env.check_runs()) == 1

    # ... and a day later (the Idempotency-Key expired): the signed payload is too old to start a run
    old = comment_payload("issue_comment.created.issue")
    fresh(old, age=timedelta(hours=13))
    response = await env.deliver("issue_comment", old)
    assert response.status_code == 202
    await env.idle()
    assert len(await env.requested()) == 1


async def test_a_comment_from_a_user_without_write_access_starts_nothing(env: Env) -> None:
    env.github.add_issue(REPO, 12)
    for user in ("hubot", "stranger"):  # triage role; not a collaborator (read on a public repository)
        response = await env.deliver(
            "issue_comment", comment_payload("issue_comment.created.issue", sender=user)
        )
        assert response.status_code == 202
    await env.idle()
    assert len(env.github.calls_to("GET", r"/collaborators/.+/permission$")) == 2
    assert await env.requested() == []
    assert env.check_runs() == []
    assert env.github.comments_on(REPO, 12, by_app=True) == []


async def test_other_events_are_stored_and_start_nothing(env: Env) -> None:
    ping = await env.deliver("ping", fixture("ping"))
    assert ping.status_code == 200 and ping.json()["ok"] is True
    push = await env.deliver(
        "push", {"ref": "refs/heads/main", "repository": fixture("issues.labeled")["repository"]}
    )
    assert push.status_code == 202
    edited = comment_payload("issue_comment.created.issue")
    edited["action"] = "edited"
    assert (await env.deliver("issue_comment", edited)).status_code == 202
    other_label = fresh(fixture("issues.labeled"))
    other_label["label"] = {**other_label["label"], "name": "bug"}
    assert (await env.deliver("issues", other_label)).status_code == 202
    unmapped = comment_payload("issue_comment.created.issue")
    unmapped["repository"] = {**unmapped["repository"], "full_name": "someone/else", "name": "else"}
    assert (await env.deliver("issue_comment", unmapped)).status_code == 202
    await env.idle()
    subjects = [m.subject for m in await env.stored("INGEST", "fabrik.ingest.github.>")]
    assert subjects == [
        "fabrik.ingest.github.ping",
        "fabrik.ingest.github.push",
        "fabrik.ingest.github.issue_comment",
        "fabrik.ingest.github.issues",
        "fabrik.ingest.github.issue_comment",
    ]
    assert await env.requested() == []
    assert env.github.calls == []


async def test_a_bad_command_gets_a_reply_and_starts_nothing(env: Env) -> None:
    env.github.add_issue(REPO, 12)
    payload = comment_payload(
        "issue_comment.created.issue", "/fabrik run greeting --priority urgent --env Prod"
    )
    assert (await env.deliver("issue_comment", payload)).status_code == 202
    await wait_until(lambda: len(env.github.comments_on(REPO, 12, by_app=True)) == 1)
    (reply,) = env.github.comments_on(REPO, 12, by_app=True)
    assert reply["body"].startswith("@octocat Fabrik cannot start this run")
    assert "`--priority`" in reply["body"] and "`--env`" in reply["body"]
    payload = comment_payload("issue_comment.created.issue", "/fabrik run --colour red")
    assert (await env.deliver("issue_comment", payload)).status_code == 202
    await wait_until(lambda: len(env.github.comments_on(REPO, 12, by_app=True)) == 2)
    assert "unknown option `--colour`" in env.github.comments_on(REPO, 12, by_app=True)[1]["body"]
    await env.idle()
    assert await env.requested() == []


async def test_without_a_webhook_secret_the_endpoint_is_503(nats_url: str, tmp_path: Path) -> None:
    async with started(nats_url, tmp_path, github_webhook_secret="") as env:
        response = await env.deliver("ping", fixture("ping"))
        assert response.status_code == 503
        assert response.json()["type"] == "https://fabrik.sh/problems/webhook-not-configured"
        assert await env.stored("INGEST", "fabrik.ingest.github.>") == []


# ------------------------------------------------------------------------------------------------
# reporting survives GitHub failures and missed events


async def test_the_conclusion_survives_github_failures(env: Env) -> None:
    env.github.add_issue(REPO, 12)
    assert (
        await env.deliver("issue_comment", comment_payload("issue_comment.created.issue"))
    ).status_code == 202
    run = await env.one_run()
    await wait_until(lambda: len(env.check_runs()) == 1)
    await env.put(record_of(run, "running", 1))
    # GitHub is rate limiting, then failing, when the run ends
    env.github.rate_limit_next("PATCH", r"/check-runs/", retry_after=1)
    env.github.fail("PATCH", r"/check-runs/", 502, times=1)
    await env.put(record_of(run, "succeeded", 2))
    await env.publish(changed(run, "running", "succeeded"))
    await wait_until(lambda: env.check_runs()[0]["status"] == "completed", timeout=30)
    assert env.check_runs()[0]["conclusion"] == "success"
    await wait_until(lambda: len(env.github.comments_on(REPO, 12, by_app=True)) == 1)
    failed = [c for c in env.github.calls_to("PATCH", r"/check-runs/") if c.status >= 400]
    assert [c.status for c in failed] == [403, 502]


async def test_the_reconciler_reports_what_no_event_said(env: Env) -> None:
    """An event lost (or dead-lettered): the run record says the run ended, and GitHub hears it."""
    env.github.add_issue(REPO, 12)
    assert (
        await env.deliver("issue_comment", comment_payload("issue_comment.created.issue"))
    ).status_code == 202
    run = await env.one_run()
    await wait_until(lambda: len(env.check_runs()) == 1)
    await env.put(record_of(run, "timed_out", 5, reason="deadline"))  # no event published
    await wait_until(lambda: env.check_runs()[0]["status"] == "completed", timeout=20)
    assert env.check_runs()[0]["conclusion"] == "timed_out"
    await wait_until(lambda: len(env.github.comments_on(REPO, 12, by_app=True)) == 1)

    async def settled() -> bool:
        # the record is written after GitHub took the comment, and the lease released after that
        origin = await env.origin(run.run_id)
        return origin.commented_attempt == 1 and origin.lease_owner is None

    await wait_until(settled)
    origin = await env.origin(run.run_id)
    assert origin.reported == origin.desired


async def test_redelivered_run_events_change_nothing_twice(env: Env) -> None:
    env.github.add_issue(REPO, 12)
    assert (
        await env.deliver("issue_comment", comment_payload("issue_comment.created.issue"))
    ).status_code == 202
    run = await env.one_run()
    await wait_until(lambda: len(env.check_runs()) == 1)
    end = changed(run, "running", "succeeded")
    await env.put(record_of(run, "succeeded", 2))
    await env.publish(end)
    await wait_until(lambda: len(env.github.comments_on(REPO, 12, by_app=True)) == 1)
    await env.idle(RUNS_DURABLE, "RUNS")
    calls = len(env.github.calls)
    # the same event again (a new message id: as if redelivered after the dedupe window)
    await env.js.publish(end.subject(), encode(end), headers={"Nats-Msg-Id": "again"})
    await env.publish(changed(run, "queued", "running"))  # late and out of order
    await env.idle(RUNS_DURABLE, "RUNS")
    assert len(env.github.calls) == calls
    assert env.check_runs()[0]["conclusion"] == "success"
