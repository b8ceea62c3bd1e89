"""Waiting for a run to end (`fabrik run --wait`) and following its log (`--follow`, `logs -f`).

Waiting polls `GET /runs/{id}` and reports each change (state, queue position, progress) once.
Following reads `GET /runs/{id}/logs?follow=true` (server-sent events), which the gateway ends
when the run has ended and its last lines are out; a dropped stream is reopened with
`Last-Event-ID`, so no line is shown twice or lost. Either way the final run is fetched and
returned: its state, not the stream, decides the outcome.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from typing import Any

from fabrik_cli.client import ApiClient, ApiError, ApiUnreachableError
from fabrik_cli.errors import CliError
from fabrik_cli.sse import ServerSentEvent, SseParser
from fabrik_common.events import TERMINAL_STATES

StatusCallback = Callable[[Mapping[str, Any]], None]
LineCallback = Callable[[Mapping[str, Any] | str], None]

END_EVENTS = frozenset({"end", "done", "eof", "finished", "close"})
LINE_EVENTS = frozenset({"message", "log", "line", "lines", "chunk"})
STATUS_EVENTS = frozenset({"state", "status", "run"})


class WaitTimeoutError(CliError):
    pass


def _status_key(run: Mapping[str, Any]) -> tuple[Any, ...]:
    queue = run.get("queue") if isinstance(run.get("queue"), Mapping) else {}
    progress = run.get("progress") if isinstance(run.get("progress"), Mapping) else {}
    return (
        run.get("state"),
        run.get("reason"),
        run.get("attempt"),
        queue.get("position") if queue else None,
        tuple(progress.get(k) for k in ("phase", "task", "finished", "total")) if progress else None,
    )


def is_terminal(run: Mapping[str, Any]) -> bool:
    return run.get("state") in TERMINAL_STATES


class RunWatcher:
    """Follows one run until it is terminal. `on_status` gets the run whenever it changed."""

    def __init__(
        self,
        client: ApiClient,
        run_id: str,
        *,
        on_status: StatusCallback | None = None,
        on_line: LineCallback | None = None,
        done: Callable[[Mapping[str, Any]], bool] = is_terminal,
        min_attempt: int = 0,
        timeout: float | None = None,
        poll_interval: float = 0.5,
        max_poll_interval: float = 2.0,
        reconnect_for: float = 60.0,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.run_id = run_id
        self.on_status = on_status or (lambda run: None)
        self.on_line = on_line or (lambda line: None)
        self.done = done
        self.min_attempt = min_attempt
        self.timeout = timeout
        self.poll_interval = poll_interval
        self.max_poll_interval = max_poll_interval
        self.reconnect_for = reconnect_for
        self.sleep = sleep
        self.clock = clock
        self._started = clock()
        self._last_key: tuple[Any, ...] | None = None
        self._last_line: tuple[int, int] | None = None
        self.last_run: Mapping[str, Any] | None = None

    # -- status --------------------------------------------------------------------------------

    def poll(self) -> Mapping[str, Any]:
        """The run now (reporting a change); unreachable API is retried for `reconnect_for` s."""
        run = self._retrying(lambda: self.client.get_run(self.run_id))
        if not isinstance(run, Mapping):
            raise CliError(f"unexpected answer for run {self.run_id}: {json.dumps(run)[:200]}")
        self.last_run = run
        key = _status_key(run)
        if key != self._last_key:
            self._last_key = key
            self.on_status(run)
        return run

    def _check_timeout(self) -> None:
        if self.timeout is not None and self.clock() - self._started > self.timeout:
            state = (self.last_run or {}).get("state", "unknown")
            raise WaitTimeoutError(
                f"gave up waiting after {self.timeout:g}s: run {self.run_id} is still {state}",
                [f"it goes on: `fabrik runs show {self.run_id}`; stop it: `fabrik cancel {self.run_id}`"],
            )

    def wait(self) -> Mapping[str, Any]:
        """Poll until the run is done (terminal); returns the final run."""
        interval = self.poll_interval
        while True:
            before = self._last_key
            run = self.poll()
            if self.done(run):
                return run
            self._check_timeout()
            interval = (
                self.poll_interval
                if self._last_key != before
                else min(interval * 1.5, self.max_poll_interval)
            )
            self.sleep(interval)

    # -- logs ----------------------------------------------------------------------------------

    def follow(self, *, tail: int | None = None) -> Mapping[str, Any]:
        """Stream the log until the run is terminal; returns the final run."""
        parser = SseParser()
        first = True
        while True:
            run = self.poll()
            if self.done(run) and not first:
                return run
            self._check_timeout()
            ended = self._stream_once(parser, tail if first else None)
            first = False
            run = self.poll()
            if self.done(run):
                return run
            if not ended:
                self.sleep(self.poll_interval)

    def _stream_once(self, parser: SseParser, tail: int | None) -> bool:
        """One log stream until the server ends it; True if it ended with an end event."""
        deadline = self.clock() + self.reconnect_for
        while True:
            try:
                for event in self.client.stream_logs(
                    self.run_id, tail=tail, last_event_id=parser.last_event_id, parser=parser
                ):
                    if self._handle(event):
                        return True
                    self._check_timeout()
                return False
            except ApiUnreachableError:
                if self.clock() > deadline:
                    raise
                self.sleep(1.0)

    def _handle(self, event: ServerSentEvent) -> bool:
        name = event.event.lower()
        if name in END_EVENTS:
            return True
        data = _json_or_text(event.data)
        if name in STATUS_EVENTS:
            if isinstance(data, Mapping) and "state" in data:
                self.last_run = data
                key = _status_key(data)
                if key != self._last_key:
                    self._last_key = key
                    self.on_status(data)
            return False
        if name not in LINE_EVENTS:
            return False
        items: list[Any] = data if isinstance(data, list) else [data]
        for item in items:
            if isinstance(item, Mapping) and isinstance(item.get("lines"), list):
                items_of_chunk: list[Any] = item["lines"]
                for line in items_of_chunk:
                    self._emit(line)
            else:
                self._emit(item)
        return False

    def _emit(self, line: Any) -> None:
        if isinstance(line, Mapping):
            attempt, number = line.get("attempt"), line.get("line")
            if isinstance(attempt, int) and attempt < self.min_attempt:
                return  # an earlier attempt's line (following a resumed run)
            if isinstance(attempt, int) and isinstance(number, int):
                position = (attempt, number)
                if self._last_line is not None and position <= self._last_line:
                    return  # already shown (a replay after a reconnect)
                self._last_line = position
            self.on_line(line)
        elif line is not None:
            self.on_line(str(line))

    def _retrying(self, call: Callable[[], Any]) -> Any:
        deadline = self.clock() + self.reconnect_for
        while True:
            try:
                return call()
            except ApiUnreachableError:
                if self.clock() > deadline:
                    raise
                self.sleep(1.0)
            except ApiError as exc:
                if exc.status not in (502, 503, 504) or self.clock() > deadline:
                    raise
                self.sleep(1.0)


def _json_or_text(data: str) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        return data
