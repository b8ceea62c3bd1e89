"""The serving side of a service's NATS request/reply subjects (the optimizer's, the backup
service's): one subscription per subject in the service's queue group, each request decoded into
its typed struct, answered with the response or with the error struct of the contract."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import msgspec
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

log = logging.getLogger(__name__)

Req = TypeVar("Req")
Handler = Callable[[Msg], Awaitable[None]]


def request_handler(
    contract: Any,
    request_type: type[Req],
    serve: Callable[[Req], Awaitable[msgspec.Struct]],
    *,
    expected: tuple[type[Exception], ...],
) -> Handler:
    """A subscription callback for one subject of `contract` (a contract module such as
    `fabrik_common.optimizer_rpc`: its `RpcError`, `encode` and `decode_request`): decode (a
    malformed request is answered with the contract's error), serve, answer. Exceptions of the
    `expected` types carry their answer in `.error`; anything else is logged and answered as a 500
    of the contract's `RpcError`."""
    error_type = contract.RpcError

    async def handle(msg: Msg) -> None:
        request = contract.decode_request(msg.data, request_type)
        response: msgspec.Struct
        if isinstance(request, error_type):
            response = request
        else:
            try:
                response = await serve(request)
            except expected as exc:
                response = exc.error  # type: ignore[attr-defined]
            except Exception as exc:
                log.exception("request failed", extra={"subject": msg.subject})
                response = error_type(status=500, rule="internal", message=f"{type(exc).__name__}: {exc}")
        if msg.reply:
            await msg.respond(contract.encode(response))

    return handle


async def subscribe_all(
    nc: NatsClient, routes: Sequence[tuple[str, Handler]], queue: str
) -> list[Subscription]:
    """Subscribe every (subject, handler) in the queue group, flushed so that requests sent right
    after find their subscribers."""
    subs = [await nc.subscribe(subject, queue=queue, cb=cb) for subject, cb in routes]
    await nc.flush()
    return subs


async def unsubscribe_all(subs: Sequence[Subscription]) -> None:
    for sub in subs:
        try:
            await sub.unsubscribe()
        except Exception:  # the connection may already be closing
            log.debug("unsubscribe failed", exc_info=True)
