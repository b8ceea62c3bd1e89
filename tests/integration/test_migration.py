"""Migration over a real platform: Smithers databases and portable NDJSON through `fabrik import`
and `fabrik export`, with a real NATS server, gateway and scheduler (docs/migration.md).

Two platforms: the Smithers database is imported into the first (twice: nothing new the second
time), its project is exported, imported into the second, exported again, and the two exports
must be equal.
"""

from __future__ import annotations

import asyncio
import importlib.util
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import msgspec
import nats
import pytest
from click.testing import CliRunner

from fabrik_cli.main import cli
from fabrik_common.bus import MSG_ID
from fabrik_common.codec import encode
from fabrik_common.events import RunImported
from fabrik_common.portable import PortableRun, decode_ndjson

ROOT = Path(__file__).resolve().parents[2]
PROJECT = "legacy"


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)
    spec.loader.exec_module(module)
    return module


support = _load("fabrik_test_platform", Path(__file__).parent / "support" / "platform_stack.py")
smithers_db = _load("fabrik_test_smithers_db", ROOT / "cli" / "tests" / "smithers_db.py")
T0: int = smithers_db.T0


@dataclass
class Outcome:
    returncode: int
    stdout: str
    stderr: str


def fabrik(api: str, home: Path, *args: str) -> Outcome:
    """The `fabrik` command, run in this process (its start-up costs seconds on a loaded machine)
    against the gateway over HTTP, as an operator's shell would run it."""
    home.mkdir(parents=True, exist_ok=True)
    result = CliRunner().invoke(
        cli, list(args), env={"FABRIK_API_URL": api, "FABRIK_HOME": str(home)}, catch_exceptions=False
    )
    return Outcome(result.exit_code, result.stdout, result.stderr)


def list_runs(api: str) -> list[dict[str, Any]]:
    answer = httpx.get(f"{api}/api/v1/runs", params={"project": PROJECT, "limit": 100}, timeout=10)
    answer.raise_for_status()
    items: list[dict[str, Any]] = answer.json()["items"]
    return items


def wait_for_runs(api: str, count: int, timeout: float = 20) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        runs = [r for r in list_runs(api) if r["recorded"]]
        if len(runs) >= count or time.monotonic() > deadline:
            return runs
        time.sleep(0.2)


def run_events(api: str, run_id: str) -> list[dict[str, Any]]:
    answer = httpx.get(f"{api}/api/v1/runs/{run_id}/events", timeout=10)
    answer.raise_for_status()
    items: list[dict[str, Any]] = answer.json()["items"]
    return items


def _ms(value: str | None) -> int | None:
    return None if value is None else int(datetime.fromisoformat(value).timestamp() * 1000)


@pytest.fixture(scope="module")
def platforms(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Any]]:
    root = tmp_path_factory.mktemp("migration")
    # Both platforms start at once: their start-up is most of this module's wall time.
    with ThreadPoolExecutor(2) as pool:
        starts = [
            pool.submit(support.start_platform, root / key, ("gateway", "scheduler"), anonymous_role="admin")
            for key in ("a", "b")
        ]
        wait(starts)
    failures = [error for f in starts if (error := f.exception()) is not None]
    if failures:
        for started in starts:
            if started.exception() is None:
                started.result().stop()
        raise failures[0]
    first, second = (f.result() for f in starts)
    try:
        yield first, second
    except BaseException:
        print(first.logs(), second.logs())
        raise
    finally:
        first.stop()
        second.stop()


@pytest.fixture(scope="module")
def database(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("smithers")
    return smithers_db.build_with_wal(  # type: ignore[no-any-return]
        directory,
        "smithers.db",
        [
            smithers_db.run_rows("run-ok", "finished", T0),
            smithers_db.run_rows(
                "run-failed", "failed", T0 + 100_000, workflow="fix", error={"message": "boom"}
            ),
            smithers_db.run_rows("run-bad", "finished", T0 + 150_000, bad_event=True),
        ],
        [smithers_db.run_rows("run-cancelled", "cancelled", T0 + 200_000)],
    )


async def _republish(nats_url: str, event: RunImported) -> None:
    """The same import under another message id: past the stream's duplicate window."""
    connection = await nats.connect(nats_url)
    try:
        js = connection.jetstream()
        await js.publish(event.subject(), encode(event), headers={MSG_ID: "later-import"})
        deadline = time.monotonic() + 15
        while True:
            info = await js.consumer_info("RUNS", "scheduler-imports")
            if info.num_pending == 0 and info.num_ack_pending == 0:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"the scheduler did not handle the repeated import: {info}")
            await asyncio.sleep(0.1)
    finally:
        await connection.close()


