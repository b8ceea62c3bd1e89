"""Reading Smithers databases into portable run documents, and the NDJSON round trip."""

from __future__ import annotations

import hashlib
import importlib.util
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType

import msgspec
import pytest
from click.testing import CliRunner

from fabrik_cli.commands.migrate import batches, document_of
from fabrik_cli.main import cli
from fabrik_cli.migrate.smithers import (
    INCOMPLETE_REASON,
    SmithersError,
    map_status,
    read_database,
    run_id_for,
)
from fabrik_common.ids import derived_ulid, ulid_time
from fabrik_common.portable import (
    LineError,
    PortableOrigin,
    PortableRun,
    decode_line,
    decode_ndjson,
    encode_ndjson,
)


def _load_builder() -> ModuleType:
    spec = importlib.util.spec_from_file_location("smithers_db", Path(__file__).with_name("smithers_db.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


db = _load_builder()
T0: int = db.T0


def _ms(value: datetime | None) -> int | None:
    return None if value is None else int(value.timestamp() * 1000)


@pytest.fixture
def database(tmp_path: Path) -> Path:
    return db.build(  # type: ignore[no-any-return]
        tmp_path / "smithers.db",
        [
            db.run_rows("run-ok", "finished", T0),
            db.run_rows("run-failed", "failed", T0 + 100_000, workflow="fix", error={"message": "boom"}),
            db.run_rows("run-running", "running", T0 + 200_000),
            db.run_rows("run-bad", "finished", T0 + 300_000, bad_event=True),
        ],
    )


def test_reads_runs_tasks_attempts_and_events(database: Path) -> None:
    result = read_database(database, project="legacy", env="dev")
    by_source = {run.origin.source_run_id: run for run in result.runs}
    assert set(by_source) == {"run-ok", "run-failed", "run-running"}
    assert len(result.errors) == 1
    assert "run run-bad" in result.errors[0] and "payload_json (seq 3)" in result.errors[0]

    ok = by_source["run-ok"]
    assert ok.project == "legacy" and ok.env == "dev"
    assert ok.state == "succeeded" and ok.reason is None
    assert ok.spec == "review" and ok.spec_path == "workflows/review.tsx"
    assert (_ms(ok.requested_at), _ms(ok.started_at), _ms(ok.finished_at)) == (T0, T0 + 1_000, T0 + 61_000)
    assert ok.origin.system == "smithers"
    assert ok.labels == {"imported-from": "smithers"}
    assert [(t.id, t.iteration, t.state) for t in ok.tasks] == [
        ("impl", 0, "failed"),
        ("impl", 1, "finished"),
        ("plan", 0, "finished"),
    ]
    impl0 = ok.tasks[0]
    assert [(a.attempt, a.state, a.error) for a in impl0.attempts] == [
        (1, "failed", {"message": "tests failed"}),
        (2, "failed", {"message": "lint"}),
    ]
    assert _ms(impl0.attempts[1].started_at) == T0 + 20_000
    assert [(e.seq, e.type) for e in ok.events] == [
        (1, "RunStarted"),
        (2, "NodeFinished"),
        (3, "RunFinished"),
    ]
    assert ok.events[2].payload == {"status": "finished"}
    assert _ms(ok.events[1].time) == T0 + 10_000

    failed = by_source["run-failed"]
    assert (failed.state, failed.reason, failed.message) == ("failed", "workload_error", "boom")

    running = by_source["run-running"]
    assert (running.state, running.reason) == ("failed", INCOMPLETE_REASON)
    assert "running" in running.message
    assert any("run-running" in w for w in result.warnings)


def test_run_ids_are_stable_and_ordered_by_creation(database: Path) -> None:
    first = read_database(database, project="legacy").runs
    second = read_database(database, project="legacy").runs
    assert [r.run_id for r in first] == [r.run_id for r in second]
    ok = next(r for r in first if r.origin.source_run_id == "run-ok")
    assert ok.run_id == run_id_for("run-ok", T0)
    assert ok.run_id[10:] == derived_ulid("smithers:run-ok")[10:]
    assert ulid_time(ok.run_id) == datetime.fromtimestamp(T0 / 1000, tz=UTC)
    ids = [r.run_id for r in sorted(first, key=lambda r: r.requested_at)]
    assert ids == sorted(ids)


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        ("finished", ("succeeded", None)),
        ("FAILED", ("failed", "workload_error")),
        ("cancelled", ("cancelled", "cancelled")),
        ("timed_out", ("timed_out", "timeout")),
        ("waiting-approval", ("failed", INCOMPLETE_REASON)),
        (None, ("failed", INCOMPLETE_REASON)),
    ],
)
def test_status_mapping(status: str | None, expected: tuple[str, str | None]) -> None:
    assert map_status(status) == expected


