"""Environment request validation and the role seam, without NATS."""

from __future__ import annotations

import json
from typing import Any

import pytest

from fabrik_gateway.auth import Principal, anonymous, require_role
from fabrik_gateway.envs import check_path, validate_promote, validate_put
from fabrik_gateway.problems import ProblemError


def put_errors(body: Any, max_value_bytes: int = 64) -> list[tuple[str, str]]:
    with pytest.raises(ProblemError) as info:
        validate_put(json.dumps(body).encode(), max_value_bytes)
    assert info.value.status == 422
    return list(info.value.errors or [])


def test_a_valid_put() -> None:
    request = validate_put(b'{"values": {"A": "1"}, "unset": ["B"]}')
    assert (request.values, request.unset, request.replace, request.confirm) == (
        {"A": "1"},
        ["B"],
        False,
        False,
    )
    assert validate_put(b'{"replace": true}').replace  # empties the environment


def test_put_names_every_invalid_field() -> None:
    errors = put_errors(
        {
            "values": {"FABRIK_X": "1", "9LIVES": "x", "BIG": "y" * 65, "N": None},
            "unset": ["SMITHERS_Y", 3],
            "nope": 1,
        }
    )
    fields = [f for f, _ in errors]
    assert fields == [
        "nope",
        "values.N",
        "unset[1]",
        "values.FABRIK_X",
        "values.9LIVES",
        "values.BIG",
        "unset[0]",
    ]


def test_put_rules_across_fields() -> None:
    assert put_errors({}) == [
        ("values", "give values to set or keys to unset (or replace: true to empty the environment)")
    ]
    assert [f for f, _ in put_errors({"values": {"A": "1"}, "unset": ["A"]})] == ["unset[0]"]
    assert [f for f, _ in put_errors({"replace": True, "unset": ["A"]})] == ["unset"]
    assert [f for f, _ in put_errors({"expected_revision": -1, "values": {"A": "1"}})] == [
        "expected_revision"
    ]


def test_malformed_and_empty_bodies_are_400() -> None:
    for raw in (b"", b"{nope", b"   "):
        with pytest.raises(ProblemError) as info:
            validate_put(raw)
        assert info.value.status == 400


def test_promote_validation() -> None:
    request = validate_promote(b'{"from": "staging", "to": "prod", "confirm": true}')
    assert (request.from_env, request.to_env, request.confirm, request.merge) == (
        "staging",
        "prod",
        True,
        False,
    )
    with pytest.raises(ProblemError) as info:
        validate_promote(b'{"from": "Staging", "to": "promote", "extra": 1}')
    assert {f for f, _ in info.value.errors or []} == {"from", "to", "extra"}
    with pytest.raises(ProblemError) as info:
        validate_promote(b'{"from": "dev", "to": "dev"}')
    assert [f for f, _ in info.value.errors or []] == ["to"]


def test_path_names() -> None:
    check_path("demo", "dev")
    with pytest.raises(ProblemError) as info:
        check_path("Demo", "a" * 64)
    assert info.value.status == 400
    assert [f for f, _ in info.value.errors or []] == ["project", "env"]
    with pytest.raises(ProblemError):
        check_path("demo", "diff")


def test_roles() -> None:
    require_role(Principal("alice", "maintainer"), "developer", "x")
    with pytest.raises(ProblemError) as info:
        require_role(Principal("bob", "developer", authenticated=True), "maintainer", "write prod")
    assert info.value.status == 403
    assert info.value.detail == "the maintainer role is needed to write prod; bob has the developer role"
    with pytest.raises(ProblemError) as info:
        require_role(anonymous("viewer"), "developer", "write")
    assert "FABRIK_ANONYMOUS_ROLE" in info.value.detail
    with pytest.raises(ProblemError) as info:
        require_role(anonymous("none"), "viewer", "read")
    assert info.value.status == 401
    assert anonymous("admin").has_role("maintainer")
