"""Configuration of the gateway service, from `FABRIK_*` environment variables."""

from __future__ import annotations

from typing import Annotated

import msgspec

from fabrik_common.envs import (
    DEFAULT_MAX_KEYS,
    DEFAULT_MAX_TOTAL_BYTES,
    DEFAULT_MAX_VALUE_BYTES,
    load_env_cipher,
)
from fabrik_common.settings import CommonSettings, Port, PositiveFloat, PositiveInt
from fabrik_gateway.auth import AnonymousRole


class GatewaySettings(CommonSettings, frozen=True, kw_only=True):
    http_port: Port = 8080
    # Requests
    max_body_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 1024 * 1024
    """Largest accepted request body; bigger ones are answered 413."""
    require_image_digest: bool = False
    """Reject a `workload.image` that is not pinned by digest (`...@sha256:...`); on for Kubernetes."""
    max_labels: PositiveInt = 64
    # Listing
    list_default_limit: PositiveInt = 50
    list_max_limit: PositiveInt = 500
    queue_ahead_max: PositiveInt = 20
    """How many run ids a queued run's `queue.ahead` lists (the count is always complete)."""
    queue_max_limit: PositiveInt = 10000
    # Logs and events
    logs_max_lines: PositiveInt = 10000
    """Most lines a non-following `GET /logs` returns (the last ones; `truncated` says so)."""
    logs_heartbeat_seconds: PositiveFloat = 15.0
    """A comment is sent on an idle log stream this often, so proxies keep it open."""
    logs_follow_grace_seconds: Annotated[float, msgspec.Meta(ge=0)] = 1.0
    """After a followed run ends, how long to wait for its last log chunks before closing."""
    events_default_limit: PositiveInt = 1000
    events_max_limit: PositiveInt = 10000
    # Access (until authentication exists, every caller is anonymous)
    anonymous_role: AnonymousRole = "viewer"
    """Role of anonymous callers: `none`, `viewer`, `developer`, `maintainer` or `admin`. `fabrik up`
    sets `admin` (a local stack listens on 127.0.0.1 only); anything above `developer` is logged as a
    warning at start, because anyone who reaches the gateway may then change protected environments."""
    # Project environments (docs/environments.md)
    env_encryption_key: str = ""
    """Fernet key(s) encrypting project env values at rest (comma-separated: the first encrypts, all
    decrypt). Without a key (and without a key file) the env endpoints answer 503; with environments
    stored, the gateway refuses to start."""
    env_encryption_key_file: str = ""
    """A file holding the key(s) instead (a mounted Secret); set one of the two, not both."""
    env_max_value_bytes: PositiveInt = DEFAULT_MAX_VALUE_BYTES
    env_max_keys: PositiveInt = DEFAULT_MAX_KEYS
    env_max_total_bytes: PositiveInt = DEFAULT_MAX_TOTAL_BYTES
    """Keys and values of one environment together (NATS messages and Kubernetes Secrets hold 1 MiB)."""

    def __post_init__(self) -> None:
        # An unusable key stops the start with the variable named (exit 2), before NATS is involved.
        load_env_cipher(self.env_encryption_key, self.env_encryption_key_file)
