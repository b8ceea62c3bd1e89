"""The live-stream hub without NATS: filters, visibility, slow consumers, cursors, and resuming
without gaps or duplicates, over an in-memory stream that behaves like JetStream's ordered
consumers (stream sequences shared by every subject of a stream)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from fabrik_common.codec import encode
from fabrik_common.events import (
    Event,
    LogLine,
    RunLogChunk,
    RunParameters,
    RunProgress,
    RunQueued,
    RunRequested,
    RunStateChanged,
)
from fabrik_common.ids import new_ulid, utcnow
from fabrik_common.runs import TEMPLATES
from fabrik_common.topology import subject_matches
from fabrik_gateway.auth import Principal
from fabrik_gateway.live import (
    SHUTDOWN,
    SLOW,
    Closed,
    Cursor,
    Fanout,
    Gap,
    Heartbeat,
    Item,
    LiveHub,
    Message,
    Output,
    Stored,
    StreamFilter,
    Subscriber,
    Subscription,
    item_body,
    parse_cursor,
    runs_item,
)
from fabrik_gateway.problems import ProblemError

ADMIN = Principal(subject="root", role="admin", authenticated=True, kind="jwt")
VIEWER = Principal(subject="eve", role="viewer", authenticated=True, kind="jwt")
ONLY_A = Principal(
    subject="alice", role=None, project_roles={"proj-a": "viewer"}, authenticated=True, kind="jwt"
)
NOBODY = Principal(subject="nobody", role=None, authenticated=True, kind="jwt")


# ------------------------------------------------------------------------------------ in memory


@dataclass
class _Msg:
    seq: int
    subject: str
    data: bytes


@dataclass
class MemorySource:
    """Streams in memory; readers follow them like ordered consumers (filtered, from a sequence)."""

    streams: dict[str, list[_Msg]] = field(default_factory=lambda: {"RUNS": [], "LOGS": []})
    last: dict[str, int] = field(default_factory=lambda: {"RUNS": 0, "LOGS": 0})
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    gates: dict[str, asyncio.Event] = field(default_factory=dict)
    """Readers on these subjects wait while the gate is closed (a lagging consumer)."""
    lookups: int = 0

    def publish(self, stream: str, event: Event) -> int:
        self.last[stream] += 1
        self.streams[stream].append(_Msg(self.last[stream], event.subject(), encode(event)))
        self.changed.set()
        self.changed = asyncio.Event()
        return self.last[stream]

    def remove(self, stream: str, seq: int) -> None:
        self.streams[stream] = [m for m in self.streams[stream] if m.seq != seq]

    async def last_seq(self, stream: str) -> int:
        return self.last[stream]

    async def first_seq(self, stream: str) -> int:
        messages = self.streams[stream]
        return messages[0].seq if messages else self.last[stream] + 1

    @contextlib.asynccontextmanager
    async def read(self, stream: str, subject: str, start_seq: int) -> AsyncIterator[_Reader]:
        yield _Reader(self, stream, subject, start_seq)

    async def last_message(self, stream: str, subject: str) -> Stored | None:
        self.lookups += 1
        for m in reversed(self.streams[stream]):
            if m.subject == subject:
                return Stored(m.seq, m.subject, m.data, 0)
        return None


class _Reader:
    def __init__(self, source: MemorySource, stream: str, subject: str, start: int) -> None:
        self.source = source
        self.stream = stream
        self.subject = subject
        self.next_seq = start
        self.pending = len(self._matching(start))

    def _matching(self, start: int) -> list[_Msg]:
        return [
            m
            for m in self.source.streams[self.stream]
            if m.seq >= start and subject_matches(self.subject, m.subject)
        ]

    async def next(self, wait_seconds: float | None) -> Stored | None:
        try:
            async with asyncio.timeout(wait_seconds):
                while True:
                    gate = self.source.gates.get(self.subject)
                    if gate is not None:
                        await gate.wait()
                    found = self._matching(self.next_seq)
                    if found:
                        m = found[0]
                        self.next_seq = m.seq + 1
                        await asyncio.sleep(0)  # as a real consumer: other tasks run in between
                        return Stored(m.seq, m.subject, m.data, len(found) - 1)
                    await self.source.changed.wait()
        except TimeoutError:
            return None


# ------------------------------------------------------------------------------------ helpers


def queued(run_id: str, project: str = "proj-a") -> RunQueued:
    return RunQueued(run_id=run_id, project=project, attempt=1)


def progress(run_id: str, n: int) -> RunProgress:
    return RunProgress(run_id=run_id, attempt=1, finished=n, total=100)


def requested(run_id: str, project: str) -> RunRequested:
    return RunRequested(
        run_id=run_id,
        project=project,
        env="dev",
        params=RunParameters(resources=TEMPLATES["default"]),
        requested_by="test",
    )


def chunk(run_id: str, first_line: int, *texts: str) -> RunLogChunk:
    return RunLogChunk(
        run_id=run_id,
        attempt=1,
        first_line=first_line,
        lines=tuple(LogLine(ts=utcnow(), stream="stdout", text=t) for t in texts),
    )


def item(
    seq: int, *, project: str | None = "proj-a", type_: str = "run.progress", run_id: str = "R1"
) -> Item:
    return Item(
        logs=False, seq=seq, run_id=run_id, type=type_, project=project, body=item_body("s", type_, b"{}")
    )


def decoded(message: Output) -> dict[str, Any]:
    assert isinstance(message, Message), message
    value = json.loads(message.text)
    assert value["cursor"] == message.cursor
    assert isinstance(value, dict)
    return value


@contextlib.asynccontextmanager
async def running_hub(source: MemorySource, **kwargs: Any) -> AsyncIterator[LiveHub]:
    hub = LiveHub(source=source, **kwargs)
    task = asyncio.create_task(hub.run())
    try:
        async with asyncio.timeout(2):
            while not hub.ready:
                await asyncio.sleep(0.001)
        yield hub
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class Client:
    """Iterates a subscription in the background and records what it got."""

    def __init__(self, subscription: Subscription, heartbeat: float = 30.0) -> None:
        self.subscription = subscription
        self.outputs: list[Output] = []
        self._task = asyncio.create_task(self._run(heartbeat))

    async def _run(self, heartbeat: float) -> None:
        async with contextlib.aclosing(self.subscription.outputs(heartbeat)) as outputs:
            async for out in outputs:
                self.outputs.append(out)
                if isinstance(out, Closed):
                    return

    @property
    def messages(self) -> list[dict[str, Any]]:
        return [decoded(o) for o in self.outputs if isinstance(o, Message)]

    @property
    def runs_seqs(self) -> list[int]:
        return [int(m["cursor"].split(":")[0]) for m in self.messages if m["type"] != "log.chunk"]

    async def wait_for(self, predicate: Callable[[Client], bool], what: str = "") -> None:
        async with asyncio.timeout(3):
            while not predicate(self):
                if self._task.done():
                    self._task.result()
                    assert predicate(self), f"ended before {what}: {self.outputs}"
                await asyncio.sleep(0.001)

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


# ------------------------------------------------------------------------------------ plain parts


def test_cursor_round_trip_and_rejects() -> None:
    assert parse_cursor("1842") == Cursor(1842)
    assert parse_cursor("1842:977") == Cursor(1842, 977)
    assert str(Cursor(1842)) == "1842" and str(Cursor(1842, 977)) == "1842:977"
    for bad in ("", "x", "-1", "1:", ":2", "1:2:3", "1.5", "r1", "9" * 30):
        assert parse_cursor(bad) is None, bad


def test_filters_and_visibility() -> None:
    everything = Subscriber(StreamFilter(), None, queue_size=10)
    scoped = Subscriber(StreamFilter(), frozenset({"proj-a"}), queue_size=10)
    typed = Subscriber(StreamFilter(types=frozenset({"run.queued"})), None, queue_size=10)
    one_run = Subscriber(StreamFilter(run_id="R2"), None, queue_size=10)
    project_b = Subscriber(StreamFilter(projects=frozenset({"proj-b"})), None, queue_size=10)
    a, b, unknown = item(1), item(2, project="proj-b", run_id="R2"), item(3, project=None)
    queued_a = item(4, type_="run.queued")
    assert [everything.wants(i) for i in (a, b, unknown)] == [True, True, True]
    # A scoped principal sees its project only, and never a run whose project is not known.
    assert [scoped.wants(i) for i in (a, b, unknown)] == [True, False, False]
    assert [typed.wants(i) for i in (a, queued_a)] == [False, True]
    assert [one_run.wants(i) for i in (a, b)] == [False, True]
    assert [project_b.wants(i) for i in (a, b, unknown)] == [False, True, False]
    log = Item(logs=True, seq=1, run_id="R1", type="log.chunk", project="proj-a", body="")
    assert not everything.wants(log)
    assert Subscriber(StreamFilter(logs="R1"), None, queue_size=1).wants(log)


async def test_slow_subscriber_is_dropped_without_touching_the_others() -> None:
    dropped: list[Subscriber] = []
    fanout = Fanout(on_drop=dropped.append)
    fast = Subscriber(StreamFilter(), None, queue_size=3)
    slow = Subscriber(StreamFilter(), None, queue_size=3)
    fanout.add(fast)
    fanout.add(slow)
    for seq in range(1, 4):
        assert fanout.publish(item(seq)) == 2
        got = await fast.next(1)
        assert isinstance(got, Item) and got.seq == seq
    # The slow one never read: its fourth item overflows it, the fast one still gets it.
    assert fanout.publish(item(4)) == 1
    assert dropped == [slow] and len(fanout) == 1
    assert slow.closed == SLOW and slow.queued == 0  # its backlog is discarded
    assert await slow.next(1) == SLOW
    got = await fast.next(1)
    assert isinstance(got, Item) and got.seq == 4
    assert await slow.wait_closed() == SLOW


async def test_render_never_sends_a_sequence_twice_and_cursors_cover_both_streams() -> None:
    sub = Subscriber(StreamFilter(), None, queue_size=10, sent_runs=5)
    assert sub.render(item(5)) is None  # at or before the position: sent already
    message = sub.render(item(6))
    assert message is not None and decoded(message)["cursor"] == "6"
    assert sub.render(item(6)) is None
    both = Subscriber(StreamFilter(logs="R1"), None, queue_size=10, sent_runs=6, sent_logs=40)
    log = Item(
        logs=True, seq=41, run_id="R1", type="log.chunk", project=None, body=item_body("s", "t", b"{}")
    )
    message = both.render(log)
    assert message is not None and message.cursor == "6:41"
    assert both.render(log) is None
    message = both.render(item(9))
    assert message is not None and message.cursor == "9:41"


async def test_idle_subscriber_gets_heartbeats_and_closing_waits_for_the_queue() -> None:
    sub = Subscriber(StreamFilter(), None, queue_size=10)
    assert await sub.next(0.01) is None
    sub.offer(item(1))
    sub.close(SHUTDOWN)
    got = await sub.next(1)
    assert isinstance(got, Item) and got.seq == 1  # what was queued is still sent
    assert await sub.next(1) == SHUTDOWN


def test_an_event_the_gateway_cannot_decode_is_shown_as_stored() -> None:
    run_id = new_ulid()
    stored = Stored(7, f"fabrik.runs.future.{run_id}", b'{"type":"run.future","project":"proj-a","x":1}', 0)
    got = runs_item(stored)
    assert got is not None and got.type == "run.future" and got.project == "proj-a" and got.run_id == run_id
    assert json.loads("{" + got.body)["event"] == {"type": "run.future", "project": "proj-a", "x": 1}


# ------------------------------------------------------------------------------------ the hub


async def test_live_events_reach_only_who_may_see_them() -> None:
    source = MemorySource()
    a_run, b_run = new_ulid(), new_ulid()
    async with running_hub(source) as hub:
        admin = Client(await hub.subscribe(ADMIN, StreamFilter()))
        alice = Client(await hub.subscribe(ONLY_A, StreamFilter()))
        alice_b = Client(await hub.subscribe(ONLY_A, StreamFilter(projects=frozenset({"proj-b"}))))
        await admin.wait_for(lambda _: len(hub.fanout) == 3, "joined")
        source.publish("RUNS", queued(a_run, "proj-a"))
        source.publish("RUNS", queued(b_run, "proj-b"))
        # No project on these: the hub remembers the runs' projects from the events above.
        source.publish("RUNS", progress(a_run, 1))
        source.publish("RUNS", progress(b_run, 1))
        await admin.wait_for(lambda c: len(c.messages) == 4, "4 events")
        await alice.wait_for(lambda c: len(c.messages) == 2, "2 events")
        assert [m["event"]["run_id"] for m in alice.messages] == [a_run, a_run]
        assert admin.runs_seqs == [1, 2, 3, 4]
        assert alice.runs_seqs == [1, 3]
        await asyncio.sleep(0.02)
        assert alice_b.messages == []
        for client in (admin, alice, alice_b):
            await client.stop()
        assert len(hub.fanout) == 0 and not hub.subscriptions


async def test_project_of_an_unknown_run_comes_from_its_request_event() -> None:
    source = MemorySource()
    run_a, ghost = new_ulid(), new_ulid()
    source.publish("RUNS", requested(run_a, "proj-a"))  # before the hub started: not remembered
    async with running_hub(source) as hub:
        alice = Client(await hub.subscribe(ONLY_A, StreamFilter()))
        admin = Client(await hub.subscribe(ADMIN, StreamFilter()))
        await alice.wait_for(lambda _: len(hub.fanout) == 2, "joined")
        source.publish("RUNS", progress(run_a, 1))
        source.publish("RUNS", progress(ghost, 1))  # a run nobody requested: project unknown
        source.publish("RUNS", progress(run_a, 2))
        await admin.wait_for(lambda c: len(c.messages) == 3, "all three")
        await alice.wait_for(lambda c: len(c.messages) == 2, "run_a's two")
        assert [m["event"]["finished"] for m in alice.messages] == [1, 2]
        assert source.lookups == 2  # one per unknown run, then remembered
        await alice.stop()
        await admin.stop()


async def test_a_project_filter_gets_the_events_that_carry_no_project() -> None:
    source = MemorySource()
    run_a, run_b = new_ulid(), new_ulid()
    source.publish("RUNS", requested(run_a, "proj-a"))
    source.publish("RUNS", requested(run_b, "proj-b"))
    source.publish("RUNS", progress(run_a, 1))  # replayed: its project is looked up
    async with running_hub(source) as hub:
        admin_a = Client(await hub.subscribe(ADMIN, StreamFilter(projects=frozenset({"proj-a"})), Cursor(0)))
        await admin_a.wait_for(lambda _: len(hub.fanout) == 1, "caught up")
        source.publish("RUNS", progress(run_b, 2))
        source.publish("RUNS", progress(run_a, 3))  # live: its project is looked up as well
        await admin_a.wait_for(lambda c: len(c.messages) == 3, "a's three events")
        assert [m["type"] for m in admin_a.messages] == ["run.requested", "run.progress", "run.progress"]
        assert {m["event"]["run_id"] for m in admin_a.messages} == {run_a}
        await admin_a.stop()


async def test_subscribe_refusals() -> None:
    source = MemorySource()
    hub = LiveHub(source=source)
    with pytest.raises(ProblemError) as info:
        await hub.subscribe(ADMIN, StreamFilter())
    assert info.value.status == 503
    run_b = new_ulid()
    source.publish("RUNS", requested(run_b, "proj-b"))
    async with running_hub(source) as hub:
        with pytest.raises(ProblemError) as info:
            await hub.subscribe(NOBODY, StreamFilter())
        assert info.value.status == 403
        for principal, run in ((ONLY_A, run_b), (ADMIN, new_ulid())):
            with pytest.raises(ProblemError) as info:
                await hub.subscribe(principal, StreamFilter(logs=run))
            assert info.value.status == 404 and info.value.errors == [("logs", "is not a run you can see")]
        await hub.subscribe(VIEWER, StreamFilter(logs=run_b))


async def test_resume_while_events_keep_coming_has_no_gap_and_no_duplicate() -> None:
    source = MemorySource()
    run = new_ulid()
    source.publish("RUNS", queued(run))
    for n in range(1, 40):
        source.publish("RUNS", progress(run, n))
    async with running_hub(source) as hub:
        for n in range(40, 60):
            source.publish("RUNS", progress(run, n))
        client = Client(await hub.subscribe(ADMIN, StreamFilter(), Cursor(10)))

        async def keep_publishing() -> None:
            for n in range(60, 120):
                source.publish("RUNS", progress(run, n))
                await asyncio.sleep(0)

        await keep_publishing()
        await client.wait_for(lambda c: c.runs_seqs[-1:] == [120], "the last event")
        assert client.runs_seqs == list(range(11, 121))
        await client.stop()


async def test_resume_with_a_cursor_ahead_of_a_lagging_hub_sends_nothing_twice() -> None:
    source = MemorySource()
    run = new_ulid()
    async with running_hub(source) as hub:
        source.publish("RUNS", queued(run))
        client = Client(await hub.subscribe(ADMIN, StreamFilter()))
        await client.wait_for(lambda c: c.runs_seqs == [1], "the first event")
        # The hub falls behind (another replica, faster, already sent 2..4 to a client)...
        gate = source.gates["fabrik.runs.>"] = asyncio.Event()
        for n in range(2, 6):
            source.publish("RUNS", progress(run, n))
        await asyncio.sleep(0.01)
        assert hub.position == 1
        resumed = Client(await hub.subscribe(ADMIN, StreamFilter(), Cursor(4)))
        await resumed.wait_for(lambda _: len(hub.fanout) == 2, "joined")
        gate.set()
        await client.wait_for(lambda c: c.runs_seqs == [1, 2, 3, 4, 5], "all")
        await resumed.wait_for(lambda c: c.runs_seqs == [5], "only what it had not")
        await asyncio.sleep(0.01)
        assert resumed.runs_seqs == [5]
        await client.stop()
        await resumed.stop()


async def test_resume_filters_the_replay_and_resolves_projects() -> None:
    source = MemorySource()
    a_run, b_run = new_ulid(), new_ulid()
    source.publish("RUNS", requested(a_run, "proj-a"))
    source.publish("RUNS", requested(b_run, "proj-b"))
    for n in range(3):
        source.publish("RUNS", progress(a_run, n))
        source.publish("RUNS", progress(b_run, n))
    async with running_hub(source) as hub:
        alice = Client(
            await hub.subscribe(ONLY_A, StreamFilter(types=frozenset({"run.progress"})), Cursor(0))
        )
        await alice.wait_for(lambda _: len(hub.fanout) == 1, "caught up")
        source.publish("RUNS", progress(b_run, 9))
        source.publish("RUNS", progress(a_run, 9))
        await alice.wait_for(lambda c: len(c.messages) == 4, "a's events")
        assert [m["event"]["run_id"] for m in alice.messages] == [a_run] * 4
        assert [m["event"]["finished"] for m in alice.messages] == [0, 1, 2, 9]
        await alice.stop()


async def test_a_replay_longer_than_the_cap_starts_with_a_gap() -> None:
    source = MemorySource()
    run = new_ulid()
    source.publish("RUNS", queued(run))
    for n in range(1, 30):
        source.publish("RUNS", progress(run, n))
    async with running_hub(source, max_replay=10) as hub:
        client = Client(await hub.subscribe(ADMIN, StreamFilter(), Cursor(5)))
        await client.wait_for(lambda c: c.runs_seqs[-1:] == [30], "caught up")
        gap = client.outputs[0]
        assert isinstance(gap, Gap) and (gap.after, gap.resumed_at) == (5, 21)
        assert json.loads(gap.text)["type"] == "gap"
        assert client.runs_seqs == list(range(21, 31))
        await client.stop()


async def test_log_chunks_resume_with_a_composite_cursor() -> None:
    source = MemorySource()
    run, other = new_ulid(), new_ulid()
    source.publish("RUNS", requested(run, "proj-a"))  # RUNS 1
    source.publish("LOGS", chunk(run, 0, "one"))  # LOGS 1
    source.publish("LOGS", chunk(other, 0, "elsewhere"))  # LOGS 2
    async with running_hub(source) as hub:
        first = Client(await hub.subscribe(ONLY_A, StreamFilter(logs=run)))
        await first.wait_for(lambda _: len(hub.fanout) == 1 and run in hub._log_feeds, "joined")
        source.publish("LOGS", chunk(run, 1, "two"))  # LOGS 3
        source.publish("RUNS", progress(run, 1))  # RUNS 2
        await first.wait_for(lambda c: len(c.messages) == 2, "a chunk and an event")
        # Live from the connection on: the chunk stored before is not sent; cursors carry both.
        texts = [m["event"]["lines"][0]["text"] for m in first.messages if m["type"] == "log.chunk"]
        assert texts == ["two"]
        cursor = parse_cursor(first.messages[-1]["cursor"])
        assert cursor is not None and cursor.logs == 3 and cursor.runs == 2
        await first.stop()
        assert run not in hub._log_feeds  # the last subscriber of the log stopped its feed

        # Disconnected meanwhile: two chunks and an event.
        source.publish("LOGS", chunk(run, 2, "three"))  # LOGS 4
        source.publish("LOGS", chunk(other, 1, "elsewhere"))  # LOGS 5
        source.publish("RUNS", progress(run, 2))  # RUNS 3
        source.publish("LOGS", chunk(run, 3, "four"))  # LOGS 6
        again = Client(await hub.subscribe(ONLY_A, StreamFilter(logs=run), cursor))
        await again.wait_for(lambda c: len(c.messages) == 3, "what was missed")
        source.publish("LOGS", chunk(run, 4, "five"))  # LOGS 7
        await again.wait_for(lambda c: len(c.messages) == 4, "live again")
        chunks = [m for m in again.messages if m["type"] == "log.chunk"]
        assert [m["event"]["lines"][0]["text"] for m in chunks] == ["three", "four", "five"]
        # RUNS and LOGS are ordered each in itself, not with each other; each cursor covers both.
        cursors = [parse_cursor(m["cursor"]) for m in again.messages]
        assert all(c is not None for c in cursors)
        runs = [c.runs for c in cursors if c is not None]
        logs = [c.logs or 0 for c in cursors if c is not None]
        assert runs == sorted(runs) and logs == sorted(logs) and again.messages[-1]["cursor"] == "3:7"
        assert [int(m["cursor"].split(":")[1]) for m in chunks] == [4, 6, 7]
        await again.stop()


async def test_a_chunk_both_replayed_and_queued_live_is_sent_once() -> None:
    source = MemorySource()
    run = new_ulid()
    source.publish("RUNS", requested(run, "proj-a"))
    async with running_hub(source) as hub:
        watcher = Client(await hub.subscribe(ADMIN, StreamFilter(logs=run)))  # keeps the feed running
        await watcher.wait_for(
            lambda _: run in hub._log_feeds and len(hub._log_feeds[run].fanout) == 1, "feed"
        )
        for n in range(5):
            source.publish("LOGS", chunk(run, n, f"line {n}"))
        await watcher.wait_for(lambda c: len(c.messages) == 5, "five chunks")
        # Resuming from before them while the feed offers more: each chunk exactly once.
        resumed = Client(await hub.subscribe(ADMIN, StreamFilter(logs=run), Cursor(1, 0)))
        for n in range(5, 10):
            source.publish("LOGS", chunk(run, n, f"line {n}"))
            await asyncio.sleep(0)
        await resumed.wait_for(lambda c: len(c.messages) == 10, "ten chunks")
        await asyncio.sleep(0.01)
        lines = [m["event"]["first_line"] for m in resumed.messages]
        assert lines == list(range(10))
        await watcher.stop()
        await resumed.stop()


async def test_stopping_the_hub_ends_every_stream_going_away() -> None:
    source = MemorySource()
    hub = LiveHub(source=source)
    task = asyncio.create_task(hub.run())
    async with asyncio.timeout(2):
        while not hub.ready:
            await asyncio.sleep(0.001)
    client = Client(await hub.subscribe(ADMIN, StreamFilter()), heartbeat=0.05)
    await client.wait_for(lambda c: any(isinstance(o, Heartbeat) for o in c.outputs), "a heartbeat")
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await client.wait_for(lambda c: c.outputs[-1:] == [SHUTDOWN], "going away")
    with pytest.raises(ProblemError):
        await hub.subscribe(ADMIN, StreamFilter())


async def test_a_slow_subscription_ends_with_slow_consumer() -> None:
    source = MemorySource()
    run = new_ulid()
    async with running_hub(source, queue_size=4) as hub:
        subscription = await hub.subscribe(ADMIN, StreamFilter())
        outputs = subscription.outputs(30)
        # Joined, then never reads again.
        source.publish("RUNS", queued(run))
        first = await anext(outputs)
        assert decoded(first)["cursor"] == "1"
        healthy = Client(await hub.subscribe(ADMIN, StreamFilter()))
        await healthy.wait_for(lambda _: len(hub.fanout) == 2, "joined")
        for n in range(2, 12):
            source.publish("RUNS", progress(run, n))
        await healthy.wait_for(lambda c: len(c.messages) == 10, "every event")
        assert subscription.subscriber.closed == SLOW and len(hub.fanout) == 1
        assert await anext(outputs) == SLOW
        await outputs.aclose()
        assert subscription not in hub.subscriptions
        await healthy.stop()


def test_state_changed_carries_its_project() -> None:
    run = new_ulid()
    event = RunStateChanged(run_id=run, project="proj-a", attempt=1, from_state=None, to_state="queued")
    got = runs_item(Stored(3, event.subject(), encode(event), 0))
    assert got is not None and got.project == "proj-a" and got.type == "run.state_changed"
