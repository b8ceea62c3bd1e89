"""Node and storage prices as data, currency conversion, and Hetzner Cloud prices through `hcloud`.

Prices come from `prices/nodes.json` (or `FABRIK_NODE_PRICES_FILE`): per node type its capacity
(`cores`, `memory_gib`) and a list of hourly prices, each with a `currency` and a `valid_from`
(a date — UTC midnight — or an ISO timestamp with offset); plus storage prices per GiB-month.
Every price is converted to USD once, at load, with the file's `currency_rates` overridden by
`FABRIK_CURRENCY_RATES` (USD per unit of the currency); a currency without a rate stops start-up.

Costs are computed exactly: prices are Decimals, shares and durations Fractions, and each cost is
rounded once, half to even, to integer nano-dollars.

When `FABRIK_HCLOUD_TOKEN` is set, `HcloudPrices.fetch()` lists the server types of the Hetzner
Cloud API (`client.server_types.get_all()`: cores, memory and per-location hourly prices; the
`hcloud` library has no pricing client any more) and `PriceBook.merge_hcloud` adds them: a node
type the file does not know gets the fetched price from the epoch on; a known one whose fetched
price differs from the price in force gets a new entry valid from the fetch time (the API has no
price history). The fetch is repeated after `FABRIK_HCLOUD_CACHE_SECONDS` (a day).
"""

from __future__ import annotations

import bisect
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Annotated, Any

import msgspec

log = logging.getLogger(__name__)

NonNeg = Annotated[float, msgspec.Meta(ge=0)]
Positive = Annotated[float, msgspec.Meta(gt=0)]
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
NANOS_PER_USD = 1_000_000_000
HOURS_PER_MONTH = 730  # the storage price is per GiB-month; a month is 730 hours (8760 / 12)
GIB = 1024**3
MICROS_PER_HOUR = 3_600_000_000
_MEMO_LIMIT = 4096  # entries per result memo of a PriceBook (emptied when full)


class PriceError(ValueError):
    """The price data is unreadable or inconsistent; the message names the file or setting."""


class NodePriceEntry(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    valid_from: str
    hourly: NonNeg
    currency: str = "USD"
    note: str = ""


class NodeTypeEntry(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    cores: Positive
    memory_gib: Positive
    prices: tuple[NodePriceEntry, ...] = ()
    note: str = ""


class StoragePriceEntry(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    valid_from: str
    per_gb_month: NonNeg
    currency: str = "USD"
    note: str = ""


class NodePriceFile(msgspec.Struct, frozen=True, kw_only=True):
    nodes: dict[str, NodeTypeEntry] = msgspec.field(default_factory=dict)
    storage: tuple[StoragePriceEntry, ...] = ()
    currency_rates: dict[str, Positive] = msgspec.field(default_factory=dict)
    description: str = ""


def parse_valid_from(text: str) -> datetime:
    """`2026-03-15` (UTC midnight) or an ISO timestamp with an offset."""
    try:
        if len(text) == 10:
            return datetime.fromisoformat(text).replace(tzinfo=UTC)
        ts = datetime.fromisoformat(text)
    except ValueError as exc:
        raise PriceError(f"valid_from {text!r} is not a date or an ISO timestamp") from exc
    if ts.tzinfo is None:
        raise PriceError(f"valid_from {text!r} needs a UTC offset (or give a plain date)")
    return ts.astimezone(UTC)


_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]*)?|\.[0-9]+)([a-zA-Z]*)$")
_SUFFIX: dict[str, Fraction] = {
    "": Fraction(1),
    "m": Fraction(1, 1000),
    "k": Fraction(10**3),
    "M": Fraction(10**6),
    "G": Fraction(10**9),
    "T": Fraction(10**12),
    "P": Fraction(10**15),
    "E": Fraction(10**18),
    "Ki": Fraction(2**10),
    "Mi": Fraction(2**20),
    "Gi": Fraction(2**30),
    "Ti": Fraction(2**40),
    "Pi": Fraction(2**50),
    "Ei": Fraction(2**60),
}


def parse_quantity(text: str | None) -> Fraction | None:
    """A Kubernetes quantity (`500m`, `2`, `1.5`, `512Mi`, `1G`) as an exact number; None if unreadable."""
    if not text:
        return None
    match = _QUANTITY.match(text.strip())
    if match is None or match.group(2) not in _SUFFIX:
        return None
    return Fraction(match.group(1)) * _SUFFIX[match.group(2)]


