"""`Informer`: one list + watch of a resource kind, kept in a local cache, never missing a change.

The loop (what client-go's reflector does):

1. **list** (`resourceVersion` of the list = where the watch starts); every listed object goes to
   the handler as `ADDED`/`MODIFIED` when new or changed since the cache saw it, and every cached
   object missing from the list as `DELETED` (it went away while nobody watched);
2. **watch** from the last resourceVersion seen, with `allowWatchBookmarks` (the server moves the
   resourceVersion forward even when nothing of ours changes) and a server-side timeout;
3. when the watch ends (timeout) or the connection drops, watch again **from the last
   resourceVersion** — every change after it is delivered, none is missed;
4. on `410 Gone` (that resourceVersion was compacted away) relist: step 1 reconciles the cache
   with the present, so a change that happened in the gap is still seen as its end state.

Handlers run one at a time, in order, and get the raw object (a dict). A failing handler is
logged and does not stop the informer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from kubernetes_asyncio import watch as k8s_watch
from kubernetes_asyncio.client.exceptions import ApiException
from prometheus_client import Counter

log = logging.getLogger(__name__)

Handler = Callable[[str, dict[str, Any]], Awaitable[None]]
ListFunc = Callable[..., Awaitable[Any]]


def _rv(obj: dict[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("resourceVersion") or "")


def _key(obj: dict[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    return f"{meta.get('namespace', '')}/{meta.get('name', '')}"


class Informer:
    def __init__(
        self,
        kind: str,
        list_func: ListFunc,
        namespace: str,
        label_selector: str,
        handler: Handler,
        *,
        timeout_seconds: int = 300,
        retry_seconds: float = 1.0,
        restarts: Counter | None = None,
    ) -> None:
        self.kind = kind
        self.list_func = list_func
        self.namespace = namespace
        self.label_selector = label_selector
        self.handler = handler
        self.timeout_seconds = timeout_seconds
        self.retry_seconds = retry_seconds
        self.cache: dict[str, dict[str, Any]] = {}
        self.resource_version = ""
        self.synced = asyncio.Event()
        self.relists = 0
        self.rewatches = 0
        self._restarts = restarts

    def _count(self, why: str) -> None:
        if self._restarts is not None:
            self._restarts.labels(self.kind, why).inc()

    async def run(self) -> None:
        need_list = True
        while True:
            try:
                if need_list:
                    await self.relist()
                    need_list = False
                await self._watch_once()
                self.rewatches += 1
                self._count("timeout")
            except ApiException as exc:
                if exc.status == 410:
                    log.info(
                        "watch resourceVersion too old (410 Gone); relisting",
                        extra={"kind": self.kind, "resource_version": self.resource_version},
                    )
                    self._count("gone")
                    need_list = True
                    continue
                log.warning(
                    "watch failed; retrying",
                    extra={"kind": self.kind, "status": exc.status, "error": str(exc.reason)},
                )
                self._count("error")
                await asyncio.sleep(self.retry_seconds)
            except (aiohttp.ClientError, TimeoutError, ConnectionError) as exc:
                log.info(
                    "watch connection lost; watching again from the last resourceVersion",
                    extra={"kind": self.kind, "error": repr(exc), "resource_version": self.resource_version},
                )
                self._count("dropped")
                await asyncio.sleep(min(self.retry_seconds, 0.2))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a malformed answer must not end the watch for good
                log.warning(
                    "watch failed unexpectedly; relisting",
                    extra={"kind": self.kind, "error": repr(exc)},
                )
                self._count("error")
                need_list = True
                await asyncio.sleep(self.retry_seconds)

    async def relist(self) -> None:
        result = await self.list_func(
            self.namespace, label_selector=self.label_selector, _preload_content=False
        )
        try:
            if result.status != 200:
                body = await result.text()
                raise ApiException(status=result.status, reason=body[:300])
            data = await result.json(content_type=None)
        finally:
            result.release()
        self.relists += 1
        items: list[dict[str, Any]] = list(data.get("items") or [])
        seen: set[str] = set()
        for obj in items:
            key = _key(obj)
            seen.add(key)
            old = self.cache.get(key)
            self.cache[key] = obj
            if old is None:
                await self._dispatch("ADDED", obj)
            elif _rv(old) != _rv(obj):
                await self._dispatch("MODIFIED", obj)
        for key in [k for k in self.cache if k not in seen]:
            gone = self.cache.pop(key)
            await self._dispatch("DELETED", gone)
        self.resource_version = str((data.get("metadata") or {}).get("resourceVersion") or "")
        self.synced.set()

    async def _watch_once(self) -> None:
        watcher = k8s_watch.Watch()
        kwargs: dict[str, Any] = {
            "label_selector": self.label_selector,
            "timeout_seconds": self.timeout_seconds,
            "allow_watch_bookmarks": True,
        }
        if self.resource_version:
            kwargs["resource_version"] = self.resource_version
        try:
            async with watcher.stream(self.list_func, self.namespace, **kwargs) as stream:
                async for event in stream:
                    kind = str(event["type"])
                    obj: dict[str, Any] = event["raw_object"]
                    rv = _rv(obj)
                    if kind == "BOOKMARK":
                        if rv:
                            self.resource_version = rv
                        continue
                    key = _key(obj)
                    if kind == "DELETED":
                        self.cache.pop(key, None)
                    else:
                        self.cache[key] = obj
                    if rv:
                        self.resource_version = rv
                    await self._dispatch(kind, obj)
        finally:
            await watcher.close()

    async def _dispatch(self, kind: str, obj: dict[str, Any]) -> None:
        try:
            await self.handler(kind, obj)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("informer handler failed", extra={"kind": self.kind, "object": _key(obj)})