def test_reads_rows_that_are_only_in_the_wal(tmp_path: Path) -> None:
    path = db.build_with_wal(
        tmp_path,
        "smithers.db",
        [db.run_rows("old", "finished", T0)],
        [db.run_rows("new", "failed", T0 + 5_000)],
    )
    assert path.with_name("smithers.db-wal").stat().st_size > 0
    # The main file alone does not have the newest run: only the WAL does.
    scratch = tmp_path / "main-only.db"
    scratch.write_bytes(path.read_bytes())
    connection = sqlite3.connect(scratch)
    try:
        assert [r[0] for r in connection.execute("SELECT run_id FROM _smithers_runs")] == ["old"]
    finally:
        connection.close()

    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in tmp_path.glob("smithers.db*")}
    result = read_database(path, project="legacy")
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in tmp_path.glob("smithers.db*")}
    assert result.errors == []
    assert sorted(r.origin.source_run_id for r in result.runs) == ["new", "old"]
    new = next(r for r in result.runs if r.origin.source_run_id == "new")
    assert new.state == "failed" and len(new.tasks) == 3 and len(new.events) == 3
    assert after == before, "reading must not change the database or its WAL"


def test_not_a_smithers_database(tmp_path: Path) -> None:
    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).close()
    with pytest.raises(SmithersError, match="not a readable Smithers database"):
        read_database(empty, project="legacy")
    with pytest.raises(SmithersError, match="no such file"):
        read_database(tmp_path / "missing.db", project="legacy")
    with pytest.raises(ValueError, match="DNS-1123"):
        read_database(empty, project="Legacy_Project")


def test_ndjson_round_trip(database: Path) -> None:
    runs = read_database(database, project="legacy").runs
    data = encode_ndjson(runs)
    assert data.count(b"\n") == len(runs)
    assert decode_ndjson(data) == runs
    assert encode_ndjson(decode_ndjson(data)) == data


def test_invalid_lines_name_line_and_field(database: Path) -> None:
    run = read_database(database, project="legacy").runs[0]
    raw = msgspec.to_builtins(run)
    raw["project"] = "Not A Label"
    with pytest.raises(LineError) as info:
        decode_line(msgspec.json.encode(raw), 7)
    assert info.value.line == 7 and info.value.field == "project"
    raw = msgspec.to_builtins(run)
    raw["tasks"][1]["attempts"][0]["attempt"] = "one"
    with pytest.raises(LineError) as info:
        decode_line(msgspec.json.encode(raw), 2)
    assert info.value.field == "tasks[1].attempts[0].attempt"
    raw = msgspec.to_builtins(run)
    raw["finished_at"] = "2000-01-01T00:00:00Z"
    with pytest.raises(LineError, match="line 3: finished_at"):
        decode_line(msgspec.json.encode(raw), 3)
    with pytest.raises(LineError, match="line 4: \\$: not JSON"):
        decode_line(b"{", 4)
    assert isinstance(decode_line(msgspec.json.encode(msgspec.to_builtins(run)), 1), PortableRun)


def test_cli_writes_documents_and_reports_bad_runs(database: Path, tmp_path: Path) -> None:
    out = tmp_path / "runs.ndjson"
    result = CliRunner().invoke(
        cli, ["import", "smithers", str(database), "--project", "legacy", "--write", str(out)]
    )
    assert result.exit_code == 1, result.output
    assert "run run-bad" in result.stderr
    assert "3 run(s) written" in result.stderr
    assert len(decode_ndjson(out.read_bytes())) == 3

    bad = CliRunner().invoke(cli, ["import", "smithers", str(database), "--project", "Bad", "--write", "-"])
    assert bad.exit_code == 2 and "DNS-1123" in bad.stderr


def test_batches_stay_within_the_limit() -> None:
    lines = [b"a" * 40 + b"\n", b"b" * 70 + b"\n", b"c" * 20 + b"\n", b"d" * 10 + b"\n"]
    groups = list(batches(lines, 100))
    assert groups == [[lines[0]], [lines[1], lines[2]], [lines[3]]]
    assert all(sum(map(len, group)) <= 100 for group in groups)


def test_export_document_of_a_fabrik_run() -> None:
    view = {
        "run_id": "01JDXKZ0000000000000000001",
        "project": "web",
        "env": "dev",
        "spec_id": "fix-tests",
        "labels": {"team": "core"},
        "created_at": "2026-01-02T03:04:05Z",
        "started_at": "2026-01-02T03:04:10Z",
        "finished_at": "2026-01-02T03:10:00Z",
        "state": "timed_out",
        "reason": "deadline",
        "message": "",
    }
    events = [
        {
            "seq": 12,
            "subject": "fabrik.runs.requested.01JDXKZ0000000000000000001",
            "type": "run.requested",
            "event": {"type": "run.requested", "occurred_at": "2026-01-02T03:04:05Z", "project": "web"},
        }
    ]
    document = document_of(view, events)
    assert document.origin == PortableOrigin(system="fabrik", source_run_id=view["run_id"])
    assert (document.state, document.reason, document.spec, document.labels) == (
        "timed_out",
        "deadline",
        "fix-tests",
        {"team": "core"},
    )
    assert [(e.seq, e.type, e.payload["project"]) for e in document.events] == [(12, "run.requested", "web")]
    assert decode_ndjson(encode_ndjson([document])) == [document]
    # An imported run is exported as it was imported, whatever its record says.
    imported = {"seq": 3, "type": "run.imported", "event": {"run": msgspec.to_builtins(document)}}
    assert document_of({**view, "state": "failed"}, [imported, *events]) == document
