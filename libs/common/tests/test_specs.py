"""Spec and todo documents: strict validation naming every invalid field, and their JSON Schemas."""

from __future__ import annotations

import copy
from typing import Annotated, Any, Literal

import msgspec
import pytest

from fabrik_common.specs import (
    JSON_SCHEMA_DIALECT,
    Spec,
    SpecValidationError,
    Todo,
    collect_errors,
    decode_spec,
    decode_todo,
    humanize,
    spec_json_schema,
    todo_json_schema,
    validate_spec,
    validate_todo,
)

SPEC: dict[str, Any] = {
    "v": 1,
    "id": "hello",
    "title": "Hello",
    "status": "draft",
    "version": "1.0",
    "lastUpdated": "2025-01-31",
    "goals": ["say hello"],
    "nonGoals": ["say goodbye"],
    "req": {"api": ["GET /hello"], "behavior": ["answers"], "obs": ["logs a line"]},
    "accept": ["curl works"],
    "assume": ["python 3.11"],
}
TODO: dict[str, Any] = {
    "v": 1,
    "id": "hello",
    "tdd": True,
    "dod": ["tests pass"],
    "tasks": [{"id": "1:test", "do": "write the test", "verify": "pytest fails"}],
}


def errors_of(call: Any, value: Any) -> list[tuple[str, str]]:
    with pytest.raises(SpecValidationError) as info:
        call(value)
    return info.value.errors


def test_a_valid_spec_and_todo_decode() -> None:
    spec = validate_spec(SPEC)
    assert isinstance(spec, Spec)
    assert spec.non_goals == ["say goodbye"]
    assert spec.req.api == ["GET /hello"]
    assert spec.supersedes == [] and spec.depends_on == []
    assert msgspec.to_builtins(spec) == SPEC  # defaults are omitted again: it round-trips
    full = {**SPEC, "supersedes": ["old"], "dependsOn": ["base"], "cfg": {"env": ["TOKEN"]}}
    assert msgspec.to_builtins(validate_spec(full)) == full
    todo = validate_todo(TODO)
    assert isinstance(todo, Todo)
    assert todo.tasks[0].verify == "pytest fails"


def test_every_invalid_field_of_a_spec_is_named() -> None:
    bad = copy.deepcopy(SPEC)
    bad["v"] = 2
    bad["goals"] = ["ok", 3, "ok", None]
    bad["req"] = {"api": "GET /", "behavior": [], "extra": []}
    bad["nonGoal"] = []
    bad["cfg"] = {"env": [1]}
    bad["title"] = ""
    del bad["accept"]
    errors = dict(errors_of(validate_spec, bad))
    assert errors == {
        "nonGoal": "is not a known field",
        "v": "must be 1",
        "title": "must not be empty",
        "goals[1]": "must be a string, not an integer",
        "goals[3]": "must be a string, not null",
        "req.extra": "is not a known field",
        "req.api": "must be an array, not a string",
        "req.obs": "is required",
        "accept": "is required",
        "cfg.env[0]": "must be a string, not an integer",
    }


def test_the_error_message_lists_field_and_rule() -> None:
    with pytest.raises(SpecValidationError) as info:
        validate_spec({**SPEC, "goals": "x"})
    assert "goals: must be an array, not a string" in str(info.value)
    assert info.value.what == "spec"


def test_a_spec_that_is_not_an_object() -> None:
    assert errors_of(validate_spec, ["x"]) == [("$", "must be an object, not an array")]
    assert errors_of(decode_spec, b"{nope")[0][0] == "$"
    assert "is not valid JSON" in errors_of(decode_spec, "{nope")[0][1]
    assert decode_spec(msgspec.json.encode(SPEC)).id == "hello"


def test_every_invalid_field_of_a_todo_is_named() -> None:
    bad = copy.deepcopy(TODO)
    bad["tdd"] = "yes"
    bad["tasks"] = [
        {"id": "a", "do": "x", "verify": ""},
        {"id": "a", "do": "y", "verify": "z", "owner": "me"},
        {"id": "b", "verify": "z"},
        "c",
    ]
    assert errors_of(validate_todo, bad) == [
        ("tdd", "must be true or false, not a string"),
        ("tasks[0].verify", "must not be empty"),
        ("tasks[1].owner", "is not a known field"),
        ("tasks[2].do", "is required"),
        ("tasks[3]", "must be an object, not a string"),
        ("tasks[1].id", "duplicates the id of tasks[0]"),
    ]
    assert decode_todo(msgspec.json.encode(TODO)).id == "hello"


def test_schemas_are_2020_12_and_closed() -> None:
    for schema, required in (
        (spec_json_schema(), {"v", "id", "title", "status", "version", "lastUpdated", "goals", "nonGoals"}),
        (todo_json_schema(), {"v", "id", "tdd", "dod", "tasks"}),
    ):
        assert schema["$schema"] == JSON_SCHEMA_DIALECT
        assert schema["$id"].endswith(".schema.json")
        assert schema["type"] == "object"
        assert schema["additionalProperties"] is False
        assert required <= set(schema["required"])
        assert schema["properties"]["v"] == {"const": 1}
        for definition in schema.get("$defs", {}).values():
            assert definition["additionalProperties"] is False
    spec = spec_json_schema()
    assert set(spec["required"]) == {
        "v", "id", "title", "status", "version", "lastUpdated", "goals", "nonGoals", "req", "accept", "assume"
    }  # fmt: skip
    assert {"supersedes", "dependsOn", "cfg"} <= set(spec["properties"])
    assert spec["$defs"]["Requirements"]["required"] == ["api", "behavior", "obs"]
    assert spec_json_schema() == spec  # deterministic


class Thing(msgspec.Struct, forbid_unknown_fields=True):
    name: Annotated[str, msgspec.Meta(pattern="^[a-z]+$", extra={"rule": "must be lowercase letters"})]
    size: Annotated[int, msgspec.Meta(ge=1, le=10)] = 1
    kind: Literal["a", "b"] | None = None
    tags: dict[str, int] = {}


def test_collect_errors_on_plain_types_and_rules_from_metadata() -> None:
    assert collect_errors({"name": "ok"}, Thing) == []
    assert collect_errors({"name": "NO", "size": 11, "kind": "c", "tags": {"x": "1"}}, Thing) == [
        ("name", "must be lowercase letters"),
        ("size", "must be at most 10"),
        ("kind", "must be one of 'a', 'b'"),
        ("tags.x", "must be an integer, not a string"),
    ]
    assert collect_errors([1, "x"], list[int], "items") == [("items[1]", "must be an integer, not a string")]


@pytest.mark.parametrize(
    ("message", "rule"),
    [
        ("Expected `str` of length <= 63", "must have at most 63 characters"),
        ("Expected `array` of length >= 2", "must have at least 2 items"),
        ("Expected `float` >= 0.0", "must be at least 0"),
        ("Expected `int` > 0", "must be greater than 0"),
        ("Expected `str | null`, got `int`", "must be a string or null, not an integer"),
        ("Expected `str` matching regex '^x$'", "must match the pattern ^x$"),
        ("something else", "something else"),
    ],
)
def test_humanize(message: str, rule: str) -> None:
    assert humanize(message) == rule
