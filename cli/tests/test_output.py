from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import yaml

from fabrik_cli.output import (
    OutputFormat,
    dump,
    format_duration,
    format_eta,
    format_progress,
    iter_log_entries,
    progress_bar,
    queue_table,
    render_table,
    run_detail,
    run_summary,
    runs_table,
)

NOW = datetime(2026, 11, 29, 14, 0, 0, tzinfo=UTC)


def a_run(**changes: Any) -> dict[str, Any]:
    run: dict[str, Any] = {
        "run_id": "01JDXKZ0000000000000000000",
        "project": "demo",
        "env": "dev",
        "spec_id": "hello",
        "state": "running",
        "reason": None,
        "message": "",
        "attempt": 1,
        "queue": None,
        "progress": {"phase": "implement", "task": "16:impl", "finished": 150, "total": 192},
        "created_at": "2026-11-29T13:55:00Z",
        "started_at": "2026-11-29T13:56:00Z",
        "finished_at": None,
        "exit_code": None,
        "cost_usd": 0.1234,
        "tokens": {"input": 12345, "output": 678},
        "labels": {"team": "core"},
    }
    run.update(changes)
    return run


def test_table_columns_are_aligned() -> None:
    table = render_table(("A", "LONGER"), [["xx", "1"], ["y", "22 two words"]])
    assert table.splitlines() == ["A   LONGER", "xx  1", "y   22 two words"]


def test_empty_cells_show_a_dash() -> None:
    assert render_table(("A", "B"), [["", "x"]]).splitlines()[1] == "-  x"


def test_durations_and_progress() -> None:
    assert format_duration(0.25) == "250ms"
    assert format_duration(42) == "42s"
    assert format_duration(187) == "3m 07s"
    assert format_duration(7500) == "2h 05m"
    assert progress_bar(1, 4, width=8) == "[##------]  25%"
    assert format_progress({"phase": "plan"}) == "plan"
    assert format_progress(None) == "-"
    assert format_progress({"finished": 3, "total": 6, "phase": "p", "task": "t"}, bar=False) == "3/6  p · t"


def test_eta_as_time_seconds_or_unknown() -> None:
    assert format_eta(None, NOW) == "unknown"
    assert format_eta(90, NOW) == "in ~1m 30s"
    assert format_eta("2026-11-29T13:00:00Z", NOW) == "now"
    assert "(in 2m 00s)" in format_eta("2026-11-29T14:02:00Z", NOW)


def test_run_detail_shows_everything_a_person_asks_about() -> None:
    text = run_detail(a_run(), NOW)
    lines = {key: value for key, _, value in (line.partition("  ") for line in text.splitlines())}
    assert lines["state"].strip() == "running"
    assert "150/192" in lines["progress"]
    assert "78%" in lines["progress"]
    assert "implement · 16:impl" in lines["progress"]
    assert "4m 00s (so far)" in text
    assert "$0.1234" in text
    assert "12,345 in / 678 out" in text
    assert "team=core" in text
    assert "queue" not in lines


def test_queued_run_shows_its_place() -> None:
    queue = {"position": 3, "ahead_count": 2, "ahead": ["A", "B"], "eta": None, "eta_seconds": None}
    text = run_detail(a_run(state="queued", started_at=None, progress={}, queue=queue), NOW)
    assert "position 3, 2 runs ahead, estimated start unknown" in text
    text = run_detail(a_run(state="queued", queue={"position": None}), NOW)
    assert "not placed by the scheduler yet" in text


def test_runs_table_and_summary() -> None:
    failed = a_run(state="failed", reason="workload_error", exit_code=3, finished_at="2026-11-29T13:56:05Z")
    table = runs_table([a_run(), failed], NOW)
    header, first, second = table.splitlines()
    assert header.split() == ["RUN", "ID", "PROJECT", "ENV", "STATE", "ATTEMPT", "PROGRESS", "CREATED",
                              "DURATION", "COST"]  # fmt: skip
    assert "150/192 (78%)" in first
    assert "failed: workload_error" in second
    assert run_summary(failed, NOW) == (
        "run 01JDXKZ0000000000000000000 failed (reason: workload_error, exit code 3, after 5s)"
    )


def test_queue_table_with_usage() -> None:
    data = {
        "taken_at": "2026-11-29T14:00:00Z",
        "total": 2,
        "running": 1,
        "items": [
            {"position": 1, "run_id": "A", "project": "p", "priority": "high", "eta_seconds": 0, "eta": None},
            {
                "position": 2,
                "run_id": "B",
                "project": "q",
                "priority": "low",
                "eta_seconds": None,
                "eta": None,
            },
        ],
        "usage": {"p": {"runs": 1, "cpu": 0.5, "memory": 1073741824}},
        "limits": {"cluster": {"runs": 100, "cpu": 100, "memory": 214748364800}, "p": {"runs": 10}},
    }
    text = queue_table(data, NOW)
    assert "1    A       p        high      0      unknown" in text
    assert "2 queued, 1 running" in text
    assert "cluster         1/100  0.5/100  1Gi/200Gi" in text


def test_log_entries_whatever_the_nesting() -> None:
    lines = [{"text": "a", "stream": "stdout"}, {"text": "b", "stream": "system"}]
    assert list(iter_log_entries({"run_id": "R", "lines": lines, "truncated": False})) == lines
    assert list(iter_log_entries([{"lines": lines}])) == lines
    assert list(iter_log_entries("x\ny")) == ["x", "y"]


def test_yaml_and_json_keep_the_api_document() -> None:
    run = a_run()
    assert yaml.safe_load(dump(run, OutputFormat.YAML)) == run
    assert dump(run, OutputFormat.JSON).startswith('{\n  "run_id"')
