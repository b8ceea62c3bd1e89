"""The dashboard's view models, without a terminal: rows, live events applied to the run list,
the filter, the caller's roles, the new-run form, a run's events and log lines."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from fabrik_cli.dashboard.access import Caller
from fabrik_cli.dashboard.detail import EventLog, LogBuffer, chunk_lines, event_row, header_pairs
from fabrik_cli.dashboard.filtering import parse_filter
from fabrik_cli.dashboard.form import GENERAL, NewRun, errors_by_field, form_field, project_error
from fabrik_cli.dashboard.runs import COLUMNS, RunStore, phase_task, progress_cell, run_row
from fabrik_cli.main import cli
from fabrik_common.ids import DNS1123_RULE

NOW = datetime(2026, 11, 29, 14, 0, 0, tzinfo=UTC)
RUN_A = "01JH3Z9W4R8Q0M6Y2V5T7K1B3A"
RUN_B = "01JH3Z9W4R8Q0M6Y2V5T7K1B3B"


def iso(delta_seconds: float) -> str:
    return (NOW - timedelta(seconds=delta_seconds)).isoformat().replace("+00:00", "Z")


def run(run_id: str = RUN_A, **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "run_id": run_id,
        "project": "demo",
        "env": "dev",
        "spec_id": "hello",
        "state": "running",
        "reason": None,
        "message": "",
        "attempt": 1,
        "progress": {"phase": "implement", "task": "16:impl", "finished": 150, "total": 192},
        "created_at": iso(90),
        "started_at": iso(80),
        "finished_at": None,
        "cost_usd": 0.25,
        "tokens": {"input": 1200, "output": 340},
        "labels": {"team": "core"},
    }
    base.update(fields)
    return base


_seq = iter(range(1, 1_000_000))


def message(kind: str, run_id: str = RUN_A, **fields: Any) -> dict[str, Any]:
    seq = next(_seq)
    event = {
        "type": kind,
        "event_id": f"ev-{seq}",
        "occurred_at": iso(0),
        "schema_version": 1,
        "run_id": run_id,
        **fields,
    }
    return {"cursor": str(seq), "subject": f"fabrik.runs.x.{run_id}", "type": kind, "event": event}


# --------------------------------------------------------------------------------------------
# Rows


def test_a_row_has_the_columns_in_order() -> None:
    row = run_row(run(), NOW)
    assert len(row) == len(COLUMNS)
    assert dict(zip(COLUMNS, row, strict=True)) == {
        "STATE": "running",
        "PROJECT": "demo",
        "SPEC": "hello",
        "PHASE / TASK": "implement · 16:impl",
        "PROGRESS": "███████░░░  78% 150/192",
        "AGE": "1m ago",
        "COST": "$0.2500",
        "RUN ID": RUN_A,
    }


def test_a_row_without_progress_or_cost_shows_dashes_and_the_reason_with_the_state() -> None:
    row = run_row(run(state="failed", reason="oom_killed", progress=None, cost_usd=None, spec_id=None), NOW)
    assert row[:5] == ("failed: oom_killed", "demo", "-", "-", "-")
    assert row[6] == "-"


def test_progress_cells() -> None:
    assert progress_cell({"finished": 0, "total": 4}) == "░░░░░░░░░░   0% 0/4"
    assert progress_cell({"finished": 9, "total": 4}) == "██████████ 100% 9/4"
    assert progress_cell({"finished": 3}) == "3"
    assert progress_cell({"phase": "plan"}) == "-"
    assert phase_task({"phase": "plan"}) == "plan"
    assert phase_task(None) == "-"


# --------------------------------------------------------------------------------------------
# Live events


def test_a_requested_run_appears_at_the_top_and_is_read_again() -> None:
    store = RunStore()
    store.load([run(RUN_A)])
    change = store.apply(
        message(
            "run.requested",
            RUN_B,
            project="web",
            env="dev",
            params={"spec": {"id": "shop"}, "priority": "high", "labels": {"a": "b"}},
            requested_by="anonymous",
        )
    )
    assert change is not None and change.added and change.fetch
    assert [r["run_id"] for r in store.ordered()] == [RUN_B, RUN_A]
    new = store.get(RUN_B)
    assert new is not None
    assert (new["project"], new["spec_id"], new["state"], new["priority"]) == (
        "web",
        "shop",
        "queued",
        "high",
    )


def test_state_progress_and_finish_change_the_row() -> None:
    store = RunStore()
    store.load([run(state="starting", progress=None, started_at=None)])
    started = store.apply(message("run.started", attempt=1, backend="local", workload_ref="x"))
    assert started is not None and started.changed and started.fetch
    progress = store.apply(message("run.progress", attempt=1, phase="verify", task="t", finished=2, total=4))
    assert progress is not None and progress.changed and not progress.fetch
    change = store.apply(
        message(
            "run.state_changed",
            project="demo",
            attempt=1,
            from_state="running",
            to_state="failed",
            reason="workload_error",
            message="exit code 3",
        )
    )
    assert change is not None and change.fetch
    current = store.get(RUN_A)
    assert current is not None
    assert run_row(current, NOW)[:5] == (
        "failed: workload_error",
        "demo",
        "hello",
        "verify · t",
        "█████░░░░░  50% 2/4",
    )
    assert current["finished_at"] == iso(0)
    assert current["started_at"] == iso(0)


def test_an_event_is_applied_once_and_an_older_attempt_does_not_move_a_resumed_run() -> None:
    store = RunStore()
    store.load([run(attempt=2, state="running")])
    late = message("run.state_changed", project="demo", attempt=1, from_state="running", to_state="failed")
    change = store.apply(late)
    assert change is not None and not change.changed
    assert store.runs[RUN_A]["state"] == "running"

    queued = message("run.state_changed", project="demo", attempt=3, from_state="failed", to_state="queued")
    assert store.apply(queued) is not None
    assert store.apply(queued) is None  # the same event again (a replay after a reconnect)
    assert (store.runs[RUN_A]["state"], store.runs[RUN_A]["attempt"]) == ("queued", 3)
    assert store.runs[RUN_A]["finished_at"] is None


def test_events_of_unknown_runs_ask_for_a_read_and_other_messages_are_ignored() -> None:
    store = RunStore()
    change = store.apply(message("run.progress", RUN_B, attempt=1, finished=1, total=2))
    assert change is not None and change.fetch and not change.changed
    assert store.get(RUN_B) is None
    assert store.apply({"type": "log.chunk", "event": {"run_id": RUN_A}}) is None
    assert store.apply({"type": "heartbeat"}) is None


def test_a_rest_read_replaces_what_events_made() -> None:
    store = RunStore()
    store.apply(message("run.requested", project="demo", env="dev", params={}, requested_by="x"))
    assert store.upsert(run(state="succeeded", cost_usd=1.5)) is False
    assert store.runs[RUN_A]["cost_usd"] == 1.5


# --------------------------------------------------------------------------------------------
# Filter


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("", True),
        ("demo", True),
        ("DEMO hello", True),
        ("hello web", False),
        ("project:demo", True),
        ("p:web", False),
        ("project:web,demo", True),
        ("state:running", True),
        ("s:queued,failed", False),
        ("state:active", True),
        ("state:done", False),
        ("team=core", True),
        ("16:impl", True),
        ("1b3a", True),
    ],
)
def test_filter(query: str, expected: bool) -> None:
    assert parse_filter(query).matches(run()) is expected


def test_filter_description() -> None:
    parsed = parse_filter("project:demo state:done oom")
    assert parsed.projects == {"demo"}
    assert "succeeded" in parsed.states and "running" not in parsed.states
    assert parsed.describe().startswith("project demo, state ")
    assert parsed.describe().endswith('"oom"')
    assert parse_filter("  ").empty


# --------------------------------------------------------------------------------------------
# Roles


def test_roles_decide_cancel_resume_and_submit() -> None:
    viewer = Caller.from_whoami(
        {"subject": "token:1", "name": "ci", "role": "viewer", "project_roles": {"web": "developer"}}
    )
    assert viewer.refusal("cancel", "web") is None
    refusal = viewer.refusal("cancel", "demo")
    assert refusal == "ci has the role viewer in project demo; to cancel runs it takes developer or higher"
    assert viewer.may_anywhere("submit")
    assert viewer.roles_text() == "viewer everywhere, developer in web"

    nobody = Caller.from_whoami({"subject": "anonymous", "role": None, "project_roles": {}})
    assert nobody.refusal("resume", "demo") == (
        "anonymous has no role in project demo; to resume runs it takes developer or higher"
    )
    assert not nobody.may_anywhere("submit")
    assert Caller.from_whoami({"subject": "a", "role": "admin"}).refusal("submit", None) is None
    with pytest.raises(TypeError):
        Caller.from_whoami(["not", "a", "mapping"])


# --------------------------------------------------------------------------------------------
# The new-run form


def test_project_is_checked_as_typed() -> None:
    assert project_error("") == "required"
    assert project_error("Bad_Project") == DNS1123_RULE
    assert project_error("-demo") == DNS1123_RULE
    assert project_error("a" * 64) == DNS1123_RULE
    assert project_error("web-shop") is None


def test_form_local_errors_and_body(tmp_path: Path) -> None:
    bad = NewRun(project="Demo", env="Prod", ref="main", command="python 'unterminated")
    assert set(bad.local_errors()) == {"project", "env", "ref", "command"}

    repo = tmp_path / "repo"
    repo.mkdir()
    good = NewRun.from_values(
        {
            "project": " demo ",
            "spec_path": "spec.json",
            "repo": "repo",
            "command": "python -c 'print(1)'",
            "priority": "high",
        }
    )
    assert good.local_errors() == {}
    assert good.body(cwd=tmp_path) == {
        "project": "demo",
        "spec_path": "spec.json",
        "repo": {"url": str(repo.resolve())},
        "workload": {"command": ["python", "-c", "print(1)"]},
        "priority": "high",
    }
    assert NewRun(project="demo").body() == {"project": "demo"}


def test_api_errors_go_under_their_fields() -> None:
    assert form_field("project") == "project"
    assert form_field("repo.url") == "repo"
    assert form_field("repo.ref") == "ref"
    assert form_field("spec.goals[2]") == "spec_path"
    assert form_field("workload.command[0]") == "command"
    assert form_field("labels.x") == GENERAL
    assert form_field("$") == GENERAL
    grouped = errors_by_field(
        [
            ("project", "must be a DNS-1123 label"),
            ("spec_path", "must be relative"),
            ("repo.url", "is not a URL"),
            ("$", "one of spec, spec_path or workload.command is required"),
            ("budget_usd", "must be >= 0"),
        ]
    )
    assert grouped == {
        "project": ["must be a DNS-1123 label"],
        "spec_path": ["must be relative"],
        "repo": ["repo.url: is not a URL"],
        GENERAL: ["one of spec, spec_path or workload.command is required", "budget_usd: must be >= 0"],
    }


# --------------------------------------------------------------------------------------------
# One run


def test_header_shows_state_reason_attempt_timings_cost_and_tokens() -> None:
    pairs = dict(
        header_pairs(
            run(state="failed", reason="oom_killed", attempt=2, finished_at=iso(20), exit_code=137), NOW
        )
    )
    assert pairs["state"] == "failed: oom_killed"
    assert pairs["attempt"] == "2"
    assert pairs["duration"] == "1m 00s"
    assert pairs["cost"] == "$0.2500"
    assert pairs["tokens"] == "1,200 in / 340 out"
    assert pairs["exit code"] == "137"
    assert "queue" not in pairs
    queued = dict(header_pairs(run(state="queued", queue={"position": 2, "ahead_count": 1}), NOW))
    assert queued["queue"].startswith("position 2, 1 run ahead")


def test_events_are_kept_once_and_shown_as_transitions() -> None:
    events = EventLog()
    item = message(
        "run.state_changed", project="demo", attempt=1, from_state="queued", to_state="starting", reason=None
    )
    assert events.add(item)
    assert not events.add({"seq": 7, "type": "run.state_changed", "event": item["event"]})
    time_text, kind, attempt, details = event_row(item)
    assert (kind, attempt, details) == ("run.state_changed", "1", "queued -> starting")
    assert len(time_text) == 8
    finished = message("run.finished", attempt=1, outcome="failed", exit_code=3, message="boom")
    assert event_row(finished)[3] == "outcome=failed, exit_code=3, message=boom"


def test_log_lines_from_rest_and_stream_are_kept_once() -> None:
    logs = LogBuffer(limit=4)
    rest = [
        {"ts": iso(3), "stream": "stdout", "text": "one", "attempt": 1, "line": 0},
        {"ts": iso(2), "stream": "system", "text": "workspace ready", "attempt": 1, "line": 1},
    ]
    assert len(logs.add_all(rest)) == 2
    chunk = {
        "type": "log.chunk",
        "event": {
            "run_id": RUN_A,
            "attempt": 1,
            "first_line": 1,
            "lines": [
                {"ts": iso(2), "stream": "system", "text": "workspace ready"},
                {"ts": iso(1), "stream": "stdout", "text": "two"},
                {"ts": iso(0), "stream": "stderr", "text": "three"},
            ],
        },
    }
    lines = list(chunk_lines(chunk))
    assert [(line["attempt"], line["line"]) for line in lines] == [(1, 1), (1, 2), (1, 3)]
    new = logs.add_all(lines)
    assert [line["text"] for line in new] == ["two", "three"]
    assert logs.add({"text": "no numbers"})
    assert [line["text"] for line in logs.lines] == ["workspace ready", "two", "three", "no numbers"]


def test_the_command_is_registered() -> None:
    result = CliRunner().invoke(cli, ["dashboard", "--help"])
    assert result.exit_code == 0, result.output
    assert "--api URL" in result.output and "--filter TEXT" in result.output
