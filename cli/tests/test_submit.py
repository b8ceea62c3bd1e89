from __future__ import annotations

import json
from pathlib import Path

import pytest

from fabrik_cli.errors import EXIT_USAGE, UsageError
from fabrik_cli.submit import (
    RunOptions,
    build_run_request,
    document_errors,
    flag_for,
    load_valid_document,
    parse_pairs,
)

SPEC = {
    "v": 1,
    "id": "s",
    "title": "t",
    "status": "draft",
    "version": "1",
    "lastUpdated": "2026-01-01",
    "goals": ["g"],
    "nonGoals": [],
    "req": {"api": [], "behavior": [], "obs": []},
    "accept": [],
    "assume": [],
}


def test_minimal_request_leaves_defaults_to_the_api() -> None:
    assert build_run_request(RunOptions(project="demo"), environ={}) == {"project": "demo"}


def test_full_request(tmp_path: Path) -> None:
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(SPEC))
    repo = tmp_path / "repo"
    repo.mkdir()
    body = build_run_request(
        RunOptions(
            project="demo",
            env="staging",
            spec_file=spec,
            repo="repo",
            ref="main",
            image="ghcr.io/acme/agent@sha256:abc",
            command=["python", "-c", "print(1)"],
            env_vars=["A=1", "B=x=y", "HOME_DIR"],
            cpu="2",
            memory="4Gi",
            timeout_seconds=600,
            priority="high",
            budget_usd=2.5,
            labels=["team=core", "ticket=42"],
        ),
        cwd=tmp_path,
        environ={"HOME_DIR": "/home/me"},
    )
    assert body == {
        "project": "demo",
        "env": "staging",
        "spec": SPEC,
        "repo": {"url": str(repo.resolve()), "ref": "main"},
        "workload": {
            "image": "ghcr.io/acme/agent@sha256:abc",
            "command": ["python", "-c", "print(1)"],
            "env": {"A": "1", "B": "x=y", "HOME_DIR": "/home/me"},
        },
        "resources": {"cpu": "2", "memory": "4Gi"},
        "timeout_seconds": 600,
        "priority": "high",
        "budget_usd": 2.5,
        "labels": {"team": "core", "ticket": "42"},
    }


def test_repository_urls_are_kept_as_given(tmp_path: Path) -> None:
    body = build_run_request(
        RunOptions(project="p", repo="https://github.com/acme/x"), cwd=tmp_path, environ={}
    )
    assert body["repo"] == {"url": "https://github.com/acme/x"}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (RunOptions(project="p", spec_file=Path("a"), spec_path="b"), "either --spec"),
        (RunOptions(project="p", template="default", cpu="1"), "either --template"),
        (RunOptions(project="p", cpu="1"), "--cpu and --memory go together"),
        (RunOptions(project="p", ref="main"), "--ref needs --repo"),
        (RunOptions(project="p", labels=["novalue"]), "--label 'novalue' is not KEY=VALUE"),
        (RunOptions(project="p", env_vars=["UNSET_VAR"]), "$UNSET_VAR is not set"),
    ],
)
def test_conflicting_or_malformed_options(options: RunOptions, message: str) -> None:
    with pytest.raises(UsageError) as caught:
        build_run_request(options, environ={})
    assert message in caught.value.message
    assert caught.value.exit_code == EXIT_USAGE


def test_invalid_spec_names_every_field_with_the_api_prefix(tmp_path: Path) -> None:
    path = tmp_path / "spec.json"
    path.write_text(json.dumps({**SPEC, "v": 2, "goals": "x", "extra": 1}))
    with pytest.raises(UsageError) as caught:
        load_valid_document(path, "spec", prefix="spec")
    assert caught.value.details == [
        "spec.extra: is not a known field",
        "spec.v: must be 1",
        "spec.goals: must be an array, not a string",
    ]


def test_malformed_json_and_yaml_files(tmp_path: Path) -> None:
    path = tmp_path / "spec.json"
    path.write_text('{"v": 1,')
    with pytest.raises(UsageError) as caught:
        load_valid_document(path, "spec")
    assert "is not valid JSON" in caught.value.message
    assert caught.value.details[0].startswith("line 1, column")
    yaml_path = tmp_path / "spec.yaml"
    yaml_path.write_text(json.dumps(SPEC))  # JSON is YAML
    assert load_valid_document(yaml_path, "spec") == SPEC
    with pytest.raises(UsageError, match="cannot read the spec file"):
        load_valid_document(tmp_path / "missing.json", "spec")


def test_todo_rules() -> None:
    todo = {"v": 1, "id": "t", "tdd": True, "dod": [], "tasks": [{"id": "a", "do": "x", "verify": "y"}]}
    assert document_errors(todo, "todo") == []
    todo["tasks"] = [{"id": "a", "do": "x", "verify": "y"}, {"id": "a", "do": "", "verify": "z"}]
    assert document_errors(todo, "todo") == [
        ("tasks[1].do", "must not be empty"),
        ("tasks[1].id", "duplicates the id of tasks[0]"),
    ]


def test_parse_pairs_keeps_the_last_value() -> None:
    assert parse_pairs(["a=1", "a=2", "b="], "--label") == {"a": "2", "b": ""}


def test_fields_map_to_their_options() -> None:
    assert flag_for("project") == "--project"
    assert flag_for("workload.env.FOO") == "--env-var"
    assert flag_for("spec.goals[2]") == "--spec"
    assert flag_for("labels.bad key") == "--label"
    assert flag_for("repo.ref") == "--ref"
    assert flag_for("$") is None
    assert flag_for("cursor") is None
