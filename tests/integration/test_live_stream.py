"""`GET /api/v1/stream` over a real NATS server, with the real gateway in this process: WebSocket
and server-sent events, many subscribers, a stalled one, resuming from a cursor, visibility per
project, authentication and bad filters.

Events are published on the bus as the scheduler and the executor would.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import nats
import pytest
import websockets
from nats.js import JetStreamContext
from websockets.asyncio.client import ClientConnection

from fabrik_common.codec import encode
from fabrik_common.events import (
    Event,
    LogLine,
    RunLogChunk,
    RunParameters,
    RunProgress,
    RunRequested,
    RunResultReported,
    RunStateChanged,
)
from fabrik_common.ids import new_ulid, utcnow
from fabrik_common.runs import TEMPLATES
from fabrik_common.service import Service
from fabrik_common.testing import running_service
from fabrik_common.topology import ensure_topology
from fabrik_gateway.api import stream
from fabrik_gateway.app import build
from fabrik_gateway.auth.jwt import mint_hs256
from fabrik_gateway.gateway import Gateway
from fabrik_gateway.live import LiveHub
from fabrik_gateway.settings import GatewaySettings

SECRET = "s" * 32
PATH = "/api/v1/stream"


def token(roles: object, subject: str = "tester") -> str:
    return mint_hs256(SECRET, subject, roles, ttl_seconds=3600)


ADMIN = token("admin", "root")
VIEWER = token("viewer", "eve")
ONLY_A = token({"proj-a": "viewer"}, "alice")
ONLY_B = token({"proj-b": "developer"}, "bob")


def wire(service: Service[Gateway]) -> LiveHub:
    """The live hub of the gateway `build()` made."""
    hub = service.http_app.state.get(stream.LIVE_STATE_KEY)
    assert isinstance(hub, LiveHub)
    return hub


@dataclass
class Live:
    service: Service[Gateway]
    hub: LiveHub
    js: JetStreamContext
    http: httpx.AsyncClient
    published: list[Event] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.service.http.port

    def ws_url(self, credential: str | None = ADMIN, **query: str) -> str:
        params = dict(query)
        if credential is not None:
            params["access_token"] = credential
        return f"ws://127.0.0.1:{self.port}{PATH}" + (
            "?" + httpx.QueryParams(params).__str__() if params else ""
        )

    async def publish(self, *events: Event) -> list[int]:
        seqs = []
        for event in events:
            ack = await self.js.publish(
                event.subject(), encode(event), headers={"Nats-Msg-Id": event.event_id}
            )
            seqs.append(ack.seq)
            self.published.append(event)
        return seqs

    async def subscribers(self, n: int) -> None:
        await wait_until(lambda: len(self.hub.fanout) == n, what=f"{n} subscribers joined")


async def wait_until(
    predicate: Callable[[], bool | Awaitable[bool]], timeout: float = 15.0, what: str = ""
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        assert time.monotonic() < deadline, f"condition not met in time: {what}"
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def started(nats_url: str, **overrides: Any) -> AsyncIterator[Live]:
    settings = GatewaySettings(
        **{
            "nats_url": nats_url,
            "http_port": 0,
            "log_format": "text",
            "jwt_hs256_secret": SECRET,
            "anonymous_role": "none",
            "rate_limit_burst": 100_000,
            "rate_limit_per_minute": 1_000_000,
            "stream_heartbeat_seconds": 1.0,
            **overrides,
        }
    )
    service = build(settings)
    hub = wire(service)
    nc = await nats.connect(nats_url)
    try:
        async with running_service(service):
            await wait_until(lambda: hub.ready, what="hub ready")
            async with httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{service.http.port}", timeout=20
            ) as http:
                yield Live(service, hub, nc.jetstream(), http)
    finally:
        await nc.close()


@pytest.fixture
async def live(nats_url: str) -> AsyncIterator[Live]:
    async with started(nats_url) as value:
        yield value


def requested(run_id: str, project: str) -> RunRequested:
    return RunRequested(
        run_id=run_id,
        project=project,
        env="dev",
        params=RunParameters(resources=TEMPLATES["default"]),
        requested_by="test",
    )


def progress(run_id: str, n: int) -> RunProgress:
    return RunProgress(run_id=run_id, attempt=1, finished=n, total=100)


def chunk(run_id: str, first_line: int, text: str) -> RunLogChunk:
    return RunLogChunk(
        run_id=run_id,
        attempt=1,
        first_line=first_line,
        lines=(LogLine(ts=utcnow(), stream="stdout", text=text),),
    )


async def connect(url: str, **kwargs: Any) -> ClientConnection:
    return await websockets.connect(url, compression=None, open_timeout=60, max_size=None, **kwargs)


async def receive(ws: ClientConnection, n: int, timeout: float = 15.0) -> list[dict[str, Any]]:
    """The next `n` messages that are not heartbeats."""
    out: list[dict[str, Any]] = []
    async with asyncio.timeout(timeout):
        while len(out) < n:
            message = json.loads(await ws.recv())
            if message.get("type") != "heartbeat":
                out.append(message)
    return out


async def close_of(ws: ClientConnection, timeout: float = 15.0) -> tuple[int, str, list[dict[str, Any]]]:
    """Read until the server closes: (code, reason, messages before the close)."""
    messages: list[dict[str, Any]] = []
    async with asyncio.timeout(timeout):
        try:
            while True:
                messages.append(json.loads(await ws.recv()))
        except websockets.ConnectionClosed as exc:
            closed = exc
    if closed.rcvd is None:
        raise AssertionError(f"closed without a close frame: {closed}")
    return closed.rcvd.code, closed.rcvd.reason, messages


@dataclass
class SseEvent:
    id: str | None = None
    event: str | None = None
    data: str = ""
    comment: str | None = None


async def sse_events(lines: AsyncIterator[str]) -> AsyncIterator[SseEvent]:
    current = SseEvent()
    async for line in lines:
        if line == "":
            if current != SseEvent():
                yield current
            current = SseEvent()
        elif line.startswith(":"):
            yield SseEvent(comment=line[1:].strip())
        else:
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "data":
                current.data = current.data + "\n" + value if current.data else value
            elif name in ("id", "event"):
                setattr(current, name, value)


@contextlib.asynccontextmanager
async def sse(
    live: Live, credential: str = ADMIN, headers: dict[str, str] | None = None, **query: str
) -> Any:
    request_headers = {
        "Accept": "text/event-stream",
        "Authorization": f"Bearer {credential}",
        **(headers or {}),
    }
    async with live.http.stream("GET", PATH, params=query, headers=request_headers) as response:
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream")
        yield sse_events(response.aiter_lines())


async def sse_take(events: AsyncIterator[SseEvent], n: int, timeout: float = 15.0) -> list[SseEvent]:
    out: list[SseEvent] = []
    async with asyncio.timeout(timeout):
        async for event in events:
            if event.comment is None:
                out.append(event)
                if len(out) == n:
                    break
    return out


# ------------------------------------------------------------------------------------ fan-out


async def test_500_websocket_subscribers_receive_every_event_of_a_run_in_order(live: Live) -> None:
    n, events = 500, 20
    limit = asyncio.Semaphore(50)

    async def one() -> ClientConnection:
        async with limit:
            return await connect(live.ws_url(VIEWER, run_id=run_id))

    run_id = new_ulid()
    consumers_before = (await live.js.stream_info("RUNS")).state.consumer_count
    started_at = time.monotonic()
    clients = await asyncio.gather(*(one() for _ in range(n)))
    try:
        await live.subscribers(n)
        connected = time.monotonic() - started_at
        # One consumer feeds them all: connecting created none.
        assert (await live.js.stream_info("RUNS")).state.consumer_count == consumers_before
        sent = [requested(run_id, "demo")] + [progress(run_id, i) for i in range(1, events)]
        seqs = await live.publish(*sent)
        received = await asyncio.gather(*(receive(ws, events, timeout=60) for ws in clients))
        elapsed = time.monotonic() - started_at
        expected_ids = [e.event_id for e in sent]
        for messages in received:
            assert [m["event"]["event_id"] for m in messages] == expected_ids
            assert [int(m["cursor"]) for m in messages] == seqs
            assert {m["event"]["run_id"] for m in messages} == {run_id}
        assert received[0][0]["type"] == "run.requested" and received[0][1]["type"] == "run.progress"
        assert received[0][0]["subject"] == f"fabrik.runs.requested.{run_id}"
        print(
            f"\n{n} subscribers connected in {connected:.1f} s; "
            f"{n * events} messages in {elapsed:.1f} s total"
        )
    finally:
        await asyncio.gather(*(ws.close() for ws in clients), return_exceptions=True)
    await live.subscribers(0)


async def test_a_stalled_subscriber_delays_nobody_and_is_dropped_as_a_slow_consumer(nats_url: str) -> None:
    async with started(nats_url, stream_queue_size=8) as live:
        run_id = new_ulid()
        healthy = [await connect(live.ws_url(ADMIN)) for _ in range(3)]
        # The stalled client reads nothing (its library stops reading the socket after one frame),
        # so once the kernel's buffers are full the gateway's writes to it wait, and its queue
        # fills and overflows.
        stalled = await connect(live.ws_url(ADMIN), max_queue=1)
        await live.subscribers(4)
        received: list[list[dict[str, Any]]] = [[] for _ in healthy]
        last_at: list[float] = [0.0 for _ in healthy]

        async def read(i: int, ws: ClientConnection) -> None:
            with contextlib.suppress(websockets.ConnectionClosed):
                async for text in ws:
                    message = json.loads(text)
                    if message.get("type") != "heartbeat":
                        received[i].append(message)
                        last_at[i] = time.monotonic()

        readers = [asyncio.create_task(read(i, ws)) for i, ws in enumerate(healthy)]
        blob = "x" * 60_000
        sent: list[Event] = []
        for i in range(400):
            event = RunResultReported(run_id=run_id, attempt=1, result={"i": i, "blob": blob})
            await live.publish(event)
            sent.append(event)
            if len(live.hub.fanout) == 3:
                break
        assert len(live.hub.fanout) == 3, "the stalled subscriber was never dropped"
        dropped_after = len(sent)
        # The others are not held up: everything so far, and what follows, arrives promptly.
        tail = [progress(run_id, i) for i in range(20)]
        published_at = time.monotonic()
        await live.publish(*tail)
        expected = [e.event_id for e in sent + tail]
        await wait_until(lambda: all(len(r) >= len(expected) for r in received), 30, "healthy ones got all")
        for messages in received:
            assert [m["event"]["event_id"] for m in messages] == expected
        delay = max(last_at) - published_at
        assert delay < 5.0, f"healthy subscribers waited {delay:.1f} s"
        # The stalled one, once it reads, gets what was already on its way, then the close reason.
        code, reason, before = await close_of(stalled, timeout=30)
        assert (code, reason) == (1013, "slow consumer")
        got = [m["event"]["event_id"] for m in before]
        assert got == [e.event_id for e in sent[: len(got)]] and len(got) < dropped_after
        for ws in healthy:
            await ws.close()
        await asyncio.gather(*readers)
        print(
            f"\nstalled subscriber dropped after {dropped_after} events of 60 kB; it had received {len(got)}"
        )
        metrics = (await live.http.get("/metrics")).text
        assert "fabrik_gateway_stream_dropped_total 1.0" in metrics


# ------------------------------------------------------------------------------------ resume


async def test_reconnect_with_a_cursor_misses_nothing_and_duplicates_nothing(live: Live) -> None:
    run_id = new_ulid()
    ws = await connect(live.ws_url(VIEWER, run_id=run_id))
    await live.subscribers(1)
    first = [requested(run_id, "demo")] + [progress(run_id, i) for i in range(1, 5)]
    await live.publish(*first)
    got = await receive(ws, 5)
    await ws.close()
    await live.subscribers(0)
    cursor = got[-1]["cursor"]
    # Meanwhile: events of this run, and of another run the filter excludes.
    other = new_ulid()
    missed = [progress(run_id, i) for i in range(5, 10)]
    await live.publish(missed[0], requested(other, "demo"), *missed[1:], progress(other, 1))
    again = await connect(live.ws_url(VIEWER, run_id=run_id, cursor=cursor))
    await live.subscribers(1)
    later = [progress(run_id, i) for i in range(10, 15)]
    publishing = asyncio.create_task(live.publish(*later))
    resumed = await receive(again, 10)
    await publishing
    assert [m["event"]["finished"] for m in resumed] == list(range(5, 15))
    cursors = [int(m["cursor"]) for m in resumed]
    assert cursors == sorted(set(cursors)) and cursors[0] > int(cursor)
    with pytest.raises(TimeoutError):
        await receive(again, 1, timeout=0.5)  # nothing twice
    await again.close()


async def test_sse_delivers_the_same_events_with_ids_and_resumes_from_last_event_id(live: Live) -> None:
    run_id = new_ulid()
    ws = await connect(live.ws_url(VIEWER, run_id=run_id))
    events: list[SseEvent]
    async with sse(live, VIEWER, run_id=run_id) as stream_events:
        await live.subscribers(2)
        await live.publish(requested(run_id, "demo"), progress(run_id, 1), progress(run_id, 2))
        events = await sse_take(stream_events, 3)
    over_ws = await receive(ws, 3)
    await ws.close()
    assert [json.loads(e.data) for e in events] == over_ws
    assert [e.id for e in events] == [m["cursor"] for m in over_ws]
    assert all(e.event is None for e in events)  # plain `message` events for EventSource.onmessage

    await live.publish(progress(run_id, 3), progress(run_id, 4))
    # What EventSource does when it reconnects: the same URL, and the last id it saw.
    async with sse(live, VIEWER, headers={"Last-Event-ID": events[-1].id or ""}, run_id=run_id) as again:
        await live.subscribers(1)
        await live.publish(progress(run_id, 5))
        resumed = await sse_take(again, 3)
    assert [json.loads(e.data)["event"]["finished"] for e in resumed] == [3, 4, 5]
    assert int(resumed[0].id or 0) > int(events[-1].id or 0)


async def test_sse_sends_keep_alive_comments_when_idle(live: Live) -> None:
    async with sse(live, VIEWER, run_id=new_ulid()) as events:
        async with asyncio.timeout(5):
            first = await anext(events)
    assert first.comment == "keep-alive"


# ------------------------------------------------------------------------------------ visibility


async def test_a_principal_of_project_a_sees_nothing_of_project_b(nats_url: str) -> None:
    run_a, run_b, early_b = new_ulid(), new_ulid(), new_ulid()
    # Requested before the gateway started, and not in the read model (no scheduler records it):
    # the hub has never seen this run's project and has to find it to keep it from alice.
    nc = await nats.connect(nats_url)
    await ensure_topology(nc.jetstream())
    event = requested(early_b, "proj-b")
    await nc.jetstream().publish(event.subject(), encode(event))
    await nc.close()
    async with started(nats_url) as live:
        await _project_a_sees_nothing_of_b(live, run_a, run_b, early_b)


async def _project_a_sees_nothing_of_b(live: Live, run_a: str, run_b: str, early_b: str) -> None:
    await live.publish(requested(run_a, "proj-a"), requested(run_b, "proj-b"))
    refused = await connect(live.ws_url(ONLY_A, logs=run_b))
    code, reason, messages = await close_of(refused)
    assert code == 1008 and "does not exist" in reason and messages[0]["problem"]["status"] == 404
    response = await live.http.get(
        PATH, params={"logs": run_b}, headers={"Authorization": f"Bearer {ONLY_A}"}
    )
    assert response.status_code == 404 and response.json()["errors"][0]["field"] == "logs"

    alice = await connect(live.ws_url(ONLY_A, logs=run_a))
    alice_b = await connect(live.ws_url(ONLY_A, project="proj-b"))
    bob = await connect(live.ws_url(ONLY_B, types="run.progress"))
    admin = await connect(live.ws_url(ADMIN, logs=run_b))
    await live.subscribers(4)
    published = [
        progress(early_b, 1),
        progress(run_b, 1),
        chunk(run_b, 0, "b's secret"),
        RunStateChanged(run_id=run_b, project="proj-b", attempt=1, from_state="queued", to_state="starting"),
        progress(run_a, 1),
        chunk(run_a, 0, "a's line"),
        progress(run_b, 2),
        RunStateChanged(run_id=run_a, project="proj-a", attempt=1, from_state="queued", to_state="starting"),
    ]
    await live.publish(*published)
    seen_by_admin = await receive(admin, 7)  # every RUNS event, and b's chunk
    # The project of `early_b` was found (not merely hidden): who sees proj-b gets its events.
    seen_by_bob = await receive(bob, 3)
    assert [m["event"]["run_id"] for m in seen_by_bob] == [early_b, run_b, run_b]
    assert {m["event"]["run_id"] for m in seen_by_admin} == {early_b, run_a, run_b}
    seen = await receive(alice, 3)
    assert [(m["type"], m["event"]["run_id"]) for m in seen if m["type"] != "log.chunk"] == [
        ("run.progress", run_a),
        ("run.state_changed", run_a),
    ]
    assert [m["event"]["lines"][0]["text"] for m in seen if m["type"] == "log.chunk"] == ["a's line"]
    assert all(":" in m["cursor"] for m in seen)  # with logs, cursors carry both positions
    with pytest.raises(TimeoutError):
        await receive(alice, 1, timeout=0.5)
    with pytest.raises(TimeoutError):
        await receive(alice_b, 1, timeout=0.3)
    # Replaying from the start does not show b's events either.
    replay = await connect(live.ws_url(ONLY_A, cursor="0"))
    replayed = await receive(replay, 3)
    assert {m["event"]["run_id"] for m in replayed} == {run_a}
    assert live.hub.known_project(early_b) == "proj-b"
    assert [m["type"] for m in replayed] == ["run.requested", "run.progress", "run.state_changed"]
    with pytest.raises(TimeoutError):
        await receive(replay, 1, timeout=0.3)
    for ws in (alice, alice_b, bob, admin, replay):
        await ws.close()


# ------------------------------------------------------------------------------------ refusals


async def test_without_credentials_http_is_401_and_the_websocket_is_refused(live: Live) -> None:
    response = await live.http.get(PATH, headers={"Accept": "text/event-stream"})
    assert response.status_code == 401
    assert response.headers["content-type"].startswith("application/problem+json")
    response = await live.http.get(
        PATH, params={"access_token": "not-a-token"}, headers={"Accept": "text/event-stream"}
    )
    assert response.status_code == 401
    for credential in (None, "not-a-token"):
        with pytest.raises(websockets.InvalidStatus) as info:
            await connect(live.ws_url(credential))
        assert info.value.response.status_code in (401, 403)
    assert len(live.hub.fanout) == 0


@pytest.mark.parametrize(
    ("query", "fields"),
    [
        ({"types": "run.progress,run.nonsense"}, {"types"}),
        ({"project": "Not_A_Label"}, {"project"}),
        ({"run_id": "nope"}, {"run_id"}),
        ({"logs": "nope"}, {"logs"}),
        ({"cursor": "abc"}, {"cursor"}),
        ({"cursor": "1", "types": "x", "project": "ok,BAD"}, {"types", "project"}),
    ],
)
async def test_bad_filters_are_400_naming_the_parameter(
    live: Live, query: dict[str, str], fields: set[str]
) -> None:
    response = await live.http.get(PATH, params=query, headers={"Authorization": f"Bearer {VIEWER}"})
    assert response.status_code == 400
    body = response.json()
    assert {e["field"] for e in body["errors"]} == fields
    ws = await connect(live.ws_url(VIEWER, **query))
    code, reason, messages = await close_of(ws)
    assert code == 1008
    assert all(name in reason for name in fields)
    assert messages == [{"type": "error", "problem": {**body}}]


async def test_a_bad_last_event_id_is_named(live: Live) -> None:
    response = await live.http.get(
        PATH,
        headers={"Authorization": f"Bearer {VIEWER}", "Last-Event-ID": "nope", "Accept": "text/event-stream"},
    )
    assert response.status_code == 400
    assert [e["field"] for e in response.json()["errors"]] == ["Last-Event-ID"]


# ------------------------------------------------------------------------------------ shutdown


async def test_open_streams_end_cleanly_when_the_gateway_stops(nats_url: str) -> None:
    ws: ClientConnection | None = None
    tail: list[SseEvent] = []
    async with started(nats_url) as live:
        ws = await connect(live.ws_url(VIEWER))
        request_headers = {"Accept": "text/event-stream", "Authorization": f"Bearer {VIEWER}"}
        async with live.http.stream("GET", PATH, headers=request_headers) as response:
            events = sse_events(response.aiter_lines())
            await live.subscribers(2)

            async def read_sse() -> None:
                with contextlib.suppress(httpx.HTTPError):
                    async for event in events:
                        tail.append(event)

            reader = asyncio.create_task(read_sse())
            stopped_at = time.monotonic()
            await live.service.stop()
            await asyncio.wait_for(reader, 10)
            took = time.monotonic() - stopped_at
    assert ws is not None
    code, reason, _ = await close_of(ws)
    assert (code, reason) == (1001, "going away")
    ends = [e for e in tail if e.event is not None]
    assert [(e.event, json.loads(e.data)) for e in ends] == [("end", {"reason": "going away"})]
    assert took < 5.0
