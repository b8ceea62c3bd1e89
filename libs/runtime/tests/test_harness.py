"""Harness settings: the spec's harness file, overlaid by the run configuration's variables."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fabrik_common.experiments import harness_file_for, is_configuration_variable
from fabrik_runtime import harness_settings


def test_the_file_next_to_the_spec() -> None:
    assert harness_file_for("specs/login.json") == "specs/login.harness.json"
    assert harness_file_for("login.json") == "login.harness.json"
    assert harness_file_for("a/b/login") == "a/b/login.harness.json"


def test_configuration_variables() -> None:
    assert is_configuration_variable("FABRIK_MODEL")
    assert is_configuration_variable("FABRIK_HARNESS_MAX_DEPTH")
    for name in ("FABRIK_RUN_ID", "FABRIK_HARNESS_", "FABRIK_HARNESS_x", "FABRIK_HARNESS_9A", "MODEL"):
        assert not is_configuration_variable(name), name


def test_file_then_variables(tmp_path: Path) -> None:
    path = tmp_path / "login.harness.json"
    path.write_text(json.dumps({"harness": {"depth": 3, "review": True, "style": "terse"}, "note": "kept"}))
    env = {"FABRIK_SPEC_HARNESS_FILE": str(path), "FABRIK_HARNESS_DEPTH": "5", "FABRIK_HARNESS_TOOLS": "all"}
    assert harness_settings(env) == {"depth": "5", "review": "true", "style": "terse", "tools": "all"}
    # no file (a run without a spec path, or a spec without one): the variables alone
    assert harness_settings({"FABRIK_SPEC_HARNESS_FILE": str(tmp_path / "none.json")}) == {}
    assert harness_settings({"FABRIK_HARNESS_DEPTH": "2", "FABRIK_MODEL": "m"}) == {"depth": "2"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "not JSON"),
        ("[]", 'a "harness" object'),
        ('{"harness": 3}', 'a "harness" object'),
        ('{"harness": {"Bad-Key": 1}}', "harness key 'Bad-Key'"),
    ],
)
def test_a_broken_file_is_an_error(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "x.harness.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        harness_settings({"FABRIK_SPEC_HARNESS_FILE": str(path)})