def format_mebibytes(size: int) -> str:
    return f"{size // 2**20}Mi"


def to_nanos(usd: Fraction | Decimal) -> int:
    """Exact USD as integer nano-dollars, rounded half to even (round() of a Fraction)."""
    return round(Fraction(usd) * NANOS_PER_USD)


def _decimal(value: float | str | Decimal) -> Decimal:
    return value if isinstance(value, Decimal) else Decimal(str(value))


@dataclass(frozen=True)
class NodeCapacity:
    cores: Fraction
    memory_bytes: Fraction


@dataclass
class _Timeline:
    """Prices (USD, exact) of one thing over time, ordered by valid_from."""

    starts: list[datetime] = field(default_factory=list)
    prices: list[Fraction] = field(default_factory=list)

    def add(self, valid_from: datetime, price: Fraction) -> None:
        i = bisect.bisect_left(self.starts, valid_from)
        if i < len(self.starts) and self.starts[i] == valid_from:
            self.prices[i] = price
            return
        self.starts.insert(i, valid_from)
        self.prices.insert(i, price)

    def at(self, when: datetime) -> Fraction | None:
        i = bisect.bisect_right(self.starts, when)
        return self.prices[i - 1] if i else None

    def index_at(self, when: datetime) -> int:
        """The number of prices valid from `when` or earlier (0: none yet)."""
        return bisect.bisect_right(self.starts, when)

    def only_price(self, start: datetime, end: datetime) -> Fraction | None:
        """The price of all of [start, end) when one price covers it, else None (unpriced or split)."""
        i = bisect.bisect_right(self.starts, start)
        if i == 0 or (i < len(self.starts) and self.starts[i] < end):
            return None
        return self.prices[i - 1]

    def integrate_hours(self, start: datetime, end: datetime) -> tuple[Fraction, Fraction]:
        """Σ price * hours over [start, end), and the hours without a price."""
        total = Fraction(0)
        unpriced = Fraction(0)
        cursor = start
        i = bisect.bisect_right(self.starts, start)
        while cursor < end:
            segment_end = self.starts[i] if i < len(self.starts) and self.starts[i] < end else end
            hours = _hours(cursor, segment_end)
            if i == 0:
                unpriced += hours
            else:
                total += self.prices[i - 1] * hours
            cursor = segment_end
            i += 1
        return total, unpriced


