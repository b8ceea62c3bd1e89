"""Configuration of the scheduler, from `FABRIK_*` environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import msgspec

from fabrik_common.settings import CommonSettings, Port, PositiveFloat, PositiveInt
from fabrik_scheduler.alerting.rules import load_rules


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
    # Cron schedules (docs/schedules.md): how often the leader looks for due slots and checks health.
    schedule_interval_seconds: PositiveFloat = 1.0
    # Run health (docs/run-health.md).
    health_stall_seconds: PositiveFloat = 1800.0
    health_heal_attempts: Annotated[int, msgspec.Meta(ge=0, le=20)] = 3
    health_heal_window_seconds: PositiveFloat = 1800.0
    health_heal_progress_seconds: PositiveFloat = 600.0
    health_max_heal_age_seconds: PositiveFloat = 23 * 3600.0
    health_interval_seconds: PositiveFloat = 15.0
    # Alert delivery (docs/alerts.md): routing rules (JSON inline or a file), channels' settings.
    alert_rules: str = ""
    alert_rules_file: str = ""
    public_url: str = ""
    alert_interval_seconds: PositiveFloat = 1.0
    alert_delivery_attempts: Annotated[int, msgspec.Meta(ge=1, le=100)] = 8
    alert_retry_base_seconds: PositiveFloat = 2.0
    alert_retry_max_seconds: PositiveFloat = 600.0
    alert_http_timeout_seconds: PositiveFloat = 10.0
    alert_slack_bot_token: str = ""
    alert_slack_bot_token_file: str = ""
    alert_slack_api_url: str = "https://slack.com/api"
    smtp_host: str = ""
    smtp_port: Port = 587
    smtp_security: Literal["starttls", "tls", "none"] = "starttls"
    smtp_username: str = ""
    smtp_password: str = ""
    smtp_password_file: str = ""
    smtp_from: str = "fabrik@localhost"
    smtp_timeout_seconds: PositiveFloat = 30.0
    smtp_verify_tls: bool = True

    def __post_init__(self) -> None:
        # Checked at start, naming the variable: rules that do not parse, secrets both set or unreadable.
        load_rules(self.alert_rules, self.alert_rules_file)
        self.secret("alert_slack_bot_token")
        self.secret("smtp_password")

    def secret(self, name: str) -> str:
        """The secret setting `name`, from its value or from the file `<name>_file` (a mounted
        Secret, stripped); a ValueError names the variable when both are set or the file cannot
        be read."""
        value: str = getattr(self, name)
        file: str = getattr(self, f"{name}_file").strip()
        variable = f"FABRIK_{name.upper()}"
        if value.strip() and file:
            raise ValueError(f"set one of {variable} or {variable}_FILE, not both")
        if file:
            try:
                return Path(file).expanduser().read_text().strip()
            except OSError as exc:
                raise ValueError(f"{variable}_FILE={file!r} cannot be read: {exc.strerror or exc}") from None
        return value.strip()
