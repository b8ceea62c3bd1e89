"""The generated contracts of DESIGN §2: a JSON Schema per event and an AsyncAPI 3 document.

Everything here is derived from the event declarations in `fabrik_common.events`, the streams in
`fabrik_common.topology` and the header names in `fabrik_common.bus`; the only hand-written facts
are `EVENT_ROLES` (who sends and who receives each event, from the DESIGN §1 table) and prose.
`write_contracts` / `check_contracts` keep `contracts/` in step with the code; the gateway's OpenAPI
document is passed in by the caller (`scripts/contracts.py`) because `fabrik_common` must not
depend on a service.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Iterator, Mapping
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import msgspec

from fabrik_common.bus import (
    DLQ_CONSUMER,
    DLQ_DELIVERIES,
    DLQ_REASON,
    DLQ_SEQUENCE,
    DLQ_STREAM,
    DLQ_SUBJECT,
    EVENT_TYPE,
    MSG_ID,
)
from fabrik_common.codec import all_event_types
from fabrik_common.events import SCHEMA_VERSION, Event
from fabrik_common.settings import CommonSettings
from fabrik_common.specs import spec_json_schema, todo_json_schema
from fabrik_common.topology import (
    DEAD_LETTER_PREFIX,
    DEADLETTER,
    STREAMS,
    StreamSpec,
    TopologyLimits,
    stream_config,
)
from fabrik_common.tracing import TRACEPARENT

JSON_SCHEMA_DIALECT: Final = "https://json-schema.org/draft/2020-12/schema"
CONTRACTS_BASE_URI: Final = "https://fabrik.sh/contracts"
ASYNCAPI_VERSION: Final = "3.0.0"

CONTRACTS_DIR: Final = "contracts"
EVENTS_DIR: Final = f"{CONTRACTS_DIR}/events"
ASYNCAPI_FILE: Final = f"{CONTRACTS_DIR}/asyncapi.json"
OPENAPI_FILE: Final = f"{CONTRACTS_DIR}/openapi.json"

TRACEPARENT_PATTERN: Final = r"^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$"

GATEWAY: Final = "gateway"
SCHEDULER: Final = "scheduler"
EXECUTOR: Final = "executor"
LLM_PROXY: Final = "llm-proxy"
OPTIMIZER: Final = "optimizer"
BACKUP: Final = "backup"
SERVICES: Final = (GATEWAY, SCHEDULER, EXECUTOR, LLM_PROXY, OPTIMIZER, BACKUP)


class Roles(msgspec.Struct, frozen=True):
    """Which services publish an event and which consume it (through durable consumers)."""

    senders: tuple[str, ...]
    receivers: tuple[str, ...] = ()


# The gateway (read model, live fan-out) and the optimizer (analytics) read every run event.
_RUN_READERS: Final = (GATEWAY, OPTIMIZER)

EVENT_ROLES: Final[Mapping[str, Roles]] = {
    # RUNS: requests from the edge, scheduler decisions, executor reports (DESIGN §1).
    "run.requested": Roles((GATEWAY,), (SCHEDULER, *_RUN_READERS)),
    "run.cancel_requested": Roles((GATEWAY,), (SCHEDULER, EXECUTOR, *_RUN_READERS)),
    "run.resume_requested": Roles((GATEWAY,), (SCHEDULER, *_RUN_READERS)),
    "run.queued": Roles((SCHEDULER,), _RUN_READERS),
    "run.dispatched": Roles((SCHEDULER,), (EXECUTOR, *_RUN_READERS)),
    "run.state_changed": Roles((SCHEDULER,), _RUN_READERS),
    "run.started": Roles((EXECUTOR,), (SCHEDULER, *_RUN_READERS)),
    "run.progress": Roles((EXECUTOR,), (SCHEDULER, *_RUN_READERS)),
    "run.result": Roles((EXECUTOR,), (SCHEDULER, *_RUN_READERS)),
    "run.finished": Roles((EXECUTOR,), (SCHEDULER, *_RUN_READERS)),
    "run.budget_exceeded": Roles((LLM_PROXY,), (SCHEDULER, *_RUN_READERS)),
    "run.health_changed": Roles((SCHEDULER,), _RUN_READERS),
    "run.imported": Roles((GATEWAY,), (SCHEDULER, *_RUN_READERS)),
    # LOGS and LLM.
    "log.chunk": Roles((EXECUTOR,), (GATEWAY,)),
    "llm.usage": Roles((LLM_PROXY,), (OPTIMIZER,)),
    # INGEST: verified webhooks; the gateway turns them into requests, the scheduler reads them too.
    "ingest.github": Roles((GATEWAY,), (GATEWAY, SCHEDULER)),
    "ingest.slack.command": Roles((GATEWAY,), (GATEWAY, SCHEDULER)),
    # OPS.
    "alert.raised": Roles((SCHEDULER, OPTIMIZER), (GATEWAY,)),
    "alert.resolved": Roles((SCHEDULER, OPTIMIZER), (GATEWAY,)),
    "audit.recorded": Roles((GATEWAY,)),
    # Backup requests come from the API (gateway) and from the backup service's own schedules.
    "backup.requested": Roles((GATEWAY, BACKUP), (BACKUP,)),
    "backup.cancel_requested": Roles((GATEWAY,), (BACKUP,)),
    "backup.state_changed": Roles((BACKUP,), (GATEWAY,)),
    "optimizer.experiment_changed": Roles((OPTIMIZER,)),
    "optimizer.decision": Roles((OPTIMIZER,)),
    "optimizer.config_changed": Roles((OPTIMIZER,), (SCHEDULER,)),
    "optimizer.budget_level_crossed": Roles((OPTIMIZER,)),
}

DEAD_LETTER_CHANNEL: Final = "deadletter"
DEAD_LETTER_ADDRESS: Final = f"{DEAD_LETTER_PREFIX}.{{stream}}.{{consumer}}"
EVENT_HEADERS_SCHEMA: Final = "EventHeaders"
DEAD_LETTER_HEADERS_SCHEMA: Final = "DeadLetterHeaders"


class ContractError(RuntimeError):
    """The code and the contract declarations disagree (a missing role, a dangling reference)."""


# --------------------------------------------------------------------------------------------
# JSON Schema per event


def event_description(cls: type[Event]) -> str:
    """The class docstring, or a sentence naming the tag and subject when there is none."""
    doc = cls.__doc__
    if doc:
        return inspect.cleandoc(doc)
    return f"The `{cls.event_type()}` event, published on `{cls.SUBJECT}`."


def event_schema_id(tag: str) -> str:
    return f"{CONTRACTS_BASE_URI}/events/{tag}.schema.json"


def event_schema(cls: type[Event]) -> dict[str, Any]:
    """A self-contained JSON Schema (2020-12) of one event as it appears on the wire."""
    (ref,), defs = msgspec.json.schema_components([cls], ref_template="#/$defs/{name}")
    name = _ref_name(ref)
    root = dict(defs[name])
    remaining = {k: v for k, v in defs.items() if k != name}
    if any(r == ref["$ref"] for r in iter_refs(remaining)):
        remaining[name] = defs[name]  # self-referencing event: keep the definition for the refs
    tag = cls.event_type()
    schema: dict[str, Any] = {
        **root,
        "$schema": JSON_SCHEMA_DIALECT,
        "$id": event_schema_id(tag),
        "title": cls.__name__,
        "description": event_description(cls),
    }
    if remaining:
        schema["$defs"] = remaining
    _require_resolvable(schema, f"event schema {tag}")
    return schema


def event_schemas() -> dict[str, dict[str, Any]]:
    """Every event's JSON Schema, keyed by its tag."""
    return {cls.event_type(): event_schema(cls) for cls in all_event_types()}