def test_smithers_import_twice_then_export_and_import_elsewhere(
    platforms: tuple[Any, Any], database: Path, tmp_path: Path
) -> None:
    first, second = platforms
    api_a, api_b = first.gateway_url, second.gateway_url

    # First import: three runs (one from the WAL), one run with malformed JSON reported.
    result = fabrik(api_a, tmp_path / "home", "import", "smithers", str(database), "--project", PROJECT)
    assert result.returncode == 1, result.stderr
    assert "run run-bad" in result.stderr and "payload_json" in result.stderr
    assert "3 run(s) imported (3 sent for the first time, 0 sent before)" in result.stderr
    runs = wait_for_runs(api_a, 3)
    by_spec = {(r["spec_id"], r["state"]): r for r in runs}
    assert set(by_spec) == {("review", "succeeded"), ("fix", "failed"), ("review", "cancelled")}
    ok = by_spec[("review", "succeeded")]
    assert (_ms(ok["created_at"]), _ms(ok["started_at"]), _ms(ok["finished_at"])) == (
        T0,
        T0 + 1_000,
        T0 + 61_000,
    )
    assert ok["labels"] == {"imported-from": "smithers"}
    failed = by_spec[("fix", "failed")]
    assert (failed["reason"], failed["message"]) == ("workload_error", "boom")
    assert [r["run_id"] for r in runs] == sorted((r["run_id"] for r in runs), reverse=True)

    events = run_events(api_a, ok["run_id"])
    assert [e["type"] for e in events] == ["run.imported", "run.state_changed"]
    document = events[0]["event"]["run"]
    assert [e["type"] for e in document["events"]] == ["RunStarted", "NodeFinished", "RunFinished"]
    assert [(t["id"], t["iteration"], len(t["attempts"])) for t in document["tasks"]] == [
        ("impl", 0, 2),
        ("impl", 1, 1),
        ("plan", 0, 1),
    ]
    assert events[1]["event"]["to_state"] == "succeeded"
    assert _ms(events[1]["event"]["occurred_at"]) == T0 + 61_000

    # Second import: the stream drops the repeats, nothing new is recorded.
    again = fabrik(api_a, tmp_path / "home", "import", "smithers", str(database), "--project", PROJECT)
    assert again.returncode == 1, again.stderr
    assert "3 run(s) imported (0 sent for the first time, 3 sent before)" in again.stderr
    # Past the duplicate window the scheduler's create-if-absent keeps it at one record.
    repeated = RunImported(
        run_id=ok["run_id"],
        project=PROJECT,
        # A different outcome: were the record written again, the listing would show it.
        run=msgspec.structs.replace(
            msgspec.convert(document, PortableRun), state="cancelled", message="imported again"
        ),
        imported_by="test",
    )
    asyncio.run(_republish(first.nats.url, repeated))
    time.sleep(0.5)
    after = wait_for_runs(api_a, 3)
    assert sorted(r["run_id"] for r in after) == sorted(r["run_id"] for r in runs)
    assert {r["run_id"]: (r["state"], r["finished_at"]) for r in after} == {
        r["run_id"]: (r["state"], r["finished_at"]) for r in runs
    }
    types = [e["type"] for e in run_events(api_a, ok["run_id"])]
    assert types == ["run.imported", "run.state_changed", "run.imported"]

    # Export from the first platform, import into the second, export again: equal documents.
    exported = tmp_path / "a.ndjson"
    result = fabrik(api_a, tmp_path / "home", "export", "--project", PROJECT, "--file", str(exported))
    assert result.returncode == 0, result.stderr
    documents = decode_ndjson(exported.read_bytes())
    assert len(documents) == 3 and {d.origin.system for d in documents} == {"smithers"}
    result = fabrik(api_b, tmp_path / "home", "import", str(exported))
    assert result.returncode == 0, result.stderr
    assert len(wait_for_runs(api_b, 3)) == 3
    result = fabrik(api_b, tmp_path / "home", "export", "--project", PROJECT)
    assert result.returncode == 0, result.stderr
    assert decode_ndjson(result.stdout.encode()) == documents
    assert result.stdout.encode() == exported.read_bytes()

    # Time window of the export: only the runs created in it.
    since = datetime.fromtimestamp((T0 + 50_000) / 1000, tz=UTC).isoformat()
    result = fabrik(api_b, tmp_path / "home", "export", "--project", PROJECT, "--from", since)
    assert result.returncode == 0, result.stderr
    assert len(decode_ndjson(result.stdout.encode())) == 2


def test_import_endpoint_names_bad_lines(platforms: tuple[Any, Any]) -> None:
    first, _ = platforms
    body = b'{"run_id": "x"}\n\n{not json\n'
    answer = httpx.post(
        f"{first.gateway_url}/api/v1/imports/runs",
        content=body,
        headers={"Content-Type": "application/x-ndjson"},
        timeout=10,
    )
    assert answer.status_code == 422, answer.text
    fields = [e["field"] for e in answer.json()["errors"]]
    assert fields[0].startswith("line 1: ") and fields[1] == "line 3: $"
