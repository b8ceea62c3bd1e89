"""The dashboard's calls to the REST API: `fabrik_cli.client.ApiClient` (the same URL, credential,
retries and error messages as every other command), run in a worker thread so the terminal stays
responsive."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from fabrik_cli.client import ApiClient, ApiTarget
from fabrik_cli.credentials import Credential
from fabrik_cli.errors import CliError

T = TypeVar("T")

LIST_LIMIT = 200
"""Runs read at start (and after a gap): the newest ones; later runs arrive from the stream."""
LOG_TAIL = 2000


class DashboardApi:
    def __init__(self, client: ApiClient) -> None:
        self.client = client

    @property
    def target(self) -> ApiTarget:
        return self.client.target

    @property
    def credential(self) -> Credential | None:
        return self.client.credential

    async def _call(self, func: Callable[[], T]) -> T:
        return await asyncio.to_thread(func)

    async def whoami(self) -> Any:
        return await self._call(self.client.whoami)

    async def list_runs(
        self, *, project: str | None = None, limit: int = LIST_LIMIT
    ) -> list[Mapping[str, Any]]:
        page = await self._call(lambda: self.client.list_runs(project=project, limit=limit))
        items = page.get("items") if isinstance(page, Mapping) else None
        if not isinstance(items, list):
            raise CliError(f"unexpected answer to GET /runs: {str(page)[:200]}")
        return [item for item in items if isinstance(item, Mapping)]

    async def get_run(self, run_id: str) -> Mapping[str, Any]:
        run = await self._call(lambda: self.client.get_run(run_id))
        if not isinstance(run, Mapping):
            raise CliError(f"unexpected answer to GET /runs/{run_id}: {str(run)[:200]}")
        return run

    async def run_events(self, run_id: str) -> list[Mapping[str, Any]]:
        items: list[Mapping[str, Any]] = []
        after: str | None = None
        while True:
            page = await self._call(functools.partial(self.client.run_events, run_id, after=after))
            if not isinstance(page, Mapping) or not isinstance(page.get("items"), list):
                raise CliError(f"unexpected answer to GET /runs/{run_id}/events: {str(page)[:200]}")
            items.extend(item for item in page["items"] if isinstance(item, Mapping))
            next_cursor = page.get("next_cursor")
            if not next_cursor or next_cursor == after:
                return items
            after = str(next_cursor)

    async def run_logs(self, run_id: str, *, tail: int = LOG_TAIL) -> list[Mapping[str, Any]]:
        data = await self._call(lambda: self.client.run_logs(run_id, tail=tail))
        lines = data.get("lines") if isinstance(data, Mapping) else None
        if not isinstance(lines, list):
            raise CliError(f"unexpected answer to GET /runs/{run_id}/logs: {str(data)[:200]}")
        return [line for line in lines if isinstance(line, Mapping)]

    async def submit(self, body: Mapping[str, Any], *, idempotency_key: str) -> Mapping[str, Any]:
        run = await self._call(lambda: self.client.submit_run(body, idempotency_key=idempotency_key))
        if not isinstance(run, Mapping):
            raise CliError(f"unexpected answer to POST /runs: {str(run)[:200]}")
        return run

    async def cancel(self, run_id: str) -> Any:
        return await self._call(
            lambda: self.client.cancel_run(run_id, reason="cancelled from fabrik dashboard")
        )

    async def resume(self, run_id: str) -> Any:
        return await self._call(lambda: self.client.resume_run(run_id))

    def close(self) -> None:
        self.client.close()


def stream_params(
    *, projects: Sequence[str] = (), run_id: str | None = None, logs: str | None = None
) -> list[tuple[str, str]]:
    params: list[tuple[str, str]] = [("project", p) for p in projects]
    if run_id:
        params.append(("run_id", run_id))
    if logs:
        params.append(("logs", logs))
    return params
