"""Wiring and start-up of the llm-proxy service."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from litestar import Request, Response, asgi, get
from litestar.types import ControllerRouterHandler, Receive, Scope, Send

from fabrik_common import kvwatch
from fabrik_common.service import Service, run_service
from fabrik_llm_proxy.accounting import EventPublisher
from fabrik_llm_proxy.aio import cancel_requested
from fabrik_llm_proxy.budgets import Budgets
from fabrik_llm_proxy.circuits import Circuits
from fabrik_llm_proxy.config import ConfigError, ProxyConfig
from fabrik_llm_proxy.handlers import router
from fabrik_llm_proxy.keypools import KeyPools
from fabrik_llm_proxy.keys import Authenticator, AuthError, parse_operator_keys
from fabrik_llm_proxy.limits import RateLimiter, SharedCounters
from fabrik_llm_proxy.metrics import ProxyMetrics
from fabrik_llm_proxy.pricing import PriceError, PriceTable, default_price_file
from fabrik_llm_proxy.proxy import LlmProxy
from fabrik_llm_proxy.routing import RouteTable
from fabrik_llm_proxy.settings import LlmProxySettings
from fabrik_llm_proxy.state import ProxyState, initial_config
from fabrik_llm_proxy.tokens import TokenCounter
from fabrik_llm_proxy.upstream import HttpTransport
from fabrik_llm_proxy.wire import Endpoint

NAME = "llm-proxy"
log = logging.getLogger(__name__)


def proxy_routes(proxy: LlmProxy) -> list[ControllerRouterHandler]:
    def endpoint_handler(endpoint: Endpoint, path: str) -> ControllerRouterHandler:
        async def handle(scope: Scope, receive: Receive, send: Send) -> None:
            await proxy.handle(endpoint, scope, receive, send)  # type: ignore[arg-type]

        handle.__name__ = f"llm_{endpoint.replace('.', '_')}"
        return asgi(path, copy_scope=False)(handle)

    @asgi("/v1/models", is_mount=True, copy_scope=False)
    async def models(scope: Scope, receive: Receive, send: Send) -> None:
        inner = dict(scope)
        inner["path"] = "/v1/models" + str(scope.get("path", "")).rstrip("/").removeprefix("/v1/models")
        await proxy.models(inner, receive, send)  # type: ignore[arg-type]

    @get("/admin/circuits", sync_to_thread=False)
    def circuits(request: Request[Any, Any, Any]) -> Response[dict[str, Any]]:
        state = proxy.state
        if state is None:
            return Response({"error": "starting"}, status_code=503)
        header = request.headers.get("authorization", "")
        key = header[7:].strip() if header[:7].lower() == "bearer " else request.headers.get("x-api-key", "")
        try:
            caller = state.auth.authenticate(key)
        except AuthError as exc:
            return Response({"error": str(exc)}, status_code=401)
        if not caller.admin:
            return Response({"error": "an operator key with admin rights is required"}, status_code=403)
        return Response(
            {
                "circuits": state.circuits.snapshot(),
                "deployments": [
                    {
                        "name": d.name,
                        "alias": d.alias,
                        "provider": d.provider_name,
                        "upstream_model": d.upstream_model or "(as requested)",
                        "key_pool": d.key_pool,
                        "priority": d.priority,
                        "weight": d.weight,
                        "endpoints": sorted(d.endpoints),
                    }
                    for d in state.routes.deployments()
                ],
                "key_pools": {
                    name: [k.fingerprint for k in pool.keys]
                    for name in state.pools.names()
                    if (pool := state.pools.get(name)) is not None
                },
            }
        )

    return [
        endpoint_handler("chat.completions", "/v1/chat/completions"),
        endpoint_handler("responses", "/v1/responses"),
        endpoint_handler("messages", "/v1/messages"),
        models,
        circuits,
    ]


def _operator_keys(settings: LlmProxySettings) -> tuple[dict[str, Any], str]:
    if settings.llm_operator_keys:
        return parse_operator_keys(settings.llm_operator_keys, "FABRIK_LLM_OPERATOR_KEYS"), ""
    return {}, settings.llm_operator_keys_file


def _load_secret(settings: LlmProxySettings) -> bytes | None:
    from fabrik_common.runkeys import load_run_key_secret

    secret = load_run_key_secret(settings.run_key_secret, settings.run_key_secret_file)
    if secret is None:
        log.warning("no FABRIK_RUN_KEY_SECRET: run keys will be refused, only operator keys work")
    return secret


def _prices(settings: LlmProxySettings) -> PriceTable:
    path = settings.llm_prices_file or default_price_file()
    if path is None:
        log.warning("no price file found; every call costs 0")
        return PriceTable()
    table = PriceTable.load(path)
    log.info("prices loaded", extra={"file": str(path), "models": len(table)})
    return table


async def _forever(name: str, run: Callable[[], Awaitable[None]]) -> None:
    """Run a watch again whenever it ends or fails (NATS reconnects, consumer resets)."""
    while not cancel_requested():
        try:
            await run()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - logged, restarted
            log.warning("watch ended; restarting", extra={"watch": name, "error": repr(exc)})
        await asyncio.sleep(1.0)
    raise asyncio.CancelledError


def _checked_files(settings: LlmProxySettings) -> tuple[ProxyConfig, tuple[int, int, int] | None, PriceTable]:
    """Routing file, prices and operator keys, validated before anything starts (exit 2 if bad)."""
    try:
        config, stamp = initial_config(settings)
        RouteTable(config, TokenCounter())
        prices = _prices(settings)
        _operator_keys(settings)
    except (ConfigError, PriceError, ValueError, OSError) as exc:
        print(f"fabrik-{NAME}: invalid configuration:\n  {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    return config, stamp, prices


def build(settings: LlmProxySettings) -> Service[ProxyState]:
    proxy = LlmProxy()
    config, stamp, prices = _checked_files(settings)

    async def on_start(service: Service[ProxyState]) -> ProxyState:
        js = service.bus.js
        limits_kv = await js.key_value("limits")
        config_kv = await js.key_value("config")
        tokens_kv = await js.key_value("tokens")
        counter = TokenCounter()
        await asyncio.to_thread(counter.load)
        operator_keys, operator_file = _operator_keys(settings)
        auth = Authenticator(_load_secret(settings), operator_keys, operator_file)
        await auth.load_revocations(tokens_kv)
        static_pools = {}
        if settings.llm_openai_api_key:
            static_pools["env:openai"] = [settings.llm_openai_api_key]
        if settings.llm_anthropic_api_key:
            static_pools["env:anthropic"] = [settings.llm_anthropic_api_key]
        counters = SharedCounters(limits_kv)
        # Spend and token counters known before the first call (the watch keeps them current).
        await kvwatch.load(limits_kv, ">", counters.observe)
        publisher = EventPublisher(js, metrics, service.metrics.published)
        publisher.start()
        state = ProxyState(
            settings=settings,
            config=config,
            routes=RouteTable(config, counter),
            pools=KeyPools(settings.llm_keys_dir or None, static_pools),
            auth=auth,
            circuits=Circuits(metrics.circuit_state),
            counters=counters,
            limiter=RateLimiter(counters, lambda: state.config.limits),
            budgets=Budgets(counters, publisher.submit),
            prices=prices,
            publisher=publisher,
            transport=HttpTransport(settings.llm_max_connections),
            metrics=metrics,
            counter=counter,
            config_stamp=stamp,
        )
        # Budgets known before the first call (the watch keeps them current).
        await state.budgets.load_config(config_kv)
        state.config_kv, state.tokens_kv = config_kv, tokens_kv
        proxy.state = state
        log.info(
            "llm-proxy ready",
            extra={
                "aliases": list(config.models),
                "deployments": len(state.routes.deployments()),
                "tokenizer": counter.method,
                "run_keys": auth.secret is not None,
            },
        )
        return state

    async def on_stop(state: ProxyState) -> None:
        # New calls get 503 from here on; calls in progress (streams too) may finish.
        proxy.state = None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + settings.shutdown_grace_seconds
        while proxy.inflight and loop.time() < deadline:  # noqa: ASYNC110 - a deadline, not an event
            await asyncio.sleep(0.05)
        if proxy.inflight:
            log.warning("stopping with calls in progress", extra={"calls": proxy.inflight})
        with contextlib.suppress(Exception):
            await state.counters.flush()
        await state.publisher.drain(settings.llm_drain_seconds)
        await state.transport.close()

    async def reload_loop(state: ProxyState) -> None:
        while not cancel_requested():
            await asyncio.sleep(settings.llm_reload_seconds)
            state.reload()
        raise asyncio.CancelledError

    async def counters_watch(state: ProxyState) -> None:
        await _forever("limits", state.counters.watch)

    async def flush_loop(state: ProxyState) -> None:
        await state.counters.flush_loop(settings.llm_flush_seconds)

    async def budgets_watch(state: ProxyState) -> None:
        await _forever("budgets", lambda: state.budgets.watch_config(state.config_kv))

    async def revocations_watch(state: ProxyState) -> None:
        await _forever("revocations", lambda: state.auth.watch_revocations(state.tokens_kv))

    service: Service[ProxyState] = Service(
        NAME,
        settings,
        routers=[router],
        on_start=on_start,
        on_stop=on_stop,
        route_handlers=proxy_routes(proxy),
        background=[reload_loop, counters_watch, flush_loop, budgets_watch, revocations_watch],
    )
    metrics = ProxyMetrics(service.registry)
    service.proxy = proxy  # type: ignore[attr-defined]
    return service


def main() -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    run_service(LlmProxySettings, build, NAME)


__all__ = ["build", "main"]
