"""The API client: where the API is, what is sent, and how errors read (no network: MockTransport)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from fabrik_cli.client import (
    ApiClient,
    ApiError,
    ApiTarget,
    ApiUnreachableError,
    normalize_base_url,
    resolve_api_target,
)
from fabrik_cli.errors import EXIT_FAILURE, EXIT_USAGE
from fabrik_cli.sse import SseParser

TARGET = ApiTarget("http://api.test", "--api")


def client_for(handler: Any, token: str | None = None, sleeps: list[float] | None = None) -> ApiClient:
    record = sleeps if sleeps is not None else []
    return ApiClient(TARGET, token=token, transport=httpx.MockTransport(handler), sleep=record.append)


def problem(
    status: int, detail: str, errors: list[dict[str, str]] | None = None, title: str = ""
) -> httpx.Response:
    body: dict[str, Any] = {
        "type": "https://fabrik.sh/problems/x",
        "title": title or "Problem",
        "status": status,
    }
    body["detail"] = detail
    if errors is not None:
        body["errors"] = errors
    return httpx.Response(status, json=body, headers={"content-type": "application/problem+json"})


def write_state(data_dir: Path, url: str) -> None:
    data_dir.mkdir(parents=True)
    component = {"name": "x", "port": 1, "pid": 1, "url": url, "health_url": "", "log": "", "restarts": 0}
    state = {
        "pid": 1,
        "data_dir": str(data_dir),
        "started_at": "2026-01-01T00:00:00+00:00",
        "status": "running",
        "nats": component,
        "services": {"gateway": {**component, "name": "gateway"}},
        "nats_monitor_port": 2,
        "log_dir": "",
        "version": 1,
    }
    (data_dir / "stack.json").write_text(json.dumps(state))


# --------------------------------------------------------------------------------------------
# Where


def test_url_precedence_flag_env_state_file_default(tmp_path: Path) -> None:
    home = tmp_path / "home"
    write_state(home, "http://127.0.0.1:9080")
    env = {"FABRIK_HOME": str(home), "FABRIK_API_URL": "http://env.test:1/api/v1/"}
    assert resolve_api_target("flag.test:2", env).url == "http://flag.test:2"
    target = resolve_api_target(None, env)
    assert (target.url, target.source) == ("http://env.test:1", "$FABRIK_API_URL")
    del env["FABRIK_API_URL"]
    target = resolve_api_target(None, env)
    assert target.url == "http://127.0.0.1:9080"
    assert "stack.json" in target.source
    assert resolve_api_target(None, {"FABRIK_HOME": str(tmp_path / "none")}).url == "http://127.0.0.1:8080"


def test_unreadable_state_file_falls_back_to_the_default(tmp_path: Path) -> None:
    (tmp_path / "stack.json").write_text("{not json")
    assert resolve_api_target(None, {"FABRIK_HOME": str(tmp_path)}).url == "http://127.0.0.1:8080"


def test_normalize_base_url() -> None:
    assert normalize_base_url("https://fabrik.example.com/api/v1/") == "https://fabrik.example.com"
    assert normalize_base_url("localhost:8080") == "http://localhost:8080"


# --------------------------------------------------------------------------------------------
# What is sent


def test_submit_sends_body_token_and_idempotency_key() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(201, json={"run_id": "R1", "state": "queued"})

    with client_for(handler, token="t0ken") as client:
        answer = client.submit_run({"project": "demo"}, idempotency_key="k-1")
    assert answer == {"run_id": "R1", "state": "queued"}
    request = seen[0]
    assert request.method == "POST"
    assert request.url.path == "/api/v1/runs"
    assert json.loads(request.content) == {"project": "demo"}
    assert request.headers["Authorization"] == "Bearer t0ken"
    assert request.headers["Idempotency-Key"] == "k-1"
    assert request.headers["User-Agent"].startswith("fabrik-cli/")


def test_list_params_repeat_and_pages_are_followed() -> None:
    queries: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        queries.append(str(request.url.query.decode()))
        cursor = request.url.params.get("cursor")
        if cursor is None:
            return httpx.Response(200, json={"items": [{"run_id": "A"}], "next_cursor": "c1"})
        return httpx.Response(200, json={"items": [{"run_id": "B"}], "next_cursor": None})

    with client_for(handler) as client:
        pages = list(
            client.iter_run_pages(project="p", states=["queued", "running"], labels=["a=b"], limit=1)
        )
    assert [item["run_id"] for page in pages for item in page["items"]] == ["A", "B"]
    assert queries[0] == "project=p&state=queued&state=running&label=a%3Db&limit=1"
    assert queries[1].endswith("&cursor=c1")


def test_run_ids_are_path_escaped() -> None:
    paths: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        paths.append(request.url.raw_path.decode())
        return httpx.Response(202, json={"run_id": "x", "action": "cancel", "state": "cancelling"})

    with client_for(handler) as client:
        client.cancel_run("../x y")
    assert paths == ["/api/v1/runs/..%2Fx%20y/cancel"]


def test_submit_always_sends_an_idempotency_key_and_retries_when_unavailable() -> None:
    keys: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        keys.append(request.headers["Idempotency-Key"])
        if len(keys) < 3:
            return problem(503, "the event bus did not acknowledge")
        return httpx.Response(201, json={"run_id": "R1"})

    sleeps: list[float] = []
    with client_for(handler, sleeps=sleeps) as client:
        assert client.submit_run({"project": "demo"}) == {"run_id": "R1"}
    assert len(keys) == 3
    assert len(set(keys)) == 1  # the retry is the same request: the gateway returns the same run
    assert keys[0].startswith("fabrik-cli-")
    assert sleeps == [1.0, 1.0]


def test_reads_honour_retry_after_but_give_up() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        response = problem(503, "the read model is still loading")
        response.headers["Retry-After"] = "2"
        return response

    sleeps: list[float] = []
    with client_for(handler, sleeps=sleeps) as client, pytest.raises(ApiError) as caught:
        client.get_run("R")
    assert caught.value.status == 503
    assert sleeps == [2.0, 2.0, 2.0]


def test_actions_and_refused_connections_are_not_retried() -> None:
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.method)
        if request.method == "GET":
            raise httpx.ConnectError("Connection refused", request=request)
        return problem(503, "unavailable")

    with client_for(handler) as client:
        with pytest.raises(ApiError):
            client.resume_run("R")
        with pytest.raises(ApiUnreachableError):
            client.get_run("R")
    assert calls == ["POST", "GET"]


# --------------------------------------------------------------------------------------------
# Errors


def test_validation_problem_lists_each_field_and_exits_2() -> None:
    errors = [
        {"field": "project", "rule": "must be a DNS-1123 label"},
        {"field": "workload.env.FABRIK_X", "rule": "is reserved"},
    ]

    def handler(request: httpx.Request) -> httpx.Response:
        return problem(422, "2 invalid field(s): project, workload.env.FABRIK_X", errors, "Validation failed")

    with client_for(handler) as client, pytest.raises(ApiError) as caught:
        client.submit_run({"project": "Bad"})
    exc = caught.value
    assert exc.exit_code == EXIT_USAGE
    assert exc.errors == [("project", "must be a DNS-1123 label"), ("workload.env.FABRIK_X", "is reserved")]
    assert exc.render().splitlines() == [
        "Error: Validation failed (422): 2 invalid field(s): project, workload.env.FABRIK_X",
        "  project: must be a DNS-1123 label",
        "  workload.env.FABRIK_X: is reserved",
    ]


@pytest.mark.parametrize(("status", "code"), [(400, EXIT_USAGE), (404, EXIT_FAILURE), (409, EXIT_FAILURE)])
def test_exit_codes_by_status(status: int, code: int) -> None:
    with client_for(lambda r: problem(status, "nope")) as client, pytest.raises(ApiError) as caught:
        client.get_run("R")
    assert caught.value.exit_code == code
    assert f"({status}): nope" in caught.value.render()


def test_conflict_reads_clearly() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return problem(409, "run R has already finished (succeeded)", title="Run already finished")

    with client_for(handler) as client, pytest.raises(ApiError) as caught:
        client.cancel_run("R")
    assert (
        caught.value.render() == "Error: Run already finished (409): run R has already finished (succeeded)"
    )


def test_non_problem_error_body_is_shown_briefly() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(502, text="<html>\n<b>bad gateway</b>\n</html>")

    with client_for(handler) as client, pytest.raises(ApiError) as caught:
        client.get_run("R")
    message = caught.value.render()
    assert message.startswith("Error: Bad Gateway (502) from GET http://api.test/api/v1/runs/R")
    assert "<b>bad gateway</b>" in message
    assert caught.value.exit_code == EXIT_FAILURE


def test_unauthorized_mentions_the_token_variable() -> None:
    with (
        client_for(lambda r: problem(401, "a token is required")) as client,
        pytest.raises(ApiError) as caught,
    ):
        client.get_run("R")
    assert "FABRIK_TOKEN" in caught.value.render()


def test_connection_refused_suggests_fabrik_up() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    with client_for(handler) as client, pytest.raises(ApiUnreachableError) as caught:
        client.get_run("R")
    text = caught.value.render()
    assert text.startswith("Error: cannot reach the Fabrik API at http://api.test: connection refused")
    assert "fabrik up" in text
    assert "(API URL from --api)" in text
    assert caught.value.exit_code == EXIT_FAILURE


# --------------------------------------------------------------------------------------------
# Log streams


def test_stream_logs_parses_events_and_sends_last_event_id() -> None:
    seen: list[httpx.Request] = []
    body = (
        ": keep-alive\n\n"
        'event: line\nid: 5-0\ndata: {"text": "a", "attempt": 1, "line": 0}\n\n'
        'event: end\ndata: {"reason": "finished", "state": "succeeded"}\n\n'
    )

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})

    parser = SseParser()
    with client_for(handler) as client:
        events = list(client.stream_logs("R", tail=10, last_event_id="4-2", parser=parser))
    assert [e.event for e in events] == ["line", "end"]
    assert json.loads(events[0].data)["text"] == "a"
    assert parser.last_event_id == "5-0"
    assert seen[0].headers["Last-Event-ID"] == "4-2"
    assert seen[0].url.params["follow"] == "true"
    assert seen[0].url.params["tail"] == "10"


def test_stream_logs_error_status_is_an_api_error() -> None:
    with (
        client_for(lambda r: problem(404, "run R does not exist")) as client,
        pytest.raises(ApiError) as caught,
    ):
        list(client.stream_logs("R"))
    assert caught.value.status == 404
