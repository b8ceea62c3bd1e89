"""Configuration of the optimizer service, from `FABRIK_*` environment variables."""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path
from typing import Annotated

import msgspec

from fabrik_common.settings import CommonSettings, Port, PositiveFloat
from fabrik_optimizer.prices import default_node_price_file, parse_quantity


class OptimizerSettings(CommonSettings, frozen=True, kw_only=True):
    http_port: Port = 9103
    data_dir: str = ""
    """Fabrik's data directory (`FABRIK_DATA_DIR`); default `~/.local/share/fabrik`."""
    analytics_db: str = ""
    """The analytics SQLite file (`FABRIK_ANALYTICS_DB`); default `<data_dir>/optimizer/analytics.db`."""

    node_prices_file: str = ""
    """Node and storage prices (`FABRIK_NODE_PRICES_FILE`); default `prices/nodes.json` of the source tree."""
    currency_rates: dict[str, Annotated[float, msgspec.Meta(gt=0)]] = msgspec.field(default_factory=dict)
    """USD per unit of a currency, JSON (`FABRIK_CURRENCY_RATES='{"EUR": 1.08}'`), over the price file's."""
    cost_node_type: str = "cx32"
    """The node type a Kubernetes run's compute cost is computed on."""
    cost_local_node_type: str = ""
    """The node type a `local` run is attributed to; empty: local runs cost no compute."""
    cost_workspace_size: str = "10Gi"
    """The workspace volume of a run (the executor's `FABRIK_K8S_PVC_SIZE` default) for storage cost."""
    cost_workspace_retention_hours: PositiveFloat = 168.0
    """How long a workspace volume is kept after its run (the executor's retention, 7 days)."""

    hcloud_token: str = ""
    """Hetzner Cloud API token: node prices from the API (read-only access is enough)."""
    hcloud_token_file: str = ""
    """A file holding the token (wins over `FABRIK_HCLOUD_TOKEN`)."""
    hcloud_api_endpoint: str = "https://api.hetzner.cloud/v1"
    hcloud_location: str = "fsn1"
    """Whose prices apply (a server type lists one price per location)."""
    hcloud_currency: str = "EUR"
    """The currency of the account's prices (converted with the currency rates)."""
    hcloud_gross: bool = False
    """Use prices with VAT instead of net prices."""
    hcloud_cache_seconds: PositiveFloat = 86400.0
    """How long fetched prices are used before they are fetched again."""

    budget_eval_seconds: PositiveFloat = 5.0
    """At most one budget evaluation per this many seconds, after new events."""
    rpc_timeout_seconds: PositiveFloat = 30.0
    """Time a query request may take before it is answered with a 503."""

    def __post_init__(self) -> None:
        if parse_quantity(self.cost_workspace_size) is None:
            raise ValueError(
                f"FABRIK_COST_WORKSPACE_SIZE={self.cost_workspace_size!r} is not a Kubernetes quantity "
                "(e.g. 10Gi)"
            )

    def analytics_db_path(self) -> Path:
        if self.analytics_db:
            return Path(self.analytics_db).expanduser()
        return resolve_data_dir(self.data_dir) / "optimizer" / "analytics.db"

    def node_prices_path(self) -> Path | None:
        if self.node_prices_file:
            return Path(self.node_prices_file).expanduser()
        return default_node_price_file()

    def workspace_bytes(self) -> int:
        size = parse_quantity(self.cost_workspace_size)
        return int(size) if size is not None else 0

    def retention_hours(self) -> Fraction:
        return Fraction(str(self.cost_workspace_retention_hours))

    def hcloud_api_token(self) -> str:
        if self.hcloud_token_file:
            return Path(self.hcloud_token_file).expanduser().read_text().strip()
        return self.hcloud_token.strip()


def resolve_data_dir(configured: str) -> Path:
    """The same resolution as the executor's: setting, then FABRIK_HOME, XDG_DATA_HOME, ~/.local/share."""
    if configured:
        return Path(configured).expanduser()
    if os.environ.get("FABRIK_HOME"):
        return Path(os.environ["FABRIK_HOME"]).expanduser()
    if os.environ.get("XDG_DATA_HOME"):
        return Path(os.environ["XDG_DATA_HOME"]).expanduser() / "fabrik"
    return Path.home() / ".local" / "share" / "fabrik"
