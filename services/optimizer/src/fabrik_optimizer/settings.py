"""Configuration of the optimizer service, from `FABRIK_*` environment variables."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Annotated
from urllib.parse import parse_qs, urlsplit

import msgspec

from fabrik_common.settings import CommonSettings, Port, PositiveFloat
from fabrik_common.urls import redact_url
from fabrik_optimizer.analytics.store import PostgresLocation
from fabrik_optimizer.prices import default_node_price_file, parse_quantity


class OptimizerSettings(CommonSettings, frozen=True, kw_only=True):
    http_port: Port = 9103
    data_dir: str = ""
    """Fabrik's data directory (`FABRIK_DATA_DIR`); default `~/.local/share/fabrik`."""
    analytics_db: str = ""
    """The analytics SQLite file (`FABRIK_ANALYTICS_DB`); default `<data_dir>/optimizer/analytics.db`."""
    analytics_database_url: str = ""
    """PostgreSQL instead of the SQLite file: `postgresql://user:pass@host:port/db` (or `postgres://`;
    libpq query parameters such as `?sslmode=require` or `?host=/socket/dir` are kept)."""
    analytics_database_password_file: str = ""
    """A file holding the PostgreSQL password (a mounted secret), instead of a password in the URL."""

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

    experiment_eval_seconds: PositiveFloat = 60.0
    """How often active experiments are evaluated (emergency checks and decisions)."""
    max_active_experiments: Annotated[int, msgspec.Meta(ge=0, le=100)] = 3
    """At most this many experiments are active at once."""
    business_hours: str = "09:00-17:00"
    """When medium- and high-risk experiments may start (local time of `FABRIK_BUSINESS_TIMEZONE`)."""
    business_days: str = "mon,tue,wed,thu,fri"
    """Days the business-hours window applies to (comma-separated, `mon` .. `sun`)."""
    business_timezone: str = "UTC"
    """IANA time zone of the business-hours window, e.g. `Europe/Berlin`."""

    optimizer_auto: bool = False
    """Auto mode (`FABRIK_OPTIMIZER_AUTO`): the optimizer starts low-risk candidates itself."""
    candidate_eval_seconds: PositiveFloat = 600.0
    """How often auto mode looks for candidates to start."""
    candidate_min_runs: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 30
    """Decided runs a group needs before a candidate is proposed from it."""
    candidate_oom_rate: Annotated[float, msgspec.Meta(gt=0, le=1)] = 0.05
    """OOM rate at a memory limit from which more memory is proposed."""
    candidate_memory_headroom: Annotated[float, msgspec.Meta(ge=1, le=4)] = 1.25
    """Proposed memory limit: p95 of the observed peaks times this, rounded up."""

    optimizer_spec_repository: str = ""
    """`owner/repo` holding the specs: a winning `harness.<key>` experiment opens a pull request
    there instead of changing the defaults (`FABRIK_OPTIMIZER_SPEC_REPOSITORY`)."""
    optimizer_spec_path: str = "specs/{spec}.harness.json"
    """The JSON file in that repository whose `harness` object holds a spec's harness settings;
    `{spec}` is the experiment's target spec."""
    optimizer_github_token_file: str = ""
    """A file holding the GitHub token for those pull requests (contents and pull requests: write)."""
    github_api_url: str = "https://api.github.com"

    def __post_init__(self) -> None:
        if parse_quantity(self.cost_workspace_size) is None:
            raise ValueError(
                f"FABRIK_COST_WORKSPACE_SIZE={self.cost_workspace_size!r} is not a Kubernetes quantity "
                "(e.g. 10Gi)"
            )
        # A bad URL or an unreadable password file stops the start with the variable named.
        self.analytics_postgres()
        self.spec_pull_requests()

    def spec_pull_requests(self) -> SpecRepository | None:
        """Where winning harness experiments open pull requests, or None (they wait for an
        approval). Raises a ValueError naming the variable when the configuration cannot work."""
        repository = self.optimizer_spec_repository.strip()
        if not repository:
            return None
        if not SPEC_REPOSITORY.match(repository):
            raise ValueError(f"FABRIK_OPTIMIZER_SPEC_REPOSITORY={repository!r} must be owner/repo")
        path = self.optimizer_spec_path.strip().lstrip("/")
        if not path.endswith(".json"):
            raise ValueError(
                f"FABRIK_OPTIMIZER_SPEC_PATH={self.optimizer_spec_path!r} must name a .json file "
                "(e.g. specs/{spec}.harness.json)"
            )
        try:
            path.format(spec="x")
        except (KeyError, IndexError, ValueError):
            raise ValueError(
                f"FABRIK_OPTIMIZER_SPEC_PATH={self.optimizer_spec_path!r} "
                "may only use the placeholder {spec}"
            ) from None
        if not self.github_api_url.startswith(("https://", "http://")):
            raise ValueError(f"FABRIK_GITHUB_API_URL={self.github_api_url!r} must be an http(s) URL")
        file = self.optimizer_github_token_file.strip()
        if not file:
            raise ValueError(
                "FABRIK_OPTIMIZER_GITHUB_TOKEN_FILE is required with FABRIK_OPTIMIZER_SPEC_REPOSITORY"
            )
        try:
            token = Path(file).expanduser().read_text().strip()
        except OSError as exc:
            raise ValueError(
                f"FABRIK_OPTIMIZER_GITHUB_TOKEN_FILE={file!r} cannot be read: {exc.strerror or exc}"
            ) from None
        if not token:
            raise ValueError(f"FABRIK_OPTIMIZER_GITHUB_TOKEN_FILE={file!r} is empty")
        return SpecRepository(
            repository=repository, path=path, token=token, api_url=self.github_api_url.rstrip("/")
        )

    def analytics_postgres(self) -> PostgresLocation | None:
        """Where the PostgreSQL store is (`FABRIK_ANALYTICS_DATABASE_URL`), or None for SQLite.
        Raises a ValueError naming the variable when the URL is not a usable PostgreSQL URL, when
        the password is given twice, or when the password file cannot be read."""
        url = self.analytics_database_url.strip()
        file = self.analytics_database_password_file.strip()
        if not url:
            if file:
                raise ValueError(
                    "FABRIK_ANALYTICS_DATABASE_PASSWORD_FILE is set but FABRIK_ANALYTICS_DATABASE_URL is not"
                )
            return None
        check_database_url(url)
        password: str | None = None
        if file:
            if urlsplit(url).password:
                raise ValueError(
                    "set the PostgreSQL password in FABRIK_ANALYTICS_DATABASE_URL or in "
                    "FABRIK_ANALYTICS_DATABASE_PASSWORD_FILE, not both"
                )
            try:
                password = Path(file).expanduser().read_text().strip()
            except OSError as exc:
                raise ValueError(
                    f"FABRIK_ANALYTICS_DATABASE_PASSWORD_FILE={file!r} cannot be read: {exc.strerror or exc}"
                ) from None
        return PostgresLocation(url, password)

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


