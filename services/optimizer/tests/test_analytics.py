"""The analytics store, ingestion and queries, without NATS."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import msgspec
import psycopg
import pytest
from optimizer_events import T0, at, imported_run, run_lifecycle, usage
from optimizer_stores import Stores

from fabrik_common.events import RunStateChanged
from fabrik_common.ids import new_ulid
from fabrik_common.settings import SettingsError, load_settings
from fabrik_optimizer.analytics.ingest import IMPORTED_BACKEND, Costing, apply_llm_usage, apply_run_event
from fabrik_optimizer.analytics.queries import costs, duration_p95, percentile, success_rate, wilson_interval
from fabrik_optimizer.analytics.store import SCHEMA_VERSION, AnalyticsStore, PostgresLocation, iso
from fabrik_optimizer.prices import PriceBook
from fabrik_optimizer.settings import OptimizerSettings

GPT = (2.50, 10.00, 1.25, 3.75)  # USD per million: input, output, cache read, cache write
CLAUDE = (3.00, 15.00, 0.30, 3.75)


@pytest.fixture
def store(stores: Stores) -> AnalyticsStore:
    """A store on each backend (SQLite file, PostgreSQL schema): the same assertions on both."""
    return stores.open()


def ingest(store: AnalyticsStore, events: list[Any], costing: Costing | None = None) -> None:
    for event in events:
        if hasattr(event, "call_id"):
            apply_llm_usage(store, event)
        else:
            apply_run_event(store, event, costing)


def test_run_row_has_everything_the_events_say(store: AnalyticsStore) -> None:
    rid = new_ulid()
    ingest(store, run_lifecycle(rid, outcome="failed", queue_s=5, run_s=60, peak=123))
    row = store.get_run(rid)
    assert row is not None
    assert row["project"] == "demo" and row["env"] == "dev" and row["spec_id"] == "spec-a"
    assert row["template"] == "default" and row["cpu_request"] == "500m" and row["memory_request"] == "1Gi"
    assert row["priority"] == "normal" and row["attempts"] == 1 and row["experiment_arm"] == "b"
    assert row["state"] == "failed" and row["reason"] == "exit 1"
    assert row["queue_seconds"] == 5.0 and row["run_seconds"] == 60.0
    assert row["peak_memory_bytes"] == 123
    assert row["created_at"] == "2026-03-01T12:00:00.000000+00:00"


def test_ingestion_is_idempotent(store: AnalyticsStore, tmp_path: Path) -> None:
    events: list[Any] = []
    for i in range(3):
        rid = new_ulid()
        events += run_lifecycle(rid, outcome="succeeded" if i else "timed_out", start=i * 100)
        events.append(usage(model="gpt-4o", tokens=(100, 50, 10, 5), prices=GPT, run_id=rid))
    ingest(store, events)
    once = (store.runs(), store.llm_calls())
    ingest(store, events)  # every event redelivered
    assert (store.runs(), store.llm_calls()) == once
    assert len(once[0]) == 3 and len(once[1]) == 3

    # Redelivered out of order (each event again, last first) still changes nothing.
    ingest(store, list(reversed(events)))
    assert (store.runs(), store.llm_calls()) == once


def test_stale_state_change_does_not_overwrite_a_newer_one(store: AnalyticsStore) -> None:
    rid = new_ulid()
    events = run_lifecycle(rid)
    ingest(store, events)
    ingest(store, [events[2]])  # revision 2 (starting) again after revision 4 (succeeded)
    row = store.get_run(rid)
    assert row is not None and row["state"] == "succeeded" and row["state_revision"] == 4


def test_resume_moves_the_row_to_the_new_attempt(store: AnalyticsStore) -> None:
    rid = new_ulid()
    ingest(store, run_lifecycle(rid, outcome="failed"))
    ingest(
        store,
        [
            RunStateChanged(
                run_id=rid,
                project="demo",
                attempt=2,
                from_state="failed",
                to_state="queued",
                revision=5,
                occurred_at=at(1000),
            )
        ],
    )
    row = store.get_run(rid)
    assert row is not None
    assert row["attempts"] == 2 and row["state"] == "queued"
    assert row["queued_at"] == "2026-03-01T12:16:40.000000+00:00"
    assert row["started_at"] is None and row["run_seconds"] is None


def test_costs_add_up_exactly_including_cache_tokens(store: AnalyticsStore) -> None:
    r1, r2 = new_ulid(), new_ulid()
    ingest(store, run_lifecycle(r1, project="alpha", spec_id="spec-a"))
    ingest(store, run_lifecycle(r2, project="beta", spec_id="spec-b"))
    day2 = T0 + timedelta(days=1)
    calls = [
        # 1000 * 2.50 + 500 * 10 + 2000 * 1.25 + 0 = 10,000 µ$ → $0.0100
        usage(model="gpt-4o", tokens=(1000, 500, 2000, 0), prices=GPT, run_id=r1, project="alpha"),
        # 3000 * 2.50 + 1000 * 10 + 0 + 400 * 3.75 = 19,000 µ$ → $0.0190
        usage(model="gpt-4o", tokens=(3000, 1000, 0, 400), prices=GPT, run_id=r2, project="beta", when=day2),
        # 200 * 3 + 100 * 15 + 10000 * 0.30 + 0 = 5,100 µ$ → $0.0051
        usage(model="claude", tokens=(200, 100, 10000, 0), prices=CLAUDE, run_id=r1, project="alpha"),
        # 0.1 + 0.2 would not add up in floats: 100000 * 1 and 200000 * 1 µ$
        usage(model="cheap", tokens=(100000, 0, 0, 0), prices=(1, 0, 0, 0), run_id=r2, project="beta"),
        usage(model="cheap", tokens=(200000, 0, 0, 0), prices=(1, 0, 0, 0), run_id=r2, project="beta"),
    ]
    ingest(store, calls)

    total = sum((r["llm_cost_usd"] for r in costs(store, "model")), Decimal(0))
    assert total == Decimal("0.0100") + Decimal("0.0190") + Decimal("0.0051") + Decimal("0.3")

    by_model = {r["model"]: r for r in costs(store, "model")}
    assert by_model["gpt-4o"]["llm_cost_usd"] == Decimal("0.029")
    assert by_model["gpt-4o"]["cache_read_tokens"] == 2000
    assert by_model["gpt-4o"]["cache_write_tokens"] == 400
    assert by_model["gpt-4o"]["tokens"] == 1000 + 500 + 2000 + 3000 + 1000 + 400
    assert by_model["gpt-4o"]["runs"] == 2 and by_model["gpt-4o"]["calls"] == 2
    assert by_model["cheap"]["llm_cost_usd"] == Decimal("0.3")

    by_project = {r["project"]: r for r in costs(store, "project")}
    assert by_project["alpha"]["llm_cost_usd"] == Decimal("0.0151") and by_project["alpha"]["runs"] == 1
    assert by_project["beta"]["llm_cost_usd"] == Decimal("0.319")

    by_spec = {r["spec"]: r["llm_cost_usd"] for r in costs(store, "spec")}
    assert by_spec == {"spec-a": Decimal("0.0151"), "spec-b": Decimal("0.319")}

    by_day = {r["day"]: r["llm_cost_usd"] for r in costs(store, "day")}
    assert by_day == {"2026-03-01": Decimal("0.3151"), "2026-03-02": Decimal("0.019")}

    # [from, to): only the first day.
    first = costs(store, "project", T0, T0 + timedelta(days=1))
    assert sum((r["llm_cost_usd"] for r in first), Decimal(0)) == Decimal("0.3151")

    with pytest.raises(ValueError, match="group_by"):
        costs(store, "bogus")  # type: ignore[arg-type]


def test_an_imported_run_is_folded_with_its_project_spec_outcome_and_times(
    store: AnalyticsStore, tmp_path: Path
) -> None:
    # Costing on, with a priced node: an imported run still costs nothing here.
    price_file = tmp_path / "prices.json"
    price_file.write_text(
        '{"nodes": {"n4": {"cores": 4, "memory_gib": 8,'
        ' "prices": [{"valid_from": "2026-01-01", "hourly": 0.1}]}},'
        ' "storage": [{"valid_from": "2026-01-01", "per_gb_month": 0.05}]}'
    )
    costing = Costing(prices=PriceBook.load(price_file), node_type="n4")
    rid = new_ulid()
    events = imported_run(rid, outcome="failed", start=600)
    ingest(store, events, costing)
    row = store.get_run(rid)
    assert row is not None
    assert (row["project"], row["env"], row["spec_id"]) == ("legacy", "prod", "nightly-refactor")
    assert (row["state"], row["reason"], row["attempts"], row["state_revision"]) == (
        "failed",
        "workload_error",
        2,
        1,
    )
    assert row["created_at"] == row["queued_at"] == iso(at(600))
    assert (row["started_at"], row["finished_at"]) == (iso(at(630)), iso(at(930)))
    assert (row["queue_seconds"], row["run_seconds"], row["finished_day"]) == (30.0, 300.0, "2026-03-01")
    assert row["backend"] == IMPORTED_BACKEND
    assert (row["compute_cost_nanos"], row["storage_cost_nanos"], row["node_type"]) == (None, None, None)

    # In the insights like any run of its spec and project.
    ingest(store, imported_run(spec_id="nightly-refactor", outcome="succeeded", start=2000), costing)
    [rate] = success_rate(store, "spec", min_runs=1)
    assert (rate["spec"], rate["runs"], rate["successes"]) == ("nightly-refactor", 2, 1)
    [p95] = duration_p95(store, "project", min_runs=1)
    assert (p95["project"], p95["runs"], p95["run_seconds_p95"], p95["queue_seconds_p95"]) == (
        "legacy",
        2,
        300.0,
        30.0,
    )

    # Idempotent and order-tolerant: again, and the announcement before the document.
    once = store.runs()
    ingest(store, events, costing)
    ingest(store, list(reversed(events)), costing)
    assert store.runs() == once
    fresh = new_ulid()
    ingest(store, list(reversed(imported_run(fresh, start=600))), costing)
    assert {k: v for k, v in (store.get_run(fresh) or {}).items() if k != "run_id"} == {
        k: v for k, v in row.items() if k != "run_id"
    }


def test_an_import_never_overwrites_a_run_fabrik_recorded(store: AnalyticsStore) -> None:
    """As the scheduler's KV create: a run of the same id stays as its own events made it."""
    rid = new_ulid()
    ingest(store, run_lifecycle(rid, outcome="succeeded"))
    before = store.get_run(rid)
    document, _announcement = imported_run(rid, outcome="failed")
    assert not apply_run_event(store, document)
    assert store.get_run(rid) == before

    # An event whose document names another project or run is ignored, as the scheduler does.
    other = new_ulid()
    document, _announcement = imported_run(other)
    assert not apply_run_event(store, msgspec.structs.replace(document, project="elsewhere"))
    assert store.get_run(other) is None


