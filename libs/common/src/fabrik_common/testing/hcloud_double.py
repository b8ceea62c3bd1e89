"""A local HTTP double of the Hetzner Cloud API subset Fabrik uses.

`HcloudDouble` serves on 127.0.0.1 (a free port) under `/v1`, so the real `hcloud` client runs
against it with `Client(token, api_endpoint=double.endpoint)`. Shapes follow the API reference and
what `hcloud` (2.x) parses.

Prices (the optimizer):

- `GET /v1/server_types` (`name`, `page`, `per_page` ≤ 50) with the API's shape: `{"server_types":
  [{"id", "name", "description", "category", "cores", "memory", "disk", "prices": [{"location",
  "price_hourly": {"net", "gross"}, "price_monthly": {...}, "included_traffic",
  "price_per_tb_traffic": {...}}], "storage_type", "cpu_type", "architecture", "deprecated",
  "deprecation", "locations": [...]}], "meta": {"pagination": {...}}}`; amounts are decimal
  strings, as the API sends them;
- `GET /v1/pricing`: `{"pricing": {"currency", "vat_rate", "server_types": [...], "volume": ...}}`.

Clusters (`fabrik infra`):

- servers (`GET/POST /servers`, `GET/DELETE /servers/{id}`; `user_data` is kept for tests in
  `ServerRecord.user_data`, never returned, as the API does), networks with subnets (`POST
  /networks` with `subnets`, `actions/add_subnet`, `DELETE`), firewalls (`rules`, `apply_to`
  servers or a label selector, `actions/set_rules`, `actions/apply_to_resources`,
  `actions/remove_from_resources`; a firewall still applied is `resource_in_use` on delete), load
  balancers (`network` at create, `services`, `targets` of type `server` or `label_selector` with
  the matched servers nested, `actions/add_service|delete_service|add_target|remove_target|
  attach_to_network`, `DELETE` answering an action), SSH keys (fingerprint computed as the API
  does: MD5 of the key, colon hex), volumes (list, get, delete), locations (list);
- actions: every mutation that the API answers with an action gets one in `running`, which turns
  `success` after `action_polls` reads of `GET /actions/{id}` (or `/<resource>/actions/{id}`);
  a server is `initializing` until its `create_server` action finishes;
- lists: `name`, `label_selector` (`k=v`, `k==v`, `k!=v`, `k`, `!k`, `k in (a,b)`, `k notin
  (a,b)`, comma-separated and all required), `page`, `per_page` (default 25, at most 50) and
  `meta.pagination`;
- errors as the API sends them: `{"error": {"code", "message", "details"}}` — `unauthorized`
  (401), `not_found` (404), `invalid_input` (400, `details.fields`), `uniqueness_error` (409,
  `details.fields`), `resource_in_use` (409), `rate_limit_exceeded` (429 with `RateLimit-Limit`,
  `RateLimit-Remaining: 0` and `RateLimit-Reset`, a UNIX timestamp); the answers of the cluster endpoints
  carry the `RateLimit-*` headers.

Test controls: `add_server_type`, `set_price`, `fail(status, code)` (the next requests fail),
`rate_limit(seconds)` (every request is refused with 429 until then), `lose_next_response(method,
path)` (the request takes effect, the caller gets a 504, as when a gateway times out),
`add_server(...)` (a server created outside Fabrik), `add_volume(...)`, `calls` (path and query
of every request), `requests` (method and path), `mutations` (the requests that change
something), `rate_limited` (how many 429s were sent), `running_in_thread()` (serve from a thread
of its own, for synchronous callers such as click commands), and the state itself: `servers`,
`networks`, `firewalls`, `load_balancers`, `ssh_keys`, `volumes`.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import itertools
import math
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from ipaddress import IPv4Network, ip_network
from typing import Any

from aiohttp import web

Obj = dict[str, Any]
VAT = Decimal("0.19")
HOURS_PER_MONTH = Decimal(730)
RATE_LIMIT = 3600
LOCATIONS: dict[str, tuple[int, str, str, str]] = {
    # name: (id, network zone, city, country)
    "fsn1": (1, "eu-central", "Falkenstein", "DE"),
    "nbg1": (2, "eu-central", "Nuremberg", "DE"),
    "hel1": (3, "eu-central", "Helsinki", "FI"),
    "ash": (4, "us-east", "Ashburn, VA", "US"),
    "hil": (5, "us-west", "Hillsboro, OR", "US"),
    "sin": (6, "ap-southeast", "Singapore", "SG"),
}
IMAGES: dict[str, int] = {"ubuntu-24.04": 161547269, "ubuntu-22.04": 67794396, "debian-12": 114690387}
LB_TYPES: dict[str, tuple[int, int, int]] = {"lb11": (1, 5, 25), "lb21": (2, 15, 75), "lb31": (3, 30, 150)}


def _amount(net: Decimal) -> Obj:
    return {"net": f"{net:.4f}", "gross": f"{(net * (1 + VAT)):.4f}"}


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S+00:00")


def _location_json(name: str) -> Obj:
    lid, zone, city, country = LOCATIONS[name]
    return {
        "id": lid,
        "name": name,
        "description": f"{city} DC Park 1",
        "country": country,
        "city": city,
        "latitude": 50.47612,
        "longitude": 12.370071,
        "network_zone": zone,
    }


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, details: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details


def _invalid(field_name: str, message: str) -> ApiError:
    return ApiError(
        400,
        "invalid_input",
        f"invalid input in field '{field_name}'",
        {"fields": [{"name": field_name, "messages": [message]}]},
    )


# --------------------------------------------------------------------------------------------
# Label selectors, as the API evaluates them
# --------------------------------------------------------------------------------------------

_KEY = r"[A-Za-z0-9]([A-Za-z0-9_.\-/]*[A-Za-z0-9])?"
_VALUE = r"[A-Za-z0-9_.\-]*"
_EQ = re.compile(rf"^\s*({_KEY})\s*(==|=|!=)\s*({_VALUE})\s*$")
_SET = re.compile(rf"^\s*({_KEY})\s+(in|notin)\s*\(([^)]*)\)\s*$")
_EXISTS = re.compile(rf"^\s*(!?)\s*({_KEY})\s*$")

Matcher = Callable[[dict[str, str]], bool]


def _split_selector(selector: str) -> list[str]:
    parts: list[str] = []
    depth = 0
    current = ""
    for ch in selector:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    return parts


def _equals(key: str, value: str, negate: bool) -> Matcher:
    return lambda labels: (labels.get(key) == value) != negate


def _member(key: str, values: set[str], negate: bool) -> Matcher:
    return lambda labels: (labels.get(key) in values) != negate


def _exists(key: str, negate: bool) -> Matcher:
    return lambda labels: (key in labels) != negate


def parse_label_selector(selector: str) -> Matcher:
    """A predicate over labels; `ValueError` for a selector the API would refuse."""
    tests: list[Matcher] = []
    for raw in _split_selector(selector):
        if not raw.strip():
            raise ValueError(f"empty expression in label selector {selector!r}")
        if m := _SET.match(raw):
            values = {v.strip() for v in m.group(4).split(",") if v.strip()}
            tests.append(_member(m.group(1), values, m.group(3) == "notin"))
        elif m := _EQ.match(raw):
            tests.append(_equals(m.group(1), m.group(4), m.group(3) == "!="))
        elif m := _EXISTS.match(raw):
            tests.append(_exists(m.group(2), bool(m.group(1))))
        else:
            raise ValueError(f"invalid label selector expression {raw.strip()!r}")
    return lambda labels: all(t(labels) for t in tests)


# --------------------------------------------------------------------------------------------
# Resources
# --------------------------------------------------------------------------------------------


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
class ServerRecord:
    id: int
    name: str
    server_type: str
    location: str
    image: str
    labels: dict[str, str]
    user_data: str | None
    ssh_keys: list[int]
    public_ipv4: str
    networks: dict[int, str] = field(default_factory=dict)  # network id -> private ip
    status: str = "initializing"
    created: str = field(default_factory=_now)


@dataclass
class NetworkRecord:
    id: int
    name: str
    ip_range: str
    labels: dict[str, str]
    subnets: list[Obj] = field(default_factory=list)
    created: str = field(default_factory=_now)


@dataclass
class FirewallRecord:
    id: int
    name: str
    labels: dict[str, str]
    rules: list[Obj] = field(default_factory=list)
    applied_to: list[Obj] = field(default_factory=list)  # {"type": "server"|"label_selector", ...}
    created: str = field(default_factory=_now)


@dataclass
class LoadBalancerRecord:
    id: int
    name: str
    lb_type: str
    location: str
    labels: dict[str, str]
    public_ipv4: str
    services: list[Obj] = field(default_factory=list)
    targets: list[Obj] = field(default_factory=list)
    networks: dict[int, str] = field(default_factory=dict)
    algorithm: str = "round_robin"
    public_interface: bool = True
    created: str = field(default_factory=_now)


@dataclass
class SshKeyRecord:
    id: int
    name: str
    public_key: str
    fingerprint: str
    labels: dict[str, str]
    created: str = field(default_factory=_now)


@dataclass
class VolumeRecord:
    id: int
    name: str
    size: int
    location: str
    labels: dict[str, str]
    server: int | None = None
    created: str = field(default_factory=_now)


@dataclass
class _Action:
    id: int
    command: str
    resources: list[Obj]
    polls_left: int
    on_finish: Callable[[], None] | None = None
    status: str = "running"
    started: str = field(default_factory=_now)
    finished: str | None = None

    def as_json(self) -> Obj:
        return {
            "id": self.id,
            "command": self.command,
            "status": self.status,
            "progress": 100 if self.status != "running" else 0,
            "started": self.started,
            "finished": self.finished,
            "resources": self.resources,
            "error": None,
        }


def ssh_fingerprint(public_key: str) -> str:
    """The API's fingerprint of an OpenSSH public key: MD5 of the key blob, colon hex."""
    parts = public_key.split()
    if len(parts) < 2:
        raise ValueError("not an OpenSSH public key")
    blob = base64.b64decode(parts[1].encode(), validate=True)
    digest = hashlib.md5(blob, usedforsecurity=False).hexdigest()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def _labels(value: Any, field_name: str = "labels") -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise _invalid(field_name, "labels must map strings to strings")
    return dict(value)


