"""Configuration of the gateway service, from `FABRIK_*` environment variables."""

from __future__ import annotations

from typing import Annotated

import msgspec

from fabrik_common.settings import CommonSettings, Port, PositiveFloat, PositiveInt


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