def test_wilson_interval_against_hand_computed_values() -> None:
    # p̂ = 0.9, n = 20, z = 1.96: centre (0.9 + 0.09604) / 1.19208 = 0.83555,
    # half 1.96 / 1.19208 * √(0.0045 + 0.0024010) = 0.13658 → (0.6990, 0.9721)
    low, high = wilson_interval(18, 20)
    assert low == pytest.approx(0.6990, abs=5e-5) and high == pytest.approx(0.9721, abs=5e-5)
    low, high = wilson_interval(10, 20)
    assert low == pytest.approx(0.2993, abs=5e-5) and high == pytest.approx(0.7007, abs=5e-5)
    low, high = wilson_interval(0, 20)  # z² / (n + z²) = 3.8415 / 23.8415
    assert low == 0.0 and high == pytest.approx(0.1611, abs=5e-5)


def test_success_rate_with_interval_and_minimum_sample(store: AnalyticsStore) -> None:
    for i in range(20):  # spec-a: 18 of 20 succeed, every run calls gpt-4o
        rid = new_ulid()
        ingest(store, run_lifecycle(rid, spec_id="spec-a", outcome="succeeded" if i < 18 else "failed"))
        ingest(store, [usage(model="gpt-4o", tokens=(1, 1, 0, 0), prices=GPT, run_id=rid)])
    for _ in range(19):  # spec-b: below the minimum sample
        ingest(store, run_lifecycle(spec_id="spec-b", outcome="succeeded"))
    ingest(store, run_lifecycle(spec_id="spec-a", outcome="cancelled"))  # not a decided outcome

    rows = success_rate(store, "spec")
    assert [r["spec"] for r in rows] == ["spec-a"]
    assert rows[0]["runs"] == 20 and rows[0]["successes"] == 18 and rows[0]["success_rate"] == 0.9
    assert rows[0]["ci95_low"] == pytest.approx(0.6990, abs=5e-5)
    assert rows[0]["ci95_high"] == pytest.approx(0.9721, abs=5e-5)

    assert [(r["model"], r["runs"]) for r in success_rate(store, "model")] == [("gpt-4o", 20)]
    assert [(r["project"], r["runs"]) for r in success_rate(store, "project")] == [("demo", 39)]
    assert len(success_rate(store, "spec", min_runs=1)) == 2


