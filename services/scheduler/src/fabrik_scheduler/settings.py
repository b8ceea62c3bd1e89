"""Configuration of the scheduler, from `FABRIK_*` environment variables."""

from __future__ import annotations

from typing import Annotated

import msgspec

from fabrik_common.settings import CommonSettings, Port, PositiveFloat, PositiveInt


class ProjectLimits(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    runs: Annotated[int, msgspec.Meta(ge=0)] | None = None
    cpu: Annotated[float, msgspec.Meta(ge=0)] | None = None
    memory: str | None = None


class SchedulerSettings(CommonSettings, frozen=True, kw_only=True):
    http_port: Port = 9101
    # Cluster-wide admission limits (the fabrik-runs ResourceQuota by default).
    max_running: PositiveInt = 100
    max_cpu: PositiveFloat = 100.0
    max_memory: str = "200Gi"
    # Per-project limits: defaults for every project, and overrides by name (JSON).
    project_max_running: PositiveInt | None = None
    project_max_cpu: PositiveFloat | None = None
    project_max_memory: str | None = None
    project_limits: dict[str, ProjectLimits] = msgspec.field(default_factory=dict)
    # Fair-share weights by project (JSON); a project not listed weighs 1.
    project_weights: dict[str, Annotated[float, msgspec.Meta(gt=0)]] = msgspec.field(default_factory=dict)
    # Deadlines of the non-terminal states; `running` uses each run's timeout_seconds.
    queued_timeout_seconds: PositiveInt = 7 * 24 * 3600
    starting_timeout_seconds: PositiveInt = 600
    cancelling_timeout_seconds: PositiveInt = 120
    # The executor enforces a run's timeout itself; the reaper steps in after this much slack.
    running_deadline_slack_seconds: Annotated[int, msgspec.Meta(ge=0)] = 60
    reaper_interval_seconds: PositiveFloat = 5.0
    dispatch_interval_seconds: PositiveFloat = 1.0
    snapshot_interval_seconds: PositiveFloat = 1.0
    lease_ttl_seconds: PositiveFloat = 6.0
