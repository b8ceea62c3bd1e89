"""Prices, routing config, circuits and key pools: the proxy's plain, NATS-free parts."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path

import pytest

from fabrik_llm_proxy.circuits import Circuits
from fabrik_llm_proxy.config import ConfigError, default_config, parse_config
from fabrik_llm_proxy.keypools import KeyPools
from fabrik_llm_proxy.pricing import PriceEntry, PriceTable, default_price_file
from fabrik_llm_proxy.routing import RouteTable
from fabrik_llm_proxy.tokens import TokenCounter


def test_the_price_valid_at_the_call_date_applies() -> None:
    table = PriceTable(
        {
            "m": (
                PriceEntry(valid_from=datetime(2024, 1, 1).date(), input=10, output=20),
                PriceEntry(valid_from=datetime(2025, 1, 1).date(), input=1, output=2, cache_read=0.5),
            )
        }
    )
    before = datetime(2023, 6, 1, tzinfo=UTC)
    early = datetime(2024, 6, 1, tzinfo=UTC)
    late = datetime(2025, 6, 1, tzinfo=UTC)
    assert table.cost(("m",), before, input_tokens=1_000_000, output_tokens=0) == 0
    assert table.cost(("m",), early, input_tokens=1_000_000, output_tokens=1_000_000) == 30
    assert table.cost(("m",), late, input_tokens=1_000_000, output_tokens=0, cache_read_tokens=2_000_000) == 2
    # cache_write defaults to the input price
    assert table.cost(("m",), late, input_tokens=0, output_tokens=0, cache_write_tokens=1_000_000) == 1


def test_unknown_models_cost_nothing_and_are_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    table = PriceTable()
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            assert table.cost(("mystery",), datetime.now(UTC), input_tokens=5, output_tokens=5) == 0
    assert sum("no price" in r.message for r in caplog.records) == 1


def test_the_repository_price_file_loads() -> None:
    path = default_price_file()
    assert path is not None
    table = PriceTable.load(path)
    assert table.price("gpt-4o", datetime(2025, 1, 1, tzinfo=UTC)) is not None
    assert table.price("echo", datetime.now(UTC)) is not None


def test_config_routes_by_endpoint_priority_and_pattern() -> None:
    config = parse_config(
        """
models:
  smart:
    - {provider: openai, base_url: "http://a/v1", model: up-a, name: a}
    - {provider: openai, base_url: "http://b/v1", model: up-b, name: b}
  "claude-*":
    - {provider: anthropic, keys: ant}
  split:
    - {provider: openai, name: s1, priority: 0, weight: 3}
    - {provider: openai, name: s2, priority: 0, weight: 1}
limits: {project: {rpm: 10}, projects: {big: {rpm: 100}}}
"""
    )
    routes = RouteTable(config, TokenCounter())
    smart = routes.resolve("smart", "chat.completions")
    assert smart is not None and [d.name for d in smart.plan()] == ["a", "b"]
    assert routes.resolve("smart", "messages") is None and routes.knows("smart")
    claude = routes.resolve("claude-sonnet-4-5", "messages")
    assert claude is not None and claude.deployments[0].model_for("claude-sonnet-4-5") == "claude-sonnet-4-5"
    assert routes.resolve("gpt-x", "chat.completions") is None and not routes.knows("gpt-x")
    split = routes.resolve("split", "responses")
    assert split is not None
    firsts = [split.plan()[0].name for _ in range(2000)]
    assert 0.65 < firsts.count("s1") / len(firsts) < 0.85
    assert config.limits.for_project("big").rpm == 100 and config.limits.for_project("other").rpm == 10


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("models: {m: [{provider: nope}]}", "provider"),
        ("models: {m: []}", "at least one"),
        ("models: {m: [{provider: anthropic, endpoints: [responses]}]}", "does not speak"),
        ("models: {m: [{provider: openai, colour: red}]}", "colour"),
        ("- just a list", "mapping"),
        ("models: {m: [{provider: openai", "YAML"),
    ],
)
def test_bad_config_is_refused_with_the_reason(text: str, message: str) -> None:
    with pytest.raises((ConfigError, ValueError), match=message):
        RouteTable(parse_config(text), TokenCounter())


def test_default_config_is_echo_offline_and_providers_when_keyed() -> None:
    offline = RouteTable(default_config(), TokenCounter())
    for endpoint in ("chat.completions", "responses", "messages"):
        route = offline.resolve("anything", endpoint)  # type: ignore[arg-type]
        assert route is not None and route.deployments[0].provider_name == "echo"
    keyed = RouteTable(default_config(openai_api_key="sk-x"), TokenCounter())
    chat = keyed.resolve("gpt-4o", "chat.completions")
    messages = keyed.resolve("claude", "messages")
    assert chat is not None and chat.deployments[0].provider_name == "openai"
    assert messages is not None and messages.deployments[0].provider_name == "echo"


def test_circuit_opens_after_threshold_probes_after_cooldown_and_closes_on_success() -> None:
    now = [0.0]
    circuits = Circuits(clock=lambda: now[0])
    assert circuits.available("deployment", "d")
    assert not circuits.failure("deployment", "d", reason="500", threshold=2, cooldown=10)
    assert circuits.failure("deployment", "d", reason="500", threshold=2, cooldown=10)
    assert not circuits.available("deployment", "d")
    now[0] = 10.5
    assert circuits.available("deployment", "d")  # the one probe
    assert not circuits.available("deployment", "d")  # others wait for it
    circuits.failure("deployment", "d", reason="500", threshold=2, cooldown=10)  # probe failed: open again
    assert not circuits.available("deployment", "d")
    now[0] = 21.0
    assert circuits.available("deployment", "d")
    circuits.success("deployment", "d")
    assert circuits.available("deployment", "d") and circuits.available("deployment", "d")
    assert circuits.snapshot()[0]["state"] == "closed"


def test_key_pools_reload_changed_new_and_removed_files(tmp_path: Path) -> None:
    (tmp_path / "main").write_text("sk-1\n# comment\n\nsk-2\nsk-1\n")
    pools = KeyPools(tmp_path)
    main = pools.get("main")
    assert main is not None and [k.secret for k in main.keys] == ["sk-1", "sk-2"]
    assert [k.secret for k in main.rotation()] == ["sk-1", "sk-2"]
    assert [k.secret for k in main.rotation()] == ["sk-2", "sk-1"]
    assert "sk-1" not in repr(main.keys[0])
    assert not pools.reload()
    (tmp_path / "main").write_text("sk-3\n")
    (tmp_path / "other").write_text("sk-o\n")
    assert pools.reload()
    main = pools.get("main")
    assert main is not None and [k.secret for k in main.keys] == ["sk-3"]
    assert pools.get("other") is not None
    (tmp_path / "other").unlink()
    assert pools.reload() and pools.get("other") is None
