"""The click wiring: exit codes, stdout versus stderr, -o formats (a scripted API, no network)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from click.testing import CliRunner, Result

from fabrik_cli.client import ApiClient, ApiTarget
from fabrik_cli.commands import runs as runs_commands
from fabrik_cli.main import cli

RUN = {
    "run_id": "01JDXKZ0000000000000000000",
    "project": "demo",
    "env": "dev",
    "state": "succeeded",
    "reason": None,
    "attempt": 1,
    "progress": {"finished": 6, "total": 6},
    "exit_code": 0,
    "labels": {},
}

Handler = Callable[[httpx.Request], httpx.Response]


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch) -> Callable[[Handler], list[httpx.Request]]:
    def install(handler: Handler) -> list[httpx.Request]:
        seen: list[httpx.Request] = []

        def recording(request: httpx.Request) -> httpx.Response:
            seen.append(request)
            return handler(request)

        def open_client(api: str | None) -> ApiClient:
            return ApiClient(
                ApiTarget("http://api.test", "test"),
                transport=httpx.MockTransport(recording),
                sleep=lambda s: None,
            )

        monkeypatch.setattr(runs_commands, "open_client", open_client)
        return seen

    return install


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args))


def test_run_prints_only_the_id(api: Any) -> None:
    seen = api(lambda r: httpx.Response(201, json={**RUN, "state": "queued"}))
    result = invoke("run", "-p", "demo", "--label", "a=b", "--", "python", "-c", "print(1)")
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{RUN['run_id']}\n"
    body = json.loads(seen[0].content)
    assert body == {
        "project": "demo",
        "workload": {"command": ["python", "-c", "print(1)"]},
        "labels": {"a": "b"},
    }


def test_run_json_is_the_api_document(api: Any) -> None:
    api(lambda r: httpx.Response(201, json=RUN))
    result = invoke("run", "-p", "demo", "-o", "json", "--command", "true")
    assert json.loads(result.stdout) == RUN
    result = invoke("run", "-p", "demo", "-o", "yaml", "--command", "true")
    assert yaml.safe_load(result.stdout) == RUN


def test_wait_exit_code_follows_the_outcome(api: Any) -> None:
    for state, code in (("succeeded", 0), ("failed", 1), ("cancelled", 1), ("timed_out", 1)):

        def handler(request: httpx.Request, state: str = state) -> httpx.Response:
            return httpx.Response(201 if request.method == "POST" else 200, json={**RUN, "state": state})

        api(handler)
        result = invoke("run", "-p", "demo", "--wait", "--", "true")
        assert result.exit_code == code, (state, result.output)
        assert result.stdout.splitlines() == [RUN["run_id"]]
        assert f"run {RUN['run_id']} {state}" in result.stderr


def test_validation_error_exits_2_with_each_field(api: Any) -> None:
    problem = {
        "title": "Validation failed",
        "status": 422,
        "detail": "1 invalid field(s): project",
        "errors": [{"field": "project", "rule": "must be a DNS-1123 label"}],
    }
    api(lambda r: httpx.Response(422, json=problem, headers={"content-type": "application/problem+json"}))
    result = invoke("run", "-p", "Bad", "--", "true")
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "Error: Validation failed (422): 1 invalid field(s): project",
        "  project: must be a DNS-1123 label (--project)",
    ]


def test_usage_errors_exit_2_before_any_request(api: Any, tmp_path: Path) -> None:
    seen = api(lambda r: httpx.Response(500))
    assert invoke("run", "-p", "demo", "--command", "a", "--", "b").exit_code == 2
    assert invoke("run", "--", "true").exit_code == 2  # --project is required
    assert invoke("run", "-p", "demo", "--template", "default", "--cpu", "1").exit_code == 2
    assert invoke("runs", "list", "--state", "sleeping").exit_code == 2
    bad = tmp_path / "spec.json"
    bad.write_text("{}")
    result = invoke("run", "-p", "demo", "--spec", str(bad), "--", "true")
    assert result.exit_code == 2
    assert "spec.title: is required" in result.stderr
    assert seen == []


def test_list_all_merges_pages(api: Any) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if "cursor" not in request.url.params:
            return httpx.Response(200, json={"items": [RUN], "next_cursor": "c"})
        return httpx.Response(200, json={"items": [{**RUN, "run_id": "B"}], "next_cursor": None})

    api(handler)
    data = json.loads(invoke("runs", "list", "--all", "-o", "json").stdout)
    assert [r["run_id"] for r in data["items"]] == [RUN["run_id"], "B"]
    assert data["next_cursor"] is None
    one_page = invoke("runs", "list")
    assert "(more runs: add --all, or --cursor c)" in one_page.stderr


def test_show_logs_cancel_resume_queue(api: Any) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path.endswith("/logs"):
            lines = [
                {"text": "hello", "stream": "stdout", "ts": "2026-01-01T00:00:00Z", "attempt": 1, "line": 0}
            ]
            return httpx.Response(200, json={"run_id": RUN["run_id"], "lines": lines, "truncated": False})
        if path.endswith("/cancel"):
            return httpx.Response(202, json={"run_id": "R", "action": "cancel", "state": "cancelling"})
        if path.endswith("/resume"):
            problem = {"title": "Run cannot be resumed", "status": 409, "detail": "run R is succeeded"}
            return httpx.Response(409, json=problem, headers={"content-type": "application/problem+json"})
        if path.endswith("/queue"):
            return httpx.Response(200, json={"taken_at": None, "total": 0, "running": 0, "items": []})
        return httpx.Response(200, json=RUN)

    api(handler)
    show = invoke("runs", "show", "R")
    assert "succeeded" in show.stdout
    assert invoke("logs", "R").stdout == "hello\n"
    assert invoke("logs", "R", "-t").stdout.endswith(" hello\n")
    assert invoke("cancel", "R").stdout == "cancel requested for run R (state: cancelling)\n"
    resumed = invoke("resume", "R")
    assert resumed.exit_code == 1
    assert resumed.stderr == "Error: Run cannot be resumed (409): run R is succeeded\n"
    assert "the queue is empty" in invoke("queue").stdout


def test_spec_validate_exit_codes(tmp_path: Path) -> None:
    good = tmp_path / "ok.yaml"
    good.write_text(
        "v: 1\nid: s\ntitle: t\nstatus: draft\nversion: '1'\nlastUpdated: '2026-01-01'\ngoals: [g]\n"
        "nonGoals: []\nreq: {api: [], behavior: [], obs: []}\naccept: []\nassume: []\n"
    )
    assert invoke("spec", "validate", str(good)).exit_code == 0
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2")
    result = invoke("spec", "validate", str(bad))
    assert result.exit_code == 2
    assert "is not valid JSON" in result.stderr
    assert invoke("spec", "validate", str(tmp_path / "missing.json")).exit_code == 2


def test_stack_commands_are_still_there() -> None:
    result = invoke("--help")
    for name in ("up", "down", "status", "run", "runs", "logs", "cancel", "resume", "queue", "spec"):
        assert f"  {name} " in result.stdout