SPEC_REPOSITORY = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,38})/[A-Za-z0-9._-]{1,100}$")


@dataclass(frozen=True)
class SpecRepository:
    repository: str
    path: str
    token: str = field(repr=False)
    api_url: str


def check_database_url(url: str) -> None:
    """Raise a ValueError naming FABRIK_ANALYTICS_DATABASE_URL unless `url` is a PostgreSQL URL
    with a host (in the URL or as `?host=`) and a database name. The password is never echoed."""

    def bad(rule: str) -> ValueError:
        return ValueError(f"FABRIK_ANALYTICS_DATABASE_URL={redact_url(url)!r} {rule}")

    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise bad(f"is not a valid URL: {exc}") from None
    if parts.scheme not in ("postgresql", "postgres"):
        raise bad("must start with postgresql:// or postgres:// (postgresql://user:pass@host:port/db)")
    query = parse_qs(parts.query)
    if not parts.hostname and not query.get("host"):
        raise bad("has no host (postgresql://user:pass@host:port/db)")
    database = parts.path.lstrip("/")
    if not database and not query.get("dbname"):
        raise bad("has no database name (postgresql://user:pass@host:port/db)")
    if "/" in database:
        raise bad("has more than one path segment; the path is the database name")
    if port == 0:
        raise bad("has port 0")


def resolve_data_dir(configured: str) -> Path:
    """The same resolution as the executor's: setting, then FABRIK_HOME, XDG_DATA_HOME, ~/.local/share."""
    if configured:
        return Path(configured).expanduser()
    if os.environ.get("FABRIK_HOME"):
        return Path(os.environ["FABRIK_HOME"]).expanduser()
    if os.environ.get("XDG_DATA_HOME"):
        return Path(os.environ["XDG_DATA_HOME"]).expanduser() / "fabrik"
    return Path.home() / ".local" / "share" / "fabrik"