@dataclass
class HcloudDouble:
    tokens: set[str] = field(default_factory=lambda: {"hcloud-test-token"})
    currency: str = "EUR"
    volume_per_gb_month: Decimal = Decimal("0.044")
    action_polls: int = 1
    calls: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    requests: list[tuple[str, str]] = field(default_factory=list)
    rate_limited: int = 0
    servers: dict[int, ServerRecord] = field(default_factory=dict)
    networks: dict[int, NetworkRecord] = field(default_factory=dict)
    firewalls: dict[int, FirewallRecord] = field(default_factory=dict)
    load_balancers: dict[int, LoadBalancerRecord] = field(default_factory=dict)
    ssh_keys: dict[int, SshKeyRecord] = field(default_factory=dict)
    volumes: dict[int, VolumeRecord] = field(default_factory=dict)
    _types: dict[str, _ServerType] = field(default_factory=dict)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _resource_ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1001))
    _ips: itertools.count[int] = field(default_factory=lambda: itertools.count(10))
    _actions: dict[int, _Action] = field(default_factory=dict)
    _failures: list[tuple[int, str]] = field(default_factory=list)
    _limited_until: float = 0.0
    _lose: list[tuple[str, str]] = field(default_factory=list)
    _runner: web.AppRunner | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    port: int = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def mutations(self) -> list[tuple[str, str]]:
        """The requests that could change something (everything but GET)."""
        return [(m, p) for m, p in self.requests if m != "GET"]

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

    def rate_limit(self, seconds: float) -> None:
        """Refuse every request with 429 `rate_limit_exceeded` for `seconds` from now."""
        self._limited_until = time.time() + seconds

    def lose_next_response(self, method: str, path: str) -> None:
        """The next `method path` (e.g. `POST`, `/v1/networks`) is done but answered 504."""
        self._lose.append((method.upper(), path))

    def add_server(
        self,
        name: str,
        *,
        labels: dict[str, str] | None = None,
        server_type: str = "cx22",
        location: str = "nbg1",
        status: str = "running",
    ) -> ServerRecord:
        """A server made outside Fabrik (by hand, by another tool)."""
        record = ServerRecord(
            id=next(self._resource_ids),
            name=name,
            server_type=server_type,
            location=location,
            image="ubuntu-24.04",
            labels=dict(labels or {}),
            user_data=None,
            ssh_keys=[],
            public_ipv4=self._public_ip(),
            status=status,
        )
        self.servers[record.id] = record
        return record

    def add_volume(self, name: str, size: int = 10, labels: dict[str, str] | None = None) -> VolumeRecord:
        record = VolumeRecord(next(self._resource_ids), name, size, "nbg1", dict(labels or {}))
        self.volumes[record.id] = record
        return record

    def server_named(self, name: str) -> ServerRecord | None:
        return next((s for s in self.servers.values() if s.name == name), None)

    # -- serving ----------------------------------------------------------------------------

    async def start(self) -> HcloudDouble:
        app = web.Application()
        app.router.add_get("/v1/server_types", self._server_types)
        app.router.add_get("/v1/pricing", self._pricing)
        app.router.add_route("*", "/v1/{tail:.*}", self._dispatch)
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

    @contextlib.contextmanager
    def running_in_thread(self) -> Iterator[HcloudDouble]:
        """Serve from a thread of its own, for synchronous callers (the `hcloud` client, click)."""
        import asyncio

        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def serve() -> None:
            asyncio.set_event_loop(loop)
            loop.run_until_complete(self.start())
            ready.set()
            loop.run_forever()

        thread = threading.Thread(target=serve, name="hcloud-double", daemon=True)
        thread.start()
        if not ready.wait(10):
            raise RuntimeError("the Hetzner Cloud API double did not start")
        try:
            yield self
        finally:
            asyncio.run_coroutine_threadsafe(self.stop(), loop).result(10)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            loop.close()

    # -- plumbing ---------------------------------------------------------------------------

    @staticmethod
    def _headers(remaining: int, reset: float) -> dict[str, str]:
        return {
            "RateLimit-Limit": str(RATE_LIMIT),
            "RateLimit-Remaining": str(remaining),
            "RateLimit-Reset": str(math.ceil(reset)),
        }

    @classmethod
    def _error(cls, status: int, code: str, message: str, details: Any = None) -> web.Response:
        return web.json_response(
            {"error": {"code": code, "message": message, "details": details}},
            status=status,
            headers=cls._headers(RATE_LIMIT - 1, time.time() + 1),
        )

    def _check(self, request: web.Request) -> web.Response | None:
        self.calls.append((request.path, dict(request.query)))
        self.requests.append((request.method, request.path))
        auth = request.headers.get("Authorization", "")
        if not auth.startswith("Bearer ") or auth[len("Bearer ") :] not in self.tokens:
            return self._error(401, "unauthorized", "unable to authenticate")
        if time.time() < self._limited_until:
            self.rate_limited += 1
            return web.json_response(
                {
                    "error": {
                        "code": "rate_limit_exceeded",
                        "message": f"limit of {RATE_LIMIT} requests per hour reached",
                        "details": {},
                    }
                },
                status=429,
                headers=self._headers(0, self._limited_until),
            )
        if self._failures:
            status, code = self._failures.pop(0)
            return self._error(status, code, f"injected failure: {code}")
        return None

    def _location_ids(self) -> dict[str, int]:
        names = sorted({loc for t in self._types.values() for loc in t.hourly})
        return {name: i + 1 for i, name in enumerate(names)}

    def _public_ip(self) -> str:
        n = next(self._ips)
        return f"203.0.113.{n % 250 + 1}" if n < 250 else f"198.51.100.{n % 250 + 1}"

    def _page(self, request: web.Request, key: str, items: list[Obj]) -> web.Response:
        try:
            page = int(request.query.get("page", "1"))
            per_page = int(request.query.get("per_page", "25"))
        except ValueError:
            raise _invalid("page", "must be an integer") from None
        if page < 1 or not 1 <= per_page <= 50:
            raise _invalid("per_page", "must be between 1 and 50")
        total = len(items)
        last = max(1, -(-total // per_page))
        return web.json_response(
            {
                key: items[(page - 1) * per_page : page * per_page],
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
            },
            headers=self._headers(RATE_LIMIT - 1, time.time() + 1),
        )

    @staticmethod
    def _selected(request: web.Request) -> Callable[[str, dict[str, str]], bool]:
        name = request.query.get("name")
        selector = request.query.get("label_selector")
        try:
            matcher = parse_label_selector(selector) if selector else None
        except ValueError as exc:
            raise _invalid("label_selector", str(exc)) from None

        def ok(item_name: str, labels: dict[str, str]) -> bool:
            if name is not None and item_name != name:
                return False
            return matcher is None or matcher(labels)

        return ok

    def _action(
        self,
        command: str,
        resources: list[tuple[int, str]],
        on_finish: Callable[[], None] | None = None,
    ) -> _Action:
        action = _Action(
            id=next(self._resource_ids),
            command=command,
            resources=[{"id": rid, "type": rtype} for rid, rtype in resources],
            polls_left=self.action_polls,
            on_finish=on_finish,
        )
        self._actions[action.id] = action
        if action.polls_left <= 0:
            self._finish(action)
        return action

    @staticmethod
    def _finish(action: _Action) -> None:
        if action.status == "running":
            action.status = "success"
            action.finished = _now()
            if action.on_finish is not None:
                action.on_finish()

    def _json(self, body: Obj, status: int = 200) -> web.Response:
        return web.json_response(body, status=status, headers=self._headers(RATE_LIMIT - 1, time.time() + 1))

    def _unique(self, kind: str, name: str, existing: list[str]) -> None:
        if name in existing:
            raise ApiError(
                409,
                "uniqueness_error",
                f"{kind} with name '{name}' already exists",
                {"fields": [{"name": "name"}]},
            )

    # -- routes -----------------------------------------------------------------------------

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

    async def _dispatch(self, request: web.Request) -> web.Response:
        refused = self._check(request)
        if refused is not None:
            return refused
        body: Obj = {}
        if request.method in ("POST", "PUT") and request.can_read_body:
            try:
                raw = await request.json()
            except ValueError:
                return self._error(400, "json_error", "invalid JSON in request body")
            if not isinstance(raw, dict):
                return self._error(400, "json_error", "the request body must be a JSON object")
            body = raw
        parts = [p for p in request.path.split("/")[2:] if p]
        lose = (request.method, request.path) in self._lose
        try:
            with self._lock:
                response = self._route(request, request.method, parts, body)
        except ApiError as exc:
            return self._error(exc.status, exc.code, exc.message, exc.details)
        if lose:
            self._lose.remove((request.method, request.path))
            return web.Response(status=504, text="gateway timeout")
        return response

    def _route(self, request: web.Request, method: str, parts: list[str], body: Obj) -> web.Response:
        if not parts:
            raise ApiError(404, "not_found", "resource not found")
        resource, rest = parts[0], parts[1:]
        # /actions/{id} and /<resource>/actions/{id}
        if resource == "actions" or (len(rest) == 2 and rest[0] == "actions" and method == "GET"):
            action_id = rest[0] if resource == "actions" and rest else (rest[1] if len(rest) == 2 else "")
            return self._get_action(action_id)
        if resource == "locations" and not rest and method == "GET":
            return self._page(request, "locations", [_location_json(name) for name in LOCATIONS])
        handlers: dict[str, Any] = {
            "servers": (self._list_servers, self._create_server, self.servers, self._server_json),
            "networks": (self._list_networks, self._create_network, self.networks, self._network_json),
            "firewalls": (self._list_firewalls, self._create_firewall, self.firewalls, self._firewall_json),
            "load_balancers": (
                self._list_lbs,
                self._create_lb,
                self.load_balancers,
                self._lb_json,
            ),
            "ssh_keys": (self._list_ssh_keys, self._create_ssh_key, self.ssh_keys, self._ssh_key_json),
            "volumes": (self._list_volumes, None, self.volumes, self._volume_json),
        }
        if resource not in handlers:
            raise ApiError(404, "not_found", "resource not found")
        lister, creator, store, render = handlers[resource]
        singular = {"load_balancers": "load_balancer", "ssh_keys": "ssh_key"}.get(resource, resource[:-1])
        if not rest:
            if method == "GET":
                return lister(request)  # type: ignore[no-any-return]
            if method == "POST" and creator is not None:
                return creator(body)  # type: ignore[no-any-return]
            raise ApiError(405, "method_not_allowed", "method not allowed")
        try:
            rid = int(rest[0])
        except ValueError:
            raise ApiError(404, "not_found", f"{singular} not found") from None
        if rid not in store:
            raise ApiError(404, "not_found", f"{singular} with ID '{rid}' not found")
        if len(rest) == 1:
            if method == "GET":
                return self._json({singular: render(store[rid])})
            if method == "PUT":
                record = store[rid]
                if "name" in body:
                    record.name = body["name"]
                if "labels" in body:
                    record.labels = _labels(body["labels"])
                return self._json({singular: render(record)})
            if method == "DELETE":
                return self._delete(resource, rid)
        if len(rest) == 3 and rest[1] == "actions" and method == "POST":
            return self._resource_action(resource, rid, rest[2], body)
        raise ApiError(404, "not_found", "resource not found")

    def _get_action(self, raw_id: str) -> web.Response:
        try:
            action = self._actions[int(raw_id)]
        except (ValueError, KeyError):
            raise ApiError(404, "not_found", f"action with ID '{raw_id}' not found") from None
        if action.status == "running":
            action.polls_left -= 1
            if action.polls_left <= 0:
                self._finish(action)
        return self._json({"action": action.as_json()})

    # -- servers ----------------------------------------------------------------------------

    def _server_json(self, s: ServerRecord) -> Obj:
        stype = self._types.get(s.server_type)
        type_json = (
            stype.as_json(self._location_ids() | {s.location: LOCATIONS[s.location][0]})
            if stype
            else {"id": 0, "name": s.server_type, "cores": 2, "memory": 4.0, "disk": 40, "prices": []}
        )
        firewalls = [
            {"id": fw.id, "status": "applied"} for fw in self.firewalls.values() if self._fw_applies(fw, s)
        ]
        return {
            "id": s.id,
            "name": s.name,
            "status": s.status,
            "created": s.created,
            "public_net": {
                "ipv4": {
                    "id": s.id + 500000,
                    "ip": s.public_ipv4,
                    "blocked": False,
                    "dns_ptr": "static.example",
                },
                "ipv6": {
                    "id": s.id + 600000,
                    "ip": f"2001:db8:{s.id:x}::/64",
                    "blocked": False,
                    "dns_ptr": [],
                },
                "floating_ips": [],
                "firewalls": firewalls,
            },
            "private_net": [
                {"network": nid, "ip": ip, "alias_ips": [], "mac_address": "86:00:00:2a:7d:e0"}
                for nid, ip in s.networks.items()
            ],
            "server_type": type_json,
            "location": _location_json(s.location),
            "image": {
                "id": IMAGES.get(s.image, 1),
                "type": "system",
                "status": "available",
                "name": s.image,
                "description": s.image,
                "os_flavor": s.image.split("-")[0],
                "os_version": s.image.split("-")[-1],
                "architecture": "x86",
            },
            "iso": None,
            "rescue_enabled": False,
            "locked": False,
            "backup_window": None,
            "outgoing_traffic": 0,
            "ingoing_traffic": 0,
            "included_traffic": 21990232555520,
            "protection": {"delete": False, "rebuild": False},
            "labels": s.labels,
            "volumes": [v.id for v in self.volumes.values() if v.server == s.id],
            "load_balancers": [],
            "primary_disk_size": 40,
            "placement_group": None,
        }

    def _list_servers(self, request: web.Request) -> web.Response:
        ok = self._selected(request)
        items = [
            self._server_json(s)
            for s in sorted(self.servers.values(), key=lambda s: s.id)
            if ok(s.name, s.labels)
        ]
        return self._page(request, "servers", items)

    def _private_ip(self, network: NetworkRecord, taken: set[str]) -> str:
        for subnet in network.subnets or [{"ip_range": network.ip_range}]:
            net = ip_network(subnet["ip_range"])
            assert isinstance(net, IPv4Network)
            for host in list(net.hosts())[1:]:
                if str(host) not in taken:
                    return str(host)
        raise ApiError(409, "no_space_left_in_location", "no free IP address left in the network")

    def _taken_ips(self, network_id: int) -> set[str]:
        taken = {s.networks[network_id] for s in self.servers.values() if network_id in s.networks}
        taken |= {lb.networks[network_id] for lb in self.load_balancers.values() if network_id in lb.networks}
        return taken

    def _create_server(self, body: Obj) -> web.Response:
        name = body.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[a-zA-Z0-9]([a-zA-Z0-9.\-]*[a-zA-Z0-9])?", name):
            raise _invalid("name", "must be a valid hostname")
        stype = body.get("server_type")
        if not isinstance(stype, str) or (self._types and stype not in self._types):
            raise _invalid("server_type", f"server type {stype!r} not found")
        image = body.get("image")
        if image not in IMAGES:
            raise _invalid("image", f"image {image!r} not found")
        location = body.get("location", "nbg1")
        if location not in LOCATIONS:
            raise _invalid("location", f"location {location!r} not found")
        user_data = body.get("user_data")
        if user_data is not None and len(user_data.encode()) > 32 * 1024:
            raise _invalid("user_data", "user_data is limited to 32 KiB")
        labels = _labels(body.get("labels"))
        key_ids: list[int] = []
        for ref in body.get("ssh_keys", []) or []:
            key = next((k for k in self.ssh_keys.values() if ref in (k.id, k.name, str(k.id))), None)
            if key is None:
                raise _invalid("ssh_keys", f"SSH key {ref!r} not found")
            key_ids.append(key.id)
        network_ids = [int(n) for n in body.get("networks", []) or []]
        for nid in network_ids:
            if nid not in self.networks:
                raise _invalid("networks", f"network {nid} not found")
        firewall_ids = [int(f["firewall"]) for f in body.get("firewalls", []) or []]
        for fid in firewall_ids:
            if fid not in self.firewalls:
                raise _invalid("firewalls", f"firewall {fid} not found")
        self._unique("server", name, [s.name for s in self.servers.values()])
        record = ServerRecord(
            id=next(self._resource_ids),
            name=name,
            server_type=stype,
            location=location,
            image=image,
            labels=labels,
            user_data=user_data,
            ssh_keys=key_ids,
            public_ipv4=self._public_ip(),
        )
        for nid in network_ids:
            record.networks[nid] = self._private_ip(self.networks[nid], self._taken_ips(nid))
        for fid in firewall_ids:
            self.firewalls[fid].applied_to.append({"type": "server", "server": {"id": record.id}})
        self.servers[record.id] = record

        def running() -> None:
            record.status = "running"

        action = self._action("create_server", [(record.id, "server")], running)
        start = self._action("start_server", [(record.id, "server")])
        return self._json(
            {
                "server": self._server_json(record),
                "action": action.as_json(),
                "next_actions": [start.as_json()],
                "root_password": None if key_ids else "YItygq1v3GYjjMomLaKc",
            },
            status=201,
        )

    # -- networks ---------------------------------------------------------------------------

    def _network_json(self, n: NetworkRecord) -> Obj:
        return {
            "id": n.id,
            "name": n.name,
            "ip_range": n.ip_range,
            "subnets": n.subnets,
            "routes": [],
            "servers": [s.id for s in self.servers.values() if n.id in s.networks],
            "load_balancers": [lb.id for lb in self.load_balancers.values() if n.id in lb.networks],
            "protection": {"delete": False},
            "labels": n.labels,
            "created": n.created,
            "expose_routes_to_vswitch": False,
        }

    def _list_networks(self, request: web.Request) -> web.Response:
        ok = self._selected(request)
        items = [
            self._network_json(n)
            for n in sorted(self.networks.values(), key=lambda n: n.id)
            if ok(n.name, n.labels)
        ]
        return self._page(request, "networks", items)

    def _subnet(self, network: NetworkRecord, raw: Obj) -> Obj:
        try:
            net = ip_network(raw["ip_range"])
            outer = ip_network(network.ip_range)
        except (KeyError, ValueError):
            raise _invalid("ip_range", "invalid subnet ip_range") from None
        if not net.subnet_of(outer):  # type: ignore[arg-type]
            raise _invalid("ip_range", "subnet must be within the network's ip_range")
        if raw.get("type") not in ("cloud", "server", "vswitch"):
            raise _invalid("type", "subnet type must be cloud, server or vswitch")
        if raw.get("network_zone") not in {z for _, z, _, _ in LOCATIONS.values()}:
            raise _invalid("network_zone", "unknown network zone")
        return {
            "type": raw["type"],
            "ip_range": str(net),
            "network_zone": raw["network_zone"],
            "gateway": str(next(outer.hosts())),
        }

    def _create_network(self, body: Obj) -> web.Response:
        name = body.get("name")
        if not isinstance(name, str) or not name:
            raise _invalid("name", "name is required")
        try:
            ip_network(body.get("ip_range", ""))
        except ValueError:
            raise _invalid("ip_range", "invalid ip_range") from None
        self._unique("network", name, [n.name for n in self.networks.values()])
        record = NetworkRecord(
            next(self._resource_ids), name, str(body["ip_range"]), _labels(body.get("labels"))
        )
        record.subnets = [self._subnet(record, raw) for raw in body.get("subnets", []) or []]
        self.networks[record.id] = record
        return self._json({"network": self._network_json(record)}, status=201)

    # -- firewalls --------------------------------------------------------------------------

    def _fw_applies(self, fw: FirewallRecord, server: ServerRecord) -> bool:
        for target in fw.applied_to:
            if target["type"] == "server" and target["server"]["id"] == server.id:
                return True
            if target["type"] == "label_selector" and parse_label_selector(
                target["label_selector"]["selector"]
            )(server.labels):
                return True
        return False

    def _firewall_json(self, fw: FirewallRecord) -> Obj:
        applied: list[Obj] = []
        for target in fw.applied_to:
            entry = dict(target)
            if target["type"] == "label_selector":
                matcher = parse_label_selector(target["label_selector"]["selector"])
                entry["applied_to_resources"] = [
                    {"type": "server", "server": {"id": s.id}}
                    for s in sorted(self.servers.values(), key=lambda s: s.id)
                    if matcher(s.labels)
                ]
            applied.append(entry)
        return {
            "id": fw.id,
            "name": fw.name,
            "labels": fw.labels,
            "rules": fw.rules,
            "applied_to": applied,
            "created": fw.created,
        }

    def _list_firewalls(self, request: web.Request) -> web.Response:
        ok = self._selected(request)
        items = [
            self._firewall_json(f)
            for f in sorted(self.firewalls.values(), key=lambda f: f.id)
            if ok(f.name, f.labels)
        ]
        return self._page(request, "firewalls", items)

    @staticmethod
    def _rule(raw: Obj) -> Obj:
        direction = raw.get("direction")
        protocol = raw.get("protocol")
        if direction not in ("in", "out"):
            raise _invalid("direction", "must be in or out")
        if protocol not in ("tcp", "udp", "icmp", "esp", "gre"):
            raise _invalid("protocol", "unknown protocol")
        if protocol in ("tcp", "udp") and not raw.get("port"):
            raise _invalid("port", "a port is required for tcp and udp")
        sources = list(raw.get("source_ips", []))
        destinations = list(raw.get("destination_ips", []))
        for cidr in sources + destinations:
            try:
                ip_network(cidr)
            except ValueError:
                raise _invalid("source_ips", f"{cidr!r} is not a CIDR") from None
        if direction == "in" and not sources:
            raise _invalid("source_ips", "an inbound rule needs source_ips")
        return {
            "direction": direction,
            "protocol": protocol,
            "port": raw.get("port"),
            "source_ips": sources,
            "destination_ips": destinations,
            "description": raw.get("description"),
        }

    def _apply_targets(self, raw: list[Obj]) -> list[Obj]:
        targets: list[Obj] = []
        for entry in raw:
            if entry.get("type") == "server":
                sid = int(entry["server"]["id"])
                if sid not in self.servers:
                    raise _invalid("apply_to", f"server {sid} not found")
                targets.append({"type": "server", "server": {"id": sid}})
            elif entry.get("type") == "label_selector":
                selector = entry["label_selector"]["selector"]
                try:
                    parse_label_selector(selector)
                except ValueError as exc:
                    raise _invalid("label_selector", str(exc)) from None
                targets.append({"type": "label_selector", "label_selector": {"selector": selector}})
            else:
                raise _invalid("type", "must be server or label_selector")
        return targets

    def _create_firewall(self, body: Obj) -> web.Response:
        name = body.get("name")
        if not isinstance(name, str) or not name:
            raise _invalid("name", "name is required")
        self._unique("firewall", name, [f.name for f in self.firewalls.values()])
        record = FirewallRecord(next(self._resource_ids), name, _labels(body.get("labels")))
        record.rules = [self._rule(r) for r in body.get("rules", []) or []]
        record.applied_to = self._apply_targets(body.get("apply_to", []) or [])
        self.firewalls[record.id] = record
        actions = [self._action("apply_firewall", [(record.id, "firewall")])] if record.applied_to else []
        return self._json(
            {"firewall": self._firewall_json(record), "actions": [a.as_json() for a in actions]}, status=201
        )

    # -- load balancers ---------------------------------------------------------------------

    def _lb_target_json(self, lb: LoadBalancerRecord, target: Obj) -> Obj:
        health = [{"listen_port": s["listen_port"], "status": "healthy"} for s in lb.services]
        if target["type"] == "server":
            return {**target, "health_status": health}
        matcher = parse_label_selector(target["label_selector"]["selector"])
        nested = [
            {
                "type": "server",
                "server": {"id": s.id},
                "use_private_ip": target["use_private_ip"],
                "health_status": health,
            }
            for s in sorted(self.servers.values(), key=lambda s: s.id)
            if matcher(s.labels)
        ]
        return {**target, "targets": nested}

    def _lb_json(self, lb: LoadBalancerRecord) -> Obj:
        tid, services, targets = LB_TYPES[lb.lb_type]
        return {
            "id": lb.id,
            "name": lb.name,
            "public_net": {
                "enabled": lb.public_interface,
                "ipv4": {"ip": lb.public_ipv4, "dns_ptr": "static.example"},
                "ipv6": {"ip": f"2001:db8:ffff::{lb.id:x}", "dns_ptr": "static.example"},
            },
            "private_net": [{"network": nid, "ip": ip} for nid, ip in lb.networks.items()],
            "location": _location_json(lb.location),
            "load_balancer_type": {
                "id": tid,
                "name": lb.lb_type,
                "description": lb.lb_type.upper(),
                "max_connections": 10000 * tid,
                "max_services": services,
                "max_targets": targets,
                "max_assigned_certificates": 10,
                "prices": [],
            },
            "protection": {"delete": False},
            "labels": lb.labels,
            "targets": [self._lb_target_json(lb, t) for t in lb.targets],
            "services": lb.services,
            "algorithm": {"type": lb.algorithm},
            "outgoing_traffic": 0,
            "ingoing_traffic": 0,
            "included_traffic": 21990232555520,
            "created": lb.created,
        }

    def _list_lbs(self, request: web.Request) -> web.Response:
        ok = self._selected(request)
        items = [
            self._lb_json(lb)
            for lb in sorted(self.load_balancers.values(), key=lambda lb: lb.id)
            if ok(lb.name, lb.labels)
        ]
        return self._page(request, "load_balancers", items)

    @staticmethod
    def _service(raw: Obj) -> Obj:
        if raw.get("protocol") not in ("tcp", "http", "https"):
            raise _invalid("protocol", "must be tcp, http or https")
        port = raw.get("listen_port")
        if not isinstance(port, int) or not 1 <= port <= 65535:
            raise _invalid("listen_port", "must be a port")
        health = dict(raw.get("health_check") or {})
        return {
            "protocol": raw["protocol"],
            "listen_port": port,
            "destination_port": raw.get("destination_port", port),
            "proxyprotocol": bool(raw.get("proxyprotocol", False)),
            "health_check": {
                "protocol": health.get("protocol", "tcp"),
                "port": health.get("port", raw.get("destination_port", port)),
                "interval": health.get("interval", 15),
                "timeout": health.get("timeout", 10),
                "retries": health.get("retries", 3),
            },
        }

    def _target(self, raw: Obj) -> Obj:
        kind = raw.get("type")
        if kind == "server":
            sid = int(raw["server"]["id"])
            if sid not in self.servers:
                raise _invalid("server", f"server {sid} not found")
            return {
                "type": "server",
                "server": {"id": sid},
                "use_private_ip": bool(raw.get("use_private_ip")),
            }
        if kind == "label_selector":
            selector = raw["label_selector"]["selector"]
            try:
                parse_label_selector(selector)
            except ValueError as exc:
                raise _invalid("label_selector", str(exc)) from None
            return {
                "type": "label_selector",
                "label_selector": {"selector": selector},
                "use_private_ip": bool(raw.get("use_private_ip")),
            }
        raise _invalid("type", "target type must be server or label_selector")

    def _create_lb(self, body: Obj) -> web.Response:
        name = body.get("name")
        if not isinstance(name, str) or not name:
            raise _invalid("name", "name is required")
        lb_type = body.get("load_balancer_type")
        if lb_type not in LB_TYPES:
            raise _invalid("load_balancer_type", f"load balancer type {lb_type!r} not found")
        location = body.get("location")
        if location is None or location not in LOCATIONS:
            raise _invalid("location", f"location {location!r} not found")
        self._unique("load_balancer", name, [lb.name for lb in self.load_balancers.values()])
        record = LoadBalancerRecord(
            id=next(self._resource_ids),
            name=name,
            lb_type=lb_type,
            location=location,
            labels=_labels(body.get("labels")),
            public_ipv4=self._public_ip(),
            public_interface=body.get("public_interface", True) is not False,
        )
        if body.get("algorithm"):
            record.algorithm = body["algorithm"]["type"]
        record.services = [self._service(s) for s in body.get("services", []) or []]
        record.targets = [self._target(t) for t in body.get("targets", []) or []]
        if body.get("network") is not None:
            nid = int(body["network"])
            if nid not in self.networks:
                raise _invalid("network", f"network {nid} not found")
            record.networks[nid] = self._private_ip(self.networks[nid], self._taken_ips(nid))
        self.load_balancers[record.id] = record
        action = self._action("create_load_balancer", [(record.id, "load_balancer")])
        return self._json({"load_balancer": self._lb_json(record), "action": action.as_json()}, status=201)

    # -- SSH keys and volumes ---------------------------------------------------------------

    @staticmethod
    def _ssh_key_json(k: SshKeyRecord) -> Obj:
        return {
            "id": k.id,
            "name": k.name,
            "fingerprint": k.fingerprint,
            "public_key": k.public_key,
            "labels": k.labels,
            "created": k.created,
        }

    def _list_ssh_keys(self, request: web.Request) -> web.Response:
        ok = self._selected(request)
        fingerprint = request.query.get("fingerprint")
        items = [
            self._ssh_key_json(k)
            for k in sorted(self.ssh_keys.values(), key=lambda k: k.id)
            if ok(k.name, k.labels) and (fingerprint is None or k.fingerprint == fingerprint)
        ]
        return self._page(request, "ssh_keys", items)

    def _create_ssh_key(self, body: Obj) -> web.Response:
        name = body.get("name")
        public_key = body.get("public_key")
        if not isinstance(name, str) or not name:
            raise _invalid("name", "name is required")
        if not isinstance(public_key, str):
            raise _invalid("public_key", "public_key is required")
        try:
            fingerprint = ssh_fingerprint(public_key)
        except ValueError:
            raise _invalid("public_key", "invalid public key") from None
        self._unique("SSH key", name, [k.name for k in self.ssh_keys.values()])
        if any(k.fingerprint == fingerprint for k in self.ssh_keys.values()):
            raise ApiError(
                409,
                "uniqueness_error",
                "SSH key with the same fingerprint already exists",
                {"fields": [{"name": "public_key"}]},
            )
        record = SshKeyRecord(
            next(self._resource_ids), name, public_key.strip(), fingerprint, _labels(body.get("labels"))
        )
        self.ssh_keys[record.id] = record
        return self._json({"ssh_key": self._ssh_key_json(record)}, status=201)

    @staticmethod
    def _volume_json(v: VolumeRecord) -> Obj:
        return {
            "id": v.id,
            "name": v.name,
            "size": v.size,
            "server": v.server,
            "location": _location_json(v.location),
            "linux_device": f"/dev/disk/by-id/scsi-0HC_Volume_{v.id}",
            "protection": {"delete": False},
            "labels": v.labels,
            "status": "available",
            "created": v.created,
            "format": "ext4",
        }

    def _list_volumes(self, request: web.Request) -> web.Response:
        ok = self._selected(request)
        items = [
            self._volume_json(v)
            for v in sorted(self.volumes.values(), key=lambda v: v.id)
            if ok(v.name, v.labels)
        ]
        return self._page(request, "volumes", items)

    # -- deletes and resource actions -------------------------------------------------------

    def _delete(self, resource: str, rid: int) -> web.Response:
        if resource == "servers":
            record = self.servers[rid]
            record.status = "deleting"

            def gone() -> None:
                self.servers.pop(rid, None)
                for fw in self.firewalls.values():
                    fw.applied_to = [
                        t for t in fw.applied_to if not (t["type"] == "server" and t["server"]["id"] == rid)
                    ]
                for lb in self.load_balancers.values():
                    lb.targets = [
                        t for t in lb.targets if not (t["type"] == "server" and t["server"]["id"] == rid)
                    ]

            action = self._action("delete_server", [(rid, "server")], gone)
            return self._json({"action": action.as_json()})
        if resource == "load_balancers":
            self.load_balancers.pop(rid)
            action = self._action("delete_load_balancer", [(rid, "load_balancer")])
            return self._json({"action": action.as_json()})
        if resource == "firewalls":
            if self.firewalls[rid].applied_to:
                raise ApiError(409, "resource_in_use", "firewall is still applied to resources")
            self.firewalls.pop(rid)
        elif resource == "networks":
            attached = [s.name for s in self.servers.values() if rid in s.networks]
            attached += [lb.name for lb in self.load_balancers.values() if rid in lb.networks]
            if attached:
                raise ApiError(
                    409, "resource_in_use", f"network is still used by {', '.join(sorted(attached))}"
                )
            self.networks.pop(rid)
        elif resource == "ssh_keys":
            self.ssh_keys.pop(rid)
        elif resource == "volumes":
            if self.volumes[rid].server is not None:
                raise ApiError(409, "resource_in_use", "volume is attached to a server")
            self.volumes.pop(rid)
        return web.Response(status=204, headers=self._headers(RATE_LIMIT - 1, time.time() + 1))

    def _resource_action(self, resource: str, rid: int, name: str, body: Obj) -> web.Response:
        kind = {"load_balancers": "load_balancer"}.get(resource, resource[:-1])
        if resource == "networks" and name == "add_subnet":
            network = self.networks[rid]
            subnet = self._subnet(network, body)
            if any(s["ip_range"] == subnet["ip_range"] for s in network.subnets):
                raise ApiError(409, "conflict", "subnet already exists")
            network.subnets.append(subnet)
        elif resource == "networks" and name == "delete_subnet":
            network = self.networks[rid]
            network.subnets = [s for s in network.subnets if s["ip_range"] != body.get("ip_range")]
        elif resource == "firewalls" and name == "set_rules":
            self.firewalls[rid].rules = [self._rule(r) for r in body.get("rules", [])]
            actions = [self._action("set_firewall_rules", [(rid, "firewall")])]
            return self._json({"actions": [a.as_json() for a in actions]}, status=201)
        elif resource == "firewalls" and name == "apply_to_resources":
            fw = self.firewalls[rid]
            for target in self._apply_targets(body.get("apply_to", [])):
                if target in fw.applied_to:
                    raise ApiError(409, "firewall_already_applied", "firewall is already applied")
                fw.applied_to.append(target)
            actions = [self._action("apply_firewall", [(rid, "firewall")])]
            return self._json({"actions": [a.as_json() for a in actions]}, status=201)
        elif resource == "firewalls" and name == "remove_from_resources":
            fw = self.firewalls[rid]
            for target in self._apply_targets(body.get("remove_from", [])):
                if target not in fw.applied_to:
                    raise ApiError(
                        409, "firewall_already_removed", "firewall is not applied to that resource"
                    )
                fw.applied_to.remove(target)
            actions = [self._action("remove_firewall", [(rid, "firewall")])]
            return self._json({"actions": [a.as_json() for a in actions]}, status=201)
        elif resource == "load_balancers" and name == "add_service":
            lb = self.load_balancers[rid]
            service = self._service(body)
            if any(s["listen_port"] == service["listen_port"] for s in lb.services):
                raise ApiError(409, "source_port_already_used", "listen port already used")
            lb.services.append(service)
        elif resource == "load_balancers" and name == "delete_service":
            lb = self.load_balancers[rid]
            lb.services = [s for s in lb.services if s["listen_port"] != body.get("listen_port")]
        elif resource == "load_balancers" and name == "add_target":
            lb = self.load_balancers[rid]
            target = self._target(body)
            if target in lb.targets:
                raise ApiError(409, "target_already_defined", "target already defined")
            lb.targets.append(target)
        elif resource == "load_balancers" and name == "remove_target":
            lb = self.load_balancers[rid]
            target = self._target(body)
            lb.targets = [
                t
                for t in lb.targets
                if not (
                    t["type"] == target["type"]
                    and t.get("server") == target.get("server")
                    and t.get("label_selector") == target.get("label_selector")
                )
            ]
        elif resource == "load_balancers" and name == "attach_to_network":
            lb = self.load_balancers[rid]
            nid = int(body["network"])
            if nid not in self.networks:
                raise _invalid("network", f"network {nid} not found")
            if nid in lb.networks:
                raise ApiError(409, "load_balancer_already_attached", "already attached to that network")
            lb.networks[nid] = body.get("ip") or self._private_ip(self.networks[nid], self._taken_ips(nid))
        else:
            raise ApiError(404, "not_found", f"action {name!r} not found")
        action = self._action(name, [(rid, kind)])
        return self._json({"action": action.as_json()}, status=201)