# --------------------------------------------------------------------------------------------
# AsyncAPI 3


def event_roles(tag: str) -> Roles:
    try:
        return EVENT_ROLES[tag]
    except KeyError:
        raise ContractError(
            f"event {tag!r} has no entry in fabrik_common.contracts.EVENT_ROLES: "
            "declare which services send and receive it"
        ) from None


def asyncapi_document() -> dict[str, Any]:
    """Subjects → events for every event type, the streams that store them, and dead letters."""
    events = all_event_types()
    tags = [cls.event_type() for cls in events]
    unknown = sorted(set(EVENT_ROLES) - set(tags))
    if unknown:
        raise ContractError(f"EVENT_ROLES names events that do not exist: {unknown}")
    for tag in tags:
        for service in (*event_roles(tag).senders, *event_roles(tag).receivers):
            if service not in SERVICES:
                raise ContractError(f"EVENT_ROLES[{tag!r}] names an unknown service {service!r}")

    schemas = _component_schemas(events)
    messages: dict[str, Any] = {}
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}

    for cls in events:
        tag = cls.event_type()
        stream = _stream_of(cls)
        messages[tag] = _event_message(cls, schemas)
        channels[tag] = _event_channel(cls, stream)
        roles = event_roles(tag)
        for action, services in (("send", roles.senders), ("receive", roles.receivers)):
            for service in services:
                operations[f"{service}.{action}.{tag}"] = _operation(service, action, tag, tag)

    messages[DEAD_LETTER_CHANNEL] = _dead_letter_message()
    channels[DEAD_LETTER_CHANNEL] = _dead_letter_channel()
    consuming = [s for s in SERVICES if any(s in EVENT_ROLES[t].receivers for t in tags)]
    for service in consuming:
        operations[f"{service}.send.{DEAD_LETTER_CHANNEL}"] = _operation(
            service,
            "send",
            DEAD_LETTER_CHANNEL,
            DEAD_LETTER_CHANNEL,
            summary=f"{service} dead-letters a message its consumers cannot decode or handle",
        )

    for spec in STREAMS:
        channels[f"stream.{spec.name}"] = _stream_channel(spec, events)

    document: dict[str, Any] = {
        "asyncapi": ASYNCAPI_VERSION,
        "id": "urn:fabrik:events",
        "info": {
            "title": "Fabrik events",
            "version": package_version("fabrik-common"),
            "description": (
                "Events the Fabrik services exchange over NATS JetStream (DESIGN §2). Every event "
                "is a JSON object whose `type` field is its tag; unknown fields are ignored on "
                "decode. Producers publish with `Nats-Msg-Id` = `event_id`, so JetStream stores "
                "a re-published event once within the stream's duplicate window. Consumers are "
                "durable pull consumers with explicit ack; a message that cannot be decoded or "
                "handled goes to the dead-letter channel with the reason in its headers. "
                "Generated by `scripts/contracts.py`; do not edit."
            ),
            "x-fabrik-schema-version": SCHEMA_VERSION,
        },
        "defaultContentType": "application/json",
        "servers": {
            "local": {
                "host": urlsplit(CommonSettings().nats_url).netloc,
                "protocol": "nats",
                "description": (
                    "The default `FABRIK_NATS_URL`: the embedded NATS JetStream server that "
                    "`fabrik up` starts on a laptop."
                ),
            }
        },
        "channels": channels,
        "operations": operations,
        "components": {"schemas": schemas, "messages": messages},
    }
    _require_resolvable(document, "asyncapi document")
    return document