def _micros(start: datetime, end: datetime) -> int:
    delta = end - start
    return (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds


def _hours(start: datetime, end: datetime) -> Fraction:
    return Fraction(_micros(start, end), MICROS_PER_HOUR)


def _round_half_even(numerator: int, denominator: int) -> int:
    """numerator / denominator (denominator > 0) rounded half to even, like round() of a Fraction."""
    quotient, remainder = divmod(numerator, denominator)
    twice = 2 * remainder
    if twice > denominator or (twice == denominator and quotient % 2 == 1):
        quotient += 1
    return quotient


class PriceBook:
    """Node capacities, node-hour prices and storage prices in USD over time."""

    def __init__(self, rates: Mapping[str, float | Decimal] | None = None) -> None:
        self.rates: dict[str, Decimal] = {"USD": Decimal(1)}
        for currency, rate in (rates or {}).items():
            self.rates[currency.upper()] = _decimal(rate)
        self.capacity: dict[str, NodeCapacity] = {}
        self._nodes: dict[str, _Timeline] = {}
        self._storage = _Timeline()
        self._warned: set[str] = set()
        # Results by their inputs: a run's cost is asked for again by every event after its end,
        # and most runs share a few resource requests. Emptied whenever a price or capacity changes.
        self._shares: dict[tuple[str, str | None, str | None], Fraction | None] = {}
        self._compute: dict[tuple[str, str | None, str | None, datetime, datetime], int | None] = {}
        self._storage_costs: dict[tuple[int, int], tuple[Fraction | float, int]] = {}

    def _changed(self) -> None:
        self._shares.clear()
        self._compute.clear()
        self._storage_costs.clear()

    # -- building ---------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path | None, rates: Mapping[str, float] | None = None) -> PriceBook:
        """The price file (None: no node prices) with `rates` over the file's currency rates."""
        if path is None:
            return cls(rates)
        try:
            data = msgspec.json.decode(Path(path).read_bytes(), type=NodePriceFile)
        except OSError as exc:
            raise PriceError(f"{path}: cannot read: {exc}") from exc
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise PriceError(f"{path}: {exc}") from exc
        book = cls({**data.currency_rates, **(rates or {})})
        try:
            for name, node in data.nodes.items():
                book.set_capacity(name, node.cores, node.memory_gib)
                for entry in node.prices:
                    book.add_node_price(
                        name, parse_valid_from(entry.valid_from), entry.hourly, entry.currency
                    )
            for storage in data.storage:
                book.add_storage_price(
                    parse_valid_from(storage.valid_from), storage.per_gb_month, storage.currency
                )
        except PriceError as exc:
            raise PriceError(f"{path}: {exc}") from exc
        return book

    def to_usd(self, amount: float | Decimal, currency: str) -> Fraction:
        rate = self.rates.get(currency.upper())
        if rate is None:
            raise PriceError(
                f"no exchange rate for {currency}: set FABRIK_CURRENCY_RATES "
                f'(e.g. {{"{currency.upper()}": 1.08}}, USD per {currency.upper()})'
            )
        return Fraction(_decimal(amount)) * Fraction(rate)

    def set_capacity(self, node_type: str, cores: float | Fraction, memory_gib: float | Fraction) -> None:
        self._changed()
        self.capacity[node_type] = NodeCapacity(
            Fraction(_decimal(cores)) if isinstance(cores, float) else Fraction(cores),
            (Fraction(_decimal(memory_gib)) if isinstance(memory_gib, float) else Fraction(memory_gib)) * GIB,
        )

    def add_node_price(
        self, node_type: str, valid_from: datetime, hourly: float | Decimal, currency: str
    ) -> None:
        self._changed()
        self._nodes.setdefault(node_type, _Timeline()).add(valid_from, self.to_usd(hourly, currency))

    def add_storage_price(self, valid_from: datetime, per_gb_month: float | Decimal, currency: str) -> None:
        self._changed()
        self._storage.add(valid_from, self.to_usd(per_gb_month, currency))

    def merge_hcloud(self, fetched: Mapping[str, HcloudNodeType], currency: str, now: datetime) -> list[str]:
        """Add fetched Hetzner prices (see the module doc); the node types whose price changed."""
        changed: list[str] = []
        self._changed()
        for name, node in fetched.items():
            self.set_capacity(name, Fraction(_decimal(node.cores)), Fraction(_decimal(node.memory_gib)))
            price = self.to_usd(node.hourly, currency)
            timeline = self._nodes.get(name)
            if timeline is None or not timeline.starts:
                self._nodes.setdefault(name, _Timeline()).add(EPOCH, price)
                changed.append(name)
            elif timeline.at(now) != price:
                timeline.add(now, price)
                changed.append(name)
        return changed

    # -- reading ----------------------------------------------------------------------------

    def node_types(self) -> list[str]:
        return sorted(self._nodes)

    def node_hourly_usd(self, node_type: str, when: datetime) -> Fraction | None:
        timeline = self._nodes.get(node_type)
        return timeline.at(when) if timeline else None

    def share(self, node_type: str, cpu_request: str | None, memory_request: str | None) -> Fraction | None:
        """The dominant share of the node: max(cpu / cores, memory / node memory), at most 1."""
        key = (node_type, cpu_request, memory_request)
        try:
            return self._shares[key]
        except KeyError:
            pass
        capacity = self.capacity.get(node_type)
        if capacity is None:
            share = None
        else:
            cpu = parse_quantity(cpu_request) or Fraction(0)
            memory = parse_quantity(memory_request) or Fraction(0)
            share = min(Fraction(1), max(cpu / capacity.cores, memory / capacity.memory_bytes))
        if len(self._shares) >= _MEMO_LIMIT:
            self._shares.clear()
        self._shares[key] = share
        return share

    def compute_cost_nanos(
        self,
        node_type: str,
        cpu_request: str | None,
        memory_request: str | None,
        start: datetime,
        end: datetime,
    ) -> int | None:
        """Node price * dominant share * duration over [start, end), split at price changes.

        None when the node type is unknown or has no price at all; hours before its first price
        cost nothing (logged once per node type)."""
        key = (node_type, cpu_request, memory_request, start, end)
        try:
            return self._compute[key]
        except KeyError:
            pass
        cost = self._compute_cost_nanos(node_type, cpu_request, memory_request, start, end)
        if len(self._compute) >= _MEMO_LIMIT:
            self._compute.clear()
        self._compute[key] = cost
        return cost

    def _compute_cost_nanos(
        self,
        node_type: str,
        cpu_request: str | None,
        memory_request: str | None,
        start: datetime,
        end: datetime,
    ) -> int | None:
        timeline = self._nodes.get(node_type)
        share = self.share(node_type, cpu_request, memory_request)
        if timeline is None or share is None:
            self._warn(node_type, "no capacity or price for node type; compute cost not counted")
            return None
        if end <= start:
            return 0
        price = timeline.only_price(start, end)
        if price is not None:
            # One price for the whole attempt (the usual case): the same exact value as below,
            # in integers, without a Fraction per step.
            return _round_half_even(
                price.numerator * share.numerator * _micros(start, end) * NANOS_PER_USD,
                price.denominator * share.denominator * MICROS_PER_HOUR,
            )
        total, unpriced = timeline.integrate_hours(start, end)
        if unpriced:
            self._warn(node_type, "run time before the node type's first price; that time costs 0")
        return to_nanos(total * share)

    def storage_cost_nanos(self, size_bytes: int, hours: Fraction | float, when: datetime) -> int:
        """size (GiB) * retention (hours) * the storage price in force at `when` (per GiB-month)."""
        index = self._storage.index_at(when)
        if index == 0 or size_bytes <= 0:
            return 0
        # Memo by price segment; the hours are compared, not hashed (hashing a Fraction is slow).
        known = self._storage_costs.get((size_bytes, index))
        if known is not None and (known[0] is hours or known[0] == hours):
            return known[1]
        price = self._storage.prices[index - 1]
        hours_f = hours if isinstance(hours, Fraction) else Fraction(_decimal(hours))
        cost = to_nanos(Fraction(size_bytes, GIB) * hours_f * price / HOURS_PER_MONTH)
        if len(self._storage_costs) >= _MEMO_LIMIT:
            self._storage_costs.clear()
        self._storage_costs[(size_bytes, index)] = (hours, cost)
        return cost

    def _warn(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message, extra={"node_type": key})


def default_node_price_file() -> Path | None:
    """prices/nodes.json of the source tree (an image copies it to /app/prices)."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        candidate = parent / "prices" / "nodes.json"
        if candidate.is_file():
            return candidate
    return None


# ------------------------------------------------------------------------------------------------
# Hetzner Cloud


@dataclass(frozen=True)
class HcloudNodeType:
    cores: float
    memory_gib: float
    hourly: Decimal
    location: str


class HcloudPrices:
    """Server-type prices from the Hetzner Cloud API through the `hcloud` library (blocking: call
    `fetch` in a thread). `location` picks the price of that location (else the first listed);
    `gross` picks prices with VAT instead of net."""

    def __init__(
        self,
        token: str,
        *,
        endpoint: str = "https://api.hetzner.cloud/v1",
        location: str = "fsn1",
        gross: bool = False,
        timeout: float = 15.0,
    ) -> None:
        self.token = token
        self.endpoint = endpoint
        self.location = location
        self.gross = gross
        self.timeout = timeout

    def fetch(self) -> dict[str, HcloudNodeType]:
        from hcloud import Client  # imported here: only needed when a token is configured

        client = Client(
            token=self.token,
            api_endpoint=self.endpoint,
            application_name="fabrik-optimizer",
            timeout=self.timeout,
        )
        result: dict[str, HcloudNodeType] = {}
        for server_type in client.server_types.get_all():
            prices: list[dict[str, Any]] = list(server_type.prices or [])
            if not server_type.name or not prices:
                continue
            chosen = next((p for p in prices if p.get("location") == self.location), prices[0])
            hourly = chosen.get("price_hourly") or {}
            amount = hourly.get("gross" if self.gross else "net")
            if amount is None or server_type.cores is None or server_type.memory is None:
                continue
            result[server_type.name] = HcloudNodeType(
                cores=float(server_type.cores),
                memory_gib=float(server_type.memory),
                hourly=Decimal(str(amount)),
                location=str(chosen.get("location", "")),
            )
        return result
