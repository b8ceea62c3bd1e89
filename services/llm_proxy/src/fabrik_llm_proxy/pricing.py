"""Model prices from a data file (prices/models.json), never from code.

```json
{"models": {"gpt-4o": [
    {"valid_from": "2024-05-13", "input": 5.0, "output": 15.0, "currency": "USD"},
    {"valid_from": "2024-10-01", "input": 2.5, "output": 10.0, "cache_read": 1.25, "currency": "USD"}
]}}
```

Prices are per million tokens. A model may have several entries; the one with the latest
`valid_from` on or before the call's date applies. A model without a price costs 0 and is
logged once. Only USD is accepted (the usage events carry `cost_usd`).
"""

from __future__ import annotations

import bisect
import logging
from datetime import date, datetime
from pathlib import Path
from typing import Annotated, Literal

import msgspec

log = logging.getLogger(__name__)

NonNeg = Annotated[float, msgspec.Meta(ge=0)]
PER = 1_000_000


class PriceEntry(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    valid_from: date
    input: NonNeg
    output: NonNeg
    cache_read: NonNeg | None = None
    cache_write: NonNeg | None = None
    currency: Literal["USD"] = "USD"
    note: str = ""


class PriceFile(msgspec.Struct, frozen=True, kw_only=True):
    models: dict[str, tuple[PriceEntry, ...]]
    description: str = ""


class PriceError(ValueError):
    pass


class PriceTable:
    def __init__(self, models: dict[str, tuple[PriceEntry, ...]] | None = None) -> None:
        self._models: dict[str, tuple[list[date], list[PriceEntry]]] = {}
        for name, entries in (models or {}).items():
            ordered = sorted(entries, key=lambda e: e.valid_from)
            self._models[name] = ([e.valid_from for e in ordered], ordered)
        self._unknown_logged: set[str] = set()

    @classmethod
    def load(cls, path: str | Path) -> PriceTable:
        try:
            data = msgspec.json.decode(Path(path).read_bytes(), type=PriceFile)
        except OSError as exc:
            raise PriceError(f"{path}: cannot read: {exc}") from exc
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise PriceError(f"{path}: {exc}") from exc
        return cls(data.models)

    def __len__(self) -> int:
        return len(self._models)

    def price(self, model: str, when: datetime) -> PriceEntry | None:
        found = self._models.get(model)
        if found is None:
            return None
        dates, entries = found
        i = bisect.bisect_right(dates, when.date())
        return entries[i - 1] if i else None

    def cost(
        self,
        models: tuple[str, ...],
        when: datetime,
        *,
        input_tokens: int,
        output_tokens: int,
        cache_read_tokens: int = 0,
        cache_write_tokens: int = 0,
    ) -> float:
        """USD cost of a call, priced by the first of `models` (upstream model, then alias) known."""
        entry = None
        for model in models:
            entry = self.price(model, when)
            if entry is not None:
                break
        if entry is None:
            key = models[0] if models else ""
            if key not in self._unknown_logged:
                self._unknown_logged.add(key)
                log.warning("no price for model; its calls cost 0", extra={"model": key})
            return 0.0
        cache_read = entry.cache_read if entry.cache_read is not None else entry.input
        cache_write = entry.cache_write if entry.cache_write is not None else entry.input
        return (
            input_tokens * entry.input
            + output_tokens * entry.output
            + cache_read_tokens * cache_read
            + cache_write_tokens * cache_write
        ) / PER


def default_price_file() -> Path | None:
    """prices/models.json of the source tree (the container image copies it to /app/prices)."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        candidate = parent / "prices" / "models.json"
        if candidate.is_file():
            return candidate
    return None
