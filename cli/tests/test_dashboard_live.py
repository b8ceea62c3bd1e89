"""The dashboard's live stream: messages, cursors, reconnects and refusals (no network:
httpx.MockTransport answers as the gateway's `GET /api/v1/stream` does)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import httpx
import pytest

from fabrik_cli.client import ApiTarget
from fabrik_cli.credentials import Credential
from fabrik_cli.dashboard.live import Backoff, LiveStream, StreamStatus, parse_item
from fabrik_cli.sse import ServerSentEvent

TARGET = ApiTarget("http://gateway.test", "--api")


def sse(*messages: Mapping[str, Any], end: str | None = None, gap: Mapping[str, Any] | None = None) -> bytes:
    parts = [": keep-alive\n\n"]
    if gap is not None:
        parts.append(f"event: gap\ndata: {json.dumps(gap)}\n\n")
    for message in messages:
        parts.append(f"id: {message['cursor']}\ndata: {json.dumps(message)}\n\n")
    if end is not None:
        parts.append(f"event: end\ndata: {json.dumps({'reason': end})}\n\n")
    return "".join(parts).encode()


def event(cursor: str, run_id: str = "r1") -> dict[str, Any]:
    return {
        "cursor": cursor,
        "subject": f"fabrik.runs.progress.{run_id}",
        "type": "run.progress",
        "event": {"type": "run.progress", "event_id": f"e{cursor}", "run_id": run_id},
    }


class StopLoopError(Exception):
    """Ends the test's stream loop (in place of the dashboard cancelling its worker)."""


class Recorder:
    def __init__(self, stop_after_sleeps: int) -> None:
        self.messages: list[str] = []
        self.statuses: list[StreamStatus] = []
        self.connects: list[bool] = []
        self.gaps: list[Mapping[str, Any]] = []
        self.sleeps: list[float] = []
        self.stop_after = stop_after_sleeps

    async def on_message(self, message: Mapping[str, Any]) -> None:
        self.messages.append(str(message["cursor"]))

    async def on_status(self, status: StreamStatus) -> None:
        self.statuses.append(status)

    async def on_connect(self, resumed: bool) -> None:
        self.connects.append(resumed)

    async def on_gap(self, gap: Mapping[str, Any]) -> None:
        self.gaps.append(gap)

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        if len(self.sleeps) >= self.stop_after:
            raise StopLoopError

    def stream(self, handler: Any, credential: Credential | None = None) -> LiveStream:
        return LiveStream(
            TARGET,
            credential,
            [("project", "demo")],
            on_message=self.on_message,
            on_status=self.on_status,
            on_connect=self.on_connect,
            on_gap=self.on_gap,
            transport=httpx.MockTransport(handler),
            sleep=self.sleep,
        )


async def test_a_dropped_stream_is_reopened_after_the_last_cursor() -> None:
    requests: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        headers = {"content-type": "text/event-stream"}
        if len(requests) == 1:
            return httpx.Response(
                200, content=sse(event("11"), event("12"), end="going away"), headers=headers
            )
        if len(requests) == 2:
            return httpx.Response(503, json={"title": "Unavailable", "status": 503, "detail": "loading"})
        if len(requests) == 3:
            return httpx.Response(200, content=sse(event("13"), end="slow consumer"), headers=headers)
        return httpx.Response(200, content=sse(gap={"after": 13, "resumed_at": 40}), headers=headers)

    recorder = Recorder(stop_after_sleeps=4)
    with pytest.raises(StopLoopError):
        await recorder.stream(handler, Credential("secret", "env")).run()

    assert recorder.messages == ["11", "12", "13"]
    assert [r.url.params.get_list("cursor") for r in requests] == [[], ["12"], ["12"], ["13"]]
    assert all(r.url.params["project"] == "demo" for r in requests)
    assert requests[0].headers["authorization"] == "Bearer secret"
    assert requests[0].headers["accept"] == "text/event-stream"
    assert recorder.connects == [False, True, True]  # the first read from scratch, then resumed
    assert recorder.gaps == [{"after": 13, "resumed_at": 40}]
    states = [(s.state, s.detail) for s in recorder.statuses]
    assert states[0] == ("connecting", "")
    assert ("reconnecting", "the gateway ended the stream: going away") in states
    assert ("reconnecting", "Unavailable (503): loading") in states
    assert ("reconnecting", "the gateway ended the stream: slow consumer") in states
    # the delay grows while connections fail and starts over once one delivers
    assert recorder.sleeps == [0.5, 1.0, 0.5, 0.5]


async def test_refusals_end_the_stream_with_the_problem() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            401,
            json={"title": "Unauthorized", "status": 401, "detail": "a credential is required"},
            headers={"content-type": "application/problem+json"},
        )

    recorder = Recorder(stop_after_sleeps=1)
    error = await recorder.stream(handler).run()
    assert error.status == 401
    assert "log in with `fabrik login --api http://gateway.test`" in error.render()
    assert recorder.statuses[-1] == StreamStatus("failed", "Unauthorized (401): a credential is required")
    assert recorder.sleeps == []


async def test_an_unreachable_gateway_is_retried_with_the_reason() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("All connection attempts failed", request=request)

    recorder = Recorder(stop_after_sleeps=3)
    with pytest.raises(StopLoopError):
        await recorder.stream(handler).run()
    assert recorder.sleeps == [0.5, 1.0, 2.0]
    last = recorder.statuses[-1]
    assert (last.state, last.detail) == ("reconnecting", "cannot connect to http://gateway.test")
    assert last.describe() == "reconnecting in 2.0s (cannot connect to http://gateway.test)"


def test_items_and_backoff() -> None:
    assert parse_item(ServerSentEvent("message", '{"type": "heartbeat"}')).kind == "heartbeat"
    item = parse_item(ServerSentEvent("message", json.dumps(event("7")), id="7"))
    assert (item.kind, item.cursor) == ("message", "7")
    assert parse_item(ServerSentEvent("error", '{"reason": "slow consumer"}')).reason == "slow consumer"
    assert parse_item(ServerSentEvent("end", "not json")).reason == "not json"
    backoff = Backoff(initial=0.5, maximum=3)
    assert [backoff.next_delay() for _ in range(5)] == [0.5, 1.0, 2.0, 3, 3]
    backoff.reset()
    assert backoff.next_delay() == 0.5
