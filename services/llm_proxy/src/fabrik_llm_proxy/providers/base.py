"""What a provider is: which endpoints it serves and how it builds the upstream request."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol

import msgspec

from fabrik_llm_proxy.wire import Endpoint

UpstreamErrorKind = Literal["connect", "timeout", "protocol"]


class UpstreamError(Exception):
    """The upstream could not be reached, did not answer in time, or broke the connection."""

    def __init__(self, kind: UpstreamErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind: UpstreamErrorKind = kind


class UpstreamResponse(Protocol):
    status: int

    def header(self, name: str) -> str | None: ...

    def passthrough_headers(self) -> list[tuple[bytes, bytes]]: ...

    async def read(self) -> bytes: ...

    async def next_chunk(self) -> bytes:
        """The next piece of the body, b"" at its end; `UpstreamError` if the stream broke."""
        ...

    def close(self) -> None: ...


@dataclass(slots=True)
class UpstreamRequest:
    url: str
    headers: dict[str, str]
    body: bytes = field(repr=False)


_encode = msgspec.json.Encoder().encode


class Provider:
    name: ClassVar[str] = ""
    endpoints: ClassVar[frozenset[Endpoint]] = frozenset()
    default_base_url: ClassVar[str] = ""
    needs_key: ClassVar[bool] = False
    in_process: ClassVar[bool] = False

    def __init__(self, base_url: str = "", headers: Mapping[str, str] | None = None) -> None:
        self.base_url = (base_url or self.default_base_url).rstrip("/")
        self.extra_headers = dict(headers or {})

    def prepare_payload(self, endpoint: Endpoint, payload: dict[str, Any], upstream_model: str) -> None:
        """Adjust the client's payload in place for this upstream (model name, usage options)."""
        payload["model"] = upstream_model

    def build(
        self,
        endpoint: Endpoint,
        payload: dict[str, Any],
        key: str | None,
        client_headers: Mapping[str, str],
    ) -> UpstreamRequest:
        raise NotImplementedError

    def encode(self, payload: dict[str, Any]) -> bytes:
        return _encode(payload)
