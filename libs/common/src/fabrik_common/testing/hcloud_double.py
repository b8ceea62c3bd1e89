"""A local HTTP double of the Hetzner Cloud API subset Fabrik reads prices from.

`HcloudDouble` serves on 127.0.0.1 (a free port) under `/v1`, so the real `hcloud` client runs
against it with `Client(token, api_endpoint=double.endpoint)`:

- `GET /v1/server_types` (`name`, `page`, `per_page` ≤ 50 query parameters) with the API's shape:
  `{"server_types": [{"id", "name", "description", "category", "cores", "memory", "disk",
  "prices": [{"location", "price_hourly": {"net", "gross"}, "price_monthly": {...},
  "included_traffic", "price_per_tb_traffic": {...}}], "storage_type", "cpu_type", "architecture",
  "deprecated", "deprecation", "locations": [{"id", "name", "deprecation"}]}], "meta": {"pagination":
  {"page", "per_page", "previous_page", "next_page", "last_page", "total_entries"}}}`; amounts are
  decimal strings, as the API sends them;
- `GET /v1/pricing`: `{"pricing": {"currency", "vat_rate", "server_types": [{"id", "name",
  "prices": [...]}], "volume": {"price_per_gb_month": {"net", "gross"}}, ...}}`;
- authentication as the API does it: `Authorization: Bearer <token>`; a missing or unknown token
  is `401 {"error": {"code": "unauthorized", "message": "unable to authenticate", "details": null}}`;
- an unknown path is `404 {"error": {"code": "not_found", ...}}`.

Test controls: `add_server_type(name, cores, memory_gb, {location: hourly_net})`, `set_price`,
`fail(status, code)` (the next requests fail, e.g. 503 `unavailable`), and `calls` (path and query
of every request).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from aiohttp import web

Obj = dict[str, Any]
VAT = Decimal("0.19")
HOURS_PER_MONTH = Decimal(730)


def _amount(net: Decimal) -> Obj:
    return {"net": f"{net:.4f}", "gross": f"{(net * (1 + VAT)):.4f}"}


@dataclass
class _ServerType:
    id: int
    name: str
    cores: int
    memory: float
    disk: int
    hourly: dict[str, Decimal]
    cpu_type: str = "shared"
    architecture: str = "x86"

    def prices(self) -> list[Obj]:
        return [
            {
                "location": location,
                "price_hourly": _amount(net),
                "price_monthly": _amount((net * HOURS_PER_MONTH).quantize(Decimal("0.0001"))),
                "included_traffic": 21990232555520,
                "price_per_tb_traffic": _amount(Decimal(1)),
            }
            for location, net in self.hourly.items()
        ]

    def as_json(self, location_ids: dict[str, int]) -> Obj:
        return {
            "id": self.id,
            "name": self.name,
            "description": self.name.upper(),
            "category": "cost_optimized" if self.cpu_type == "shared" else "dedicated_cpu",
            "cores": self.cores,
            "memory": self.memory,
            "disk": self.disk,
            "prices": self.prices(),
            "storage_type": "local",
            "cpu_type": self.cpu_type,
            "architecture": self.architecture,
            "deprecated": False,
            "deprecation": None,
            "included_traffic": 21990232555520,
            "locations": [
                {
                    "id": location_ids[loc],
                    "name": loc,
                    "deprecation": None,
                    "available": True,
                    "recommended": True,
                }
                for loc in self.hourly
            ],
        }


@dataclass
class HcloudDouble:
    tokens: set[str] = field(default_factory=lambda: {"hcloud-test-token"})
    currency: str = "EUR"
    volume_per_gb_month: Decimal = Decimal("0.044")
    calls: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    _types: dict[str, _ServerType] = field(default_factory=dict)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _failures: list[tuple[int, str]] = field(default_factory=list)
    _runner: web.AppRunner | None = None
    port: int = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    # -- test controls ----------------------------------------------------------------------

    def add_server_type(
        self, name: str, cores: int, memory_gb: float, hourly: dict[str, str | Decimal], **extra: Any
    ) -> None:
        self._types[name] = _ServerType(
            id=next(self._ids),
            name=name,
            cores=cores,
            memory=memory_gb,
            disk=extra.pop("disk", 40),
            hourly={loc: Decimal(str(v)) for loc, v in hourly.items()},
            **extra,
        )

    def set_price(self, name: str, location: str, hourly: str | Decimal) -> None:
        self._types[name].hourly[location] = Decimal(str(hourly))

    def fail(self, status: int, code: str, times: int = 1) -> None:
        self._failures.extend([(status, code)] * times)

    # -- server -----------------------------------------------------------------------------

    async def start(self) -> HcloudDouble:
        app = web.Application()
        app.router.add_get("/v1/server_types", self._server_types)
        app.router.add_get("/v1/pricing", self._pricing)
        app.router.add_route("*", "/{tail:.*}", self._not_found)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @staticmethod
    def _error(status: int, code: str, message: str) -> web.Response:
        return web.json_response(
            {"error": {"code": code, "message": message, "details": None}}, status=status
        )

    def _check(self, request: web.Request) -> web.Response | None:
        self.calls.append((request.path, dict(request.query)))
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or auth[len("Bearer ") :] not in self.tokens:
            return self._error(401, "unauthorized", "unable to authenticate")
        if self._failures:
            status, code = self._failures.pop(0)
            return self._error(status, code, f"injected failure: {code}")
        return None

    def _location_ids(self) -> dict[str, int]:
        names = sorted({loc for t in self._types.values() for loc in t.hourly})
        return {name: i + 1 for i, name in enumerate(names)}

    async def _server_types(self, request: web.Request) -> web.Response:
        refused = self._check(request)
        if refused is not None:
            return refused
        try:
            page = int(request.query.get("page", "1"))
            per_page = int(request.query.get("per_page", "25"))
        except ValueError:
            return self._error(400, "invalid_input", "invalid input in query")
        if page < 1 or not 1 <= per_page <= 50:
            return self._error(400, "invalid_input", "invalid input in query")
        items = sorted(self._types.values(), key=lambda t: t.id)
        if "name" in request.query:
            items = [t for t in items if t.name == request.query["name"]]
        total = len(items)
        last = max(1, -(-total // per_page))
        chunk = items[(page - 1) * per_page : page * per_page]
        ids = self._location_ids()
        return web.json_response(
            {
                "server_types": [t.as_json(ids) for t in chunk],
                "meta": {
                    "pagination": {
                        "page": page,
                        "per_page": per_page,
                        "previous_page": page - 1 if page > 1 else None,
                        "next_page": page + 1 if page < last else None,
                        "last_page": last,
                        "total_entries": total,
                    }
                },
            }
        )

    async def _pricing(self, request: web.Request) -> web.Response:
        refused = self._check(request)
        if refused is not None:
            return refused
        return web.json_response(
            {
                "pricing": {
                    "currency": self.currency,
                    "vat_rate": f"{VAT * 100:.2f}",
                    "server_types": [
                        {"id": t.id, "name": t.name, "prices": t.prices()}
                        for t in sorted(self._types.values(), key=lambda t: t.id)
                    ],
                    "volume": {"price_per_gb_month": _amount(self.volume_per_gb_month)},
                }
            }
        )

    async def _not_found(self, request: web.Request) -> web.Response:
        refused = self._check(request)
        if refused is not None:
            return refused
        return self._error(404, "not_found", "resource not found")
