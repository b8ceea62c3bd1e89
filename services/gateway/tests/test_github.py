"""The GitHub integration without NATS: signatures, payloads, commands, settings, the REST client
and the reporter against the GitHub double."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest

from fabrik_common.events import RunFinished, RunProgress, RunQueued, RunStarted, RunStateChanged
from fabrik_common.ids import is_ulid, new_ulid
from fabrik_common.testing.github_double import GithubDouble
from fabrik_gateway.gateway import Gateway
from fabrik_gateway.github.client import GithubApiError, GithubClient
from fabrik_gateway.github.commands import (
    CommandError,
    RunCommand,
    find_command_line,
    option_for_field,
    parse_command,
    parse_duration,
    spec_path_for,
    submit_body,
)
from fabrik_gateway.github.config import (
    Credentials,
    GithubConfigError,
    check_public_url,
    check_settings,
    load_config,
    load_credentials,
    parse_repositories,
)
from fabrik_gateway.github.handlers import github_router
from fabrik_gateway.github.integration import GithubIntegration, github_principal, rejection_text
from fabrik_gateway.github.reporter import (
    LEASE_SECONDS,
    GithubOrigin,
    MemoryOriginStore,
    Reporter,
    new_origin,
)
from fabrik_gateway.github.webhook import (
    DeliveryError,
    PayloadError,
    delivery_event,
    delivery_event_id,
    parse_trigger,
    sign,
    verify_signature,
)
from fabrik_gateway.problems import ProblemError
from fabrik_gateway.settings import GatewaySettings
from fabrik_gateway.validation import validate_submit

FIXTURES = Path(__file__).resolve().parents[3] / "tests" / "integration" / "fixtures" / "github"
REPO = "octo-org/hello-world"


def fixture(name: str) -> dict[str, Any]:
    return dict(json.loads((FIXTURES / f"{name}.json").read_text()))


def body_of(payload: dict[str, Any]) -> str:
    return json.dumps(payload)


# ------------------------------------------------------------------------------------------------
# signatures and delivery events


def test_signature_is_the_hmac_sha256_of_the_raw_body() -> None:
    body = b'{"zen":"Keep it logically awesome."}'
    # Reference value from GitHub's docs: secret "It's a Secret to Everybody", body "Hello, World!"
    assert (
        sign("It's a Secret to Everybody", b"Hello, World!")
        == "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
    )
    header = sign("s3cret", body)
    assert verify_signature("s3cret", body, header)
    assert not verify_signature("other", body, header)
    assert not verify_signature("s3cret", body + b" ", header)
    assert not verify_signature("s3cret", body, None)
    assert not verify_signature("s3cret", body, "")
    assert not verify_signature("s3cret", body, header.replace("sha256=", "sha1="))
    assert not verify_signature("s3cret", body, "sha256=ünicode")


def test_delivery_event_id_is_deterministic_and_a_ulid() -> None:
    first = delivery_event_id("72d3162e-cc78-11e3-81ab-4c9367dc0958")
    assert first == delivery_event_id("72d3162e-cc78-11e3-81ab-4c9367dc0958")
    assert first != delivery_event_id("72d3162e-cc78-11e3-81ab-4c9367dc0959")
    assert is_ulid(first)


def test_delivery_event_keeps_the_body_as_received() -> None:
    raw = b'{"action": "created",  "x": 1}'
    event = delivery_event(event="issue_comment", delivery_id="abc-123", body=raw)
    assert event.body == raw.decode()
    assert event.subject() == "fabrik.ingest.github.issue_comment"
    assert event.event_id == delivery_event_id("abc-123")


@pytest.mark.parametrize(
    ("event", "delivery", "body", "header"),
    [
        (None, "abc", b"{}", "X-GitHub-Event"),
        ("Issue-Comment", "abc", b"{}", "X-GitHub-Event"),
        ("issues", None, b"{}", "X-GitHub-Delivery"),
        ("issues", "a b", b"{}", "X-GitHub-Delivery"),
        ("issues", "abc", b"\xff\xfe", "body"),
    ],
)
def test_delivery_event_rejects_bad_headers(
    event: str | None, delivery: str | None, body: bytes, header: str
) -> None:
    with pytest.raises(DeliveryError) as info:
        delivery_event(event=event, delivery_id=delivery, body=body)
    assert info.value.header == header


# ------------------------------------------------------------------------------------------------
# payloads -> triggers


def test_comment_on_a_pull_request_is_a_trigger() -> None:
    trigger = parse_trigger(
        "issue_comment", body_of(fixture("issue_comment.created.pull_request")), trigger_label="fabrik"
    )
    assert trigger is not None
    assert trigger.kind == "comment"
    assert trigger.is_pull
    assert trigger.number == 7
    assert trigger.full_name == REPO
    assert trigger.installation_id == 4242
    assert trigger.sender == "octocat"
    assert trigger.comment_id == 2899000123
    assert trigger.head_sha is None  # issue_comment payloads do not carry the head
    assert trigger.at == datetime(2025, 5, 20, 10, 15, 2, tzinfo=UTC)


def test_comment_on_an_issue_is_a_trigger() -> None:
    trigger = parse_trigger(
        "issue_comment", body_of(fixture("issue_comment.created.issue")), trigger_label="x"
    )
    assert trigger is not None
    assert not trigger.is_pull
    assert trigger.repository.default_branch == "main"
    assert trigger.repository.clone_url == f"https://github.com/{REPO}.git"


def test_labels_are_triggers_only_with_the_trigger_label() -> None:
    issues = body_of(fixture("issues.labeled"))
    trigger = parse_trigger("issues", issues, trigger_label="Fabrik")  # GitHub labels: case-insensitive
    assert trigger is not None
    assert trigger.kind == "issue_label"
    assert trigger.command_text is not None and "/fabrik run greeting" in trigger.command_text
    assert parse_trigger("issues", issues, trigger_label="other") is None
    assert parse_trigger("issues", issues, trigger_label="") is None

    pull = parse_trigger("pull_request", body_of(fixture("pull_request.labeled")), trigger_label="fabrik")
    assert pull is not None
    assert pull.kind == "pull_request_label"
    assert pull.is_pull
    assert pull.head_sha == "6dcb09b5b57875f334f61aebed695e2e4193db5e"
    assert pull.head_ref == "greeting"
    assert pull.head_clone_url == f"https://github.com/{REPO}.git"


def test_other_actions_bots_and_plain_comments_are_not_triggers() -> None:
    comment = fixture("issue_comment.created.issue")
    assert parse_trigger("issue_comment", body_of({**comment, "action": "edited"}), trigger_label="") is None
    bot = {**comment, "sender": {**comment["sender"], "login": "fabrik-test[bot]", "type": "Bot"}}
    assert parse_trigger("issue_comment", body_of(bot), trigger_label="") is None
    plain = {**comment, "comment": {**comment["comment"], "body": "I think /fabrik run would help"}}
    assert parse_trigger("issue_comment", body_of(plain), trigger_label="") is None
    pull = fixture("pull_request.labeled")
    assert (
        parse_trigger("pull_request", body_of({**pull, "action": "synchronize"}), trigger_label="fabrik")
        is None
    )
    assert parse_trigger("push", "{}", trigger_label="fabrik") is None


def test_a_payload_that_does_not_decode_is_an_error() -> None:
    with pytest.raises(PayloadError):
        parse_trigger("issue_comment", '{"action": "created"}', trigger_label="")


# ------------------------------------------------------------------------------------------------
# /fabrik run


def test_the_command_is_the_first_fabrik_line_outside_code_and_quotes() -> None:
    text = (
        "Thanks!\n> /fabrik run quoted\n```\n/fabrik run fenced\n```\n"
        "  /fabrik run real --env qa\n/fabrik run later"
    )
    assert find_command_line(text) == "/fabrik run real --env qa"
    assert find_command_line("/fabrikate") is None
    assert find_command_line(None) is None


def test_parse_command_maps_every_option() -> None:
    command = parse_command(
        "/fabrik run specs/login.json --env staging --priority=high --timeout 1h30m --budget $2.50 "
        '--template high-cpu --label team=core --label "note=a b"'
    )
    assert command == RunCommand(
        spec="specs/login.json",
        env="staging",
        priority="high",
        timeout_seconds=5400,
        budget_usd=2.5,
        template="high-cpu",
        labels={"team": "core", "note": "a b"},
        line="/fabrik run specs/login.json --env staging --priority=high --timeout 1h30m --budget $2.50 "
        "--template high-cpu --label team=core --label note=a b",
    )
    assert parse_command("/fabrik run") == RunCommand(line="/fabrik run")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("/fabrik deploy", "`deploy` is not a command"),
        ("/fabrik", "a command is missing"),
        ("/fabrik run a b", "only one spec"),
        ("/fabrik run --colour red", "unknown option `--colour`"),
        ("/fabrik run --env", "`--env` needs a value"),
        ("/fabrik run --env a --env b", "given twice"),
        ("/fabrik run --label nokey", "must be `key=value`"),
        ("/fabrik run --timeout soon", "must be seconds or a duration"),
        ("/fabrik run --budget lots", "amount in USD"),
        ("/fabrik run 'unbalanced", "cannot read the command"),
        ("/fabrik run bad*id", "is not a spec"),
    ],
)
def test_parse_command_errors_say_what_is_wrong(line: str, message: str) -> None:
    with pytest.raises(CommandError, match=message.replace("*", r"\*")):
        parse_command(line)


def test_durations() -> None:
    assert parse_duration("3600") == 3600
    assert parse_duration("90m") == 5400
    assert parse_duration("2h") == 7200
    assert parse_duration("45s") == 45


def test_spec_references() -> None:
    assert spec_path_for("greeting") == ".fabrik/specs/greeting.json"
    assert spec_path_for("specs/greeting.json") == "specs/greeting.json"
    assert spec_path_for("greeting.yaml") == "greeting.yaml"


def test_submit_body_is_a_valid_submit_with_our_labels() -> None:
    command = parse_command(
        "/fabrik run greeting --env staging --priority high --timeout 1h --label trigger=me"
    )
    body = submit_body(
        command,
        project="demo",
        repo_url="https://github.com/octo-org/hello-world.git",
        ref="6dcb09b5b57875f334f61aebed695e2e4193db5e",
        default_spec="",
        labels={"trigger": "github", "github-pr": "7"},
    )
    valid = validate_submit(json.dumps(body).encode())
    request = valid.request
    assert request.project == "demo"
    assert request.env == "staging"
    assert request.priority == "high"
    assert request.timeout_seconds == 3600
    assert request.spec_path == ".fabrik/specs/greeting.json"
    assert request.repo is not None and request.repo.ref == "6dcb09b5b57875f334f61aebed695e2e4193db5e"
    assert request.labels == {"trigger": "github", "github-pr": "7"}


def test_submit_body_uses_the_default_spec_and_needs_one() -> None:
    body = submit_body(RunCommand(), project="demo", repo_url="u", ref="r", default_spec="hello", labels={})
    assert body["spec_path"] == ".fabrik/specs/hello.json"
    with pytest.raises(CommandError, match="no spec"):
        submit_body(RunCommand(), project="demo", repo_url="u", ref="r", default_spec="", labels={})


def test_rejections_name_the_options() -> None:
    body = submit_body(
        parse_command("/fabrik run x --priority urgent --env Prod --timeout 100000"),
        project="demo",
        repo_url="u",
        ref="r",
        default_spec="",
        labels={},
    )
    with pytest.raises(ProblemError) as info:
        validate_submit(json.dumps(body).encode())
    text = rejection_text("octocat", info.value)
    assert "`--priority`" in text
    assert "`--env`" in text
    assert "`--timeout`" in text
    assert option_for_field("labels.bad key") == "--label bad key"


def test_github_principal() -> None:
    principal = github_principal("octocat")
    assert principal.subject == "github:octocat"
    assert principal.role == "developer"
    assert principal.kind == "integration"
    assert principal.authenticated


# ------------------------------------------------------------------------------------------------
# settings


def test_repositories_map_exact_and_wildcards_case_insensitively() -> None:
    mapping = parse_repositories(" octo-org/hello-world=demo, octo-org/*=other ,Acme/Widget.js=widgets")
    assert mapping.project_for("Octo-Org/Hello-World") == "demo"
    assert mapping.project_for("octo-org/anything") == "other"
    assert mapping.project_for("acme/widget.js") == "widgets"
    assert mapping.project_for("acme/other") is None
    assert not parse_repositories("")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("octo-org/hello", "is not `owner/repo=project`"),
        ("hello=demo", "is not `owner/repo=project`"),
        ("octo-org/hello=Demo", "project 'Demo' must be a DNS-1123 label"),
        ("-bad/hello=demo", "owner '-bad'"),
        ("octo/he llo=demo", "repository 'he llo'"),
        ("a/b=x,a/B=y", "mapped twice"),
    ],
)
def test_bad_repositories_name_the_variable_and_the_rule(text: str, problem: str) -> None:
    with pytest.raises(GithubConfigError) as info:
        parse_repositories(text)
    message = str(info.value)
    assert message.startswith("FABRIK_GITHUB_REPOSITORIES=")
    assert problem in message
    assert "owner/repo=project" in message


def test_credentials(tmp_path: Path) -> None:
    # The settings check themselves when they are made: a bad combination raises right there.
    double = GithubDouble()
    key = tmp_path / "app.pem"
    key.write_text(double.app_private_key_pem)
    token = tmp_path / "token"
    token.write_text("ghp_x\n")
    assert load_credentials(GatewaySettings()) is None
    assert load_credentials(GatewaySettings(github_token_file=str(token))) == Credentials(
        mode="token", token="ghp_x"
    )
    app = load_credentials(GatewaySettings(github_app_id="424242", github_app_private_key_file=str(key)))
    assert app is not None and app.mode == "app" and app.private_key.startswith("-----BEGIN")
    with pytest.raises(ValueError, match="go together"):
        GatewaySettings(github_app_id="1")
    with pytest.raises(ValueError, match="not both"):
        GatewaySettings(github_app_id="1", github_app_private_key_file=str(key), github_token="t")
    with pytest.raises(ValueError, match="numeric"):
        GatewaySettings(github_app_id="fabrik", github_app_private_key_file=str(key))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a key")
    with pytest.raises(ValueError, match="PEM private key"):
        GatewaySettings(github_app_id="1", github_app_private_key_file=str(garbage))
    with pytest.raises(ValueError, match=r"FABRIK_GITHUB_WEBHOOK_SECRET_FILE=.* cannot be read"):
        GatewaySettings(github_webhook_secret_file=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="not both"):
        GatewaySettings(github_webhook_secret="a", github_webhook_secret_file=str(token))
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ValueError, match=r"FABRIK_GITHUB_TOKEN_FILE=.* is empty"):
        GatewaySettings(github_token_file=str(empty))


def test_check_settings_lists_every_problem() -> None:
    # The settings check themselves when they are made (a bad value stops the gateway's start).
    with pytest.raises(ValueError, match="FABRIK_GITHUB") as info:
        GatewaySettings(github_repositories="nonsense", github_token="t", github_app_id="1")
    message = str(info.value)
    assert "FABRIK_GITHUB_REPOSITORIES" in message
    assert "FABRIK_GITHUB_APP_ID" in message
    with pytest.raises(GithubConfigError, match="FABRIK_PUBLIC_URL"):
        check_public_url("fabrik.example.com")
    with pytest.raises(ValueError, match="FABRIK_GITHUB_DEFAULT_SPEC"):
        GatewaySettings(github_default_spec="no good")
    check_settings(GatewaySettings(github_repositories="o/r=p", github_webhook_secret="s"))


# ------------------------------------------------------------------------------------------------
# the webhook, before anything is published


async def test_webhook_bad_signature_is_401_and_no_secret_is_503() -> None:
    settings = GatewaySettings(github_webhook_secret="s3cret")
    integration = GithubIntegration(settings, Gateway(settings))
    body = body_of(fixture("issue_comment.created.issue")).encode()
    headers = {
        "X-GitHub-Event": "issue_comment",
        "X-GitHub-Delivery": "d-1",
        "X-Hub-Signature-256": sign("wrong", body),
    }
    with pytest.raises(ProblemError) as info:
        await integration.receive(headers, body)
    assert info.value.status == 401
    assert info.value.slug == "invalid-signature"
    unsigned = {k: v for k, v in headers.items() if k != "X-Hub-Signature-256"}
    with pytest.raises(ProblemError) as info:
        await integration.receive(unsigned, body)
    assert info.value.status == 401

    bare = GatewaySettings()
    with pytest.raises(ProblemError) as info:
        await GithubIntegration(bare, Gateway(bare)).receive(headers, body)
    assert info.value.status == 503
    assert "FABRIK_GITHUB_WEBHOOK_SECRET" in info.value.detail


# ------------------------------------------------------------------------------------------------
# the REST client against the double


@pytest.fixture
async def github() -> AsyncIterator[GithubDouble]:
    async with GithubDouble() as double:
        double.add_repo(REPO, installation_id=4242)
        yield double


def app_client(double: GithubDouble) -> GithubClient:
    return GithubClient(
        Credentials(mode="app", app_id=double.app_id, private_key=double.app_private_key_pem),
        api_url=double.url,
    )


async def test_app_auth_issues_and_caches_installation_tokens(github: GithubDouble) -> None:
    github.set_permission(REPO, "octocat", "maintain")
    client = app_client(github)
    try:
        assert (
            await client.permission("octo-org", "hello-world", "octocat", installation_id=4242) == "maintain"
        )
        assert await client.can_write("octo-org", "hello-world", "octocat", installation_id=4242)
        assert not await client.can_write("octo-org", "hello-world", "stranger", installation_id=4242)
        sha = github.repo(REPO).branches["main"]
        assert await client.commit_sha("octo-org", "hello-world", "main", installation_id=4242) == sha
    finally:
        await client.aclose()
    assert len(github.calls_to("POST", r"/access_tokens$")) == 1
    for call in github.calls:
        assert call.headers["accept"] == "application/vnd.github+json"
        assert call.headers["x-github-api-version"] == "2022-11-28"
        assert call.headers["user-agent"] == "fabrik-gateway"


async def test_an_expired_installation_token_is_replaced(github: GithubDouble) -> None:
    client = app_client(github)
    try:
        await client.commit_sha("octo-org", "hello-world", "main", installation_id=4242)
        github.expire_tokens()
        await client.commit_sha("octo-org", "hello-world", "main", installation_id=4242)
    finally:
        await client.aclose()
    assert len(github.calls_to("POST", r"/access_tokens$")) == 2


async def test_api_errors_say_whether_to_retry(github: GithubDouble) -> None:
    client = app_client(github)
    try:
        github.fail("GET", r"/commits/", 502)
        with pytest.raises(GithubApiError) as info:
            await client.commit_sha("octo-org", "hello-world", "main", installation_id=4242)
        assert info.value.retryable
        github.rate_limit_next("GET", r"/commits/", retry_after=7)
        with pytest.raises(GithubApiError) as info:
            await client.commit_sha("octo-org", "hello-world", "main", installation_id=4242)
        assert info.value.retryable and info.value.retry_after == 7
        with pytest.raises(GithubApiError) as info:
            await client.commit_sha("octo-org", "hello-world", "no-such-branch", installation_id=4242)
        assert info.value.status == 422 and not info.value.retryable
        with pytest.raises(GithubApiError) as info:
            await client.commit_sha("octo-org", "hello-world", "main", installation_id=999)
        assert info.value.status == 404 and not info.value.retryable
    finally:
        await client.aclose()


async def test_check_runs_need_an_app(github: GithubDouble) -> None:
    token = github.add_token()
    client = GithubClient(Credentials(mode="token", token=token), api_url=github.url)
    assert not client.supports_check_runs
    sha = github.repo(REPO).branches["main"]
    try:
        with pytest.raises(GithubApiError) as info:
            await client.create_check_run(
                "octo-org",
                "hello-world",
                installation_id=None,
                name="fabrik",
                head_sha=sha,
                external_id="x",
                details_url="http://127.0.0.1/runs/x",
                status="queued",
                conclusion=None,
                title="Queued",
                summary="s",
            )
        assert info.value.status == 403
        await client.create_status(
            "octo-org",
            "hello-world",
            sha,
            installation_id=None,
            state="pending",
            target_url="http://127.0.0.1/runs/x",
            description="Queued",
            context="fabrik",
        )
    finally:
        await client.aclose()
    assert github.statuses[0]["state"] == "pending"


# ------------------------------------------------------------------------------------------------
# the reporter


class Clock:
    def __init__(self) -> None:
        self.value = datetime(2025, 5, 20, 10, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.value

    def advance(self, seconds: float) -> None:
        self.value += timedelta(seconds=seconds)


def origin_for(double: GithubDouble, run_id: str, *, mode: str = "check_run", now: datetime) -> GithubOrigin:
    sha = double.repo(REPO).branches["main"]
    double.add_issue(REPO, 12)
    return new_origin(
        run_id=run_id,
        project="demo",
        env="dev",
        owner="octo-org",
        repo="hello-world",
        installation_id=4242 if mode == "check_run" else None,
        number=12,
        is_pull=False,
        sha=sha,
        ref="main",
        clone_url="https://github.com/octo-org/hello-world.git",
        trigger="comment",
        sender="octocat",
        delivery_id="d-1",
        command="/fabrik run greeting",
        comment_id=None,
        html_url="",
        mode=mode,  # type: ignore[arg-type]
        link=f"http://fabrik.test/runs/{run_id}",
        now=now,
    )


def state_changed(
    run_id: str, to_state: str, *, attempt: int = 1, reason: str | None = None
) -> RunStateChanged:
    return RunStateChanged(
        run_id=run_id,
        project="demo",
        attempt=attempt,
        from_state=None,
        to_state=to_state,  # type: ignore[arg-type]
        reason=reason,
        message="exit code 3" if reason else "",
    )


def progress(run_id: str, finished: int) -> RunProgress:
    return RunProgress(run_id=run_id, attempt=1, phase="implement", task="t1", finished=finished, total=10)


async def test_reporter_walks_a_check_run_to_its_conclusion(github: GithubDouble) -> None:
    clock = Clock()
    store = MemoryOriginStore()
    client = app_client(github)
    reporter = Reporter(store, client, link=lambda r: f"http://fabrik.test/runs/{r}", now=clock)
    run_id = new_ulid()
    try:
        await reporter.start(origin_for(github, run_id, now=clock()))
        (check,) = github.check_runs_for(REPO)
        assert check["status"] == "queued"
        assert check["details_url"] == f"http://fabrik.test/runs/{run_id}"
        assert check["external_id"] == f"{run_id}/1"
        assert check["name"] == "fabrik"

        await reporter.on_event(RunQueued(run_id=run_id, project="demo", attempt=1))  # nothing new
        await reporter.on_event(RunStarted(run_id=run_id, attempt=1, backend="local", workload_ref="local:1"))
        assert check["status"] == "in_progress"
        assert check["started_at"] is not None
        patches = len(github.calls_to("PATCH", r"/check-runs/"))

        # progress: the first at once (10 s after the last change), the next ones held back
        clock.advance(11)
        await reporter.on_event(progress(run_id, 3))
        assert "3/10" in check["output"]["title"]
        clock.advance(2)
        await reporter.on_event(progress(run_id, 4))
        await reporter.on_event(progress(run_id, 5))
        assert "3/10" in check["output"]["title"]
        assert len(github.calls_to("PATCH", r"/check-runs/")) == patches + 1
        await reporter.flush_progress()  # not due yet
        assert "3/10" in check["output"]["title"]
        clock.advance(9)
        await reporter.flush_progress()
        assert "5/10" in check["output"]["title"]

        await reporter.on_event(state_changed(run_id, "failed", reason="workload_error"))
        assert check["status"] == "completed"
        assert check["conclusion"] == "failure"
        assert check["output"]["title"] == "Failed: workload error"
        (comment,) = github.comments_on(REPO, 12)
        assert run_id in comment["body"]
        assert "failed" in comment["body"]

        # redelivered and late events change nothing
        calls = len(github.calls)
        await reporter.on_event(state_changed(run_id, "failed", reason="workload_error"))
        await reporter.on_event(progress(run_id, 9))
        await reporter.on_event(RunFinished(run_id=run_id, attempt=1, outcome="failed"))
        assert len(github.calls) == calls
        assert check["conclusion"] == "failure"
        stored = await store.get(run_id)
        assert stored is not None and stored.lease_owner is None and not stored.needs_work
    finally:
        await client.aclose()


@pytest.mark.parametrize(
    ("state", "conclusion"),
    [
        ("succeeded", "success"),
        ("cancelled", "cancelled"),
        ("timed_out", "timed_out"),
        ("budget_exceeded", "failure"),
    ],
)
async def test_conclusions(github: GithubDouble, state: str, conclusion: str) -> None:
    store = MemoryOriginStore()
    client = app_client(github)
    reporter = Reporter(store, client, link=lambda r: f"http://fabrik.test/runs/{r}")
    run_id = new_ulid()
    try:
        await reporter.start(origin_for(github, run_id, now=datetime.now(UTC)))
        await reporter.on_event(state_changed(run_id, state))
    finally:
        await client.aclose()
    (check,) = github.check_runs_for(REPO)
    assert check["conclusion"] == conclusion
    assert len(github.comments_on(REPO, 12)) == 1


async def test_a_github_outage_loses_no_conclusion(github: GithubDouble) -> None:
    store = MemoryOriginStore()
    client = app_client(github)
    reporter = Reporter(store, client, link=lambda r: f"http://fabrik.test/runs/{r}")
    run_id = new_ulid()
    try:
        await reporter.start(origin_for(github, run_id, now=datetime.now(UTC)))
        github.fail("PATCH", r"/check-runs/", 503, times=2)
        with pytest.raises(GithubApiError) as info:
            await reporter.on_event(state_changed(run_id, "succeeded"))
        assert info.value.retryable
        stored = await store.get(run_id)
        assert stored is not None
        assert stored.desired.status == "completed"  # kept for the retry
        assert stored.lease_owner is None  # released for whoever retries
        with pytest.raises(GithubApiError):
            await reporter.on_event(state_changed(run_id, "succeeded"))  # a redelivery, still failing
        await reporter.on_event(state_changed(run_id, "succeeded"))  # the next one goes through
    finally:
        await client.aclose()
    (check,) = github.check_runs_for(REPO)
    assert check["conclusion"] == "success"
    assert len(github.comments_on(REPO, 12)) == 1


async def test_a_check_run_created_before_a_crash_is_reused(github: GithubDouble) -> None:
    store = MemoryOriginStore()
    client = app_client(github)
    reporter = Reporter(store, client, link=lambda r: f"http://fabrik.test/runs/{r}")
    run_id = new_ulid()
    origin = origin_for(github, run_id, now=datetime.now(UTC))
    try:
        # the check run exists on GitHub, but its id never made it into the origin
        await client.create_check_run(
            "octo-org",
            "hello-world",
            installation_id=4242,
            name="fabrik",
            head_sha=origin.sha,
            external_id=f"{run_id}/1",
            details_url="http://fabrik.test/x",
            status="queued",
            conclusion=None,
            title="Queued",
            summary="s",
        )
        await reporter.start(origin)
    finally:
        await client.aclose()
    assert len(github.check_runs_for(REPO)) == 1


async def test_a_lease_held_elsewhere_is_respected_until_it_expires(github: GithubDouble) -> None:
    clock = Clock()
    store = MemoryOriginStore()
    client = app_client(github)
    run_id = new_ulid()
    origin = origin_for(github, run_id, now=clock())
    origin.lease_owner = "another-replica"
    origin.lease_until = clock() + timedelta(seconds=LEASE_SECONDS)
    reporter = Reporter(store, client, link=lambda r: f"http://fabrik.test/runs/{r}", now=clock)
    try:
        await reporter.start(origin)
        assert github.check_runs_for(REPO) == []
        clock.advance(LEASE_SECONDS + 1)
        await reporter.sync(run_id)
        assert len(github.check_runs_for(REPO)) == 1
    finally:
        await client.aclose()


async def test_a_resumed_run_gets_a_new_check_run(github: GithubDouble) -> None:
    store = MemoryOriginStore()
    client = app_client(github)
    reporter = Reporter(store, client, link=lambda r: f"http://fabrik.test/runs/{r}")
    run_id = new_ulid()
    try:
        await reporter.start(origin_for(github, run_id, now=datetime.now(UTC)))
        await reporter.on_event(state_changed(run_id, "timed_out"))
        await reporter.on_event(state_changed(run_id, "queued", attempt=2))
        await reporter.on_event(state_changed(run_id, "succeeded", attempt=2))
    finally:
        await client.aclose()
    first, second = sorted(github.check_runs_for(REPO), key=lambda c: c["id"])
    assert (first["conclusion"], second["conclusion"]) == ("timed_out", "success")
    assert second["external_id"] == f"{run_id}/2"
    assert len(github.comments_on(REPO, 12)) == 2


async def test_with_a_plain_token_the_reporter_sets_commit_statuses(github: GithubDouble) -> None:
    store = MemoryOriginStore()
    client = GithubClient(Credentials(mode="token", token=github.add_token()), api_url=github.url)
    reporter = Reporter(store, client, link=lambda r: f"http://fabrik.test/runs/{r}")
    run_id = new_ulid()
    try:
        await reporter.start(origin_for(github, run_id, mode="status", now=datetime.now(UTC)))
        await reporter.on_event(RunStarted(run_id=run_id, attempt=1, backend="local", workload_ref="w"))
        await reporter.on_event(state_changed(run_id, "cancelled"))
    finally:
        await client.aclose()
    assert [s["state"] for s in github.statuses] == ["pending", "pending", "error"]
    assert {s["context"] for s in github.statuses} == {"fabrik"}
    assert github.statuses[-1]["target_url"] == f"http://fabrik.test/runs/{run_id}"
    assert github.check_runs == {}
    assert len(github.comments_on(REPO, 12)) == 1


async def test_origins_round_trip_through_json(github: GithubDouble) -> None:
    origin = origin_for(github, new_ulid(), now=datetime.now(UTC))
    assert msgspec.json.decode(msgspec.json.encode(origin), type=GithubOrigin) == origin


def test_the_router_has_one_durable_consumer_per_stream() -> None:
    settings = GatewaySettings()
    router = github_router(GithubIntegration(settings, Gateway(settings)))
    by_durable = {s.durable: s for s in router.subscribers}
    assert set(by_durable) == {"gateway-github-ingest", "gateway-github-runs"}
    assert by_durable["gateway-github-ingest"].stream.name == "INGEST"
    assert by_durable["gateway-github-ingest"].subjects == ("fabrik.ingest.github.*",)
    assert by_durable["gateway-github-runs"].stream.name == "RUNS"
    assert by_durable["gateway-github-runs"].deliver_new_only


def test_load_config_defaults() -> None:
    config = load_config(GatewaySettings(github_repositories="octo-org/*=demo"))
    assert config.repositories.project_for(REPO) == "demo"
    assert config.trigger_label == "fabrik"
