"""The LLM calls of one run, as the optimizer answers `fabrik.rpc.optimizer.run_llm_calls`."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from optimizer_events import usage

from fabrik_common import optimizer_rpc as rpc
from fabrik_common.ids import new_ulid
from fabrik_optimizer.analytics.ingest import apply_llm_usage
from fabrik_optimizer.analytics.store import AnalyticsStore
from fabrik_optimizer.rpc import run_llm_calls_response

T0 = datetime(2026, 3, 1, 12, tzinfo=UTC)


@pytest.fixture
def store() -> Iterator[AnalyticsStore]:
    s = AnalyticsStore(":memory:")
    yield s
    s.close()


def test_calls_of_one_run_in_order_with_exact_costs(store: AnalyticsStore) -> None:
    run, other = new_ulid(), new_ulid()
    late = usage(model="b", tokens=(10, 5, 0, 0), prices=(1, 2, 0, 0), run_id=run, when=T0 + timedelta(2))
    early = usage(model="a", tokens=(1000, 0, 0, 0), prices=(0.15, 0, 0, 0), run_id=run, when=T0)
    for event in (late, early, usage(model="c", tokens=(1, 1, 0, 0), prices=(1, 1, 0, 0), run_id=other)):
        apply_llm_usage(store, event)

    answer = run_llm_calls_response(store, rpc.RunLlmCallsRequest(run_id=run.lower()))

    assert [c.call_id for c in answer.calls] == [early.call_id, late.call_id]
    assert answer.total == 2
    first = answer.calls[0]
    assert (first.model, first.provider, first.input_tokens, first.outcome) == ("a", "openai", 1000, "ok")
    assert first.cost_usd == Decimal("0.00015")
    assert first.latency_ms == 120.0
    assert first.occurred_at == T0
    assert answer.cost_usd == Decimal("0.00015") + Decimal("0.00002")


def test_limit_cuts_the_list_but_not_the_totals(store: AnalyticsStore) -> None:
    run = new_ulid()
    for i in range(3):
        apply_llm_usage(
            store,
            usage(model="m", tokens=(1, 0, 0, 0), prices=(1, 0, 0, 0), run_id=run, when=T0 + timedelta(i)),
        )
    answer = run_llm_calls_response(store, rpc.RunLlmCallsRequest(run_id=run, limit=2))
    assert len(answer.calls) == 2
    assert answer.total == 3
    assert answer.cost_usd == Decimal("0.000003")


def test_a_run_without_calls_is_empty_not_an_error(store: AnalyticsStore) -> None:
    answer = run_llm_calls_response(store, rpc.RunLlmCallsRequest(run_id=new_ulid()))
    assert (answer.calls, answer.total, answer.cost_usd) == ([], 0, Decimal(0))


def test_a_bad_run_id_is_named() -> None:
    error = rpc.decode_request(b'{"run_id": "nope"}', rpc.RunLlmCallsRequest)
    assert isinstance(error, rpc.RpcError)
    assert error.field == "run_id"
