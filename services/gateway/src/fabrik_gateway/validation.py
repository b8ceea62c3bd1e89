"""Validation of a submitted run: every invalid field named, then the `RunParameters` it asks for."""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import msgspec

from fabrik_common.events import RepoRef, Resources, RunParameters, Workload
from fabrik_common.runs import TEMPLATES, parse_cpu, parse_memory
from fabrik_common.specs import FieldError, collect_errors, todo_semantic_errors
from fabrik_gateway.models import SubmitRunRequest
from fabrik_gateway.problems import ProblemError, invalid

RESERVED_ENV_PREFIXES: Final = ("FABRIK_", "SMITHERS_")
RESERVED_LABEL_PREFIX: Final = "fabrik.sh/"
_LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
LABEL_KEY_RULE: Final = (
    "must be a Kubernetes label key: an optional DNS subdomain prefix and '/', then a name of at most "
    "63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit"
)
LABEL_VALUE_RULE: Final = (
    "must be a Kubernetes label value: empty, or at most 63 letters, digits, '-', '_' or '.', "
    "starting and ending with a letter or digit"
)


@dataclass(frozen=True)
class SubmitLimits:
    require_image_digest: bool = False
    max_labels: int = 64


@dataclass(frozen=True)
class ValidSubmit:
    request: SubmitRunRequest
    body_hash: str
    """SHA-256 of the body's canonical JSON: the same request in any key order or spacing."""


def decode_body(raw: bytes) -> Any:
    if not raw.strip():
        raise invalid([("body", "is required: a JSON object describing the run")], status=400)
    try:
        return msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise invalid(
            [("body", f"is not valid JSON: {exc}")], status=400, detail="malformed JSON body"
        ) from None


def validate_submit(raw: bytes, limits: SubmitLimits = SubmitLimits()) -> ValidSubmit:
    """The request, or a 422 `ProblemError` naming every invalid field (400 for malformed JSON)."""
    obj = decode_body(raw)
    errors = collect_errors(obj, SubmitRunRequest)
    if isinstance(obj, Mapping):
        errors.extend(semantic_errors(obj, limits))
    if errors:
        raise invalid(_unique(errors))
    request = msgspec.convert(obj, SubmitRunRequest)
    return ValidSubmit(request, body_hash(obj))


def body_hash(obj: Any) -> str:
    canonical = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def semantic_errors(obj: Mapping[str, Any], limits: SubmitLimits) -> list[FieldError]:
    """Rules across fields, and value rules a schema cannot express. Fields of the wrong type are
    skipped here: the schema walk has reported them already."""
    errors: list[FieldError] = []
    workload = obj.get("workload")
    workload = workload if isinstance(workload, Mapping) else {}
    command = workload.get("command")
    has_spec = obj.get("spec") is not None
    has_spec_path = obj.get("spec_path") is not None
    if not (has_spec or has_spec_path or (isinstance(command, list) and command)):
        errors.append(("spec", "a run needs one of spec, spec_path or workload.command"))
    if has_spec and has_spec_path:
        errors.append(("spec_path", "cannot be given together with spec: give one of them"))
    spec_path = obj.get("spec_path")
    if isinstance(spec_path, str) and spec_path and not _is_relative_path(spec_path):
        errors.append(("spec_path", "must be a relative path inside the repository, without '..'"))
    todo = obj.get("todo")
    errors.extend((f"todo.{field}", rule) for field, rule in todo_semantic_errors(todo))

    template = obj.get("template")
    if obj.get("resources") is not None and template is not None:
        errors.append(("template", "cannot be given together with resources: give one of them"))
    if isinstance(template, str) and template not in TEMPLATES:
        errors.append(("template", "must be one of " + ", ".join(repr(t) for t in TEMPLATES)))
    resources = obj.get("resources")
    if isinstance(resources, Mapping):
        errors.extend(_quantity_errors(resources))

    env = workload.get("env")
    if isinstance(env, Mapping):
        for key in env:
            if isinstance(key, str) and key.upper().startswith(RESERVED_ENV_PREFIXES):
                errors.append(
                    (
                        f"workload.env.{key}",
                        "is reserved: keys starting with FABRIK_ or SMITHERS_ are set by Fabrik",
                    )
                )
    image = workload.get("image")
    if limits.require_image_digest and isinstance(image, str) and "@sha256:" not in image:
        errors.append(("workload.image", "must be pinned by digest (image@sha256:...)"))

    labels = obj.get("labels")
    if isinstance(labels, Mapping):
        errors.extend(label_errors(labels, limits.max_labels))
    return errors


