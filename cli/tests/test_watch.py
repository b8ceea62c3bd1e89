"""Waiting and following against a scripted API (MockTransport), with a fake clock."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from fabrik_cli.client import ApiClient, ApiTarget, ApiUnreachableError
from fabrik_cli.watch import RunWatcher, WaitTimeoutError


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def run(state: str, attempt: int = 1, **extra: Any) -> dict[str, Any]:
    return {"run_id": "R", "state": state, "attempt": attempt, "reason": None, "progress": {}, **extra}


def line_event(seq: int, text: str, attempt: int = 1, line: int = 0) -> str:
    data = json.dumps(
        {"text": text, "stream": "stdout", "attempt": attempt, "line": line, "ts": "2026-01-01T00:00:00Z"}
    )
    return f"event: line\nid: {seq}-0\ndata: {data}\n\n"


def make_client(handler: Callable[[httpx.Request], httpx.Response]) -> ApiClient:
    return ApiClient(
        ApiTarget("http://api.test", "test"), transport=httpx.MockTransport(handler), sleep=lambda s: None
    )


def watcher(client: ApiClient, clock: FakeClock, **kwargs: Any) -> tuple[RunWatcher, list[Any], list[Any]]:
    statuses: list[Any] = []
    lines: list[Any] = []
    w = RunWatcher(
        client,
        "R",
        on_status=statuses.append,
        on_line=lines.append,
        sleep=clock.sleep,
        clock=clock,
        **kwargs,
    )
    return w, statuses, lines


def test_wait_reports_each_change_once_and_returns_the_terminal_run() -> None:
    script = [
        run("queued"),
        run("queued"),
        run("running"),
        run("running", progress={"finished": 1}),
        run("failed"),
    ]
    script[-1]["reason"] = "workload_error"

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=script.pop(0) if len(script) > 1 else script[0])

    clock = FakeClock()
    w, statuses, _ = watcher(make_client(handler), clock)
    final = w.wait()
    assert final["state"] == "failed"
    assert [s["state"] for s in statuses] == ["queued", "running", "running", "failed"]


def test_wait_gives_up_after_its_timeout() -> None:
    clock = FakeClock()
    w, _, _ = watcher(make_client(lambda r: httpx.Response(200, json=run("running"))), clock, timeout=5)
    with pytest.raises(WaitTimeoutError, match="gave up waiting after 5s: run R is still running"):
        w.wait()


def test_unreachable_api_is_retried_then_reported() -> None:
    calls = {"n": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        if calls["n"] <= 3:
            raise httpx.ConnectError("Connection refused", request=request)
        return httpx.Response(200, json=run("succeeded"))

    clock = FakeClock()
    w, _, _ = watcher(make_client(handler), clock)
    assert w.wait()["state"] == "succeeded"

    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("Connection refused", request=request)

    w, _, _ = watcher(make_client(down), clock, reconnect_for=10)
    with pytest.raises(ApiUnreachableError):
        w.wait()


def test_follow_reopens_a_dropped_stream_where_it_left_off() -> None:
    """The first stream breaks after two lines; the second resumes with Last-Event-ID."""
    streams = [
        line_event(1, "one", line=0) + line_event(2, "two", line=1),  # then the connection drops
        line_event(2, "two", line=1)
        + line_event(3, "three", line=2)
        + 'event: end\ndata: {"state": "succeeded"}\n\n',
    ]
    last_ids: list[str | None] = []
    state = {"terminal": False}

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/logs"):
            last_ids.append(request.headers.get("Last-Event-ID"))
            body = streams.pop(0)
            if not streams:
                state["terminal"] = True
            return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})
        return httpx.Response(200, json=run("succeeded" if state["terminal"] else "running"))

    clock = FakeClock()
    w, statuses, lines = watcher(make_client(handler), clock)
    final = w.follow()
    assert final["state"] == "succeeded"
    assert [line["text"] for line in lines] == ["one", "two", "three"]
    assert last_ids == [None, "2-0"]
    assert [s["state"] for s in statuses] == ["running", "succeeded"]


def test_follow_after_resume_skips_the_earlier_attempt() -> None:
    body = line_event(1, "old", attempt=1) + line_event(2, "new", attempt=2) + "event: end\ndata: {}\n\n"
    polls = [run("failed", 1), run("succeeded", 2)]

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/logs"):
            return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})
        return httpx.Response(200, json=polls.pop(0) if len(polls) > 1 else polls[0])

    clock = FakeClock()
    w, _, lines = watcher(
        make_client(handler),
        clock,
        done=lambda r: r["state"] == "succeeded" and r["attempt"] > 1,
        min_attempt=2,
    )
    assert w.follow()["attempt"] == 2
    assert [line["text"] for line in lines] == ["new"]
