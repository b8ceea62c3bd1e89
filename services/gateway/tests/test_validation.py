"""Submit validation without NATS: every invalid field named, and the parameters it produces."""

from __future__ import annotations

import json
from typing import Any

import pytest

from fabrik_gateway.problems import ProblemError
from fabrik_gateway.validation import (
    SubmitLimits,
    body_hash,
    check_idempotency_key,
    is_label_key,
    is_label_value,
    to_parameters,
    validate_submit,
)

SPEC = {
    "v": 1,
    "id": "hello",
    "title": "Hello",
    "status": "draft",
    "version": "1",
    "lastUpdated": "2025-01-01",
    "goals": [],
    "nonGoals": [],
    "req": {"api": [], "behavior": [], "obs": []},
    "accept": [],
    "assume": [],
}


def errors(body: Any, limits: SubmitLimits = SubmitLimits()) -> dict[str, str]:  # noqa: B008
    with pytest.raises(ProblemError) as info:
        validate_submit(json.dumps(body).encode(), limits)
    assert info.value.status == 422
    assert info.value.errors is not None
    return dict(info.value.errors)


def test_minimal_run_and_defaults() -> None:
    valid = validate_submit(b'{"project": "demo", "workload": {"command": ["echo", "hi"]}}')
    params = to_parameters(valid.request)
    assert valid.request.env == "dev"
    assert params.template == "default"
    assert (params.resources.cpu_request, params.resources.memory_limit) == ("500m", "4Gi")
    assert params.timeout_seconds == 86400 and params.priority == "normal"
    assert params.workload.command == ("echo", "hi")


def test_resources_are_request_and_limit() -> None:
    valid = validate_submit(
        b'{"project": "demo", "spec_path": "specs/a.json", "resources": {"cpu": "1.5", "memory": "512Mi"}}'
    )
    params = to_parameters(valid.request)
    assert params.template is None
    r = params.resources
    assert (r.cpu_request, r.cpu_limit, r.memory_request, r.memory_limit) == ("1.5", "1.5", "512Mi", "512Mi")
    high = to_parameters(
        validate_submit(b'{"project": "d", "spec_path": "s", "template": "high-cpu"}').request
    )
    assert high.template == "high-cpu" and high.resources.cpu_request == "8"


def test_inline_spec_is_passed_on_normalised() -> None:
    valid = validate_submit(json.dumps({"project": "demo", "spec": SPEC}).encode())
    params = to_parameters(valid.request)
    assert params.spec == SPEC


def test_every_invalid_field_is_named() -> None:
    got = errors(
        {
            "project": "Bad_Project",
            "env": "-x",
            "spec": {**SPEC, "goals": [1], "extra": True},
            "spec_path": "../etc/passwd",
            "todo": {
                "v": 1,
                "id": "t",
                "tdd": True,
                "dod": [],
                "tasks": [{"id": "a", "do": "x", "verify": "y"}] * 2,
            },
            "repo": {"url": ""},
            "workload": {"command": ["x"], "env": {"FABRIK_TOKEN": "1", "smithers_x": "2", "1BAD": "3"}},
            "resources": {"cpu": "0", "memory": "lots"},
            "template": "default",
            "timeout_seconds": 86401,
            "priority": "urgent",
            "budget_usd": -1,
            "labels": {"fabrik.sh/run-id": "x", "ok": "not ok!", "Bad Key": "v"},
            "surprise": 1,
        }
    )
    assert set(got) == {
        "surprise",
        "project",
        "env",
        "spec.goals[0]",
        "spec.extra",
        "todo.tasks[1].id",
        "spec_path",
        "repo.url",
        "workload.env.1BAD",
        "workload.env.FABRIK_TOKEN",
        "workload.env.smithers_x",
        "resources.cpu",
        "resources.memory",
        "template",
        "timeout_seconds",
        "priority",
        "budget_usd",
        "labels.fabrik.sh/run-id",
        "labels.ok",
        "labels.Bad Key",
    }
    assert got["spec_path"].startswith("cannot be given together with spec") or "relative" in got["spec_path"]
    assert got["timeout_seconds"] == "must be at most 86400"
    assert got["budget_usd"] == "must be at least 0"
    assert "DNS-1123" in got["project"]
    assert got["workload.env.FABRIK_TOKEN"].startswith("is reserved")


def test_what_to_run_is_required_once() -> None:
    assert errors({"project": "demo"}) == {"spec": "a run needs one of spec, spec_path or workload.command"}
    assert errors({"project": "demo", "workload": {"command": []}})["spec"].startswith("a run needs")
    both = errors({"project": "demo", "spec": SPEC, "spec_path": "x"})
    assert both == {"spec_path": "cannot be given together with spec: give one of them"}
    assert errors({"env": "dev", "spec_path": "x"}) == {"project": "is required"}


def test_digest_pinning_when_asked() -> None:
    body = {"project": "demo", "workload": {"image": "python:3.12", "command": ["x"]}}
    assert errors(body, SubmitLimits(require_image_digest=True)) == {
        "workload.image": "must be pinned by digest (image@sha256:...)"
    }
    validate_submit(json.dumps(body).encode())


def test_too_many_labels() -> None:
    labels = {f"k{i}": "v" for i in range(5)}
    assert errors({"project": "d", "spec_path": "s", "labels": labels}, SubmitLimits(max_labels=4)) == {
        "labels": "must have at most 4 entries"
    }


@pytest.mark.parametrize("raw", [b"", b"  ", b"{nope", b"[1", b"\xff"])
def test_malformed_bodies_are_400(raw: bytes) -> None:
    with pytest.raises(ProblemError) as info:
        validate_submit(raw)
    assert info.value.status == 400
    assert info.value.errors is not None and info.value.errors[0][0] == "body"


def test_not_an_object() -> None:
    assert errors([1, 2]) == {"$": "must be an object, not an array"}


def test_label_rules() -> None:
    for key in ["app", "a.b-c_d", "example.com/app", "x" * 63]:
        assert is_label_key(key), key
    for key in ["", "-a", "a-", "x" * 64, "/a", "Example.com/a", "a/b/c", "a b"]:
        assert not is_label_key(key), key
    assert is_label_value("") and is_label_value("v1.2")
    assert not is_label_value("x" * 64) and not is_label_value("a b")


def test_body_hash_ignores_key_order_and_spacing() -> None:
    assert body_hash(json.loads('{"a": 1, "b": [1, 2]}')) == body_hash(json.loads('{"b":[1,2],"a":1}'))
    assert body_hash({"a": 1}) != body_hash({"a": 2})


def test_idempotency_key_header() -> None:
    assert check_idempotency_key(None) is None
    assert check_idempotency_key("abc-123") == "abc-123"
    for bad in ["", "x" * 256, "tab\there", "é"]:
        with pytest.raises(ProblemError) as info:
            check_idempotency_key(bad)
        assert info.value.status == 400
        assert info.value.errors == [("Idempotency-Key", "must be 1 to 255 printable ASCII characters")]