def _component_schemas(events: tuple[type[Event], ...]) -> dict[str, Any]:
    streams = [s for s in STREAMS if s.codec is not None]
    union_names = [f"{spec.name.title()}StreamEvent" for spec in streams]
    types: list[Any] = [*events, *(s.codec.event_type for s in streams if s.codec is not None)]
    outs, components = msgspec.json.schema_components(types, ref_template="#/components/schemas/{name}")
    for cls in events:
        components[cls.__name__] = {
            **components[cls.__name__],
            "description": event_description(cls),
        }
    for name, spec, out in zip(union_names, streams, outs[len(events) :], strict=True):
        union = _asyncapi_discriminator(out)
        union["title"] = name
        union["description"] = f"Any event of the {spec.name} stream, told apart by `type`."
        components[name] = union
    extra = {
        EVENT_HEADERS_SCHEMA: _event_headers_schema(),
        DEAD_LETTER_HEADERS_SCHEMA: _dead_letter_headers_schema(),
    }
    clash = sorted(set(extra) & set(components))
    if clash:
        raise ContractError(f"schema names used twice: {clash}")
    components.update(extra)
    return components


def _asyncapi_discriminator(schema: Mapping[str, Any]) -> dict[str, Any]:
    """msgspec writes OpenAPI's `discriminator` object; an AsyncAPI schema wants the property name."""
    out = dict(schema)
    discriminator = out.get("discriminator")
    if isinstance(discriminator, Mapping):
        out["discriminator"] = discriminator["propertyName"]
    return out


