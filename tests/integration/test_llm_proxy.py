"""The llm-proxy against a real NATS, driven by the official `openai` and `anthropic` SDKs.

Upstreams are `FakeUpstream`s on 127.0.0.1 speaking each provider's wire format (SSE, usage,
tool calls) with scripted faults; the proxy runs in-process. Every call's `LlmUsage` event is
read back from the LLM stream and compared with what the fake upstream billed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anthropic
import httpx
import nats
import openai
import pytest

from fabrik_common.codec import EventCodec
from fabrik_common.events import LlmUsage, RunBudgetExceeded
from fabrik_common.ids import new_ulid
from fabrik_common.runkeys import issue_run_key, revocation_key, revocation_value
from fabrik_common.testing import running_service
from fabrik_llm_proxy.app import build
from fabrik_llm_proxy.keys import hash_key
from fabrik_llm_proxy.settings import LlmProxySettings
from fabrik_llm_proxy.testing.fakes import TOOL_ARGUMENTS, Blackhole, FakeUpstream, Fault

SECRET = b"integration-test-secret-0123456789"
ADMIN_KEY = "sk-operator-admin-key"
TEAM_KEY = "sk-operator-team-key"
PRICES = {
    "models": {
        "up-gpt": [{"valid_from": "2020-01-01", "input": 1000.0, "output": 2000.0, "cache_read": 500.0}],
        "up-claude": [
            {
                "valid_from": "2020-01-01",
                "input": 3000.0,
                "output": 6000.0,
                "cache_read": 300.0,
                "cache_write": 3750.0,
            }
        ],
    }
}
usage_codec: EventCodec[LlmUsage] = EventCodec(LlmUsage)
budget_codec: EventCodec[RunBudgetExceeded] = EventCodec(RunBudgetExceeded)


def run_key(project: str = "demo", budget: float | None = None, run_id: str | None = None, **kw: Any) -> str:
    return issue_run_key(
        SECRET,
        run_id=run_id or new_ulid(),
        project=project,
        budget_usd=budget,
        expires_at=kw.pop("expires_at", datetime.now(UTC) + timedelta(hours=1)),
        **kw,
    )


@dataclass
class Recorder:
    """Every LlmUsage and RunBudgetExceeded stored in JetStream, read back as the optimizer would."""

    usages: list[LlmUsage] = field(default_factory=list)
    budgets: list[RunBudgetExceeded] = field(default_factory=list)

    async def wait_usages(self, n: int, timeout: float = 10.0) -> list[LlmUsage]:
        deadline = time.monotonic() + timeout
        while len(self.usages) < n:
            assert time.monotonic() < deadline, f"{len(self.usages)} usage events, expected {n}"
            await asyncio.sleep(0.02)
        return self.usages

    def usage(self, call_id: str) -> LlmUsage:
        found = [u for u in self.usages if u.call_id == call_id]
        assert len(found) == 1, f"{len(found)} usage events for call {call_id}"
        return found[0]

    async def wait_usage(self, call_id: str, timeout: float = 10.0) -> LlmUsage:
        deadline = time.monotonic() + timeout
        while not any(u.call_id == call_id for u in self.usages):
            assert time.monotonic() < deadline, f"no usage event for call {call_id}"
            await asyncio.sleep(0.02)
        return self.usage(call_id)


@dataclass
class Proxy:
    port: int
    service: Any
    tmp: Path
    recorder: Recorder
    js: Any

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def openai(self, key: str) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=30)

    def anthropic(self, key: str) -> anthropic.AsyncAnthropic:
        return anthropic.AsyncAnthropic(base_url=self.url, api_key=key, max_retries=0, timeout=30)

    def write_pool(self, name: str, keys: list[str]) -> None:
        path = self.tmp / "keys" / name
        tmp = path.with_suffix(".tmp")
        tmp.write_text("\n".join(keys) + "\n")
        tmp.replace(path)

    async def circuits(self) -> dict[str, Any]:
        async with httpx.AsyncClient() as client:
            r = await client.get(
                f"{self.url}/admin/circuits", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
            )
            assert r.status_code == 200, r.text
            return r.json()  # type: ignore[no-any-return]


@contextlib.asynccontextmanager
async def start_proxy(
    nats_url: str,
    tmp: Path,
    config: dict[str, Any] | None,
    pools: dict[str, list[str]] | None = None,
    **settings: Any,
) -> AsyncIterator[Proxy]:
    (tmp / "keys").mkdir(exist_ok=True)
    for name, keys in (pools or {}).items():
        (tmp / "keys" / name).write_text("\n".join(keys) + "\n")
    (tmp / "prices.json").write_text(json.dumps(PRICES))
    operators = [
        {"id": "ops-admin", "sha256": hash_key(ADMIN_KEY), "admin": True},
        {"id": "team-ci", "sha256": hash_key(TEAM_KEY), "project": "team"},
    ]
    cfg_file = ""
    if config is not None:
        (tmp / "llm.json").write_text(json.dumps(config))
        cfg_file = str(tmp / "llm.json")
    recorder = Recorder()
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    s = LlmProxySettings(
        nats_url=nats_url,
        http_port=0,
        log_format="text",
        llm_config_file=cfg_file,
        llm_keys_dir=str(tmp / "keys"),
        llm_reload_seconds=0.1,
        llm_flush_seconds=0.05,
        llm_prices_file=str(tmp / "prices.json"),
        run_key_secret=SECRET.decode(),
        llm_operator_keys=json.dumps(operators),
        **settings,
    )
    service = build(s)
    async with running_service(service):

        async def on_usage(msg: Any) -> None:
            recorder.usages.append(usage_codec.decode(msg.data))

        async def on_budget(msg: Any) -> None:
            recorder.budgets.append(budget_codec.decode(msg.data))

        sub1 = await js.subscribe("fabrik.llm.usage", cb=on_usage, ordered_consumer=True)
        sub2 = await js.subscribe("fabrik.runs.budget_exceeded.*", cb=on_budget, ordered_consumer=True)
        try:
            yield Proxy(service.http.port, service, tmp, recorder, js)
        finally:
            await sub1.unsubscribe()
            await sub2.unsubscribe()
            await nc.close()


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    fake = await FakeUpstream(name="primary").start()
    yield fake
    await fake.stop()


@pytest.fixture
async def backup() -> AsyncIterator[FakeUpstream]:
    fake = await FakeUpstream(name="backup").start()
    yield fake
    await fake.stop()


def deployments(up: FakeUpstream, **extra: Any) -> dict[str, Any]:
    return {
        "gpt-test": [{"provider": "openai", "base_url": up.openai_base_url, "model": "up-gpt", **extra}],
        "claude-test": [
            {"provider": "anthropic", "base_url": up.anthropic_base_url, "model": "up-claude", **extra}
        ],
    }


WEATHER_TOOL_OPENAI = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
WEATHER_TOOL_RESPONSES = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
WEATHER_TOOL_ANTHROPIC = {
    "name": "get_weather",
    "description": "Weather of a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
USER = [{"role": "user", "content": "tell me about the weather"}]


def cost_of(u: LlmUsage) -> float:
    price = PRICES["models"][u.upstream_model][0]  # type: ignore[index]
    return (
        u.input_tokens * price["input"]
        + u.output_tokens * price["output"]
        + u.cache_read_tokens * price.get("cache_read", price["input"])
        + u.cache_write_tokens * price.get("cache_write", price["input"])
    ) / 1_000_000


# ---------------------------------------------------------------------------------------------


async def test_three_endpoints_streamed_and_not_tool_calls_and_usage_equal_to_billing(
    nats_url: str, tmp_path: Path, upstream: FakeUpstream
) -> None:
    async with start_proxy(nats_url, tmp_path, {"models": deployments(upstream)}) as proxy:
        key = run_key()
        oc, ac = proxy.openai(key), proxy.anthropic(key)
        call_ids: list[str] = []

        # chat completions, not streamed
        raw = await oc.chat.completions.with_raw_response.create(model="gpt-test", messages=USER)
        assert float(raw.headers["x-fabrik-overhead-ms"]) >= 0
        assert raw.headers["x-request-id"] == "req_primary"
        call_ids.append(raw.headers["x-fabrik-call-id"])
        chat = raw.parse()
        assert chat.choices[0].message.content == "fake answer: tell me about the weather"
        assert chat.model == "up-gpt"

        # chat completions, streamed, without asking for usage: the proxy asks, the client never sees it
        raw_stream = await oc.chat.completions.with_raw_response.create(
            model="gpt-test", messages=USER, stream=True
        )
        call_ids.append(raw_stream.headers["x-fabrik-call-id"])
        chunks = [c async for c in raw_stream.parse()]
        assert all(c.choices for c in chunks) and all(c.usage is None for c in chunks)
        assert (
            "".join(c.choices[0].delta.content or "" for c in chunks).strip()
            == chat.choices[0].message.content
        )
        assert upstream.seen[-1].body["stream_options"] == {"include_usage": True}

        # chat completions, streamed, asking for usage: it arrives as the upstream sent it
        raw_stream = await oc.chat.completions.with_raw_response.create(
            model="gpt-test", messages=USER, stream=True, stream_options={"include_usage": True}
        )
        call_ids.append(raw_stream.headers["x-fabrik-call-id"])
        chunks = [c async for c in raw_stream.parse()]
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 7

        # chat completions with a tool call, both ways: passed through unchanged
        raw = await oc.chat.completions.with_raw_response.create(
            model="gpt-test", messages=USER, tools=[WEATHER_TOOL_OPENAI]
        )
        call_ids.append(raw.headers["x-fabrik-call-id"])
        call = raw.parse().choices[0].message.tool_calls[0]  # type: ignore[index]
        assert call.function.name == "get_weather" and call.function.arguments == TOOL_ARGUMENTS  # type: ignore[union-attr]
        assert upstream.seen[-1].body["tools"] == [WEATHER_TOOL_OPENAI]
        raw_stream = await oc.chat.completions.with_raw_response.create(
            model="gpt-test", messages=USER, tools=[WEATHER_TOOL_OPENAI], stream=True
        )
        call_ids.append(raw_stream.headers["x-fabrik-call-id"])
        args = ""
        async for c in raw_stream.parse():
            for tc in c.choices[0].delta.tool_calls or []:
                args += tc.function.arguments or ""  # type: ignore[union-attr]
        assert args == TOOL_ARGUMENTS

        # Responses API, both ways, and a tool call
        raw_resp = await oc.responses.with_raw_response.create(model="gpt-test", input="hello responses")
        call_ids.append(raw_resp.headers["x-fabrik-call-id"])
        assert raw_resp.parse().output_text == "fake answer: hello responses"
        raw_rs = await oc.responses.with_raw_response.create(
            model="gpt-test", input="hello stream", stream=True
        )
        call_ids.append(raw_rs.headers["x-fabrik-call-id"])
        events = [e async for e in raw_rs.parse()]
        assert events[-1].type == "response.completed"
        text = "".join(e.delta for e in events if e.type == "response.output_text.delta")  # type: ignore[union-attr]
        assert text.strip() == "fake answer: hello stream"
        raw_resp = await oc.responses.with_raw_response.create(
            model="gpt-test",
            input="weather?",
            tools=[WEATHER_TOOL_RESPONSES],  # type: ignore[list-item]
        )
        call_ids.append(raw_resp.headers["x-fabrik-call-id"])
        item = raw_resp.parse().output[0]
        assert item.type == "function_call" and item.arguments == TOOL_ARGUMENTS

        # Anthropic messages, both ways, and a tool call streamed
        raw_msg = await ac.messages.with_raw_response.create(
            model="claude-test", max_tokens=50, messages=USER
        )  # type: ignore[arg-type]
        call_ids.append(raw_msg.headers["x-fabrik-call-id"])
        assert raw_msg.headers["request-id"] == "req_primary"
        msg = await raw_msg.parse()
        assert msg.content[0].text == "fake answer: tell me about the weather"  # type: ignore[union-attr]
        assert msg.usage.cache_read_input_tokens == 5
        async with ac.messages.stream(model="claude-test", max_tokens=50, messages=USER) as stream:  # type: ignore[arg-type]
            final = await stream.get_final_message()
            call_ids.append(stream.response.headers["x-fabrik-call-id"])
        assert final.content[0].text.strip() == msg.content[0].text  # type: ignore[union-attr]
        assert final.usage.output_tokens == msg.usage.output_tokens
        async with ac.messages.stream(
            model="claude-test",
            max_tokens=50,
            messages=USER,  # type: ignore[arg-type]
            tools=[WEATHER_TOOL_ANTHROPIC],  # type: ignore[list-item]
        ) as stream:
            final = await stream.get_final_message()
            call_ids.append(stream.response.headers["x-fabrik-call-id"])
        tool_use = final.content[0]
        assert tool_use.type == "tool_use" and tool_use.input == json.loads(TOOL_ARGUMENTS)
        assert upstream.seen[-1].body["tools"] == [WEATHER_TOOL_ANTHROPIC]

        # One usage event per call, equal to what the upstream billed, priced from the price file.
        usages = await proxy.recorder.wait_usages(len(call_ids))
        assert len(usages) == len(call_ids) == len(upstream.ledger)
        for call_id, billed in zip(call_ids, upstream.ledger, strict=True):
            u = proxy.recorder.usage(call_id)
            assert (u.input_tokens, u.output_tokens, u.cache_read_tokens, u.cache_write_tokens) == (
                billed.input_tokens,
                billed.output_tokens,
                billed.cache_read_tokens,
                billed.cache_write_tokens,
            ), (u, billed)
            assert u.outcome == "ok" and not u.estimated and u.retries == 0
            assert u.streamed == billed.stream
            assert u.project == "demo" and u.run_id is not None
            assert u.cost_usd == pytest.approx(cost_of(u))
            assert u.cost_usd > 0 and u.latency_ms > 0 and u.ttfb_ms is not None
        assert {u.endpoint for u in usages} == {"chat.completions", "responses", "messages"}
        assert {(u.provider, u.deployment) for u in usages} == {
            ("openai", "gpt-test#0"),
            ("anthropic", "claude-test#0"),
        }

        # Prompts and keys never reach the logs' structured fields; metrics count what happened.
        async with httpx.AsyncClient() as client:
            metrics = (await client.get(f"{proxy.url}/metrics")).text
        assert (
            'fabrik_llm_requests_total{endpoint="messages",model="claude-test",status="200"} 3.0' in metrics
        )
        assert "fabrik_llm_overhead_seconds_bucket" in metrics
        assert 'fabrik_llm_tokens_total{kind="cache_write",model="claude-test"}' in metrics


async def test_echo_answers_offline_when_no_provider_is_configured(nats_url: str, tmp_path: Path) -> None:
    async with start_proxy(nats_url, tmp_path, None) as proxy:
        key = run_key()
        oc, ac = proxy.openai(key), proxy.anthropic(key)
        chat = await oc.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "ping pong"}]
        )
        assert chat.choices[0].message.content == "ping pong"
        assert chat.usage is not None and chat.usage.completion_tokens == 2
        chunks = [
            c
            async for c in await oc.chat.completions.create(
                model="any-model",
                messages=[{"role": "user", "content": "one two three four five six"}],
                stream=True,
            )
        ]
        assert (
            "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            == "one two three four five six"
        )
        resp = await oc.responses.create(model="gpt-4o", input="echo me")
        assert resp.output_text == "echo me"
        events = [
            e async for e in await oc.responses.create(model="gpt-4o", input="echo stream", stream=True)
        ]
        assert events[-1].type == "response.completed"
        msg = await ac.messages.create(
            model="claude-any", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
        )
        assert msg.content[0].text == "hi"  # type: ignore[union-attr]
        async with ac.messages.stream(
            model="claude-any", max_tokens=10, messages=[{"role": "user", "content": "hi stream"}]
        ) as stream:
            assert await stream.get_final_text() == "hi stream"
        tool = await oc.chat.completions.create(
            model="gpt-4o",
            messages=[{"role": "user", "content": 'tool: get_weather {"city": "Oslo"}'}],
            tools=[WEATHER_TOOL_OPENAI],  # type: ignore[list-item]
        )
        assert tool.choices[0].message.tool_calls[0].function.arguments == '{"city": "Oslo"}'  # type: ignore[index,union-attr]
        usages = await proxy.recorder.wait_usages(7)
        assert {u.provider for u in usages} == {"echo"}
        assert all(u.outcome == "ok" and u.cost_usd == 0 and u.input_tokens > 0 for u in usages)
        assert {u.streamed for u in usages} == {True, False}


async def test_bad_input_gets_a_clear_4xx_in_each_clients_format(
    nats_url: str, tmp_path: Path, upstream: FakeUpstream
) -> None:
    async with start_proxy(
        nats_url, tmp_path, {"models": deployments(upstream)}, llm_max_body_bytes=4096
    ) as proxy:
        key = run_key()
        oc, ac = proxy.openai(key), proxy.anthropic(key)
        async with httpx.AsyncClient(base_url=proxy.url) as http:
            auth = {"Authorization": f"Bearer {key}", "content-type": "application/json"}
            r = await http.post(
                "/v1/chat/completions", content=b'{"model": "gpt-test", "messages": [', headers=auth
            )
            assert r.status_code == 400
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"} and "not valid JSON" in err["message"]
            r = await http.post("/v1/messages", content=b"{nope", headers={"x-api-key": key})
            assert r.status_code == 400
            assert r.json()["type"] == "error" and r.json()["error"]["type"] == "invalid_request_error"
            r = await http.post("/v1/chat/completions", content=b"[1, 2]", headers=auth)
            assert r.status_code == 400 and "JSON object" in r.json()["error"]["message"]
            r = await http.post("/v1/chat/completions", json={"messages": []}, headers=auth)
            assert r.status_code == 400 and r.json()["error"]["param"] == "model"
            r = await http.post("/v1/chat/completions", json={"model": "gpt-test"})
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
            r = await http.post("/v1/messages", json={"model": "claude-test"})
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"

        with pytest.raises(openai.NotFoundError) as nf:
            await oc.chat.completions.create(model="no-such-model", messages=USER)  # type: ignore[arg-type]
        assert nf.value.code == "model_not_found" and "no-such-model" in nf.value.message
        with pytest.raises(openai.NotFoundError):  # a Claude alias is not served on the OpenAI endpoints
            await oc.chat.completions.create(model="claude-test", messages=USER)  # type: ignore[arg-type]
        with pytest.raises(anthropic.NotFoundError) as anf:
            await ac.messages.create(model="no-such-model", max_tokens=5, messages=USER)  # type: ignore[arg-type]
        assert anf.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
        with pytest.raises(openai.AuthenticationError):
            await proxy.openai("sk-wrong").chat.completions.create(model="gpt-test", messages=USER)  # type: ignore[arg-type]
        with pytest.raises(anthropic.AuthenticationError):
            await proxy.anthropic("sk-ant-wrong").messages.create(
                model="claude-test", max_tokens=5, messages=USER
            )  # type: ignore[arg-type]
        big = [{"role": "user", "content": "x" * 5000}]
        with pytest.raises(openai.APIStatusError) as too_big:
            await oc.chat.completions.create(model="gpt-test", messages=big)  # type: ignore[arg-type]
        assert too_big.value.status_code == 413 and too_big.value.code == "request_too_large"
        with pytest.raises(anthropic.APIStatusError) as too_big_a:
            await ac.messages.create(model="claude-test", max_tokens=5, messages=big)  # type: ignore[arg-type]
        assert too_big_a.value.status_code == 413
        assert too_big_a.value.body["error"]["type"] == "request_too_large"  # type: ignore[index]
        # An upstream 400 about the request itself reaches the client as the upstream said it.
        upstream.script(Fault(status=400))
        with pytest.raises(openai.BadRequestError) as bad:
            await oc.chat.completions.create(model="gpt-test", messages=USER)  # type: ignore[arg-type]
        assert "fake upstream says 400" in bad.value.message
        assert len(upstream.ledger) == 0


async def test_429_retry_after_is_honoured_and_a_401_key_is_rotated_out(
    nats_url: str, tmp_path: Path, upstream: FakeUpstream
) -> None:
    upstream.valid_keys = {"sk-good"}
    config = {
        "models": deployments(upstream, keys="main"),
        "retry": {"max_retry_after_seconds": 3},
    }
    async with start_proxy(nats_url, tmp_path, config, pools={"main": ["sk-bad", "sk-good"]}) as proxy:
        oc = proxy.openai(run_key())
        # A 401 for one key: the call moves to the next key at once and succeeds.
        for _ in range(4):
            assert (await oc.chat.completions.create(model="gpt-test", messages=USER)).choices  # type: ignore[arg-type]
        bad_uses = [s for s in upstream.seen if s.key == "sk-bad"]
        assert len(bad_uses) == 1, "the 401 key must cool down, not be retried on every call"
        state = await proxy.circuits()
        key_circuits = {c["name"]: c for c in state["circuits"] if c["kind"] == "key"}
        assert any(c["state"] == "open" and c["reason"] == "auth" for c in key_circuits.values())
        assert state["key_pools"]["main"] and "sk-good" not in json.dumps(state)

        # A 429 with Retry-After on the only good key: waited for, then retried.
        upstream.script(Fault(status=429, retry_after="1"))
        started = time.monotonic()
        raw = await oc.chat.completions.with_raw_response.create(model="gpt-test", messages=USER)  # type: ignore[arg-type]
        assert time.monotonic() - started >= 1.0
        usage = await proxy.recorder.wait_usage(raw.headers["x-fabrik-call-id"])
        assert usage.retries == 1 and usage.outcome == "ok"
        # The wait was the upstream's, not the proxy's own overhead.
        assert float(raw.headers["x-fabrik-overhead-ms"]) < 500

        # Rate limited longer than the proxy waits: a clear 429 with Retry-After for the client.
        upstream.script(Fault(status=429, retry_after="30"))
        with pytest.raises(openai.RateLimitError) as limited:
            await oc.chat.completions.create(model="gpt-test", messages=USER)  # type: ignore[arg-type]
        assert int(limited.value.response.headers["retry-after"]) >= 1


async def test_failover_on_5xx_and_connect_timeout_circuit_opens_and_recovers(
    nats_url: str, tmp_path: Path, upstream: FakeUpstream, backup: FakeUpstream
) -> None:
    hole = Blackhole()
    config = {
        "models": {
            "flaky": [
                {
                    "provider": "openai",
                    "base_url": upstream.openai_base_url,
                    "model": "up-gpt",
                    "name": "primary",
                },
                {
                    "provider": "openai",
                    "base_url": backup.openai_base_url,
                    "model": "up-gpt",
                    "name": "backup",
                },
            ],
            "unreachable": [
                {
                    "provider": "openai",
                    "base_url": hole.openai_base_url,
                    "model": "up-gpt",
                    "name": "blackhole",
                    "connect_timeout_seconds": 0.3,
                },
                {
                    "provider": "openai",
                    "base_url": backup.openai_base_url,
                    "model": "up-gpt",
                    "name": "backup2",
                },
            ],
        },
        "retry": {"attempts_per_deployment": 2, "backoff_base_seconds": 0.05},
        "circuit": {"failure_threshold": 2, "cooldown_seconds": 1.0},
    }
    try:
        async with start_proxy(nats_url, tmp_path, config) as proxy:
            oc = proxy.openai(run_key())
            upstream.script(Fault(status=500), Fault(status=503))
            raw = await oc.chat.completions.with_raw_response.create(model="flaky", messages=USER)  # type: ignore[arg-type]
            usage = await proxy.recorder.wait_usage(raw.headers["x-fabrik-call-id"])
            assert usage.deployment == "backup" and usage.retries == 2 and usage.outcome == "ok"
            assert [s.status for s in upstream.seen] == [500, 503]
            # Two failures opened the primary's circuit: the next calls go straight to the backup.
            state = await proxy.circuits()
            primary = next(c for c in state["circuits"] if c["name"] == "primary")
            assert primary["state"] == "open"
            stream = await oc.chat.completions.create(model="flaky", messages=USER, stream=True)  # type: ignore[arg-type]
            assert [c async for c in stream]
            assert len(upstream.seen) == 2
            # After the cooldown one probe goes to the primary; it is healthy again, so it closes.
            await asyncio.sleep(1.1)
            raw = await oc.chat.completions.with_raw_response.create(model="flaky", messages=USER)  # type: ignore[arg-type]
            assert (await proxy.recorder.wait_usage(raw.headers["x-fabrik-call-id"])).deployment == "primary"
            primary = next(c for c in (await proxy.circuits())["circuits"] if c["name"] == "primary")
            assert primary["state"] == "closed"

            # A connect timeout fails over too, streamed or not, before the first byte.
            started = time.monotonic()
            raw = await oc.chat.completions.with_raw_response.create(model="unreachable", messages=USER)  # type: ignore[arg-type]
            usage = await proxy.recorder.wait_usage(raw.headers["x-fabrik-call-id"])
            assert usage.deployment == "backup2" and usage.retries >= 1
            assert time.monotonic() - started < 5
            text = ""
            async for c in await oc.chat.completions.create(model="unreachable", messages=USER, stream=True):  # type: ignore[arg-type]
                text += (c.choices[0].delta.content or "") if c.choices else ""
            assert text.strip() == "fake answer: tell me about the weather"

            # Every deployment down: 502/503 in the client's format, and still one usage event.
            upstream.script(*[Fault(status=500)] * 4)
            await backup.stop()
            with pytest.raises(openai.APIStatusError) as down:
                await oc.chat.completions.create(model="flaky", messages=USER)  # type: ignore[arg-type]
            assert down.value.status_code in (502, 503)
            assert (await proxy.recorder.wait_usages(6))[-1].outcome == "error"
    finally:
        hole.close()


async def test_mid_stream_failure_ends_with_an_error_event_and_partial_usage_is_recorded(
    nats_url: str, tmp_path: Path, upstream: FakeUpstream
) -> None:
    async with start_proxy(nats_url, tmp_path, {"models": deployments(upstream)}) as proxy:
        key = run_key()
        oc, ac = proxy.openai(key), proxy.anthropic(key)

        upstream.script(Fault(break_after_events=3))
        raw = await oc.chat.completions.with_raw_response.create(model="gpt-test", messages=USER, stream=True)  # type: ignore[arg-type]
        received: list[str] = []

        async def read_chat() -> None:
            async for c in raw.parse():
                received.append(c.choices[0].delta.content or "")

        with pytest.raises(openai.APIError) as broke:
            await read_chat()
        assert "incomplete" in broke.value.message and received
        chat_usage = await proxy.recorder.wait_usage(raw.headers["x-fabrik-call-id"])

        upstream.script(Fault(break_after_events=4))
        raw_rs = await oc.responses.with_raw_response.create(
            model="gpt-test", input="hello there", stream=True
        )
        events = [e async for e in raw_rs.parse()]
        assert events[-1].type == "error"
        assert events[-1].sequence_number == events[-2].sequence_number + 1
        resp_usage = await proxy.recorder.wait_usage(raw_rs.headers["x-fabrik-call-id"])

        upstream.script(Fault(break_after_events=5))
        call_ids: list[str] = []

        async def read_messages() -> None:
            async with ac.messages.stream(model="claude-test", max_tokens=50, messages=USER) as stream:  # type: ignore[arg-type]
                call_ids.append(stream.response.headers["x-fabrik-call-id"])
                async for _ in stream:
                    pass

        with pytest.raises(anthropic.APIStatusError) as broke_a:
            await read_messages()
        assert "incomplete" in str(broke_a.value)
        msg_usage = await proxy.recorder.wait_usage(call_ids[0])

        for u in (chat_usage, resp_usage, msg_usage):
            assert u.outcome == "error" and u.streamed and u.estimated
            assert u.output_tokens > 0 and u.input_tokens > 0, u
            assert u.cost_usd > 0
        # Anthropic's message_start carried the real input figures: kept, only output is estimated.
        billed = upstream.billed("/v1/messages")[-1]
        assert msg_usage.input_tokens == billed.input_tokens
        assert msg_usage.cache_read_tokens == billed.cache_read_tokens


async def test_stream_without_usage_is_estimated_and_client_disconnect_is_recorded(
    nats_url: str, tmp_path: Path, upstream: FakeUpstream
) -> None:
    async with start_proxy(nats_url, tmp_path, {"models": deployments(upstream)}) as proxy:
        oc = proxy.openai(run_key())
        upstream.no_usage = True  # an OpenAI-compatible server that ignores stream_options
        raw = await oc.chat.completions.with_raw_response.create(model="gpt-test", messages=USER, stream=True)  # type: ignore[arg-type]
        assert [c async for c in raw.parse()]
        u = await proxy.recorder.wait_usage(raw.headers["x-fabrik-call-id"])
        assert u.outcome == "ok" and u.estimated and u.output_tokens >= 6 and u.input_tokens >= 5
        upstream.no_usage = False

        # The client goes away mid-stream: the call is recorded as such, with what was streamed.
        upstream.script(Fault(event_delay=0.2))
        async with httpx.AsyncClient(base_url=proxy.url) as http:
            body = {"model": "gpt-test", "messages": USER, "stream": True}
            headers = {"Authorization": f"Bearer {run_key()}"}
            async with http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
                call_id = r.headers["x-fabrik-call-id"]
                async for _ in r.aiter_bytes():
                    break
        u = await proxy.recorder.wait_usage(call_id)
        assert u.outcome == "client_disconnected" and u.estimated and u.input_tokens > 0


async def test_run_and_project_budgets_refuse_with_402_and_announce_budget_exceeded(
    nats_url: str, tmp_path: Path, upstream: FakeUpstream
) -> None:
    async with start_proxy(nats_url, tmp_path, {"models": deployments(upstream)}) as proxy:
        run_id = new_ulid()
        key = run_key(project="budgeted", budget=0.02, run_id=run_id)
        oc, ac = proxy.openai(key), proxy.anthropic(key)
        first = await oc.chat.completions.with_raw_response.create(model="gpt-test", messages=USER)  # type: ignore[arg-type]
        cost = (await proxy.recorder.wait_usage(first.headers["x-fabrik-call-id"])).cost_usd
        assert cost > 0.02  # this call crossed the budget; it was allowed because spend was 0 before it
        await asyncio.sleep(0.2)  # the spend counter reaches the KV
        with pytest.raises(openai.APIStatusError) as refused:
            await oc.chat.completions.create(model="gpt-test", messages=USER)  # type: ignore[arg-type]
        assert refused.value.status_code == 402 and refused.value.code == "budget_exceeded"
        with pytest.raises(anthropic.APIStatusError) as refused_a:
            await ac.messages.create(model="claude-test", max_tokens=5, messages=USER)  # type: ignore[arg-type]
        assert refused_a.value.status_code == 402
        assert refused_a.value.body["error"]["type"] == "billing_error"  # type: ignore[index]
        deadline = time.monotonic() + 5
        while not proxy.recorder.budgets:
            assert time.monotonic() < deadline, "no RunBudgetExceeded published"
            await asyncio.sleep(0.02)
        event = proxy.recorder.budgets[0]
        assert (event.run_id, event.scope, event.project) == (run_id, "run", "budgeted")
        assert event.budget_usd == 0.02 and event.spent_usd == pytest.approx(cost)
        assert len(upstream.ledger) == 1
        spent = await (await proxy.js.key_value("limits")).get(f"spend.run.{run_id}")
        assert json.loads(spent.value)["value"] == pytest.approx(cost)

        # Per project per month, set through the config KV (as the optimizer does).
        config_kv = await proxy.js.key_value("config")
        await config_kv.put("budgets.project.team2", json.dumps({"llm_usd_per_month": 0.01}).encode())
        team_run = new_ulid()
        oc2 = proxy.openai(run_key(project="team2", run_id=team_run))
        await asyncio.sleep(0.2)
        await oc2.chat.completions.create(model="gpt-test", messages=USER)  # type: ignore[arg-type]
        await asyncio.sleep(0.2)
        with pytest.raises(openai.APIStatusError) as refused:
            await oc2.chat.completions.create(model="gpt-test", messages=USER)  # type: ignore[arg-type]
        assert refused.value.status_code == 402 and "project budget" in refused.value.message
        deadline = time.monotonic() + 5
        while not any(e.run_id == team_run for e in proxy.recorder.budgets):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        assert next(e for e in proxy.recorder.budgets if e.run_id == team_run).scope == "project"
        refusals = [u for u in await proxy.recorder.wait_usages(5) if u.outcome == "refused"]
        assert len(refusals) == 3 and all(u.cost_usd == 0 for u in refusals)


async def test_key_pool_rotation_without_restart_and_revoked_or_expired_run_keys(
    nats_url: str, tmp_path: Path, upstream: FakeUpstream
) -> None:
    upstream.valid_keys = {"sk-old"}
    config = {"models": deployments(upstream, keys="rotating")}
    async with start_proxy(nats_url, tmp_path, config, pools={"rotating": ["sk-old"]}) as proxy:
        run_id = new_ulid()
        key = run_key(run_id=run_id)
        oc = proxy.openai(key)
        await oc.chat.completions.create(model="gpt-test", messages=USER)  # type: ignore[arg-type]
        assert upstream.seen[-1].key == "sk-old"

        upstream.valid_keys = {"sk-new"}
        proxy.write_pool("rotating", ["sk-new"])
        await asyncio.sleep(0.3)
        await oc.chat.completions.create(model="gpt-test", messages=USER)  # type: ignore[arg-type]
        assert upstream.seen[-1].key == "sk-new"
        assert len(upstream.ledger) == 2

        # An operator key (hashed in the settings) works and is attributed to its project.
        raw = await proxy.openai(TEAM_KEY).chat.completions.with_raw_response.create(
            model="gpt-test", messages=USER
        )  # type: ignore[arg-type]
        team = await proxy.recorder.wait_usage(raw.headers["x-fabrik-call-id"])
        assert (team.project, team.key_id, team.run_id) == ("team", "team-ci", None)

        expired = run_key(expires_at=datetime.now(UTC) - timedelta(seconds=1))
        with pytest.raises(openai.AuthenticationError) as exc:
            await proxy.openai(expired).chat.completions.create(model="gpt-test", messages=USER)  # type: ignore[arg-type]
        assert "expired" in exc.value.message
        forged = key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB")
        with pytest.raises(openai.AuthenticationError) as exc:
            await proxy.openai(forged).chat.completions.create(model="gpt-test", messages=USER)  # type: ignore[arg-type]
        assert "signature" in exc.value.message
        other = issue_run_key(
            b"another-secret-entirely-000000",
            run_id=run_id,
            project="demo",
            budget_usd=None,
            expires_at=datetime.now(UTC) + timedelta(hours=1),
        )
        with pytest.raises(openai.AuthenticationError):
            await proxy.openai(other).chat.completions.create(model="gpt-test", messages=USER)  # type: ignore[arg-type]

        tokens_kv = await proxy.js.key_value("tokens")
        await tokens_kv.put(revocation_key(run_id=run_id), revocation_value("run finished", "test"))
        deadline = time.monotonic() + 5
        refused: openai.AuthenticationError | None = None
        while refused is None:
            try:
                await oc.chat.completions.create(model="gpt-test", messages=USER)  # type: ignore[arg-type]
            except openai.AuthenticationError as exc:
                refused = exc
            assert time.monotonic() < deadline, "revocation never took effect"
            await asyncio.sleep(0.05)
        assert "revoked" in refused.message


async def test_rate_limits_per_run_and_per_project(
    nats_url: str, tmp_path: Path, upstream: FakeUpstream
) -> None:
    config = {
        "models": deployments(upstream),
        "limits": {"run": {"rpm": 3}, "projects": {"tight": {"tpm": 10}}},
    }
    async with start_proxy(nats_url, tmp_path, config) as proxy:
        oc = proxy.openai(run_key())
        for _ in range(3):
            await oc.chat.completions.create(model="gpt-test", messages=USER)  # type: ignore[arg-type]
        with pytest.raises(openai.RateLimitError) as limited:
            await oc.chat.completions.create(model="gpt-test", messages=USER)  # type: ignore[arg-type]
        assert 1 <= int(limited.value.response.headers["retry-after"]) <= 60
        assert "run limit of 3 rpm" in limited.value.message
        # Another run of the same project is not affected.
        await proxy.openai(run_key()).chat.completions.create(model="gpt-test", messages=USER)  # type: ignore[arg-type]

        # Tokens per minute: once a window's tokens reached the limit, the next call waits.
        tight = proxy.openai(run_key(project="tight"))
        await tight.chat.completions.create(model="gpt-test", messages=USER)  # type: ignore[arg-type]
        with pytest.raises(openai.RateLimitError) as limited:
            await tight.chat.completions.create(model="gpt-test", messages=USER)  # type: ignore[arg-type]
        assert "tpm" in limited.value.message
