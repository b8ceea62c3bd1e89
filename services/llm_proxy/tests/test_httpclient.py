"""The proxy's own HTTP/1.1 client, on asyncio's loop and on uvloop, against real local servers."""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import uvloop
from aiohttp import web

from fabrik_llm_proxy.httpclient import NativeHttpClient
from fabrik_llm_proxy.providers.base import UpstreamError, UpstreamRequest
from fabrik_llm_proxy.testing.fakes import Blackhole, FakeUpstream, Fault

LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hello there"}]}).encode()


def run(loop: str, test: Callable[[], Awaitable[None]]) -> None:
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        runner.run(test())


def chat(up: FakeUpstream, stream: bool = False) -> UpstreamRequest:
    body = json.loads(BODY)
    body["stream"] = stream
    return UpstreamRequest(
        up.openai_base_url + "/chat/completions",
        {"Content-Type": "application/json"},
        json.dumps(body).encode(),
    )


@pytest.mark.parametrize("loop", LOOPS)
def test_buffered_and_streamed_responses_on_one_kept_alive_connection(loop: str) -> None:
    async def test() -> None:
        up = await FakeUpstream(name="hc").start()
        client = NativeHttpClient()
        try:
            r = await client.send(chat(up), 1, 5)
            assert r.status == 200 and r.header("Content-Type") == "application/json; charset=utf-8"
            assert r.passthrough_headers() == [(b"x-request-id", b"req_hc")]
            assert (
                json.loads(await r.read())["choices"][0]["message"]["content"] == "fake answer: hello there"
            )
            r = await client.send(chat(up, stream=True), 1, 5)
            chunks = []
            while chunk := await r.next_chunk():
                chunks.append(chunk)
            text = b"".join(chunks)
            assert text.endswith(b"data: [DONE]\n\n") and text.count(b"data: ") == 7
            r.close()
            assert sum(len(v) for v in client._idle.values()) == 1  # the same connection, back in the pool
            # The server drops idle connections (restart): the next call still works.
            for conns in client._idle.values():
                for conn in conns:
                    assert conn.transport is not None
            await up.stop()
            up2 = FakeUpstream(name="hc2")
            up2.port = up.port
            await up2.start()
            r = await client.send(chat(up2), 1, 5)
            assert r.status == 200 and await r.read()
            await up2.stop()
        finally:
            await client.close()
            await up.stop()

    run(loop, test)


@pytest.mark.parametrize("loop", LOOPS)
def test_failures_become_upstream_errors(loop: str) -> None:
    async def test() -> None:
        up = await FakeUpstream().start()
        hole = Blackhole()
        client = NativeHttpClient()
        try:
            with pytest.raises(UpstreamError) as exc:
                await client.send(UpstreamRequest(hole.openai_base_url + "/x", {}, b"{}"), 0.2, 1)
            assert exc.value.kind == "connect"
            with pytest.raises(UpstreamError) as exc:
                await client.send(UpstreamRequest("http://127.0.0.1:1/v1/x", {}, b"{}"), 1, 1)
            assert exc.value.kind == "connect"
            up.script(Fault(delay=1.0))
            with pytest.raises(UpstreamError) as exc:
                await client.send(chat(up), 1, 0.2)
            assert exc.value.kind == "timeout"
            up.script(Fault(break_after_events=2))
            r = await client.send(chat(up, stream=True), 1, 5)
            with pytest.raises(UpstreamError) as exc:
                await r.read()
            assert exc.value.kind == "protocol"
            up.script(Fault(status=429, retry_after="3"))
            r = await client.send(chat(up), 1, 5)
            assert r.status == 429 and r.header("retry-after") == "3"
            assert json.loads(await r.read())["error"]["type"] == "rate_limit_error"
        finally:
            await client.close()
            await up.stop()
            hole.close()

    run(loop, test)


@pytest.mark.parametrize("loop", LOOPS)
def test_gzip_and_close_delimited_bodies(loop: str) -> None:
    async def test() -> None:
        async def gzipped(request: web.Request) -> web.StreamResponse:
            data = gzip.compress(b'{"ok": true}')
            return web.Response(
                body=data, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"}
            )

        async def until_close(request: web.Request) -> web.StreamResponse:
            resp = web.StreamResponse(headers={"Connection": "close"})
            resp.enable_chunked_encoding = lambda: None  # type: ignore[method-assign]
            resp.force_close()
            await resp.prepare(request)
            await resp.write(b"part one, ")
            await resp.write(b"part two")
            await resp.write_eof()
            return resp

        app = web.Application()
        app.router.add_post("/gz", gzipped)
        app.router.add_post("/close", until_close)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port: Any = runner.addresses[0][1]
        client = NativeHttpClient()
        try:
            r = await client.send(UpstreamRequest(f"http://127.0.0.1:{port}/gz", {}, b"{}"), 1, 5)
            assert await r.read() == b'{"ok": true}'
            r = await client.send(UpstreamRequest(f"http://127.0.0.1:{port}/close", {}, b"{}"), 1, 5)
            assert await r.read() in (b"part one, part two",)
        finally:
            await client.close()
            await runner.cleanup()

    run(loop, test)