def _event_headers_schema() -> dict[str, Any]:
    return {
        "title": "Fabrik event headers",
        "description": "NATS headers of every event a Fabrik service publishes.",
        "type": "object",
        "properties": {
            MSG_ID: {
                "type": "string",
                "description": (
                    "The event's `event_id` (a ULID). JetStream stores a second message with the "
                    "same id within the stream's duplicate window only once, so retried "
                    "publishes are safe."
                ),
            },
            EVENT_TYPE: {
                "type": "string",
                "description": "The event's `type` tag, readable without decoding the body.",
            },
            TRACEPARENT: {
                "type": "string",
                "pattern": TRACEPARENT_PATTERN,
                "description": "W3C trace context of the publishing span; consumers continue it.",
            },
        },
        "required": [MSG_ID, EVENT_TYPE, TRACEPARENT],
    }


def _dead_letter_headers_schema() -> dict[str, Any]:
    return {
        "title": "Dead-letter headers",
        "description": (
            "Headers of a dead-lettered message: the original message's headers (except "
            f"`{MSG_ID}`) plus the reason and where the message came from."
        ),
        "type": "object",
        "properties": {
            MSG_ID: {
                "type": "string",
                "description": (
                    "`dlq:<stream>:<stream sequence>:<consumer>`, so each consumer dead-letters a "
                    "given message at most once."
                ),
            },
            DLQ_REASON: {
                "type": "string",
                "maxLength": 1000,
                "description": (
                    "Why: `invalid event: …` or `malformed JSON: …` (did not decode), "
                    "`rejected: …` (the handler refused it), `failed N times: …` or `handler did "
                    "not finish within N deliveries`."
                ),
            },
            DLQ_SUBJECT: {"type": "string", "description": "The subject the message was on."},
            DLQ_STREAM: {"type": "string", "description": "The stream it was stored in."},
            DLQ_SEQUENCE: {
                "type": "string",
                "pattern": "^[0-9]+$",
                "description": "Its sequence number in that stream.",
            },
            DLQ_CONSUMER: {
                "type": "string",
                "description": "The durable consumer that gave up on it.",
            },
            DLQ_DELIVERIES: {
                "type": "string",
                "pattern": "^[0-9]+$",
                "description": "How many times it had been delivered to that consumer.",
            },
            EVENT_TYPE: {
                "type": "string",
                "description": "Copied from the original message when it had one.",
            },
            TRACEPARENT: {
                "type": "string",
                "description": "Copied from the original message when it had one.",
            },
        },
        "required": [
            MSG_ID,
            DLQ_REASON,
            DLQ_SUBJECT,
            DLQ_STREAM,
            DLQ_SEQUENCE,
            DLQ_CONSUMER,
            DLQ_DELIVERIES,
        ],
    }


def _stream_of(cls: type[Event]) -> StreamSpec:
    owners = [s for s in STREAMS if s.codec is not None and cls in s.codec.members()]
    if len(owners) != 1:
        names = [s.name for s in owners]
        raise ContractError(f"{cls.__name__} must belong to exactly one stream's union, not {names}")
    return owners[0]


