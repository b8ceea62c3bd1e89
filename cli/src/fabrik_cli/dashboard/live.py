"""The live stream of the dashboard: `GET /api/v1/stream` as server-sent events, reconnected
with the last cursor after a dropped connection, so no event is lost or shown twice.

`LiveStream.run()` keeps one stream open until it is cancelled. Every message goes to
`on_message`; the connection's state (connecting, live, reconnecting in N s, failed) to
`on_status`; `on_connect(resumed)` is called each time a stream is open, with `resumed` false when
it could not continue from a cursor (the first connection, or one before any message arrived):
then the caller reads the current state from the REST API. A `gap` message (the gateway could not
replay everything) goes to `on_gap`, for the same reason.

A refusal that retrying does not fix (400, 401, 403, 404) ends `run()` with a `failed` status and
the `ApiError`; anything else (the gateway restarting, 502/503/504, a network error, a slow
consumer or `going away` end) is retried with a growing delay (0.5 s doubling up to 10 s).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import httpx

from fabrik_cli.client import (
    DEFAULT_TIMEOUT,
    STREAM_READ_TIMEOUT,
    ApiError,
    ApiTarget,
    _api_error,
    _describe_transport_error,
)
from fabrik_cli.credentials import Credential
from fabrik_cli.sse import ServerSentEvent, SseParser

StatusName = Literal["connecting", "live", "reconnecting", "failed"]
FATAL_STATUSES = frozenset({400, 401, 403, 404})


@dataclass(frozen=True)
class StreamStatus:
    state: StatusName
    detail: str = ""
    retry_in: float | None = None
    failures: int = 0

    def describe(self) -> str:
        if self.state == "live":
            return "live"
        if self.state == "connecting":
            return "connecting…"
        if self.state == "reconnecting":
            wait = f" in {self.retry_in:.1f}s" if self.retry_in is not None else ""
            return f"reconnecting{wait} ({self.detail})" if self.detail else f"reconnecting{wait}"
        return f"stream failed: {self.detail}"


class Backoff:
    """0.5 s, 1 s, 2 s, ... up to `maximum`; `reset()` after a connection that delivered."""

    def __init__(self, initial: float = 0.5, maximum: float = 10.0, factor: float = 2.0) -> None:
        self.initial = initial
        self.maximum = maximum
        self.factor = factor
        self.failures = 0

    def next_delay(self) -> float:
        delay = min(self.initial * self.factor**self.failures, self.maximum)
        self.failures += 1
        return delay

    def reset(self) -> None:
        self.failures = 0


@dataclass(frozen=True)
class StreamItem:
    """One SSE event of the stream: a `message` (a run event or log chunk), a `gap`, a
    `heartbeat`, or the server ending the stream (`end`, `error`) with a reason."""

    kind: Literal["message", "gap", "heartbeat", "end"]
    data: Mapping[str, Any]
    cursor: str | None = None

    @property
    def reason(self) -> str:
        return str(self.data.get("reason") or "")


def parse_item(event: ServerSentEvent) -> StreamItem:
    try:
        data = json.loads(event.data) if event.data else {}
    except ValueError:
        data = {"reason": event.data}
    if not isinstance(data, Mapping):
        data = {"value": data}
    if event.event in ("end", "error"):
        return StreamItem("end", data)
    if event.event == "gap":
        return StreamItem("gap", data)
    if data.get("type") == "heartbeat":
        return StreamItem("heartbeat", data)
    cursor = data.get("cursor")
    return StreamItem("message", data, str(cursor) if cursor is not None else event.id)


def _connect_detail(exc: httpx.ConnectError) -> str:
    """`: connection refused`, or nothing for the asynchronous transport's generic
    `All connection attempts failed`."""
    text = _describe_transport_error(exc)
    return "" if text.startswith("All connection attempts failed") else f": {text}"


class StreamDroppedError(Exception):
    """The stream ended or broke; it is opened again."""


class LiveStream:
    def __init__(
        self,
        target: ApiTarget,
        credential: Credential | None,
        params: Sequence[tuple[str, str]],
        *,
        on_message: Callable[[Mapping[str, Any]], Awaitable[None]],
        on_status: Callable[[StreamStatus], Awaitable[None]],
        on_connect: Callable[[bool], Awaitable[None]],
        on_gap: Callable[[Mapping[str, Any]], Awaitable[None]],
        transport: httpx.AsyncBaseTransport | None = None,
        backoff: Backoff | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.target = target
        self.credential = credential
        self.params = list(params)
        self.cursor: str | None = None
        self.on_message = on_message
        self.on_status = on_status
        self.on_connect = on_connect
        self.on_gap = on_gap
        self.backoff = backoff or Backoff()
        self.connections = 0
        self._transport = transport
        self._sleep = sleep

    def request_params(self) -> list[tuple[str, str | int | float | bool | None]]:
        params: list[tuple[str, str | int | float | bool | None]] = list(self.params)
        if self.cursor:
            params.append(("cursor", self.cursor))
        return params

    async def run(self) -> ApiError:
        """Until cancelled, or until a refusal that retrying does not fix (returned)."""
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
        if self.credential is not None:
            headers["Authorization"] = f"Bearer {self.credential.token}"
        timeout = httpx.Timeout(DEFAULT_TIMEOUT, read=STREAM_READ_TIMEOUT)
        async with httpx.AsyncClient(
            base_url=self.target.api_url, headers=headers, timeout=timeout, transport=self._transport
        ) as http:
            await self.on_status(StreamStatus("connecting"))
            while True:
                try:
                    await self._once(http)
                    reason = "the stream ended"
                except StreamDroppedError as exc:
                    reason = str(exc)
                except httpx.ConnectError as exc:
                    reason = f"cannot connect to {self.target.url}{_connect_detail(exc)}"
                except httpx.TransportError as exc:
                    reason = _describe_transport_error(exc)
                except ApiError as exc:
                    if exc.status in FATAL_STATUSES:
                        await self.on_status(StreamStatus("failed", exc.message))
                        return exc
                    reason = exc.message
                delay = self.backoff.next_delay()
                await self.on_status(
                    StreamStatus("reconnecting", reason, retry_in=delay, failures=self.backoff.failures)
                )
                await self._sleep(delay)

    async def _once(self, http: httpx.AsyncClient) -> None:
        resumed = self.cursor is not None
        async with http.stream("GET", "/stream", params=self.request_params()) as response:
            if response.status_code >= 400:
                await response.aread()
                raise _api_error(response, credential=self.credential, target=self.target)
            self.connections += 1
            await self.on_status(StreamStatus("live"))
            await self.on_connect(resumed)
            parser = SseParser()
            async for line in response.aiter_lines():
                event = parser.feed(line)
                if event is None:
                    continue
                item = parse_item(event)
                if item.kind == "end":
                    raise StreamDroppedError(
                        f"the gateway ended the stream: {item.reason or 'no reason given'}"
                    )
                self.backoff.reset()
                if item.kind == "gap":
                    await self.on_gap(item.data)
                elif item.kind == "message":
                    if item.cursor:
                        self.cursor = item.cursor
                    await self.on_message(item.data)
