"""HTTP to the upstreams: one client with a keep-alive pool shared by every deployment.

Failures become `UpstreamError(kind)`: `connect` (refused, DNS, TLS, connect timeout),
`timeout` (no answer or no next chunk within the deployment's read timeout), `protocol`
(the connection broke, e.g. in the middle of a stream). See `httpclient` for why the proxy
has its own small client.
"""

from __future__ import annotations

from fabrik_llm_proxy.httpclient import NativeHttpClient, NativeResponse
from fabrik_llm_proxy.providers.base import UpstreamRequest


class HttpTransport:
    def __init__(self, max_connections: int) -> None:
        self._client = NativeHttpClient(max_idle_per_host=max_connections)

    async def send(
        self, request: UpstreamRequest, connect_timeout: float, read_timeout: float
    ) -> NativeResponse:
        return await self._client.send(request, connect_timeout, read_timeout)

    async def close(self) -> None:
        await self._client.close()