def _event_message(cls: type[Event], schemas: Mapping[str, Any]) -> dict[str, Any]:
    tag = cls.event_type()
    if cls.__name__ not in schemas:
        raise ContractError(f"no component schema for {cls.__name__}")
    return {
        "name": tag,
        "title": cls.__name__,
        "description": event_description(cls),
        "contentType": "application/json",
        "headers": {
            "type": "object",
            "allOf": [
                {"$ref": f"#/components/schemas/{EVENT_HEADERS_SCHEMA}"},
                {"type": "object", "properties": {EVENT_TYPE: {"const": tag}}},
            ],
        },
        "payload": {"$ref": f"#/components/schemas/{cls.__name__}"},
        "x-fabrik-json-schema": event_schema_id(tag),
    }


def _event_channel(cls: type[Event], stream: StreamSpec) -> dict[str, Any]:
    tag = cls.event_type()
    channel: dict[str, Any] = {
        "address": cls.SUBJECT,
        "title": cls.__name__,
        "description": (
            f"{event_description(cls)}\n\nStored in the {stream.name} stream; consumers "
            f"filter on `{cls.subject_filter()}`."
        ),
        "messages": {tag: {"$ref": f"#/components/messages/{tag}"}},
        "x-fabrik-stream": stream.name,
    }
    parameters = _subject_parameters(cls)
    if parameters:
        channel["parameters"] = parameters
    return channel


def _subject_parameters(cls: type[Event]) -> dict[str, Any]:
    info = msgspec.inspect.type_info(cls)
    assert isinstance(info, msgspec.inspect.StructType)
    fields = {f.encode_name: f for f in info.fields}
    parameters: dict[str, Any] = {}
    for name in cls.subject_parameters():
        field = fields.get(name)
        if field is None:
            raise ContractError(f"{cls.__name__}.SUBJECT names {name!r}, which is not a field")
        parameter: dict[str, Any] = {
            "description": f"The event's `{name}` field (a single subject token).",
        }
        if isinstance(field.type, msgspec.inspect.LiteralType):
            parameter["enum"] = [str(v) for v in field.type.values]
        parameters[name] = parameter
    return parameters


def _operation(
    service: str, action: str, channel: str, message: str, *, summary: str | None = None
) -> dict[str, Any]:
    verb = "publishes" if action == "send" else "consumes (durable pull consumer, explicit ack)"
    return {
        "action": action,
        "channel": {"$ref": f"#/channels/{channel}"},
        "messages": [{"$ref": f"#/channels/{channel}/messages/{message}"}],
        "summary": summary or f"{service} {verb} `{message}`",
        "tags": [{"name": service}],
        "x-fabrik-service": service,
    }


def _dead_letter_message() -> dict[str, Any]:
    return {
        "name": DEAD_LETTER_CHANNEL,
        "title": "Dead letter",
        "summary": "A message a consumer could not decode or handle, byte for byte.",
        "contentType": "application/octet-stream",
        "headers": {"$ref": f"#/components/schemas/{DEAD_LETTER_HEADERS_SCHEMA}"},
        "payload": {
            "description": (
                "The original message body unchanged; it may not be valid JSON (that may be why it is here)."
            ),
        },
    }


def _dead_letter_channel() -> dict[str, Any]:
    sources = [s.name for s in STREAMS if s.codec is not None]
    return {
        "address": DEAD_LETTER_ADDRESS,
        "title": "Dead letters",
        "description": (
            "Where a consumer puts a message it gives up on, then acks the original: nothing "
            f"is retried forever or dropped silently. Stored in the {DEADLETTER.name} stream."
        ),
        "parameters": {
            "stream": {"description": "The stream the message came from.", "enum": sources},
            "consumer": {"description": "The durable consumer that gave up on it."},
        },
        "messages": {DEAD_LETTER_CHANNEL: {"$ref": f"#/components/messages/{DEAD_LETTER_CHANNEL}"}},
        "x-fabrik-stream": DEADLETTER.name,
    }


