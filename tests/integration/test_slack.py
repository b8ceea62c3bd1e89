"""Slack over a real NATS server, with the real gateway service in this process and the Slack
double playing Slack (it signs and sends slash commands, receives `response_url` answers and serves
the Web API the notifications use).

The scheduler is not running: the tests assert the `run.requested` a command publishes, then
publish the lifecycle events and write the run records into the `runs` bucket as the scheduler
would.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import nats
import pytest
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from fabrik_common.codec import encode
from fabrik_common.events import (
    AuditRecorded,
    Event,
    RunCancelRequested,
    RunParameters,
    RunRequested,
    RunStateChanged,
    SlackCommandReceived,
)
from fabrik_common.ids import new_ulid, utcnow
from fabrik_common.runs import TEMPLATES, RunRecord
from fabrik_common.service import Service
from fabrik_common.testing import running_service
from fabrik_common.testing.slack_double import SlackDouble
from fabrik_gateway.api.webhooks_slack import SLACK_WEBHOOK_PATH
from fabrik_gateway.app import build
from fabrik_gateway.gateway import Gateway
from fabrik_gateway.settings import GatewaySettings
from fabrik_gateway.slack.integration import slack_for
from fabrik_gateway.slack.notifier import KEY_PREFIX, SlackThread

CHANNEL = "C0DEMO01"
USERS = "U0DEV=demo:developer,U0VIEW=viewer"
FAST_ENOUGH = 1.5
"""Slack gives up after 3 s; the acknowledgement must come well before (here: one publish)."""


@dataclass
class Env:
    service: Service[Gateway]
    slack: SlackDouble
    nc: NatsClient
    js: JetStreamContext
    runs_kv: KeyValue
    integrations_kv: KeyValue
    url: str

    @property
    def gateway(self) -> Gateway:
        return self.service.state

    async def command(self, text: str, **kw: Any) -> Any:
        return await self.slack.send_command(self.url, text, **kw)

    async def stored(self, stream: str, subject: str) -> list[Any]:
        """The messages `stream` holds on `subject` (wildcards allowed), in order."""
        info = await self.js.stream_info(stream, subjects_filter=subject)
        count = sum((info.state.subjects or {}).values())
        if count == 0:
            return []
        sub = await self.js.subscribe(subject, ordered_consumer=True)
        try:
            return [await sub.next_msg(timeout=5) for _ in range(count)]
        finally:
            await sub.unsubscribe()

    async def events(self, stream: str, subject: str, kind: type[Any]) -> list[Any]:
        return [msgspec.json.decode(m.data, type=kind) for m in await self.stored(stream, subject)]

    async def publish(self, event: Event) -> None:
        await self.js.publish(event.subject(), encode(event), headers={"Nats-Msg-Id": event.event_id})

    async def put(self, record: RunRecord) -> None:
        await self.runs_kv.put(record.run_id, msgspec.json.encode(record))
        await wait_until(lambda: _same(self.gateway.readmodel.get(record.run_id), record))

    def answers(self, response_id: str) -> list[dict[str, Any]]:
        return self.slack.responses.get(response_id, [])


def _same(current: RunRecord | None, record: RunRecord) -> bool:
    return current is not None and current.state == record.state and current.revision == record.revision


async def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


@pytest.fixture
async def env(nats_url: str) -> AsyncIterator[Env]:
    async with started(nats_url) as value:
        yield value


class started:  # noqa: N801 - used like a function
    def __init__(self, nats_url: str, **overrides: Any) -> None:
        self.nats_url = nats_url
        self.overrides = overrides

    async def __aenter__(self) -> Env:
        self.slack = await SlackDouble(channels=(CHANNEL,)).start()
        settings = GatewaySettings(
            **{
                "nats_url": self.nats_url,
                "http_port": 0,
                "log_format": "text",
                "slack_signing_secret": self.slack.signing_secret,
                "slack_bot_token": self.slack.token,
                "slack_api_url": self.slack.api_url,
                "slack_channels": f"demo={CHANNEL}",
                "slack_users": USERS,
                "public_url": "https://fabrik.example.com",
                **self.overrides,
            }
        )
        self.service = build(settings)
        self._running = running_service(self.service)
        await self._running.__aenter__()
        await wait_until(lambda: self.service.state.readmodel.ready)
        self.nc = await nats.connect(self.nats_url)
        js = self.nc.jetstream()
        return Env(
            service=self.service,
            slack=self.slack,
            nc=self.nc,
            js=js,
            runs_kv=await js.key_value("runs"),
            integrations_kv=await js.key_value("integrations"),
            url=f"http://127.0.0.1:{self.service.http.port}{SLACK_WEBHOOK_PATH}",
        )

    async def __aexit__(self, *exc: object) -> None:
        await self.nc.close()
        await self._running.__aexit__(None, None, None)
        await slack_for(self.service.state).aclose()
        await self.slack.stop()


def run_record(run_id: str, state: str, *, revision: int, project: str = "demo", **fields: Any) -> RunRecord:
    now = utcnow()
    return RunRecord(
        run_id=run_id,
        project=project,
        env="dev",
        params=RunParameters(resources=TEMPLATES["default"], spec_path="specs/hello.json"),
        state=state,  # type: ignore[arg-type]
        created_at=now,
        state_entered_at=now,
        requested_by="slack:U0DEV",
        revision=revision,
        **fields,
    )


def changed(run_id: str, from_state: str | None, to_state: str, **fields: Any) -> RunStateChanged:
    return RunStateChanged(
        run_id=run_id,
        project="demo",
        attempt=1,
        from_state=from_state,  # type: ignore[arg-type]
        to_state=to_state,  # type: ignore[arg-type]
        **fields,
    )


# ------------------------------------------------------------------------------------------------


async def test_run_from_slack_then_its_thread(env: Env) -> None:
    """The whole path: a signed `/fabrik run` is acknowledged at once, recorded in INGEST, turned
    into one `run.requested` (also when Slack retries), answered through the response_url; the
    run's start and end then make one thread in the project's channel."""
    result = await env.command(
        "run demo hello --repo https://github.com/acme/hello --priority high",
        user_id="U0DEV",
        user_name="dev",
    )
    assert result.status == 200, result.body
    assert result.body["response_type"] == "ephemeral"
    assert "Starting a run of `hello` in *demo*" in result.body["text"]
    assert result.seconds < FAST_ENOUGH, result.seconds

    await wait_until(lambda: bool(env.answers(result.response_id)))
    requested = await env.events("RUNS", "fabrik.runs.requested.*", RunRequested)
    assert len(requested) == 1
    run = requested[0]
    assert run.project == "demo" and run.requested_by == "slack:U0DEV"
    assert run.params.spec_path == ".fabrik/specs/hello.json" and run.params.priority == "high"
    assert run.params.repo is not None and run.params.repo.url == "https://github.com/acme/hello"
    (answer,) = env.answers(result.response_id)
    assert answer["response_type"] == "in_channel"
    assert f"<https://fabrik.example.com/runs/{run.run_id}|{run.run_id}>" in answer["text"]
    (ingested,) = await env.events("INGEST", "fabrik.ingest.slack.command", SlackCommandReceived)
    assert ingested.user_id == "U0DEV" and ingested.text.startswith("run demo hello")

    # Slack retries the same command (same trigger_id, new timestamp): stored once, run once.
    retried = await env.slack.send_command(env.url, "", body=_body_of(ingested, env), retry_num=1)
    assert retried.status == 200
    await asyncio.sleep(0.5)
    assert len(await env.stored("INGEST", "fabrik.ingest.slack.command")) == 1
    assert len(await env.stored("RUNS", "fabrik.runs.requested.*")) == 1

    # The scheduler and executor take it from there: started, then succeeded.
    await env.put(run_record(run.run_id, "running", revision=3))
    await env.publish(changed(run.run_id, "starting", "running", revision=3))
    await env.slack.wait_for(lambda: len(env.slack.parents(CHANNEL)) == 1)
    (parent,) = env.slack.parents(CHANNEL)
    assert parent.thread_ts is None
    assert f"<https://fabrik.example.com/runs/{run.run_id}|{run.run_id}>" in parent.text
    assert "started" in parent.text and "requested by slack:U0DEV" in parent.text

    await env.put(run_record(run.run_id, "succeeded", revision=4, cost_usd=0.5))
    await env.publish(changed(run.run_id, "running", "succeeded", revision=4))
    await env.slack.wait_for(lambda: bool(env.slack.calls_of("chat.update")))
    (reply,) = env.slack.thread(CHANNEL, parent.ts)
    assert reply.thread_ts == parent.ts and reply.text.startswith(":white_check_mark:")
    assert "succeeded" in parent.text and parent.edits  # the first message shows the final state
    entry = await env.integrations_kv.get(KEY_PREFIX + run.run_id)
    stored = msgspec.json.decode(entry.value or b"", type=SlackThread)
    assert stored.channel == CHANNEL and stored.ts == parent.ts

    # Every call carried the bot token as JSON.
    for call in env.slack.calls:
        assert call.headers["Authorization"] == f"Bearer {env.slack.token}"
        assert call.headers["Content-Type"] == "application/json; charset=utf-8"
        assert call.answer["ok"] is True


def _body_of(event: SlackCommandReceived, env: Env) -> bytes:
    body, _ = env.slack.command_request(
        event.text,
        user_id=event.user_id,
        user_name=event.user_name,
        channel_id=event.channel_id,
        trigger_id=event.request_id,
        response_url=event.response_url,
    )
    return body


async def test_status_and_cancel(env: Env) -> None:
    run_id = new_ulid()
    await env.put(run_record(run_id, "running", revision=2))

    status = await env.command(f"status {run_id.lower()}", user_id="U0VIEW")
    assert status.status == 200 and f"Looking up run {run_id}" in status.body["text"]
    await wait_until(lambda: bool(env.answers(status.response_id)))
    (answer,) = env.answers(status.response_id)
    assert answer["response_type"] == "ephemeral"
    assert (
        f"*Run <https://fabrik.example.com/runs/{run_id}|{run_id}>* in *demo* is *running*" in answer["text"]
    )

    cancel = await env.command(f"cancel {run_id} wrong branch", user_id="U0DEV", user_name="dev")
    assert cancel.status == 200 and f"Cancelling run {run_id}" in cancel.body["text"]
    await wait_until(lambda: bool(env.answers(cancel.response_id)))
    (answer,) = env.answers(cancel.response_id)
    assert answer["response_type"] == "in_channel" and "asked to cancel run" in answer["text"]
    (requested,) = await env.events("RUNS", "fabrik.runs.cancel_requested.*", RunCancelRequested)
    assert requested.run_id == run_id and requested.requested_by == "slack:U0DEV"
    assert requested.reason == "wrong branch"
    audits = await env.events("OPS", "fabrik.audit.recorded", AuditRecorded)
    assert [(a.actor, a.action, a.result, a.target) for a in audits] == [
        ("slack:U0DEV", "run.cancel", "ok", run_id)
    ]

    unknown = await env.command(f"status {new_ulid()}", user_id="U0VIEW")
    await wait_until(lambda: bool(env.answers(unknown.response_id)))
    assert "does not exist" in env.answers(unknown.response_id)[0]["text"]


async def test_refused_requests_publish_nothing(env: Env) -> None:
    body, _ = env.slack.command_request("run demo hello --repo /srv/x", user_id="U0DEV")
    for kw, reason in (
        ({"timestamp": time.time() - 301}, "too old"),
        ({"timestamp": time.time() + 301}, "future"),
        ({"secret": "not-the-signing-secret"}, "does not match"),
    ):
        result = await env.slack.send_command(env.url, "", body=body, **kw)
        assert result.status == 401, result.body
        assert result.body["type"] == "https://fabrik.sh/problems/invalid-signature"
        assert reason in result.body["detail"]
    # a signed body that was altered on the way
    headers = env.slack.signed_headers(body)
    import aiohttp

    async with aiohttp.ClientSession() as session:
        response = await session.post(env.url, data=body.replace(b"U0DEV", b"U0BAD"), headers=headers)
        assert response.status == 401
        unsigned = await session.post(
            env.url, data=body, headers={"Content-Type": "application/x-www-form-urlencoded"}
        )
        assert unsigned.status == 401
        # Slack's certificate check and a signed body that is not a form: verified, nothing published
        ssl_check = b"ssl_check=1&token=x"
        response = await session.post(env.url, data=ssl_check, headers=env.slack.signed_headers(ssl_check))
        assert response.status == 200
        as_json = b'{"command": "/fabrik"}'
        headers = {**env.slack.signed_headers(as_json), "Content-Type": "application/json"}
        response = await session.post(env.url, data=as_json, headers=headers)
        assert response.status == 415
    await asyncio.sleep(0.3)
    assert await env.stored("INGEST", "fabrik.ingest.>") == []
    assert await env.stored("RUNS", "fabrik.runs.>") == []


async def test_users_without_the_role_are_refused(env: Env) -> None:
    stranger = await env.command("run demo hello --repo /srv/x", user_id="U0STRANGER")
    assert stranger.status == 200
    assert "not allowed" in stranger.body["text"] and "FABRIK_SLACK_USERS" in stranger.body["text"]

    viewer = await env.command("run demo hello --repo /srv/x", user_id="U0VIEW")
    assert "the developer role in project demo is needed to start runs" in viewer.body["text"]

    run_id = new_ulid()
    await env.put(run_record(run_id, "running", revision=2))
    cancel = await env.command(f"cancel {run_id}", user_id="U0VIEW")
    await wait_until(lambda: bool(env.answers(cancel.response_id)))
    assert (
        "developer role in project demo is needed to cancel runs"
        in env.answers(cancel.response_id)[0]["text"]
    )

    other = run_record(new_ulid(), "running", revision=2, project="secret")
    await env.put(other)
    dev = await env.command(f"cancel {other.run_id}", user_id="U0DEV")
    await wait_until(lambda: bool(env.answers(dev.response_id)))
    assert "does not exist" in env.answers(dev.response_id)[0]["text"]

    await asyncio.sleep(0.3)
    assert await env.stored("RUNS", "fabrik.runs.requested.*") == []
    assert await env.stored("RUNS", "fabrik.runs.cancel_requested.*") == []
    # the answers given at once need nothing more through the response_url
    assert env.answers(stranger.response_id) == [] and env.answers(viewer.response_id) == []
    audits = await env.events("OPS", "fabrik.audit.recorded", AuditRecorded)
    assert sorted((a.actor, a.action, a.result) for a in audits) == [
        ("slack:U0DEV", "run.cancel", "failed"),
        ("slack:U0STRANGER", "run.submit", "denied"),
        ("slack:U0VIEW", "run.cancel", "denied"),
        ("slack:U0VIEW", "run.submit", "denied"),
    ]


async def test_help_and_usage_are_answered_at_once(env: Env) -> None:
    help_ = await env.command("help", user_id="U0STRANGER")
    assert help_.status == 200 and "/fabrik run <project> <spec>" in help_.body["text"]
    bad = await env.command("run demo", user_id="U0DEV")
    assert "needs a project and a spec" in bad.body["text"]
    await asyncio.sleep(0.3)
    assert env.answers(help_.response_id) == [] and env.answers(bad.response_id) == []


async def test_the_endpoint_answers_fast(env: Env) -> None:
    timings = []
    for i in range(10):
        result = await env.command(f"status {new_ulid()}", user_id="U0VIEW", trigger_id=f"fast-{i}")
        assert result.status == 200
        timings.append(result.seconds)
    timings.sort()
    print(
        f"slack command acknowledgement: median {timings[5] * 1000:.1f} ms, max {timings[-1] * 1000:.1f} ms"
    )
    assert timings[-1] < FAST_ENOUGH


async def test_notifications_thread_per_run_and_survive_slack_errors(env: Env) -> None:
    first, second = new_ulid(), new_ulid()
    env.slack.fail("chat.postMessage", status=429, retry_after=1)  # the first try is rate limited
    await env.put(run_record(first, "running", revision=3))
    await env.publish(changed(first, "starting", "running"))
    await env.put(run_record(second, "running", revision=3))
    await env.publish(changed(second, "starting", "running"))
    await env.slack.wait_for(lambda: len(env.slack.parents(CHANNEL)) == 2, within=15)
    parents = {p.text.split("|", 1)[1][:26]: p for p in env.slack.parents(CHANNEL)}
    assert set(parents) == {first, second}

    await env.publish(changed(first, "running", "failed", reason="workload_error", message="exit 1"))
    await env.publish(changed(first, "running", "failed", reason="workload_error"))  # re-announced
    await env.publish(changed(second, "running", "succeeded"))
    await env.slack.wait_for(lambda: len(env.slack.calls_of("chat.update")) == 2, within=15)
    await asyncio.sleep(0.5)
    first_thread = env.slack.thread(CHANNEL, parents[first].ts)
    second_thread = env.slack.thread(CHANNEL, parents[second].ts)
    assert len(first_thread) == 1 and "failed (workload_error)" in first_thread[0].text
    assert len(second_thread) == 1 and "succeeded" in second_thread[0].text
    assert len(env.slack.parents(CHANNEL)) == 2
    # the rate-limited attempt, then 2 parents and 2 replies
    assert [c.status for c in env.slack.calls_of("chat.postMessage")].count(429) == 1
    assert len([c for c in env.slack.calls_of("chat.postMessage") if c.answer["ok"]]) == 4

    # a project without a channel: nothing posted
    await env.publish(
        RunStateChanged(run_id=new_ulid(), project="other", attempt=1, from_state=None, to_state="running")
    )
    await asyncio.sleep(0.5)
    assert len(env.slack.parents(CHANNEL)) == 2


async def test_no_signing_secret_is_503(nats_url: str) -> None:
    async with started(nats_url, slack_signing_secret="") as env:
        result = await env.command("help")
        assert result.status == 503
        assert result.body["type"] == "https://fabrik.sh/problems/slack-not-configured"
        assert await env.stored("INGEST", "fabrik.ingest.>") == []
