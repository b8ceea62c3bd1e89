"""The Slack integration without NATS: signatures, settings, slash-command parsing and execution,
the Web API client and the run notifier (against the Slack double, in this process)."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest

from fabrik_common.bus import Retry
from fabrik_common.events import RunParameters, RunRequested, RunStateChanged, SlackCommandReceived
from fabrik_common.ids import is_ulid, new_ulid, utcnow
from fabrik_common.runs import TEMPLATES, RunRecord
from fabrik_common.testing.slack_double import SlackDouble
from fabrik_gateway.auth.principal import Principal
from fabrik_gateway.gateway import normalize_run_id, pending_record
from fabrik_gateway.models import ActionAccepted, RunView
from fabrik_gateway.problems import ProblemError, not_found
from fabrik_gateway.readmodel import ReadModel
from fabrik_gateway.settings import GatewaySettings
from fabrik_gateway.slack import commands
from fabrik_gateway.slack.client import SlackApiError, SlackClient, is_retryable, respond
from fabrik_gateway.slack.commands import (
    Answer,
    CancelCommand,
    RunCommand,
    StatusCommand,
    Triaged,
    command_event,
    execute,
    parse,
    submit_body,
    triage,
)
from fabrik_gateway.slack.config import (
    ChannelMap,
    SlackConfig,
    SlackConfigError,
    check_slack_settings,
    default_repositories,
    parse_channels,
    parse_users,
)
from fabrik_gateway.slack.notifier import MemoryThreadStore, Notifier, render
from fabrik_gateway.slack.signature import SignatureError, compute_signature, signed_headers, verify
from fabrik_gateway.validation import ValidSubmit, check_idempotency_key, validate_submit

SECRET = "8f742231b10e8888abcd99yyyzzz85a5"
NOW = 1_700_000_000.0

# ------------------------------------------------------------------------------------------------
# signature


def test_signature_matches_slacks_documented_example() -> None:
    # https://api.slack.com/authentication/verifying-requests-from-slack (the documented example)
    body = (
        b"token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&channel_id=G8PSS9T3V"
        b"&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&command=%2Fwebhook-collect&text="
        b"&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN"
        b"&trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c"
    )
    assert (
        compute_signature(SECRET, "1531420618", body)
        == "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503"
    )


def test_verify_accepts_a_fresh_signed_request() -> None:
    headers = signed_headers(SECRET, b"a=1", NOW)
    verify(SECRET, headers["X-Slack-Request-Timestamp"], headers["X-Slack-Signature"], b"a=1", now=NOW + 299)


@pytest.mark.parametrize(
    ("timestamp", "signature", "body", "secret", "why"),
    [
        (str(int(NOW)), "v0=" + "0" * 64, b"a=1", SECRET, "does not match"),
        (str(int(NOW)), None, b"a=1", SECRET, "missing"),
        (None, "v0=x", b"a=1", SECRET, "missing"),
        ("soon", "v0=x", b"a=1", SECRET, "Unix time"),
        (str(int(NOW - 301)), "sig", b"a=1", SECRET, "too old"),
        (str(int(NOW + 301)), "sig", b"a=1", SECRET, "future"),
        (str(int(NOW)), "sig", b"a=1", "", "no signing secret"),
    ],
)
def test_verify_refuses(
    timestamp: str | None, signature: str | None, body: bytes, secret: str, why: str
) -> None:
    with pytest.raises(SignatureError, match=why):
        verify(secret, timestamp, signature, body, now=NOW)


def test_verify_refuses_an_altered_body_and_another_secret() -> None:
    headers = signed_headers(SECRET, b"text=run", NOW)
    ts, sig = headers["X-Slack-Request-Timestamp"], headers["X-Slack-Signature"]
    with pytest.raises(SignatureError):
        verify(SECRET, ts, sig, b"text=cancel", now=NOW)
    with pytest.raises(SignatureError):
        verify(SECRET + "x", ts, sig, b"text=run", now=NOW)
    # a stale request is refused even when its signature is genuine
    with pytest.raises(SignatureError, match="too old"):
        verify(SECRET, ts, sig, b"text=run", now=NOW + 301)


# ------------------------------------------------------------------------------------------------
# settings


def test_users_mapping_with_projects_and_everyone() -> None:
    users = parse_users("U1=developer, U2=demo:maintainer,U2=other:viewer , *=viewer,W3=admin")
    one = users.principal("U1", "ann")
    assert one == Principal(
        subject="slack:U1",
        role="developer",
        project_roles={},
        authenticated=True,
        kind="integration",
        name="ann",
    )
    two = users.principal("U2")
    assert two is not None and two.role == "viewer"  # from *
    assert two.role_in("demo") == "maintainer" and two.role_in("other") == "viewer"
    stranger = users.principal("U9")
    assert stranger is not None and stranger.role == "viewer" and stranger.subject == "slack:U9"
    assert parse_users("U1=developer").principal("U9") is None
    assert parse_users("").principal("U1") is None
    admin = users.principal("W3")
    assert admin is not None and admin.has_role("admin", "anything")


def test_everyone_with_a_project_role_applies_to_known_users_too() -> None:
    users = parse_users("*=demo:developer,U1=viewer")
    one = users.principal("U1")
    assert one is not None and one.role == "viewer" and one.role_in("demo") == "developer"


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("U1", "is not KEY=VALUE"),
        ("alice=developer", "is not a Slack member id"),
        ("U1=boss", "the role 'boss'"),
        ("U1=Demo:developer", "DNS-1123"),
        ("U1=viewer,U1=admin", "two different roles"),
    ],
)
def test_bad_users_mapping_names_the_variable_and_the_rule(value: str, fragment: str) -> None:
    with pytest.raises(SlackConfigError) as info:
        parse_users(value)
    message = str(info.value)
    assert message.startswith("FABRIK_SLACK_USERS:")
    assert fragment in message
    assert "USER_ID=role, USER_ID=project:role or *=role" in message


def test_channels_mapping() -> None:
    channels = parse_channels("demo=C0DEMO1, *=C0ALL01")
    assert channels.channel_for("demo") == "C0DEMO1"
    assert channels.channel_for("other") == "C0ALL01"
    assert parse_channels("demo=C0DEMO1").channel_for("other") is None
    assert not parse_channels("")
    for bad, fragment in (
        ("demo=#general", "not a Slack channel id"),
        ("Demo=C1234", "DNS-1123"),
        ("x", "KEY"),
    ):
        with pytest.raises(SlackConfigError, match=fragment) as info:
            parse_channels(bad)
        assert str(info.value).startswith("FABRIK_SLACK_CHANNELS:")


def test_secrets_from_value_or_file(tmp_path: Any) -> None:
    path = tmp_path / "secret"
    path.write_text("  s3cret\n")
    settings = GatewaySettings(slack_signing_secret_file=str(path))
    assert SlackConfig.from_settings(settings).signing_secret == "s3cret"
    settings = GatewaySettings(slack_signing_secret=" v ")
    assert SlackConfig.from_settings(settings).signing_secret == "v"
    # (the settings check themselves when they are made)
    with pytest.raises(SlackConfigError, match="not both"):
        GatewaySettings(slack_signing_secret="v", slack_signing_secret_file=str(path))
    with pytest.raises(SlackConfigError, match=r"FABRIK_SLACK_SIGNING_SECRET_FILE=.* cannot be read"):
        GatewaySettings(slack_signing_secret_file=str(tmp_path / "missing"))


def test_settings_check(tmp_path: Any) -> None:
    check_slack_settings(GatewaySettings())
    with pytest.raises(SlackConfigError, match="FABRIK_SLACK_USERS"):
        check_slack_settings(GatewaySettings(slack_users="U1=root"))
    with pytest.raises(SlackConfigError, match="FABRIK_SLACK_BOT_TOKEN"):
        check_slack_settings(GatewaySettings(slack_bot_token="not-a-token"))
    config = SlackConfig.from_settings(GatewaySettings(http_port=9000, slack_bot_token="xoxb-1"))
    assert config.public_url == "http://127.0.0.1:9000"
    assert config.run_url("01J") == "http://127.0.0.1:9000/runs/01J"
    assert not config.notifications_enabled  # a token but no channel
    config = SlackConfig.from_settings(GatewaySettings(public_url="https://fabrik.example.com/"))
    assert config.run_url("01J") == "https://fabrik.example.com/runs/01J"


def test_default_repositories_from_the_github_mapping() -> None:
    repos = default_repositories(
        "acme/api=api, acme/web=web, acme/web2=web, acme/*=misc, junk, octo/tool=tool",
        "https://api.github.com",
    )
    assert repos == {"api": "https://github.com/acme/api", "tool": "https://github.com/octo/tool"}
    assert default_repositories("a/b=p", "https://ghe.example.com/api/v3") == {
        "p": "https://ghe.example.com/a/b"
    }


# ------------------------------------------------------------------------------------------------
# parsing and triage


def test_parse_commands() -> None:
    assert parse("") == Answer(commands.USAGE)
    assert parse("help") == Answer(commands.USAGE)
    run_id = new_ulid()
    assert parse(f"status {run_id.lower()}") == StatusCommand(run_id)
    assert parse(f"status <https://fabrik.example.com/runs/{run_id}|{run_id}>") == StatusCommand(run_id)
    assert parse(f"cancel {run_id} wrong branch") == CancelCommand(run_id, "wrong branch")
    assert parse(
        "run demo hello --priority high --timeout=30m --label team=core --label “tier=gold” "
        "--repo <https://github.com/acme/hello>"
    ) == RunCommand(
        "demo",
        "hello",
        {
            "priority": ("high",),
            "timeout": ("30m",),
            "label": ("team=core", "tier=gold"),
            "repo": ("https://github.com/acme/hello",),
        },
    )


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("frobnicate", "unknown command 'frobnicate'"),
        ("status", "needs a run id"),
        ("status 42", "is not a run id"),
        ("run demo", "needs a project and a spec"),
        ("run demo hello --colour red", "unknown option `--colour`"),
        ("run demo hello --env", "`--env` needs a value"),
        ("run demo hello --env a --env b", "`--env` is given twice"),
        ("run demo ../etc/passwd.json", "is not a spec id"),
        ('run demo "hello', "could not read"),
    ],
)
def test_parse_errors_answer_with_usage(text: str, fragment: str) -> None:
    answer = parse(text)
    assert isinstance(answer, Answer)
    assert fragment in answer.text
    assert "/fabrik run <project> <spec>" in answer.text
    assert answer.response_type == "ephemeral"


USERS = parse_users("U0DEV=demo:developer,U0VIEW=viewer,U0ADMIN=admin")


def test_triage_who_may_do_what() -> None:
    unknown = triage("run demo hello", "U0NOBODY", USERS)
    assert (
        isinstance(unknown, Answer) and "not allowed" in unknown.text and "FABRIK_SLACK_USERS" in unknown.text
    )
    viewer = triage("run demo hello", "U0VIEW", USERS)
    assert isinstance(viewer, Answer) and "developer role in project demo is needed" in viewer.text
    elsewhere = triage("run other hello", "U0DEV", USERS)
    assert isinstance(elsewhere, Answer)
    allowed = triage("run demo hello", "U0DEV", USERS)
    assert isinstance(allowed, Triaged) and allowed.principal.subject == "slack:U0DEV"
    assert "Starting a run of `hello` in *demo*" in allowed.acknowledgement.text
    # status and cancel need the run's project: decided when the command is carried out
    assert isinstance(triage(f"status {new_ulid()}", "U0VIEW", USERS), Triaged)
    # help is for everyone
    assert triage("help", "U0NOBODY", USERS) == Answer(commands.USAGE)


def test_submit_body() -> None:
    config = SlackConfig(default_repos={"demo": "https://github.com/acme/demo"})
    parsed = parse(
        "run demo hello --timeout 2h --budget $5 --label team=core --ref main --cpu 1 --memory 2Gi"
    )
    assert isinstance(parsed, RunCommand)
    assert submit_body(parsed, config) == {
        "project": "demo",
        "spec_path": ".fabrik/specs/hello.json",
        "repo": {"url": "https://github.com/acme/demo", "ref": "main"},
        "timeout_seconds": 7200,
        "budget_usd": 5.0,
        "resources": {"cpu": "1", "memory": "2Gi"},
        "labels": {"team": "core"},
    }
    path = parse("run other docs/spec.json --repo /srv/repo")
    assert isinstance(path, RunCommand)
    assert submit_body(path, config) == {
        "project": "other",
        "spec_path": "docs/spec.json",
        "repo": {"url": "/srv/repo"},
    }
    no_repo = parse("run other hello")
    assert isinstance(no_repo, RunCommand)
    answer = submit_body(no_repo, config)
    assert isinstance(answer, Answer) and "--repo URL" in answer.text


def test_command_event_id_is_stable_per_trigger() -> None:
    form = {
        "trigger_id": "123.456.abc",
        "team_id": "T1",
        "user_id": "U1",
        "command": "/fabrik",
        "text": "help",
    }
    first = command_event(form, b"a", utcnow())
    again = command_event(form, b"b", utcnow() + timedelta(seconds=5))  # a retry
    other = command_event({**form, "trigger_id": "123.456.abd"}, b"a", utcnow())
    assert first.event_id == again.event_id != other.event_id
    assert is_ulid(first.event_id)
    assert first.request_id == "123.456.abc"
    no_trigger = command_event({"user_id": "U1"}, b"body", utcnow())
    assert no_trigger.request_id.startswith("sha256:")
    assert no_trigger.event_id == command_event({"user_id": "U1"}, b"body", utcnow()).event_id


# ------------------------------------------------------------------------------------------------
# carrying commands out (a fake gateway with the real read model and validation)


class FakeGateway:
    def __init__(self) -> None:
        self.readmodel = ReadModel()
        self.readmodel.load([])
        self.submitted: list[tuple[RunRequested, str | None]] = []
        self.cancelled: list[tuple[str, str, str]] = []
        self.keys: dict[str, str] = {}
        self.unavailable = False

    def validate_submit(self, raw: bytes, idempotency_key: str | None) -> tuple[ValidSubmit, str | None]:
        return validate_submit(raw), check_idempotency_key(idempotency_key)

    async def submit(self, valid: ValidSubmit, key: str | None, principal: Principal) -> tuple[RunView, bool]:
        if self.unavailable:
            raise ProblemError(503, "not connected")
        if key is not None and key in self.keys:
            record = self.readmodel.get(self.keys[key])
            assert record is not None
            return self.readmodel.view(record), False
        request = valid.request
        event = RunRequested(
            run_id=new_ulid(),
            project=request.project,
            env=request.env,
            params=msgspec.convert(
                {"spec_path": request.spec_path, "resources": msgspec.to_builtins(TEMPLATES["default"])},
                RunParameters,
            ),
            requested_by=principal.subject,
            idempotency_key=key,
        )
        self.submitted.append((event, key))
        if key is not None:
            self.keys[key] = event.run_id
        self.readmodel.add_pending(pending_record(event))
        record = self.readmodel.get(event.run_id)
        assert record is not None
        return self.readmodel.view(record), True

    async def cancel(self, run_id: str, principal: Principal, reason: str) -> ActionAccepted:
        record = self.find(run_id, principal)
        self.cancelled.append((record.run_id, principal.subject, reason))
        return ActionAccepted(run_id=record.run_id, action="cancel", state=record.state, event_id=new_ulid())

    def find(self, run_id: str, principal: Principal) -> RunRecord:
        normalized = normalize_run_id(run_id)
        record = self.readmodel.get(normalized) if normalized else None
        if record is None or not principal.can_see(record.project):
            raise not_found(f"run {run_id}")
        return record


def slack_event(text: str, user_id: str = "U0DEV", trigger: str = "t-1") -> SlackCommandReceived:
    return command_event(
        {
            "trigger_id": trigger,
            "team_id": "T1",
            "user_id": user_id,
            "user_name": "dev",
            "command": "/fabrik",
            "text": text,
        },
        text.encode(),
        utcnow(),
    )


def triaged(event: SlackCommandReceived) -> Triaged:
    decision = triage(event.text, event.user_id, USERS, event.user_name)
    assert isinstance(decision, Triaged)
    return decision


CONFIG = SlackConfig(
    public_url="https://fabrik.example.com", default_repos={"demo": "https://github.com/a/demo"}
)


async def test_run_submits_once_per_command() -> None:
    gateway = FakeGateway()
    event = slack_event("run demo hello --priority high")
    done = await execute(triaged(event), event, gateway, CONFIG)
    assert len(gateway.submitted) == 1
    requested, key = gateway.submitted[0]
    assert key == "slack:T1:t-1"
    assert requested.requested_by == "slack:U0DEV" and requested.project == "demo"
    assert requested.params.spec_path == ".fabrik/specs/hello.json"
    assert done.answer.response_type == "in_channel"
    assert f"<https://fabrik.example.com/runs/{requested.run_id}|{requested.run_id}>" in done.answer.text
    assert done.audit is not None and done.audit.action == "run.submit" and done.audit.result == "ok"
    assert done.audit.target == requested.run_id and done.audit.actor == "slack:U0DEV"
    again = await execute(triaged(event), event, gateway, CONFIG)  # a redelivery
    assert len(gateway.submitted) == 1
    assert again.answer.text == done.answer.text
    assert again.audit is not None and again.audit.event_id == done.audit.event_id


async def test_run_validation_errors_name_the_options() -> None:
    gateway = FakeGateway()
    event = slack_event("run demo hello --priority urgent --timeout forever --label 'bad key=x'")
    done = await execute(triaged(event), event, gateway, CONFIG)
    assert gateway.submitted == []
    text = done.answer.text
    assert "The run was not started" in text
    assert "`--priority`" in text and "`--timeout`" in text and "`--label bad key`" in text
    assert done.audit is not None and done.audit.result == "failed"


async def test_not_ready_gateway_retries() -> None:
    gateway = FakeGateway()
    gateway.unavailable = True
    event = slack_event("run demo hello")
    with pytest.raises(Retry):
        await execute(triaged(event), event, gateway, CONFIG)


def put_run(gateway: FakeGateway, project: str = "demo", state: str = "running") -> RunRecord:
    now = utcnow()
    record = RunRecord(
        run_id=new_ulid(),
        project=project,
        env="dev",
        params=RunParameters(resources=TEMPLATES["default"], spec_path="specs/hello.json"),
        state=state,  # type: ignore[arg-type]
        created_at=now,
        state_entered_at=now,
        started_at=now - timedelta(minutes=3),
        requested_by="slack:U0DEV",
        cost_usd=0.42,
    )
    gateway.readmodel.upsert(record)
    return record


async def test_status_and_cancel() -> None:
    gateway = FakeGateway()
    record = put_run(gateway)
    status = slack_event(f"status {record.run_id}", user_id="U0VIEW")
    done = await execute(triaged(status), status, gateway, CONFIG)
    assert done.audit is None and done.answer.response_type == "ephemeral"
    assert (
        f"*Run <https://fabrik.example.com/runs/{record.run_id}|{record.run_id}>* in *demo* is *running*"
        in (done.answer.text)
    )
    assert "spec `hello`" in done.answer.text and "cost $0.42" in done.answer.text

    viewer_cancel = slack_event(f"cancel {record.run_id}", user_id="U0VIEW")
    done = await execute(triaged(viewer_cancel), viewer_cancel, gateway, CONFIG)
    assert gateway.cancelled == []
    assert "developer role in project demo is needed to cancel runs" in done.answer.text
    assert done.audit is not None and done.audit.result == "denied"

    cancel = slack_event(f"cancel {record.run_id} not needed")
    done = await execute(triaged(cancel), cancel, gateway, CONFIG)
    assert gateway.cancelled == [(record.run_id, "slack:U0DEV", "not needed")]
    assert done.answer.response_type == "in_channel" and "asked to cancel run" in done.answer.text


async def test_runs_of_other_projects_do_not_exist_for_the_caller() -> None:
    gateway = FakeGateway()
    record = put_run(gateway, project="secret")
    event = slack_event(f"status {record.run_id}")  # U0DEV has a role in demo only
    done = await execute(triaged(event), event, gateway, CONFIG)
    assert "does not exist" in done.answer.text


# ------------------------------------------------------------------------------------------------
# the Web API client, against the Slack double


@pytest.fixture
async def slack() -> AsyncIterator[SlackDouble]:
    async with SlackDouble(channels=("C0DEMO1", "C0ALL01")) as double:
        yield double


@pytest.fixture
async def http() -> AsyncIterator[Any]:
    import httpx

    async with httpx.AsyncClient(timeout=5) as client:
        yield client


def test_retryable_errors() -> None:
    assert is_retryable(429, "ratelimited")
    assert is_retryable(503, "http_503")
    assert is_retryable(200, "internal_error")
    assert not is_retryable(200, "channel_not_found")
    assert not is_retryable(200, "invalid_auth")
    assert not is_retryable(404, "used_url")


async def test_client_posts_threads_and_updates(slack: SlackDouble, http: Any) -> None:
    client = SlackClient(http, slack.api_url, slack.token)
    parent = await client.post_message("C0DEMO1", "first")
    reply = await client.post_message("C0DEMO1", "second", thread_ts=parent.ts)
    await client.update_message("C0DEMO1", parent.ts, "first, updated")
    assert parent.channel == "C0DEMO1" and reply.ts != parent.ts
    assert [m.text for m in slack.parents("C0DEMO1")] == ["first, updated"]
    assert [m.text for m in slack.thread("C0DEMO1", parent.ts)] == ["second"]
    call = slack.calls_of("chat.postMessage")[0]
    assert call.headers["Authorization"] == f"Bearer {slack.token}"
    assert call.headers["Content-Type"] == "application/json; charset=utf-8"
    assert "warning" not in call.answer


async def test_client_errors_are_sorted(slack: SlackDouble, http: Any) -> None:
    client = SlackClient(http, slack.api_url, slack.token)
    with pytest.raises(SlackApiError) as info:
        await client.post_message("C0NOWHERE", "x")
    assert info.value.error == "channel_not_found" and not info.value.retryable
    slack.add_channel("C0OUTSIDE", member=False)
    with pytest.raises(SlackApiError) as info:
        await client.post_message("C0OUTSIDE", "x")
    assert info.value.error == "not_in_channel" and not info.value.retryable
    with pytest.raises(SlackApiError) as info:
        await SlackClient(http, slack.api_url, "xoxb-wrong").post_message("C0DEMO1", "x")
    assert info.value.error == "invalid_auth" and not info.value.retryable
    slack.fail("chat.postMessage", status=429, retry_after=7)
    with pytest.raises(SlackApiError) as info:
        await client.post_message("C0DEMO1", "x")
    assert info.value.error == "ratelimited" and info.value.retryable and info.value.retry_after == 7
    slack.fail("chat.postMessage", status=503)
    with pytest.raises(SlackApiError) as info:
        await client.post_message("C0DEMO1", "x")
    assert info.value.retryable and info.value.status == 503
    slack.fail("chat.postMessage", error="internal_error")
    with pytest.raises(SlackApiError) as info:
        await client.post_message("C0DEMO1", "x")
    assert info.value.retryable
    with pytest.raises(SlackApiError) as info:
        await client.post_message("C0DEMO1", "x", thread_ts="1.000000")
    assert info.value.error == "thread_not_found"


async def test_response_url(slack: SlackDouble, http: Any) -> None:
    url = slack.new_response_url()
    await respond(http, url, "hello", "ephemeral")
    hook = url.rsplit("/", 1)[-1]
    assert slack.responses[hook] == [
        {"response_type": "ephemeral", "text": "hello", "replace_original": False}
    ]
    slack.expire(url)
    with pytest.raises(SlackApiError) as info:
        await respond(http, url, "again", "ephemeral")
    assert info.value.error == "expired_url" and not info.value.retryable
    other = slack.new_response_url()
    slack.fail("response_url", status=503)
    with pytest.raises(SlackApiError) as info:
        await respond(http, other, "x", "in_channel")
    assert info.value.retryable


# ------------------------------------------------------------------------------------------------
# the notifier


def changed(
    run_id: str, to_state: str, *, attempt: int = 1, reason: str | None = None, project: str = "demo"
) -> RunStateChanged:
    return RunStateChanged(
        run_id=run_id,
        project=project,
        attempt=attempt,
        from_state=None,
        to_state=to_state,  # type: ignore[arg-type]
        reason=reason,
    )


class Counts:
    def __init__(self) -> None:
        self.outcomes: list[str] = []
        self.errors: list[tuple[str, str]] = []

    def notification(self, outcome: str) -> None:
        self.outcomes.append(outcome)

    def api_error(self, method: str, error: str) -> None:
        self.errors.append((method, error))


def notifier_for(
    slack: SlackDouble, http: Any, store: MemoryThreadStore, channels: str = "demo=C0DEMO1", **kw: Any
) -> Notifier:
    return Notifier(
        SlackClient(http, slack.api_url, slack.token),
        parse_channels(channels),
        store,
        lambda run_id: f"https://fabrik.example.com/runs/{run_id}",
        **kw,
    )


def test_render() -> None:
    run_id = new_ulid()
    assert render(changed(run_id, "queued"), None, "u") is None
    assert render(changed(run_id, "cancelling"), None, "u") is None
    started = render(changed(run_id, "running"), None, "https://x/runs/1")
    assert started is not None and started.key == "running#1" and not started.final
    assert started.text.startswith(f":arrow_forward: Run <https://x/runs/1|{run_id}> in *demo* started")
    failed = render(changed(run_id, "failed", reason="oom_killed", attempt=2), None, "u")
    assert failed is not None and failed.final and failed.key == "failed#2"
    assert ":x:" in failed.text and "failed (oom_killed)" in failed.text


async def test_a_thread_per_run(slack: SlackDouble, http: Any) -> None:
    store = MemoryThreadStore()
    counts = Counts()
    notifier = notifier_for(slack, http, store, metrics=counts)
    run_a, run_b = new_ulid(), new_ulid()
    assert await notifier.handle(changed(run_a, "running")) == "posted"
    assert await notifier.handle(changed(run_b, "running")) == "posted"
    assert await notifier.handle(changed(run_a, "succeeded")) == "replied"
    assert await notifier.handle(changed(run_b, "failed", reason="workload_error")) == "replied"
    parents = slack.parents("C0DEMO1")
    assert len(parents) == 2
    parent_a, parent_b = parents
    assert run_a in parent_a.text and run_b in parent_b.text
    # the parent shows the final state, the thread holds the history
    assert "succeeded" in parent_a.text and parent_a.edits and "started" in parent_a.edits[0]
    assert slack.thread("C0DEMO1", parent_a.ts)[0].text.startswith(":white_check_mark:")
    assert "failed (workload_error)" in slack.thread("C0DEMO1", parent_b.ts)[0].text
    stored = await store.get(run_a)
    assert stored is not None and stored[0].ts == parent_a.ts
    assert stored[0].sent == ["running#1", "succeeded#1", "succeeded#1:parent"]
    assert counts.outcomes == ["posted", "posted", "replied", "replied"]


async def test_redelivery_and_reannouncement_post_nothing_twice(slack: SlackDouble, http: Any) -> None:
    notifier = notifier_for(slack, http, MemoryThreadStore())
    run_id = new_ulid()
    event = changed(run_id, "running")
    await notifier.handle(event)
    assert await notifier.handle(event, delivery=2) == "duplicate"
    assert await notifier.handle(changed(run_id, "running")) == "duplicate"  # re-announced, new id
    await notifier.handle(changed(run_id, "succeeded"))
    assert await notifier.handle(changed(run_id, "succeeded")) == "duplicate"
    assert len(slack.calls_of("chat.postMessage")) == 2
    assert len(slack.calls_of("chat.update")) == 1


async def test_resumed_attempts_reply_in_the_same_thread(slack: SlackDouble, http: Any) -> None:
    notifier = notifier_for(slack, http, MemoryThreadStore())
    run_id = new_ulid()
    for event in (
        changed(run_id, "running"),
        changed(run_id, "failed", reason="infra_error"),
        changed(run_id, "running", attempt=2),
        changed(run_id, "succeeded", attempt=2),
    ):
        await notifier.handle(event)
    (parent,) = slack.parents("C0DEMO1")
    replies = [m.text for m in slack.thread("C0DEMO1", parent.ts)]
    assert len(replies) == 3 and "(attempt 2)" in replies[1]
    assert "succeeded" in parent.text


async def test_a_late_start_after_the_end_is_not_posted(slack: SlackDouble, http: Any) -> None:
    notifier = notifier_for(slack, http, MemoryThreadStore())
    run_id = new_ulid()
    assert await notifier.handle(changed(run_id, "failed", reason="image_pull")) == "posted"
    assert await notifier.handle(changed(run_id, "running")) == "out_of_order"
    (parent,) = slack.parents("C0DEMO1")
    assert slack.thread("C0DEMO1", parent.ts) == [] and not slack.calls_of("chat.update")


async def test_a_claimed_thread_waits_then_takes_over_a_stale_claim(slack: SlackDouble, http: Any) -> None:
    store = MemoryThreadStore()
    now = datetime(2026, 1, 1, tzinfo=UTC)
    clock = [now]
    notifier = notifier_for(slack, http, store, clock=lambda: clock[0])
    run_id = new_ulid()
    from fabrik_gateway.slack.notifier import SlackThread

    await store.create(run_id, SlackThread(channel="C0DEMO1", claimed_by="other-replica", claimed_at=now))
    with pytest.raises(Retry):
        await notifier.handle(changed(run_id, "running"))
    assert slack.calls == []
    clock[0] = now + timedelta(seconds=61)
    assert await notifier.handle(changed(run_id, "running")) == "posted"
    assert len(slack.parents("C0DEMO1")) == 1


async def test_slack_errors(slack: SlackDouble, http: Any) -> None:
    store = MemoryThreadStore()
    counts = Counts()
    notifier = notifier_for(slack, http, store, channels="demo=C0DEMO1,*=C0GONE01", metrics=counts)
    run_id = new_ulid()
    slack.fail("chat.postMessage", status=429, retry_after=3)
    with pytest.raises(Retry) as info:
        await notifier.handle(changed(run_id, "running"))
    assert info.value.delay == 3
    assert await store.get(run_id) is None  # the claim was released
    slack.fail("chat.postMessage", status=502)
    with pytest.raises(Retry) as info:
        await notifier.handle(changed(run_id, "running"), delivery=3)
    assert info.value.delay == 8.0  # backoff by delivery
    assert await notifier.handle(changed(run_id, "running")) == "posted"
    # permanent: logged, counted, not retried
    other = new_ulid()
    assert await notifier.handle(changed(other, "running", project="elsewhere")) == "failed"
    assert ("chat.postMessage", "channel_not_found") in counts.errors
    assert counts.outcomes[-1] == "failed"
    # a failed parent update after the reply: the retry does not post the reply again
    slack.fail("chat.update", status=500)
    with pytest.raises(Retry):
        await notifier.handle(changed(run_id, "succeeded"))
    assert await notifier.handle(changed(run_id, "succeeded")) == "replied"
    (parent,) = slack.parents("C0DEMO1")
    assert len(slack.thread("C0DEMO1", parent.ts)) == 1 and "succeeded" in parent.text


async def test_disabled_and_unmapped(slack: SlackDouble, http: Any) -> None:
    run_id = new_ulid()
    assert (
        await notifier_for(slack, http, MemoryThreadStore(), channels="other=C0ALL01").handle(
            changed(run_id, "running")
        )
        == "no_channel"
    )
    disabled = Notifier(None, ChannelMap(default="C0ALL01"), MemoryThreadStore(), lambda r: r)
    assert await disabled.handle(changed(run_id, "running")) == "disabled"
    assert slack.calls == []


# ------------------------------------------------------------------------------------------------
# the double plays Slack's side correctly


def test_double_signs_like_slack() -> None:
    double = SlackDouble(signing_secret=SECRET)
    body, _ = double.command_request("help")
    headers = double.signed_headers(body, timestamp=NOW)
    expected = (
        "v0=" + hmac.new(SECRET.encode(), f"v0:{int(NOW)}:".encode() + body, hashlib.sha256).hexdigest()
    )
    assert headers["X-Slack-Signature"] == expected
    verify(SECRET, headers["X-Slack-Request-Timestamp"], headers["X-Slack-Signature"], body, now=NOW)


# ------------------------------------------------------------------------------------------------
# the integration's background task


async def test_background_task_checks_the_token_once_and_closes_the_client(
    slack: SlackDouble, caplog: pytest.LogCaptureFixture
) -> None:
    import asyncio
    import logging

    from fabrik_gateway.slack.integration import SlackIntegration

    caplog.set_level(logging.INFO, logger="fabrik_gateway.slack.integration")
    integration = SlackIntegration(
        SlackConfig(bot_token=slack.token, api_url=slack.api_url, channels=parse_channels("*=C0ALL01"))
    )
    task = asyncio.create_task(integration.run())
    await slack.wait_for(lambda: bool(slack.calls_of("auth.test")))
    for _ in range(100):  # the answer is logged once the client has read it
        if any(r.getMessage() == "Slack bot token works" for r in caplog.records):
            break
        await asyncio.sleep(0.01)
    http = integration.http
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert http.is_closed
    messages = [r.getMessage() for r in caplog.records]
    assert "Slack: slash commands off (no FABRIK_SLACK_SIGNING_SECRET: 503); run notifications on" in messages
    assert "Slack bot token works" in messages

    caplog.clear()
    silent = SlackIntegration(SlackConfig(signing_secret="s"))
    task = asyncio.create_task(silent.run())
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert [r.getMessage() for r in caplog.records] == [
        "Slack: slash commands on; run notifications off (no FABRIK_SLACK_BOT_TOKEN)"
    ]
    assert len(slack.calls_of("auth.test")) == 1
