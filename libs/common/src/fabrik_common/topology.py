"""Streams, KV buckets and object stores of DESIGN §2, and their idempotent creation."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from nats.js import JetStreamContext, api
from nats.js.errors import BadRequestError, NotFoundError

from fabrik_common.codec import EventCodec
from fabrik_common.events import IngestEvent, LlmEvent, LogEvent, OpsEvent, RunEvent

log = logging.getLogger(__name__)

DEAD_LETTER_PREFIX = "fabrik.deadletter"


@dataclass(frozen=True)
class StreamSpec:
    name: str
    subjects: tuple[str, ...]
    description: str
    codec: EventCodec[Any] | None = None
    bounded: bool = False

    def config(
        self, replicas: int, *, max_age: float = 0, max_bytes: int = -1, duplicate_window: float
    ) -> api.StreamConfig:
        return api.StreamConfig(
            name=self.name,
            subjects=list(self.subjects),
            description=self.description,
            storage=api.StorageType.FILE,
            retention=api.RetentionPolicy.LIMITS,
            num_replicas=replicas,
            max_age=max_age,
            max_bytes=max_bytes,
            duplicate_window=duplicate_window,
            discard=api.DiscardPolicy.OLD,
            allow_rollup_hdrs=False,
            deny_delete=False,
        )


RUNS = StreamSpec(
    "RUNS",
    ("fabrik.runs.>",),
    "Run lifecycle: requests, scheduler decisions, executor reports",
    EventCodec(RunEvent),
)
LOGS = StreamSpec(
    "LOGS",
    ("fabrik.logs.>",),
    "Workload output per run, bounded by age and bytes",
    EventCodec(LogEvent),
    bounded=True,
)
LLM = StreamSpec("LLM", ("fabrik.llm.>",), "One usage event per LLM call", EventCodec(LlmEvent))
INGEST = StreamSpec("INGEST", ("fabrik.ingest.>",), "Verified webhooks, as received", EventCodec(IngestEvent))
OPS = StreamSpec(
    "OPS",
    ("fabrik.alerts.>", "fabrik.audit.>", "fabrik.backup.>", "fabrik.optimizer.>"),
    "Alerts, audit trail, backup operations and optimizer decisions",
    EventCodec(OpsEvent),
)
DEADLETTER = StreamSpec(
    "DEADLETTER",
    (f"{DEAD_LETTER_PREFIX}.>",),
    "Messages a consumer could not decode or handle, with the reason in headers",
)

STREAMS: tuple[StreamSpec, ...] = (RUNS, LOGS, LLM, INGEST, OPS, DEADLETTER)


@dataclass(frozen=True)
class BucketSpec:
    name: str
    description: str
    history: int = 1
    ttl_seconds: float | None = None


KV_BUCKETS: tuple[BucketSpec, ...] = (
    BucketSpec("runs", "Run records; written only by the scheduler, with revision checks", history=5),
    BucketSpec("schedules", "Cron schedules and their last fired slots", history=5),
    BucketSpec("config", "Run defaults and active experiments; written only by the optimizer", history=10),
    BucketSpec("tokens", "Hashed API tokens"),
    BucketSpec(
        "integrations",
        "Where runs started from GitHub or Slack report back (check run, comment, thread); by run id",
    ),
    BucketSpec("limits", "Shared counters for rate limits and budgets"),
    BucketSpec(
        "alerts", "Open alert episodes and what was delivered for them; written only by the scheduler"
    ),
    BucketSpec("leases", "Leader-election leases of services that need one decider"),
    BucketSpec("queue", "The scheduler's queue snapshot in dispatch order; written only by the scheduler"),
    BucketSpec("idempotency", "Idempotency-Key of submits -> run id, kept a day", ttl_seconds=24 * 3600),
    BucketSpec("backups", "Backup, verify and restore operations and their states (the backup service's)"),
    # One revision per key: a replaced or deleted secret does not linger in the bucket's history.
    BucketSpec(
        "envs",
        "Project environments <project>.<env>, values encrypted; written only by the gateway, "
        "with revision checks",
    ),
)

OBJECT_STORES: tuple[BucketSpec, ...] = (BucketSpec("artifacts", "Run artifacts"),)


@dataclass(frozen=True)
class TopologyLimits:
    replicas: int = 1
    logs_max_age_seconds: int = 7 * 24 * 3600
    logs_max_bytes: int = 10 * 1024**3
    dead_letter_max_age_seconds: int = 30 * 24 * 3600
    dedupe_window_seconds: int = 600
    extra_streams: tuple[StreamSpec, ...] = field(default=())


def stream_for_subject(subject: str) -> StreamSpec:
    for spec in STREAMS:
        for pattern in spec.subjects:
            if subject_matches(pattern, subject):
                return spec
    raise LookupError(f"no stream captures subject {subject!r}")


def subject_matches(pattern: str, subject: str) -> bool:
    pattern_parts = pattern.split(".")
    subject_parts = subject.split(".")
    for i, part in enumerate(pattern_parts):
        if part == ">":
            return len(subject_parts) > i
        if i >= len(subject_parts) or part not in ("*", subject_parts[i]):
            return False
    return len(pattern_parts) == len(subject_parts)


def stream_config(spec: StreamSpec, limits: TopologyLimits) -> api.StreamConfig:
    if spec is LOGS or spec.bounded:
        return spec.config(
            limits.replicas,
            max_age=limits.logs_max_age_seconds,
            max_bytes=limits.logs_max_bytes,
            duplicate_window=limits.dedupe_window_seconds,
        )
    if spec is DEADLETTER:
        return spec.config(
            limits.replicas,
            max_age=limits.dead_letter_max_age_seconds,
            duplicate_window=limits.dedupe_window_seconds,
        )
    return spec.config(limits.replicas, duplicate_window=limits.dedupe_window_seconds)


async def ensure_stream(js: JetStreamContext, config: api.StreamConfig) -> None:
    assert config.name is not None
    try:
        await js.stream_info(config.name)
    except NotFoundError:
        try:
            await js.add_stream(config)
            log.info("stream created", extra={"stream": config.name})
            return
        except BadRequestError:
            # Another replica created it between our lookup and our create: fall through to update.
            pass
    await js.update_stream(config)


async def ensure_topology(js: JetStreamContext, limits: TopologyLimits | None = None) -> None:
    """Create or update every stream, KV bucket and object store. Safe to run from every replica."""
    limits = limits or TopologyLimits()
    for spec in (*STREAMS, *limits.extra_streams):
        await ensure_stream(js, stream_config(spec, limits))
    for bucket in KV_BUCKETS:
        kv_config = api.KeyValueConfig(
            bucket=bucket.name,
            description=bucket.description,
            history=bucket.history,
            ttl=bucket.ttl_seconds,
            storage=api.StorageType.FILE,
            replicas=limits.replicas,
        )
        try:
            await js.key_value(bucket.name)
        except NotFoundError:
            try:
                await js.create_key_value(kv_config)
            except BadRequestError:
                # Created by another replica meanwhile; make sure it is really there now.
                await js.key_value(bucket.name)
    for store in OBJECT_STORES:
        try:
            await js.object_store(store.name)
        except NotFoundError:
            try:
                await js.create_object_store(
                    store.name,
                    api.ObjectStoreConfig(
                        description=store.description,
                        storage=api.StorageType.FILE,
                        replicas=limits.replicas,
                    ),
                )
            except BadRequestError:
                await js.object_store(store.name)