def _stream_channel(spec: StreamSpec, events: tuple[type[Event], ...]) -> dict[str, Any]:
    if spec.codec is None:
        members: list[str] = [DEAD_LETTER_CHANNEL]
    else:
        members = [cls.event_type() for cls in events if cls in spec.codec.members()]
    subjects = ", ".join(f"`{s}`" for s in spec.subjects)
    config = stream_config(spec, TopologyLimits())
    return {
        "address": None,
        "title": f"{spec.name} stream",
        "description": f"JetStream stream {spec.name}: {spec.description}. Subjects: {subjects}.",
        "messages": {m: {"$ref": f"#/components/messages/{m}"} for m in members},
        "x-fabrik-stream": {
            "name": spec.name,
            "subjects": list(spec.subjects),
            "storage": _enum_value(config.storage),
            "retention": _enum_value(config.retention),
            "discard": _enum_value(config.discard),
        },
    }


def _enum_value(value: Any) -> str:
    return str(getattr(value, "value", value))


# --------------------------------------------------------------------------------------------
# References


def iter_refs(node: Any) -> Iterator[str]:
    """Every `$ref` value in a JSON document."""
    if isinstance(node, Mapping):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from iter_refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from iter_refs(item)


def resolve_ref(document: Mapping[str, Any], ref: str) -> Any:
    """Resolve a local JSON pointer reference (`#/a/b`) in `document`; KeyError if it dangles."""
    if not ref.startswith("#"):
        raise KeyError(f"not a local reference: {ref}")
    node: Any = document
    for raw in ref[1:].split("/")[1:] if ref != "#" else []:
        token = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(node, Mapping) and token in node:
            node = node[token]
        elif isinstance(node, list) and token.isdigit() and int(token) < len(node):
            node = node[int(token)]
        else:
            raise KeyError(f"{ref} does not resolve (no {token!r})")
    return node


def _require_resolvable(document: Mapping[str, Any], what: str) -> None:
    for ref in iter_refs(document):
        try:
            resolve_ref(document, ref)
        except KeyError as exc:
            raise ContractError(f"{what}: {exc}") from exc


def _ref_name(ref: Mapping[str, Any]) -> str:
    return str(ref["$ref"]).rsplit("/", 1)[-1]


# --------------------------------------------------------------------------------------------
# Files


def render_json(document: Mapping[str, Any]) -> str:
    """Deterministic JSON text: sorted keys, two-space indent, trailing newline."""
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def contract_files(openapi: Mapping[str, Any]) -> dict[str, str]:
    """Every generated file, by path relative to the repository root, with its text."""
    files = {
        f"{EVENTS_DIR}/{tag}.schema.json": render_json(schema) for tag, schema in event_schemas().items()
    }
    files[ASYNCAPI_FILE] = render_json(asyncapi_document())
    files[OPENAPI_FILE] = render_json(openapi)
    # The run spec and todo documents users submit (POST /api/v1/runs, `fabrik spec validate`).
    files[f"{CONTRACTS_DIR}/spec.schema.json"] = render_json(spec_json_schema())
    files[f"{CONTRACTS_DIR}/todo.schema.json"] = render_json(todo_json_schema())
    return files


def _existing_json(root: Path) -> set[str]:
    base = root / CONTRACTS_DIR
    if not base.is_dir():
        return set()
    return {p.relative_to(root).as_posix() for p in base.rglob("*.json") if p.is_file()}


def check_contracts(root: Path, openapi: Mapping[str, Any]) -> list[str]:
    """Generated files under `root` that differ from the code, are missing, or should not exist."""
    expected = contract_files(openapi)
    problems: list[str] = []
    for path, text in expected.items():
        target = root / path
        if not target.is_file():
            problems.append(f"{path} (missing)")
        elif target.read_text(encoding="utf-8") != text:
            problems.append(f"{path} (differs)")
    problems.extend(f"{path} (extra)" for path in _existing_json(root) - set(expected))
    return sorted(problems)


def write_contracts(root: Path, openapi: Mapping[str, Any]) -> list[str]:
    """Write every generated file under `root`, delete stale ones; return what changed."""
    expected = contract_files(openapi)
    changed: list[str] = []
    for path, text in expected.items():
        target = root / path
        if target.is_file() and target.read_text(encoding="utf-8") == text:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
        changed.append(path)
    for path in _existing_json(root) - set(expected):
        (root / path).unlink()
        changed.append(path)
    return sorted(changed)