def _is_relative_path(path: str) -> bool:
    if path.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", path):
        return False
    return ".." not in re.split(r"[/\\]", path)


def _quantity_errors(resources: Mapping[str, Any]) -> list[FieldError]:
    errors: list[FieldError] = []
    cpu = resources.get("cpu")
    if isinstance(cpu, str):
        try:
            value = parse_cpu(cpu)
        except ValueError:
            value = math.nan  # the pattern rule has been reported by the schema walk
        if value == 0:
            errors.append(("resources.cpu", "must be greater than 0"))
    memory = resources.get("memory")
    if isinstance(memory, str):
        try:
            size = parse_memory(memory)
        except ValueError:
            size = -1
        if size == 0:
            errors.append(("resources.memory", "must be greater than 0"))
    return errors


def is_label_key(key: str) -> bool:
    prefix, _, name = key.rpartition("/")
    if "/" in key and (not prefix or len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix)):
        return False
    return 0 < len(name) <= 63 and bool(_LABEL_NAME.match(name))


def is_label_value(value: str) -> bool:
    return value == "" or (len(value) <= 63 and bool(_LABEL_NAME.match(value)))


def label_errors(labels: Mapping[str, Any], max_labels: int) -> list[FieldError]:
    errors: list[FieldError] = []
    if len(labels) > max_labels:
        errors.append(("labels", f"must have at most {max_labels} entries"))
    for key, value in labels.items():
        field = f"labels.{key}"
        if not isinstance(key, str) or not is_label_key(key):
            errors.append((field, "key " + LABEL_KEY_RULE))
        elif key.startswith(RESERVED_LABEL_PREFIX):
            errors.append((field, f"key is reserved: the prefix {RESERVED_LABEL_PREFIX} belongs to Fabrik"))
        if isinstance(value, str) and not is_label_value(value):
            errors.append((field, LABEL_VALUE_RULE))
    return errors


def _unique(errors: list[FieldError]) -> list[FieldError]:
    return list(dict.fromkeys(errors))


def to_parameters(request: SubmitRunRequest) -> RunParameters:
    """What the scheduler and the executor receive: resources resolved from `resources` or `template`."""
    if request.resources is not None:
        cpu, memory = request.resources.cpu, request.resources.memory
        resources = Resources(cpu_request=cpu, memory_request=memory, cpu_limit=cpu, memory_limit=memory)
        template = None
    else:
        template = request.template or "default"
        resources = TEMPLATES[template]
    workload = request.workload
    return RunParameters(
        spec=msgspec.to_builtins(request.spec) if request.spec is not None else None,
        spec_path=request.spec_path,
        todo=msgspec.to_builtins(request.todo) if request.todo is not None else None,
        repo=RepoRef(url=request.repo.url, ref=request.repo.ref) if request.repo is not None else None,
        workload=Workload(
            image=workload.image,
            command=tuple(workload.command),
            args=tuple(workload.args),
            env=dict(workload.env),
        )
        if workload is not None
        else Workload(),
        resources=resources,
        template=template,
        timeout_seconds=request.timeout_seconds,
        priority=request.priority,
        budget_usd=request.budget_usd,
        labels=dict(request.labels),
    )


def check_idempotency_key(value: str | None) -> str | None:
    if value is None:
        return None
    if not 1 <= len(value) <= 255 or not value.isprintable() or not value.isascii():
        raise ProblemError(
            400,
            "the Idempotency-Key header is invalid",
            slug="invalid-request",
            title="Invalid request",
            errors=[("Idempotency-Key", "must be 1 to 255 printable ASCII characters")],
        )
    return value
