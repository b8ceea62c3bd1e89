"""The hot path: one LLM call from request to usage event, as a raw ASGI handler.

authenticate -> read and parse the body -> resolve the model -> budgets (local view) -> rate
limits (tokens: local view; requests: exact, shared) -> upstream attempts with key rotation,
retries, failover and circuit breakers -> the answer (buffered, or streamed event by event)
-> usage, cost, counters, metrics and one `LlmUsage` event, whatever happened.

Raw ASGI rather than a framework handler: the body is read once, with its size limit, as bytes;
streams are relayed without extra buffering; and a client disconnect is seen while streaming.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Literal

import msgspec
import nats.errors

from fabrik_common.events import LlmUsage
from fabrik_common.ids import new_ulid
from fabrik_llm_proxy.circuits import Circuits
from fabrik_llm_proxy.keypools import ProviderKey
from fabrik_llm_proxy.keys import AuthError, Caller
from fabrik_llm_proxy.limits import CounterConflictError
from fabrik_llm_proxy.providers.base import UpstreamError, UpstreamResponse
from fabrik_llm_proxy.providers.echo import EchoProvider
from fabrik_llm_proxy.routing import Deployment, Route
from fabrik_llm_proxy.state import ProxyState
from fabrik_llm_proxy.streaming import StreamTracker, tracker_for
from fabrik_llm_proxy.tokens import estimate_prompt_tokens
from fabrik_llm_proxy.usage import Usage, usage_from_body
from fabrik_llm_proxy.wire import (
    STATUS,
    Endpoint,
    ErrorKind,
    WireFormat,
    error_body,
    stream_error_event,
    wire_format,
)

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_JSON: Final = b"application/json"
_SSE: Final = b"text/event-stream"
_WANTED_HEADERS: Final = frozenset(
    {
        b"authorization",
        b"x-api-key",
        b"content-length",
        b"anthropic-version",
        b"anthropic-beta",
        b"openai-beta",
    }
)
_json_decode = msgspec.json.Decoder().decode
_STARTED = int(time.time())
# A small margin so a wait for Retry-After ends after the key's cooldown, never just before.
_RETRY_AFTER_MARGIN = 0.01

FailureKind = Literal[
    "auth",
    "rate_limited",
    "server",
    "connect",
    "timeout",
    "protocol",
    "client_error",
    "not_found",
    "unavailable",
]


class UpstreamFailure(Exception):  # noqa: N818 - an outcome, handled in place
    def __init__(
        self,
        kind: FailureKind,
        message: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
        body: bytes = b"",
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        super().__init__(message)
        self.kind: FailureKind = kind
        self.message = message
        self.status = status
        self.retry_after = retry_after
        self.body = body
        self.headers = headers or []

    @property
    def label(self) -> str:
        return str(self.status) if self.status is not None else self.kind


class ClientGone(Exception):  # noqa: N818 - a condition, not an error
    pass


@dataclass
class Call:
    call_id: str
    endpoint: Endpoint
    fmt: WireFormat
    caller: Caller | None
    t0: float
    started_at: datetime
    model: str = ""
    stream: bool = False
    alias: str | None = None
    deployment: Deployment | None = None
    retries: int = 0
    status: int = 0
    outcome: Literal["ok", "error", "refused", "client_disconnected"] = "error"
    error: str | None = None
    usage: Usage | None = None
    ttfb: float | None = None
    upstream_wait: float = 0.0
    sleeping: float = 0.0
    overhead: float | None = None
    payload: dict[str, Any] = field(default_factory=dict)


def parse_retry_after(resp: UpstreamResponse) -> float | None:
    ms = resp.header("retry-after-ms")
    if ms:
        with contextlib.suppress(ValueError):
            return max(0.0, float(ms) / 1000)
    value = resp.header("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    with contextlib.suppress(TypeError, ValueError, IndexError):
        from email.utils import parsedate_to_datetime

        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    return None


def _classify_status(status: int) -> FailureKind:
    if status in (401, 403):
        return "auth"
    if status == 429:
        return "rate_limited"
    if status == 404:
        return "not_found"
    if status >= 500 or status in (408, 409):
        return "server"
    return "client_error"


def _key_ident(key: ProviderKey | None) -> str:
    return key.ident if key is not None else ""


class LlmProxy:
    def __init__(self) -> None:
        self.state: ProxyState | None = None
        self.inflight = 0

    # -- ASGI entry points ----------------------------------------------------------------

    async def handle(self, endpoint: Endpoint, scope: Scope, receive: Receive, send: Send) -> None:
        t0 = time.perf_counter()
        fmt = wire_format(endpoint)
        state = self.state
        if state is None:
            await _respond(
                send, 503, error_body(fmt, "unavailable", "the llm-proxy is starting"), retry_after=1
            )
            return
        if scope.get("method") != "POST":
            await _respond(send, 405, error_body(fmt, "invalid_request", "use POST"))
            return
        headers = _headers(scope)
        try:
            caller = state.auth.authenticate(_api_key(headers))
        except AuthError as exc:
            state.metrics.refused.labels("auth").inc()
            state.metrics.requests.labels(endpoint, "", str(exc.status)).inc()
            await _respond(send, exc.status, error_body(fmt, "authentication", str(exc)))
            return
        call = Call(new_ulid(), endpoint, fmt, caller, t0, datetime.now(UTC))
        state.metrics.inflight.inc()
        self.inflight += 1
        try:
            await self._handle_call(state, call, headers, receive, send)
        except ClientGone:
            call.outcome = "client_disconnected"
            call.error = "client disconnected"
        except Exception as exc:
            log.exception("llm call failed inside the proxy", extra={"call_id": call.call_id})
            call.outcome, call.error = "error", f"proxy error: {type(exc).__name__}"
            if call.status == 0:
                call.status = 500
                with contextlib.suppress(Exception):
                    await _respond(send, 500, error_body(fmt, "upstream", "internal error in the llm-proxy"))
        finally:
            state.metrics.inflight.dec()
            self.inflight -= 1
            self._finish(state, call)

    async def models(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = self.state
        headers = _headers(scope)
        fmt: WireFormat = "anthropic" if "anthropic-version" in headers else "openai"
        if state is None:
            await _respond(
                send, 503, error_body(fmt, "unavailable", "the llm-proxy is starting"), retry_after=1
            )
            return
        try:
            state.auth.authenticate(_api_key(headers))
        except AuthError as exc:
            await _respond(send, exc.status, error_body(fmt, "authentication", str(exc)))
            return
        path = str(scope.get("path", "")).rstrip("/")
        aliases = state.routes.aliases
        if path.startswith("/v1/models/"):
            wanted = path[len("/v1/models/") :]
            if wanted not in aliases and not state.routes.knows(wanted):
                await _respond(send, 404, error_body(fmt, "not_found", f"model {wanted!r} does not exist"))
                return
            aliases = [wanted]
        created = _STARTED
        if fmt == "anthropic":
            data: Any = [
                {
                    "type": "model",
                    "id": a,
                    "display_name": a,
                    "created_at": datetime.fromtimestamp(created, UTC).isoformat(),
                }
                for a in aliases
            ]
            body: Any = (
                data[0]
                if path.startswith("/v1/models/")
                else {
                    "data": data,
                    "has_more": False,
                    "first_id": aliases[0] if aliases else None,
                    "last_id": aliases[-1] if aliases else None,
                }
            )
        else:
            data = [{"id": a, "object": "model", "created": created, "owned_by": "fabrik"} for a in aliases]
            body = data[0] if path.startswith("/v1/models/") else {"object": "list", "data": data}
        await _respond(send, 200, msgspec.json.encode(body))

    # -- one call ---------------------------------------------------------------------------

    async def _handle_call(
        self, state: ProxyState, call: Call, headers: dict[str, str], receive: Receive, send: Send
    ) -> None:
        limit = state.settings.llm_max_body_bytes
        declared = headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            await self._refuse(state, call, send, "too_large", f"request body over {limit} bytes")
            return
        body = await _read_body(receive, limit)
        if body is None:
            await self._refuse(state, call, send, "too_large", f"request body over {limit} bytes")
            return
        try:
            payload = _json_decode(body)
        except msgspec.DecodeError as exc:
            await self._refuse(state, call, send, "invalid_request", f"request body is not valid JSON: {exc}")
            return
        if not isinstance(payload, dict):
            await self._refuse(state, call, send, "invalid_request", "request body must be a JSON object")
            return
        model = payload.get("model")
        if not isinstance(model, str) or not model:
            await self._refuse(state, call, send, "invalid_request", "`model` is required", param="model")
            return
        call.model = model
        call.stream = payload.get("stream") is True
        call.payload = payload
        route = state.routes.resolve(model, call.endpoint)
        if route is None:
            if state.routes.knows(model):
                message = (
                    f"model {model!r} is not served on this endpoint (its deployments speak another API)"
                )
            else:
                message = f"model {model!r} does not exist"
            await self._refuse(state, call, send, "not_found", message, param="model", reason="unknown_model")
            return
        call.alias = route.alias
        caller = call.caller
        assert caller is not None
        refusal = state.budgets.check(caller.project, caller.run_id, caller.budget_usd)
        if refusal is not None:
            spent, budget = refusal.spent_usd, refusal.budget_usd
            message = f"{refusal.scope} budget exhausted: ${spent:.4f} spent of ${budget:.4f}"
            await self._refuse(state, call, send, "budget", message, reason="budget")
            return
        try:
            limited = await state.limiter.admit(caller.project, caller.run_id)
        except (nats.errors.Error, TimeoutError, CounterConflictError) as exc:
            # Limits that cannot be checked are not waived: the call is refused, briefly.
            log.warning("rate limit store unavailable", extra={"error": repr(exc)})
            message = "rate limits cannot be checked right now (NATS unavailable)"
            await self._refuse(
                state, call, send, "unavailable", message, reason="limits_unavailable", retry_after=1
            )
            return
        if limited is not None:
            message = f"{limited.scope} limit of {limited.limit} {limited.metric} reached"
            await self._refuse(
                state,
                call,
                send,
                "rate_limit",
                message,
                reason="rate_limit",
                retry_after=max(1, math.ceil(limited.retry_after)),
            )
            return
        await self._forward(state, call, route, payload, headers, receive, send)

    async def _refuse(
        self,
        state: ProxyState,
        call: Call,
        send: Send,
        kind: ErrorKind,
        message: str,
        *,
        param: str | None = None,
        reason: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        state.metrics.refused.labels(reason or kind).inc()
        call.outcome, call.error = "refused", message
        call.status = _status(kind)
        await _respond(
            send, call.status, error_body(call.fmt, kind, message, param=param), retry_after=retry_after
        )

    # -- upstream attempts ------------------------------------------------------------------

    async def _forward(
        self,
        state: ProxyState,
        call: Call,
        route: Route,
        payload: dict[str, Any],
        headers: dict[str, str],
        receive: Receive,
        send: Send,
    ) -> None:
        retry = state.config.retry
        breaker = state.config.circuit
        circuits = state.circuits
        options = payload.get("stream_options")
        client_wants_usage = isinstance(options, dict) and options.get("include_usage") is True
        attempts = 0
        last: UpstreamFailure | None = None
        for dep in route.plan():
            if attempts >= retry.max_attempts:
                break
            if not circuits.available("deployment", dep.name):
                last = last or UpstreamFailure(
                    "unavailable",
                    f"deployment {dep.name} is cooling down",
                    retry_after=circuits.retry_after("deployment", dep.name),
                )
                continue
            dep.provider.prepare_payload(call.endpoint, payload, dep.model_for(call.model))
            keys: list[ProviderKey | None]
            if dep.key_pool:
                pool = state.pools.get(dep.key_pool)
                if pool is None or not pool.keys:
                    log.error(
                        "deployment has no provider keys",
                        extra={"deployment": dep.name, "pool": dep.key_pool},
                    )
                    last = UpstreamFailure("auth", f"no provider keys in pool {dep.key_pool!r}")
                    circuits.release("deployment", dep.name)
                    continue
                keys = list(pool.rotation())
            else:
                keys = [None]
            tries = 0
            while tries < retry.attempts_per_deployment and attempts < retry.max_attempts:
                key = _next_key(circuits, keys)
                if isinstance(key, _AllCooling):
                    cooling = [k for k in keys if k is not None]
                    wait = min((circuits.retry_after("key", k.ident) for k in cooling), default=0.0)
                    last = UpstreamFailure(
                        "rate_limited" if last is None or last.kind != "auth" else "auth",
                        f"every key of deployment {dep.name} is cooling down",
                        retry_after=wait,
                    )
                    break
                attempts += 1
                tries += 1
                if attempts > 1:
                    call.retries += 1
                    state.metrics.retries.labels(dep.name).inc()
                try:
                    result = await self._attempt(state, call, dep, key, payload, headers, client_wants_usage)
                except UpstreamFailure as failure:
                    last = failure
                    state.metrics.upstream_errors.labels(dep.name, failure.label).inc()
                    log.warning(
                        "upstream attempt failed",
                        extra={
                            "call_id": call.call_id,
                            "deployment": dep.name,
                            "key": key.fingerprint if key else None,
                            "failure": failure.label,
                            "error": failure.message,
                        },
                    )
                    if key is not None and failure.kind not in ("auth", "rate_limited"):
                        circuits.release("key", key.ident)  # not the key's fault
                    if failure.kind == "client_error":
                        circuits.success("deployment", dep.name)
                        await self._pass_error(state, call, dep, failure, send)
                        return
                    if failure.kind == "auth" and key is not None:
                        circuits.failure(
                            "key",
                            key.ident,
                            reason="auth",
                            threshold=1,
                            cooldown=breaker.auth_cooldown_seconds,
                        )
                        tries -= 1  # rotating away from a bad key is not a retry of this deployment
                        continue
                    if failure.kind == "rate_limited":
                        cooldown = failure.retry_after or breaker.rate_limit_cooldown_seconds
                        if key is not None:
                            circuits.failure(
                                "key", key.ident, reason="rate_limited", threshold=1, cooldown=cooldown
                            )
                            if _next_key(circuits, keys, peek=True) is not _ALL_COOLING:
                                tries -= 1
                                continue
                        if (
                            failure.retry_after is not None
                            and failure.retry_after <= retry.max_retry_after_seconds
                        ):
                            if tries < retry.attempts_per_deployment and attempts < retry.max_attempts:
                                await self._sleep(call, failure.retry_after + _RETRY_AFTER_MARGIN)
                            continue
                        if key is None:
                            circuits.failure(
                                "deployment", dep.name, reason="rate_limited", threshold=1, cooldown=cooldown
                            )
                        break
                    if failure.kind == "not_found":
                        break
                    if failure.kind == "auth":  # keyless deployment refused us: nothing to rotate
                        break
                    opened = circuits.failure(
                        "deployment",
                        dep.name,
                        reason=failure.label,
                        threshold=breaker.failure_threshold,
                        cooldown=max(breaker.cooldown_seconds, failure.retry_after or 0.0),
                    )
                    if opened or tries >= retry.attempts_per_deployment or attempts >= retry.max_attempts:
                        break
                    delay = min(retry.backoff_max_seconds, retry.backoff_base_seconds * 2 ** (tries - 1))
                    delay *= 0.5 + random.random() / 2  # noqa: S311 - jitter, not cryptography
                    if (
                        failure.retry_after is not None
                        and failure.retry_after <= retry.max_retry_after_seconds
                    ):
                        delay = max(delay, failure.retry_after)
                    await self._sleep(call, delay)
                    continue
                circuits.success("deployment", dep.name)
                if key is not None:
                    circuits.success("key", key.ident)
                call.deployment = dep
                if isinstance(result, _Stream):
                    await self._deliver_stream(state, call, result, receive, send)
                else:
                    await self._deliver_body(state, call, result, send)
                return
            circuits.release("deployment", dep.name)
        await self._fail(state, call, last, send)

    async def _sleep(self, call: Call, seconds: float) -> None:
        call.sleeping += seconds
        await asyncio.sleep(seconds)

    async def _attempt(
        self,
        state: ProxyState,
        call: Call,
        dep: Deployment,
        key: ProviderKey | None,
        payload: dict[str, Any],
        headers: dict[str, str],
        client_wants_usage: bool,
    ) -> _Stream | _Body:
        provider = dep.provider
        started = time.perf_counter()
        resp: UpstreamResponse
        try:
            if isinstance(provider, EchoProvider):
                resp = provider.respond(call.endpoint, payload, include_usage=True)
            else:
                request = provider.build(call.endpoint, payload, key.secret if key else None, headers)
                resp = await state.transport.send(request, dep.connect_timeout, dep.read_timeout)
            if resp.status >= 400:
                try:
                    body = await resp.read()
                except UpstreamError:
                    body = b""
                kind = _classify_status(resp.status)
                raise UpstreamFailure(
                    kind,
                    f"upstream answered {resp.status}",
                    status=resp.status,
                    retry_after=parse_retry_after(resp),
                    body=body,
                    headers=resp.passthrough_headers(),
                )
            if call.stream:
                try:
                    first = await resp.next_chunk()
                except BaseException:
                    resp.close()
                    raise
                if not first:
                    resp.close()
                    raise UpstreamFailure("protocol", "upstream ended the stream before its first byte")
                call.ttfb = time.perf_counter() - call.t0
                return _Stream(resp, tracker_for(call.endpoint, client_wants_usage), first)
            body = await resp.read()
            call.ttfb = time.perf_counter() - call.t0
            return _Body(body, resp.passthrough_headers())
        except UpstreamError as exc:
            raise UpstreamFailure(exc.kind, str(exc)) from exc
        finally:
            call.upstream_wait += time.perf_counter() - started

    # -- answers ----------------------------------------------------------------------------

    def _overhead(self, call: Call) -> float:
        elapsed = time.perf_counter() - call.t0
        call.overhead = max(0.0, elapsed - call.upstream_wait - call.sleeping)
        return call.overhead

    def _response_headers(self, call: Call, extra: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        overhead_ms = self._overhead(call) * 1000
        return [
            (b"x-fabrik-call-id", call.call_id.encode()),
            (b"x-fabrik-overhead-ms", f"{overhead_ms:.3f}".encode()),
            *extra,
        ]

    async def _deliver_body(self, state: ProxyState, call: Call, result: _Body, send: Send) -> None:
        body = result.body
        usage = usage_from_body(call.endpoint, body)
        if usage is None:
            usage = Usage(estimated=True)
            usage.input_tokens = estimate_prompt_tokens(state.counter, call.payload)
            usage.output_tokens = state.counter.count(_answer_text(call.endpoint, body))
        call.usage = usage
        call.status, call.outcome = 200, "ok"
        headers = self._response_headers(call, result.headers)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", _JSON), (b"content-length", str(len(body)).encode()), *headers],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def _deliver_stream(
        self,
        state: ProxyState,
        call: Call,
        stream: _Stream,
        receive: Receive,
        send: Send,
    ) -> None:
        resp, tracker, first = stream.resp, stream.tracker, stream.first
        headers = self._response_headers(call, resp.passthrough_headers())
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", _SSE),
                    (b"cache-control", b"no-cache"),
                    (b"x-accel-buffering", b"no"),
                    *headers,
                ],
            }
        )
        call.status = 200
        gone = asyncio.Event()

        async def watch_client() -> None:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    gone.set()
                    resp.close()
                    return

        watcher = asyncio.create_task(watch_client())
        failure: tuple[ErrorKind, str] | None = None
        try:
            chunk = first
            while chunk:
                out = tracker.feed(chunk)
                if out:
                    await send({"type": "http.response.body", "body": out, "more_body": True})
                if gone.is_set():
                    break
                try:
                    chunk = await resp.next_chunk()
                except UpstreamError as exc:
                    if not gone.is_set():
                        failure = ("timeout" if exc.kind == "timeout" else "upstream", str(exc))
                    break
            if gone.is_set():
                call.outcome, call.error = "client_disconnected", "client disconnected mid-stream"
            elif failure is None and not tracker.done:
                failure = ("upstream", "upstream ended the stream before its end")
            if failure is not None and not gone.is_set():
                kind, message = failure
                dep_name = call.deployment.name if call.deployment else ""
                state.metrics.stream_errors.labels(call.endpoint).inc()
                state.metrics.upstream_errors.labels(dep_name, "stream_broken").inc()
                if tracker.upstream_error is None:
                    # The upstream did not say it failed: tell the client, in its own format.
                    seq = getattr(tracker, "sequence_number", -1) + 1
                    event = stream_error_event(
                        call.endpoint, kind, f"{message}; the answer is incomplete", seq
                    )
                    await send({"type": "http.response.body", "body": event, "more_body": True})
                call.outcome, call.error = "error", message
            elif tracker.upstream_error is not None and not gone.is_set():
                call.outcome, call.error = "error", f"upstream error event: {tracker.upstream_error}"
            elif not gone.is_set():
                call.outcome = "ok"
            if not gone.is_set():
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            watcher.cancel()
            resp.close()
            call.usage = _stream_usage(state, call, tracker)

    async def _pass_error(
        self, state: ProxyState, call: Call, dep: Deployment, failure: UpstreamFailure, send: Send
    ) -> None:
        """An upstream 4xx about the request itself: the client gets it as the upstream said it."""
        call.deployment = dep
        call.status = failure.status or 400
        call.outcome, call.error = "error", f"upstream refused the request ({call.status})"
        body = failure.body or error_body(call.fmt, "invalid_request", failure.message)
        headers = self._response_headers(call, failure.headers)
        await send(
            {
                "type": "http.response.start",
                "status": call.status,
                "headers": [(b"content-type", _JSON), (b"content-length", str(len(body)).encode()), *headers],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def _fail(self, state: ProxyState, call: Call, last: UpstreamFailure | None, send: Send) -> None:
        retry_after: int | None = None
        kind: ErrorKind
        if last is None:
            kind, message = "unavailable", "no deployment could take the call"
        elif last.kind == "unavailable":
            kind, message = "unavailable", "every deployment of this model is cooling down after failures"
            retry_after = max(1, math.ceil(last.retry_after or 1))
        elif last.kind == "rate_limited":
            kind, message = "rate_limit", "the upstream providers are rate limiting every key; retry later"
            retry_after = max(1, math.ceil(last.retry_after or 1))
        elif last.kind == "auth":
            kind, message = "upstream", "the upstream providers rejected every configured key"
        elif last.kind == "connect":
            kind, message = "unavailable", f"cannot reach the upstream provider ({last.message})"
            retry_after = 1
        elif last.kind == "timeout":
            kind, message = "timeout", "the upstream provider did not answer in time"
        elif last.kind == "not_found":
            kind, message = "not_found", f"model {call.model!r} is not available upstream"
        else:
            kind, message = "upstream", f"the upstream provider failed ({last.message})"
        call.outcome, call.error = "error", message
        call.status = _status(kind)
        self._overhead(call)
        await _respond(send, call.status, error_body(call.fmt, kind, message), retry_after=retry_after)

    # -- accounting -------------------------------------------------------------------------

    def _finish(self, state: ProxyState, call: Call) -> None:
        caller = call.caller
        latency = time.perf_counter() - call.t0
        metrics = state.metrics
        model_label = call.alias or ("" if not call.model else "(unknown)")
        child = metrics.child
        child(metrics.requests, call.endpoint, model_label, str(call.status or 499)).inc()
        child(metrics.latency, call.endpoint).observe(latency)
        if call.overhead is not None:
            child(metrics.overhead, call.endpoint).observe(call.overhead)
        if call.ttfb is not None:
            child(metrics.ttfb, call.endpoint).observe(call.ttfb)
        if caller is None:
            return
        dep = call.deployment
        usage = call.usage or Usage()
        cost = 0.0
        if dep is not None and usage.total:
            models = ("echo",) if dep.provider_name == "echo" else (dep.model_for(call.model), call.model)
            cost = state.prices.cost(
                models,
                call.started_at,
                input_tokens=usage.input_tokens,
                output_tokens=usage.output_tokens,
                cache_read_tokens=usage.cache_read_tokens,
                cache_write_tokens=usage.cache_write_tokens,
            )
            for kind, n in (
                ("input", usage.input_tokens),
                ("output", usage.output_tokens),
                ("cache_read", usage.cache_read_tokens),
                ("cache_write", usage.cache_write_tokens),
            ):
                if n:
                    child(metrics.tokens, model_label, kind).inc(n)
            if cost:
                child(metrics.cost, model_label).inc(cost)
            state.budgets.record(caller.project, caller.run_id, caller.budget_usd, cost)
            state.limiter.record_tokens(caller.project, caller.run_id, usage.total)
        try:
            event = LlmUsage(
                event_id=call.call_id,
                call_id=call.call_id,
                run_id=caller.run_id,
                project=caller.project,
                key_id=caller.key_id,
                endpoint=call.endpoint,
                model=call.model,
                provider=dep.provider_name if dep else "",
                deployment=dep.name if dep else "",
                upstream_model=dep.model_for(call.model) if dep else "",
                streamed=call.stream,
                input_tokens=usage.input_tokens,
                output_tokens=usage.output_tokens,
                cache_read_tokens=usage.cache_read_tokens,
                cache_write_tokens=usage.cache_write_tokens,
                estimated=usage.estimated,
                cost_usd=cost,
                latency_ms=round(latency * 1000, 3),
                ttfb_ms=round(call.ttfb * 1000, 3) if call.ttfb is not None else None,
                retries=call.retries,
                outcome=call.outcome,
                error=call.error,
            )
        except (msgspec.ValidationError, TypeError, ValueError) as exc:
            log.error("usage event invalid", extra={"call_id": call.call_id, "error": str(exc)})  # noqa: TRY400
            return
        state.publisher.submit(event)


@dataclass(slots=True)
class _Body:
    body: bytes
    headers: list[tuple[bytes, bytes]]


@dataclass(slots=True)
class _Stream:
    resp: UpstreamResponse
    tracker: StreamTracker
    first: bytes


class _AllCooling:
    pass


_ALL_COOLING: Final = _AllCooling()


def _next_key(
    circuits: Circuits, keys: list[ProviderKey | None], *, peek: bool = False
) -> ProviderKey | _AllCooling | None:
    """The next usable key of the rotation (None for a keyless deployment); _ALL_COOLING if none."""
    for i, key in enumerate(keys):
        if key is None:
            return None
        usable = circuits.peek("key", key.ident) if peek else circuits.available("key", key.ident)
        if usable:
            if not peek:
                keys.append(keys.pop(i))  # rotate: next time, start after this one
            return key
    return _ALL_COOLING


def _stream_usage(state: ProxyState, call: Call, tracker: StreamTracker) -> Usage:
    if tracker.usage is not None and tracker.usage_final:
        return tracker.usage
    # No final figure (upstream gave none, or the stream broke): count what we saw.
    partial = tracker.usage
    usage = Usage(estimated=True)
    if partial is not None and partial.input_tokens:
        usage.input_tokens = partial.input_tokens
        usage.cache_read_tokens = partial.cache_read_tokens
        usage.cache_write_tokens = partial.cache_write_tokens
    else:
        usage.input_tokens = estimate_prompt_tokens(state.counter, call.payload)
    usage.output_tokens = max(
        state.counter.count(tracker.output_text), partial.output_tokens if partial else 0
    )
    return usage


class _AnswerParts(msgspec.Struct):
    choices: list[dict[str, Any]] | None = None
    output: list[dict[str, Any]] | None = None
    content: list[dict[str, Any]] | None = None


def _answer_text(endpoint: Endpoint, body: bytes) -> str:
    """The generated text of a complete response (for estimating its tokens)."""
    try:
        parts = msgspec.json.decode(body, type=_AnswerParts)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return ""
    texts: list[str] = []
    for choice in parts.choices or ():
        message = choice.get("message") or {}
        if isinstance(message.get("content"), str):
            texts.append(message["content"])
        for call in message.get("tool_calls") or ():
            texts.append(str((call.get("function") or {}).get("arguments", "")))
    for item in parts.output or ():
        for content in item.get("content") or ():
            if isinstance(content, dict) and isinstance(content.get("text"), str):
                texts.append(content["text"])
        if isinstance(item.get("arguments"), str):
            texts.append(item["arguments"])
    for block in parts.content or ():
        if isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif "input" in block:
            texts.append(msgspec.json.encode(block["input"]).decode())
    return "".join(texts)


def _status(kind: ErrorKind) -> int:
    return STATUS[kind]


def _headers(scope: Scope) -> dict[str, str]:
    found: dict[str, str] = {}
    for name, value in scope.get("headers", ()):
        if name in _WANTED_HEADERS:
            found[name.decode()] = value.decode("latin-1")
    return found


def _api_key(headers: dict[str, str]) -> str:
    auth = headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return headers.get("x-api-key", "").strip()


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _respond(send: Send, status: int, body: bytes, *, retry_after: int | None = None) -> None:
    headers = [(b"content-type", _JSON), (b"content-length", str(len(body)).encode())]
    if retry_after is not None:
        headers.append((b"retry-after", str(retry_after).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
