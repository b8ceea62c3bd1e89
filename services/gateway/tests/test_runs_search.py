"""What the dashboard's run list needs from `GET /runs`: text search (`q`), oldest-first paging
with its own cursors, and the LLM calls of one run as the API shows them."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from ulid import ULID

from fabrik_common import optimizer_rpc as rpc
from fabrik_common.events import RunParameters
from fabrik_common.runs import TEMPLATES, RunRecord
from fabrik_gateway.api.analytics import RunLlmCalls
from fabrik_gateway.api.params import QueryErrors, encode_cursor
from fabrik_gateway.api.runs import _oldest_first_cursor, _page_cursor
from fabrik_gateway.optimizer import view
from fabrik_gateway.readmodel import ReadModel

T0 = datetime(2025, 1, 1, tzinfo=UTC)


def ulids(n: int) -> list[str]:
    return [str(ULID.from_datetime(T0 + timedelta(milliseconds=i))) for i in range(n)]


def record(run_id: str, project: str = "alpha", **extra: object) -> RunRecord:
    labels = extra.pop("labels", {})
    return RunRecord(
        run_id=run_id,
        project=project,
        env="dev",
        params=RunParameters(resources=TEMPLATES["default"], labels=labels),  # type: ignore[arg-type]
        state="queued",
        created_at=T0,
        state_entered_at=T0,
        **extra,  # type: ignore[arg-type]
    )


def pages(model: ReadModel, limit: int, **filters: object) -> list[list[str]]:
    out: list[list[str]] = []
    before = None
    while True:
        items, before = model.query(limit=limit, before=before, **filters)  # type: ignore[arg-type]
        out.append([r.run_id for r in items])
        if before is None:
            return out


def test_text_matches_ids_specs_requesters_messages_and_labels_case_insensitively() -> None:
    ids = ulids(6)
    model = ReadModel()
    model.load(
        [
            record(ids[0], spec_id="Checkout-Flow"),
            record(ids[1], requested_by="alice@example.com"),
            record(ids[2], message="OOM while linking"),
            record(ids[3], labels={"team": "payments"}),
            record(ids[4], project="search-infra"),
            record(ids[5]),
        ]
    )

    def found(text: str) -> list[str]:
        items, _ = model.query(text=text, limit=50)
        return [r.run_id for r in items]

    assert found("checkout") == [ids[0]]
    assert found("ALICE") == [ids[1]]
    assert found("oom") == [ids[2]]
    assert found("team=pay") == [ids[3]]
    assert found("search") == [ids[4]]
    assert found(ids[5][-8:].lower()) == [ids[5]]
    assert found("nothing like it") == []
    # Text combines with the other filters (AND).
    items, _ = model.query(text="alice", project="search-infra", limit=50)
    assert items == []


def test_oldest_first_pages_have_no_duplicates_or_gaps() -> None:
    ids = ulids(23)
    model = ReadModel()
    model.load(record(i, project="alpha" if n % 2 else "beta") for n, i in enumerate(ids))
    oldest = pages(model, 5, oldest_first=True)
    assert [i for page in oldest for i in page] == ids
    assert [len(p) for p in oldest] == [5, 5, 5, 5, 3]
    newest = pages(model, 5)
    assert [i for page in newest for i in page] == ids[::-1]
    # Several states merge in the right direction too.
    alpha = [i for n, i in enumerate(ids) if n % 2]
    assert [i for p in pages(model, 4, project="alpha", oldest_first=True) for i in p] == alpha


def test_cursors_carry_their_order() -> None:
    run_id = ulids(1)[0]
    errors = QueryErrors()
    assert _page_cursor(errors, _oldest_first_cursor(run_id), oldest_first=True) == run_id
    assert _page_cursor(errors, encode_cursor(run_id), oldest_first=False) == run_id
    assert errors.errors == []
    assert _page_cursor(errors, encode_cursor(run_id), oldest_first=True) is None
    assert _page_cursor(errors, _oldest_first_cursor(run_id), oldest_first=False) is None
    assert [f for f, _ in errors.errors] == ["cursor", "cursor"]


def test_a_text_search_over_100000_runs_stays_interactive() -> None:
    model = ReadModel()
    ids = ulids(100_000)
    model.load(record(i, project=f"p{n % 50}", spec_id=f"spec-{n % 300}") for n, i in enumerate(ids))
    started = time.perf_counter()
    items, _ = model.query(text="spec-17", limit=50)
    common = time.perf_counter() - started
    started = time.perf_counter()
    none, _ = model.query(text="no such text", limit=50)
    cold = time.perf_counter() - started  # the first full scan builds the search texts
    started = time.perf_counter()
    none, _ = model.query(text="still no such text", limit=50)
    scan = time.perf_counter() - started
    print(
        f"\ntext search, 100,000 runs: a page of a common match {common * 1000:.1f} ms; "
        f"no match (a full scan) {cold * 1000:.0f} ms the first time, then {scan * 1000:.0f} ms"
    )
    assert len(items) == 50 and none == []
    assert scan < 2.0  # generous for a loaded CI machine


def test_llm_calls_as_the_api_shows_them() -> None:
    run_id = ulids(1)[0]
    answer = rpc.RunLlmCallsResponse(
        run_id=run_id,
        calls=[
            rpc.LlmCall(
                call_id="c1",
                model="gpt-4o-mini",
                provider="openai",
                input_tokens=1000,
                output_tokens=20,
                cache_read_tokens=0,
                cache_write_tokens=0,
                cost_usd=Decimal(150) / 10**9,
                latency_ms=None,
                outcome="ok",
                occurred_at=T0,
            )
        ],
        total=3,
        cost_usd=Decimal("0E-9"),
    )
    shown = view(answer, RunLlmCalls)
    assert shown.calls[0].cost_usd == "0.00000015"
    assert shown.cost_usd == "0"
    assert shown.total == 3
    assert shown.calls[0].latency_ms is None


@pytest.mark.parametrize("bad", ["", "x" * 27, "01JH3Z9W4R8Q0M6Y2V5T7K1B3!"])
def test_the_contract_refuses_a_malformed_run_id(bad: str) -> None:
    decoded = rpc.decode_request(f'{{"run_id": "{bad}"}}'.encode(), rpc.RunLlmCallsRequest)
    assert isinstance(decoded, rpc.RpcError) and decoded.field == "run_id"
