"""Events on the wire: a sample of every event type through a real JetStream, decoding rules, subjects."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import msgspec.inspect as mi
import pytest
from prometheus_client import CollectorRegistry

from fabrik_common.bus import Bus, BusOptions
from fabrik_common.codec import EventDecodeError, all_event_types, decode_any, encode
from fabrik_common.contracts import TRACEPARENT_PATTERN
from fabrik_common.events import (
    AlertRaised,
    AlertResolved,
    AuditRecorded,
    BackupCancelRequested,
    BackupRequested,
    BackupStateChanged,
    BudgetLevelCrossed,
    ConfigChanged,
    Event,
    ExperimentChanged,
    ExperimentDecision,
    GithubDeliveryReceived,
    LlmUsage,
    LogLine,
    RepoRef,
    Resources,
    RunBudgetExceeded,
    RunCancelRequested,
    RunDispatched,
    RunFinished,
    RunHealthChanged,
    RunImported,
    RunLogChunk,
    RunParameters,
    RunProgress,
    RunQueued,
    RunRequested,
    RunResultReported,
    RunResumeRequested,
    RunStarted,
    RunStateChanged,
    SlackCommandReceived,
    Workload,
)
from fabrik_common.ids import new_ulid
from fabrik_common.metrics import BusMetrics
from fabrik_common.portable import PortableEvent, PortableOrigin, PortableRun, PortableTask
from fabrik_common.topology import STREAMS, StreamSpec, ensure_topology, stream_for_subject, subject_matches

# --------------------------------------------------------------------------------------------
# One sample per event type, with non-default values wherever a field has one, so a field that
# does not survive the round trip shows up.

T0 = datetime(2025, 3, 14, 15, 9, 26, 535897, tzinfo=UTC)


def _params() -> RunParameters:
    return RunParameters(
        spec={"title": "Add retries", "tasks": [{"id": "16:impl", "weight": 2.5}], "draft": False},
        spec_path="specs/retries.md",
        todo={"done": [], "open": ["16:impl"]},
        repo=RepoRef(url="https://github.com/example/app.git", ref="feature/retries"),
        workload=Workload(
            image="ghcr.io/example/agent:1.4",
            command=("agent",),
            args=("--spec", "specs/retries.md"),
            env={"LOG_LEVEL": "debug", "GREETING": "grüß dich ✓"},
        ),
        resources=Resources(cpu_request="500m", memory_request="1Gi", cpu_limit="2", memory_limit="4Gi"),
        template="python-agent",
        timeout_seconds=5400,
        priority="high",
        budget_usd=12.5,
        labels={"team": "platform"},
        schedule_id="nightly-retries",
        schedule_slot=T0,
    )


def _imported() -> RunImported:
    run_id = new_ulid()
    return RunImported(
        run_id=run_id,
        project="web-app",
        imported_by="admin@example.com",
        run=PortableRun(
            run_id=run_id,
            project="web-app",
            env="dev",
            spec="review",
            requested_at=T0,
            started_at=T0 + timedelta(seconds=1),
            finished_at=T0 + timedelta(minutes=5),
            state="failed",
            reason="workload_error",
            tasks=[PortableTask(id="impl", iteration=1, state="failed")],
            events=[PortableEvent(seq=1, time=T0, type="RunStarted", payload={"runId": "r-1"})],
            origin=PortableOrigin(system="smithers", source_run_id="r-1"),
        ),
    )


SAMPLES: dict[type[Event], Callable[[], Event]] = {
    RunRequested: lambda: RunRequested(
        run_id=new_ulid(),
        project="web-app",
        env="staging",
        params=_params(),
        requested_by="alice@example.com",
        idempotency_key="req-42",
    ),
    RunCancelRequested: lambda: RunCancelRequested(
        run_id=new_ulid(), requested_by="bob", reason="wrong branch"
    ),
    RunResumeRequested: lambda: RunResumeRequested(run_id=new_ulid(), requested_by="carol"),
    RunQueued: lambda: RunQueued(run_id=new_ulid(), project="web-app", attempt=2),
    RunDispatched: lambda: RunDispatched(
        run_id=new_ulid(),
        project="web-app",
        env="prod",
        attempt=1,
        params=_params(),
        image_digest="sha256:" + "ab" * 32,
        experiment_arm="arm-b",
        deadline=T0 + timedelta(hours=2),
    ),
    RunStateChanged: lambda: RunStateChanged(
        run_id=new_ulid(),
        project="web-app",
        attempt=3,
        from_state="running",
        to_state="failed",
        reason="oom_killed",
        message="container exceeded its memory limit",
        revision=17,
    ),
    RunStarted: lambda: RunStarted(
        run_id=new_ulid(),
        attempt=1,
        backend="kubernetes",
        workload_ref="fabrik-runs/job-01hzy",
        image_digest="sha256:" + "cd" * 32,
    ),
    RunProgress: lambda: RunProgress(
        run_id=new_ulid(),
        attempt=1,
        phase="implement",
        task="16:impl",
        finished=150,
        total=192,
        message="tests passing",
    ),
    RunResultReported: lambda: RunResultReported(
        run_id=new_ulid(),
        attempt=2,
        result={"ok": True, "score": 0.93, "files": ["a.py", "b.py"], "meta": {"pr": 7, "note": None}},
    ),
    RunFinished: lambda: RunFinished(
        run_id=new_ulid(),
        attempt=1,
        outcome="timed_out",
        reason="deadline",
        exit_code=137,
        message="killed at deadline",
        peak_memory_bytes=3_221_225_472,
    ),
    RunBudgetExceeded: lambda: RunBudgetExceeded(
        run_id=new_ulid(), project="web-app", scope="project", budget_usd=50.0, spent_usd=50.27
    ),
    RunHealthChanged: lambda: RunHealthChanged(
        run_id=new_ulid(),
        project="web-app",
        attempt=4,
        from_health="stalled",
        to_health="failed",
        decision="fail",
        reason="heals_exhausted",
        heal_attempt=3,
        category="transient_exhausted",
        message="no progress after 3 healing attempts",
        last_progress_at=T0,
    ),
    RunImported: _imported,
    RunLogChunk: lambda: RunLogChunk(
        run_id=new_ulid(),
        attempt=1,
        first_line=1200,
        lines=(
            LogLine(ts=T0, stream="stdout", text='::fabrik::progress {"finished": 3}'),
            LogLine(ts=T0 + timedelta(milliseconds=3), stream="stderr", text="warning: ünïcödé"),
            LogLine(ts=T0 + timedelta(seconds=1), stream="system", text=""),
        ),
    ),
    LlmUsage: lambda: LlmUsage(
        call_id=new_ulid(),
        run_id=new_ulid(),
        project="web-app",
        key_id="key-7",
        endpoint="messages",
        model="claude-sonnet",
        provider="anthropic",
        deployment="anthropic-eu",
        upstream_model="claude-sonnet-4-5",
        streamed=True,
        input_tokens=1234,
        output_tokens=567,
        cache_read_tokens=890,
        cache_write_tokens=12,
        estimated=True,
        cost_usd=0.01875,
        latency_ms=2345.5,
        ttfb_ms=312.25,
        retries=1,
        outcome="client_disconnected",
        error="client went away",
    ),
    GithubDeliveryReceived: lambda: GithubDeliveryReceived(
        delivery_id="72d3162e-cc78-11e3-81ab-4c9367dc0958",
        github_event="pull_request",
        body='{"action": "opened", "number": 7}',
        received_at=T0,
    ),
    SlackCommandReceived: lambda: SlackCommandReceived(
        request_id="slack-1",
        command="/fabrik",
        text="run web-app staging",
        user_id="U123",
        user_name="dana",
        team_id="T1",
        channel_id="C9",
        response_url="https://hooks.slack.com/commands/T1/1/x",
        received_at=T0,
    ),
    AlertRaised: lambda: AlertRaised(
        alert_id=new_ulid(),
        key="run-stuck:web-app",
        severity="critical",
        source="scheduler",
        title="Run stuck in starting",
        message="no progress for 15 minutes",
        entity_kind="run",
        entity_id=new_ulid(),
        project="web-app",
        labels={"env": "prod"},
        link="https://fabrik.example.com/runs/x",
    ),
    AlertResolved: lambda: AlertResolved(
        alert_id=new_ulid(), key="run-stuck:web-app", source="scheduler", message="run started"
    ),
    AuditRecorded: lambda: AuditRecorded(
        actor="alice@example.com",
        role="maintainer",
        action="env.write",
        target="web-app/prod",
        project="web-app",
        result="denied",
        details={"keys": ["API_URL"], "confirmed": False},
    ),
    BackupRequested: lambda: BackupRequested(
        operation_id=new_ulid(),
        operation="restore",
        target="s3://backups/fabrik",
        backup_id="bk-2025-03-14",
        options={"streams": ["RUNS"], "dry_run": True},
        requested_by="ops",
    ),
    BackupCancelRequested: lambda: BackupCancelRequested(operation_id=new_ulid(), requested_by="ops"),
    BackupStateChanged: lambda: BackupStateChanged(
        operation_id=new_ulid(),
        operation="backup",
        state="running",
        backup_id="bk-2025-03-14",
        message="streams",
        bytes_done=1 << 33,
        parts_done=12,
    ),
    ExperimentChanged: lambda: ExperimentChanged(
        experiment_id="exp-7", status="rolled_back", by="optimizer", message="guardrail breached"
    ),
    ExperimentDecision: lambda: ExperimentDecision(
        experiment_id="exp-7",
        decision="ship",
        numbers={"p_value": 0.031, "arms": {"a": {"runs": 40}, "b": {"runs": 41}}},
        approved_by="alice",
    ),
    ConfigChanged: lambda: ConfigChanged(
        key="defaults.model",
        old={"model": "small", "temperature": 0.2},
        new=["large", 3, None, {"nested": True}],
        experiment_id="exp-7",
        decision="ship",
        approved_by="alice",
    ),
    BudgetLevelCrossed: lambda: BudgetLevelCrossed(
        scope="project",
        project="web-app",
        kind="compute",
        level="limit",
        period="2025-03",
        spent_usd=101.5,
        limit_usd=100.0,
    ),
}

EVENT_TYPES = sorted(SAMPLES, key=lambda cls: cls.event_type())
by_tag = pytest.mark.parametrize("cls", EVENT_TYPES, ids=lambda cls: cls.event_type())


def _codec_for(event: Event) -> Any:
    spec = stream_for_subject(event.subject())
    assert spec.codec is not None, f"{event.subject()} lands in {spec.name}, which has no codec"
    return spec.codec


def _json(event: Event) -> dict[str, Any]:
    value = json.loads(encode(event))
    assert isinstance(value, dict)
    return value


def test_samples_cover_every_event_type_exactly() -> None:
    assert set(SAMPLES) == set(all_event_types())
    for cls, factory in SAMPLES.items():
        assert type(factory()) is cls


# --------------------------------------------------------------------------------------------
# Through a real JetStream


@pytest.fixture
async def bus(nats_url: str) -> AsyncIterator[Bus]:
    bus = Bus(BusOptions(url=nats_url, name="test-events"), BusMetrics(CollectorRegistry()))
    await bus.connect()
    try:
        await ensure_topology(bus.js)
        yield bus
    finally:
        await bus.close()


@by_tag
async def test_published_event_reads_back_from_its_stream(bus: Bus, cls: type[Event]) -> None:
    event = SAMPLES[cls]()
    spec = stream_for_subject(event.subject())

    ack = await bus.publish(event)

    assert ack.stream == spec.name
    assert not ack.duplicate
    raw = await bus.js.get_msg(spec.name, ack.seq)
    assert raw.subject == event.subject()
    assert raw.data is not None
    decoded = _codec_for(event).decode(raw.data)
    assert type(decoded) is cls
    assert decoded == event
    assert decode_any(raw.data) == event
    headers = raw.headers or {}
    assert headers.get("Nats-Msg-Id") == event.event_id
    assert headers.get("Fabrik-Event-Type") == cls.event_type()
    # The pattern the AsyncAPI document promises for this header.
    assert re.search(TRACEPARENT_PATTERN, headers.get("traceparent", ""))


async def test_republishing_an_event_is_stored_once(bus: Bus) -> None:
    event = SAMPLES[RunRequested]()
    twin = msgspec.structs.replace(event, event_id=new_ulid())  # same content, another event

    first = await bus.publish(event)
    again = await bus.publish(event)
    other = await bus.publish(twin)

    assert not first.duplicate
    assert again.duplicate
    assert again.seq == first.seq
    assert not other.duplicate
    info = await bus.js.stream_info(first.stream)
    assert info.state.messages == 2


# --------------------------------------------------------------------------------------------
# Decoding rules

UNKNOWN: dict[str, Any] = {
    "x_added_in_v9": {"nested": [1, {"deep": None}], "flag": True},
    "x_list": [1, "two", None, 3.5],
    "x_text": "ignored",
    "x_null": None,
}


_SEQUENCES = (mi.ListType, mi.VarTupleType, mi.SetType, mi.FrozenSetType)


def _inject_unknown(value: Any, info: mi.Type) -> int:
    """Add `UNKNOWN` keys to every JSON object in `value` that decodes into a Struct; count them."""
    if isinstance(info, mi.Metadata):
        return _inject_unknown(value, info.type)
    if isinstance(info, mi.StructType) and isinstance(value, dict):
        count = 1
        for field in info.fields:
            if field.encode_name in value:
                count += _inject_unknown(value[field.encode_name], field.type)
        value.update(UNKNOWN)
        return count
    if isinstance(info, mi.UnionType):
        structs = [t for t in info.types if isinstance(t, mi.StructType)]
        assert len(structs) <= 1, "nested tagged unions need the tag to pick a member"
        return sum(_inject_unknown(value, t) for t in structs)
    if isinstance(info, _SEQUENCES) and isinstance(value, list):
        return sum(_inject_unknown(item, info.item_type) for item in value)
    if isinstance(info, mi.DictType) and isinstance(value, dict):
        return sum(_inject_unknown(item, info.value_type) for item in value.values())
    return 0


@by_tag
def test_unknown_fields_are_ignored_at_every_level(cls: type[Event]) -> None:
    event = SAMPLES[cls]()
    payload = _json(event)
    injected = _inject_unknown(payload, mi.type_info(cls))
    assert injected >= 1
    assert _codec_for(event).decode(json.dumps(payload).encode()) == event


def test_unknown_fields_reach_nested_structs() -> None:
    """Guards the helper above: it must reach params, its repo/workload/resources and log lines."""
    payload = _json(SAMPLES[RunRequested]())
    assert _inject_unknown(payload, mi.type_info(RunRequested)) == 5
    assert payload["params"]["resources"]["x_text"] == "ignored"
    logs = _json(SAMPLES[RunLogChunk]())
    assert _inject_unknown(logs, mi.type_info(RunLogChunk)) == 4
    assert all("x_list" in line for line in logs["lines"])


def _set(payload: dict[str, Any], path: tuple[str | int, ...], value: Any) -> None:
    node: Any = payload
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value


WRONG_TYPES: list[tuple[type[Event], tuple[str | int, ...], Any, str]] = [
    (RunQueued, ("attempt",), "2", "$.attempt"),
    (RunQueued, ("attempt",), 0, "$.attempt"),
    (RunRequested, ("params", "timeout_seconds"), "soon", "$.params.timeout_seconds"),
    (RunRequested, ("params", "timeout_seconds"), 86401, "$.params.timeout_seconds"),
    (RunRequested, ("params", "resources", "cpu_request"), 500, "$.params.resources.cpu_request"),
    (RunRequested, ("params", "repo"), "https://github.com/x/y", "$.params.repo"),
    (RunRequested, ("project",), "Web_App", "$.project"),
    (RunRequested, ("run_id",), "too-short", "$.run_id"),
    (RunStateChanged, ("to_state",), "exploded", "$.to_state"),
    (RunLogChunk, ("lines", 1, "stream"), "stdlog", "$.lines[1].stream"),
    (RunLogChunk, ("lines", 0, "ts"), "yesterday", "$.lines[0].ts"),
    (LlmUsage, ("input_tokens",), -1, "$.input_tokens"),
    (LlmUsage, ("streamed",), "yes", "$.streamed"),
    (AlertRaised, ("labels", "env"), 1, "$.labels[...]"),
    (GithubDeliveryReceived, ("github_event",), "pull-request", "$.github_event"),
    (BackupStateChanged, ("occurred_at",), 1700000000, "$.occurred_at"),
]


@pytest.mark.parametrize(
    ("cls", "path", "bad", "where"),
    WRONG_TYPES,
    ids=[f"{c.event_type()}:{w}={b!r}" for c, _, b, w in WRONG_TYPES],
)
def test_wrong_type_is_rejected_naming_the_field(
    cls: type[Event], path: tuple[str | int, ...], bad: Any, where: str
) -> None:
    event = SAMPLES[cls]()
    payload = _json(event)
    _set(payload, path, bad)
    with pytest.raises(EventDecodeError) as excinfo:
        _codec_for(event).decode(json.dumps(payload).encode())
    message = str(excinfo.value)
    assert f"`{where}`" in message
    # The bus counts these as decode failures by this prefix (bus.ConsumerGroup._dead_letter).
    assert message.startswith("invalid event")


@pytest.mark.parametrize("field", ["run_id", "attempt", "type"])
def test_missing_required_field_is_rejected_naming_it(field: str) -> None:
    event = SAMPLES[RunFinished]()
    payload = _json(event)
    del payload[field]
    with pytest.raises(EventDecodeError, match=f"missing required field `{field}`"):
        _codec_for(event).decode(json.dumps(payload).encode())


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"{",
        b'{"type": "run.queued", ',
        b"not json",
        b"\xff\xfe{}",
        encode(SAMPLES[RunQueued]()) + b"}",
    ],
    ids=["empty", "open-brace", "truncated", "text", "bad-utf8", "trailing"],
)
def test_malformed_json_is_rejected(data: bytes) -> None:
    with pytest.raises(EventDecodeError) as excinfo:
        decode_any(data)
    assert str(excinfo.value).startswith("malformed JSON")


@by_tag
def test_truncated_sample_is_rejected(cls: type[Event]) -> None:
    data = encode(SAMPLES[cls]())
    with pytest.raises(EventDecodeError, match=r"^malformed JSON"):
        decode_any(data[: len(data) // 2])


@pytest.mark.parametrize("data", [b"[]", b"42", b"null", b'"run.queued"'])
def test_json_that_is_not_an_object_is_rejected(data: bytes) -> None:
    with pytest.raises(EventDecodeError, match=r"^invalid event"):
        decode_any(data)


@pytest.mark.parametrize("tag", ["run.exploded", "RUN.REQUESTED", "", "log.chunk.v2"])
def test_unknown_type_tag_is_rejected(tag: str) -> None:
    event = SAMPLES[RunRequested]()
    payload = _json(event)
    payload["type"] = tag
    data = json.dumps(payload).encode()
    for decode in (_codec_for(event).decode, decode_any):
        with pytest.raises(EventDecodeError, match=r"`\$\.type`"):
            decode(data)


@by_tag
def test_event_is_rejected_by_every_other_streams_codec(cls: type[Event]) -> None:
    event = SAMPLES[cls]()
    home = stream_for_subject(event.subject())
    others = [s for s in STREAMS if s.codec is not None and s is not home]
    assert others
    for spec in others:
        assert spec.codec is not None
        with pytest.raises(EventDecodeError, match=r"`\$\.type`"):
            spec.codec.decode(encode(event))


# --------------------------------------------------------------------------------------------
# Subjects


@by_tag
def test_subject_lands_in_the_stream_that_decodes_it(cls: type[Event]) -> None:
    event = SAMPLES[cls]()
    subject = event.subject()
    spec: StreamSpec = stream_for_subject(subject)
    assert spec.codec is not None
    assert cls in spec.codec.members()
    assert any(subject_matches(pattern, subject) for pattern in spec.subjects)
    assert subject_matches(cls.subject_filter(), subject)
    assert not any(c in subject for c in "*> \t\r\n")


@by_tag
def test_subject_parameters_fill_their_tokens(cls: type[Event]) -> None:
    event = SAMPLES[cls]()
    template = cls.SUBJECT.split(".")
    tokens = event.subject().split(".")
    assert len(tokens) == len(template)
    for want, got in zip(template, tokens, strict=True):
        if want.startswith("{"):
            assert got == str(getattr(event, want.strip("{}")))
        else:
            assert got == want


def test_subject_filters_select_one_event_type_each() -> None:
    for cls in EVENT_TYPES:
        matching = [
            other
            for other in EVENT_TYPES
            if subject_matches(cls.subject_filter(), SAMPLES[other]().subject())
        ]
        assert matching == [cls], f"{cls.subject_filter()} matches {[c.event_type() for c in matching]}"


PARAMETRISED = [(cls, name) for cls in EVENT_TYPES for name in cls.subject_parameters()]
UNSAFE_TOKENS = ["a.b", "a*", "*", "a>", ">", "a b", "a\tb", "a\nb", ""]


def test_every_stream_family_has_a_parametrised_subject() -> None:
    """Guards the next test: it must cover RUNS, LOGS, INGEST and OPS parameters."""
    streams = {stream_for_subject(SAMPLES[cls]().subject()).name for cls, _ in PARAMETRISED}
    assert {"RUNS", "LOGS", "INGEST", "OPS"} <= streams


@pytest.mark.parametrize(
    ("cls", "param"), PARAMETRISED, ids=[f"{c.event_type()}:{p}" for c, p in PARAMETRISED]
)
@pytest.mark.parametrize("bad", UNSAFE_TOKENS, ids=repr)
def test_unsafe_subject_parameter_raises(cls: type[Event], param: str, bad: str) -> None:
    event = msgspec.structs.replace(SAMPLES[cls](), **{param: bad})
    with pytest.raises(ValueError, match=param):
        event.subject()