def test_duration_p95_nearest_rank(store: AnalyticsStore) -> None:
    for i in range(1, 21):  # run seconds 10..200, queue seconds 1..20
        ingest(store, run_lifecycle(spec_id="spec-a", run_s=i * 10, queue_s=i, start=i * 1000))
    rows = duration_p95(store, "spec")
    # nearest rank: ceil(0.95 * 20) = 19th of 20
    assert rows == [
        {"spec": "spec-a", "runs": 20, "run_seconds_p95": 190.0, "queue_runs": 20, "queue_seconds_p95": 19.0}
    ]
    assert duration_p95(store, "spec", min_runs=21) == []
    assert percentile([5.0], 0.95) == 5.0


def test_analytics_db_setting(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("FABRIK_HOME", raising=False)
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    assert OptimizerSettings(data_dir=str(tmp_path)).analytics_db_path() == (
        tmp_path / "optimizer" / "analytics.db"
    )
    assert OptimizerSettings(analytics_db=str(tmp_path / "a.db")).analytics_db_path() == tmp_path / "a.db"
    monkeypatch.setenv("HOME", str(tmp_path))
    assert OptimizerSettings().analytics_db_path() == (
        tmp_path / ".local" / "share" / "fabrik" / "optimizer" / "analytics.db"
    )


def test_a_store_of_another_schema_version_is_emptied_and_flagged(stores: Stores) -> None:
    store = stores.open()
    ingest(store, run_lifecycle(new_ulid()))
    store.close()
    again = stores.open()
    assert not again.reset and len(again.runs()) == 1  # same version: kept
    with again.transaction() as conn:
        conn.execute(again.sql("UPDATE analytics_meta SET value = ? WHERE name = 'schema_version'"), ["3"])
    again.close()
    older = stores.open()
    assert older.reset and older.runs() == [] and older.llm_calls() == []
    assert older.query("SELECT value FROM analytics_meta") == [{"value": SCHEMA_VERSION}]
    ingest(older, run_lifecycle(new_ulid()))  # and it works as a fresh store
    assert len(older.runs()) == 1


def test_text_sorts_byte_wise_on_both_backends(store: AnalyticsStore) -> None:
    """Group keys and ISO timestamps compare as bytes (PostgreSQL's columns are COLLATE "C")."""
    for spec in ("spec_b", "Spec-c", "spec-a", "spec.d"):
        ingest(store, run_lifecycle(spec_id=spec))
    found = [r["spec_id"] for r in store.query("SELECT spec_id FROM runs ORDER BY spec_id")]
    assert found == sorted(found) == ["Spec-c", "spec-a", "spec.d", "spec_b"]


def test_database_url_settings(tmp_path: Path) -> None:
    url = "postgresql://fabrik@db.example:5432/analytics?sslmode=require"
    found = OptimizerSettings(analytics_database_url=url).analytics_postgres()
    assert found == PostgresLocation(url, None)
    assert OptimizerSettings().analytics_postgres() is None
    assert OptimizerSettings(analytics_database_url="postgres://u:p@h/db").analytics_postgres() is not None
    socket = "postgresql://postgres:@/db?host=/run/postgresql"
    assert OptimizerSettings(analytics_database_url=socket).analytics_postgres() == PostgresLocation(socket)

    secret = tmp_path / "password"
    secret.write_text("s3cret\n")
    env = {
        "FABRIK_ANALYTICS_DATABASE_URL": "postgresql://fabrik@db:5432/analytics",
        "FABRIK_ANALYTICS_DATABASE_PASSWORD_FILE": str(secret),
    }
    location = load_settings(OptimizerSettings, env).analytics_postgres()
    assert location is not None and location.password == "s3cret"

    for bad, rule in [
        ("mysql://u:hidden@h/db", "must start with postgresql://"),
        ("postgresql://u:hidden@h:99999/db", "not a valid URL"),
        ("postgresql://u:hidden@/db", "has no host"),
        ("postgresql://u:hidden@h", "has no database name"),
        ("postgresql://u:hidden@h/a/b", "more than one path segment"),
        ("db.example:5432", "must start with postgresql://"),
    ]:
        with pytest.raises(SettingsError) as caught:
            load_settings(OptimizerSettings, {"FABRIK_ANALYTICS_DATABASE_URL": bad})
        message = str(caught.value)
        assert "FABRIK_ANALYTICS_DATABASE_URL" in message and rule in message, message
        assert "hidden" not in message  # the password is never echoed
    with pytest.raises(SettingsError, match="not both"):
        load_settings(
            OptimizerSettings,
            {**env, "FABRIK_ANALYTICS_DATABASE_URL": "postgresql://u:p@db/analytics"},
        )
    with pytest.raises(SettingsError, match=r"FABRIK_ANALYTICS_DATABASE_PASSWORD_FILE=.*cannot be read"):
        load_settings(
            OptimizerSettings, {**env, "FABRIK_ANALYTICS_DATABASE_PASSWORD_FILE": str(tmp_path / "no")}
        )
    with pytest.raises(SettingsError, match="FABRIK_ANALYTICS_DATABASE_URL is not"):
        load_settings(OptimizerSettings, {"FABRIK_ANALYTICS_DATABASE_PASSWORD_FILE": str(secret)})


def test_the_password_file_is_used_to_connect(postgres_url: str, tmp_path: Path) -> None:
    """A password from the file reaches the server (a wrong one is refused by a server that asks)."""
    admin = psycopg.connect(postgres_url, autocommit=True)
    try:
        admin.execute("CREATE ROLE analytics_writer LOGIN PASSWORD 'right-one'")
    finally:
        admin.close()
    location = OptimizerSettings(analytics_database_url=postgres_url).analytics_postgres()
    assert location is not None
    # The test server trusts local connections: what is checked here is that the setting's
    # password is handed to the driver with the URL's other parameters.
    secret = tmp_path / "pw"
    secret.write_text("right-one")
    with_file = OptimizerSettings(
        analytics_database_url=postgres_url.replace("postgres:@", "analytics_writer@"),
        analytics_database_password_file=str(secret),
    ).analytics_postgres()
    assert with_file is not None and with_file.password == "right-one"
    conn = with_file.connect()
    try:
        assert conn.info.password == "right-one" and conn.info.user == "analytics_writer"
    finally:
        conn.close()
