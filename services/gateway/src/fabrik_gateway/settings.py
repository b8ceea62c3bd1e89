"""Configuration of the gateway service, from `FABRIK_*` environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import msgspec

from fabrik_common.envs import (
    DEFAULT_MAX_KEYS,
    DEFAULT_MAX_TOTAL_BYTES,
    DEFAULT_MAX_VALUE_BYTES,
    load_env_cipher,
)
from fabrik_common.settings import CommonSettings, Port, PositiveFloat, PositiveInt
from fabrik_gateway.github.config import check_settings as check_github_settings
from fabrik_gateway.roles import AnonymousRole
from fabrik_gateway.slack.config import check_slack_settings


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
    # Access (docs/auth.md)
    anonymous_role: AnonymousRole = "none"
    """Role of callers without credentials: `none` (the default: 401), `viewer`, `developer`,
    `maintainer` or `admin`. `fabrik up` sets `admin` (a local stack listens on 127.0.0.1 only);
    anything but `none` is logged as a warning at start."""
    jwt_hs256_secret: str = ""
    """Shared secret of HS256 bearer JWTs (at least 32 bytes); empty: HS256 tokens are refused."""
    jwt_hs256_secret_file: str = ""
    """A file holding that secret instead (a mounted Secret)."""
    oidc_issuer: str = ""
    """Issuer of RS256/ES256 bearer JWTs (`iss` must equal it); its keys come from `oidc_jwks_url`,
    else from the issuer's `/.well-known/openid-configuration`."""
    oidc_jwks_url: str = ""
    jwt_issuer: str = ""
    """Required `iss` of HS256 tokens (empty: not checked)."""
    jwt_audience: str = "fabrik"
    """Required `aud` of every bearer JWT."""
    jwt_roles_claim: str = "fabrik_roles"
    """Claim holding the roles: a role (every project), a list of `role` / `project:role`
    strings, or an object `{project or "*": role}`."""
    jwt_leeway_seconds: Annotated[float, msgspec.Meta(ge=0, le=300)] = 30.0
    """Clock skew allowed on `exp`, `nbf` and `iat`."""
    jwks_refresh_seconds: PositiveFloat = 300.0
    """How long fetched JWKS keys are trusted before they are fetched again (an unknown `kid`
    fetches at most once per 10 s)."""
    token_last_used_interval_seconds: PositiveFloat = 60.0
    """An API token's `last_used_at` is written at most this often."""
    rate_limit_per_minute: PositiveInt = 1200
    """Requests per minute one caller (token, JWT subject, or client address when anonymous) may
    make to one gateway replica; past it, 429 with `Retry-After`."""
    rate_limit_burst: PositiveInt = 200
    cors_allow_origins: str = ""
    """Comma-separated origins allowed to call the API from a browser; empty: CORS off."""
    public_url: str = ""
    """Where users reach this gateway (links in GitHub checks and Slack messages), e.g.
    `https://fabrik.example.com`; empty: `http://127.0.0.1:<http_port>`."""
    audit_default_limit: PositiveInt = 100
    audit_max_limit: PositiveInt = 1000
    audit_max_scan: PositiveInt = 20000
    """Most audit events one `GET /audit` reads while filtering; `next_cursor` continues."""
    # Costs, budgets and analytics: requests to the optimizer (docs/costs-and-analytics.md)
    optimizer_timeout_seconds: PositiveFloat = 35.0
    """How long a cost, budget or insight request waits for the optimizer's answer (a little longer
    than the optimizer's own `FABRIK_RPC_TIMEOUT_SECONDS`, so that a slow query gets its 503)."""
    optimizer_rebuild_timeout_seconds: PositiveFloat = 900.0
    """How long `POST /analytics/rebuild` waits for the rebuild to finish."""
    # Backups: requests to the backup service (docs/backup.md, docs/disaster-recovery.md)
    backup_timeout_seconds: PositiveFloat = 30.0
    """How long a `/backups` request waits for the backup service's answer (long operations answer
    at once with the operation; listing reads every manifest on the target); past it, 504."""
    # Live stream (docs/api.md#live-stream)
    stream_queue_size: PositiveInt = 1000
    """Events one live-stream subscriber may have unsent; past it, it is dropped (close reason
    `slow consumer`) rather than slowing the others."""
    stream_heartbeat_seconds: PositiveFloat = 15.0
    stream_max_replay: PositiveInt = 100000
    """Most stored events a reconnect with a cursor replays before going live."""
    # GitHub (docs/github.md)
    github_webhook_secret: str = ""
    """Secret of the GitHub webhook (`X-Hub-Signature-256`); empty: `/webhooks/github` answers 503."""
    github_webhook_secret_file: str = ""
    github_api_url: str = "https://api.github.com"
    github_app_id: str = ""
    """GitHub App id; with `github_app_private_key_file`, calls use installation tokens."""
    github_app_private_key_file: str = ""
    github_token: str = ""
    """A token for the GitHub API instead of an App (a fine-grained PAT with commit statuses, issues
    and pull requests; GitHub lets only Apps write check runs, so runs are reported as statuses)."""
    github_token_file: str = ""
    github_repositories: str = ""
    """Repository -> project mapping, `owner/repo=project` comma-separated (`owner/*` matches every
    repository of an owner); a repository not mapped starts nothing."""
    github_trigger_label: str = "fabrik"
    """Labelling an issue with this starts a run (empty: labels start nothing)."""
    github_default_spec: str = ""
    """Spec id used when `/fabrik run` names none."""
    # Slack (docs/slack.md)
    slack_signing_secret: str = ""
    """Signing secret of the Slack app; empty: `/webhooks/slack` answers 503."""
    slack_signing_secret_file: str = ""
    slack_bot_token: str = ""
    """Bot token (`xoxb-...`) for notifications; empty: no notifications."""
    slack_bot_token_file: str = ""
    slack_api_url: str = "https://slack.com/api"
    slack_channels: str = ""
    """Project -> channel for run notifications, `project=CHANNEL_ID` comma-separated (`*=...`: every
    other project)."""
    slack_users: str = ""
    """Slack user -> Fabrik role, `USER_ID=role` or `USER_ID=project:role` comma-separated
    (`*=role`: everyone in the workspace); slash commands need developer to run or cancel."""
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
        check_slack_settings(self)
        check_github_settings(self)
        for name in SECRETS:
            self.secret(name)
        hs256 = self.secret("jwt_hs256_secret")
        if hs256 and len(hs256.encode()) < MIN_HS256_SECRET_BYTES:
            raise ValueError(
                f"FABRIK_JWT_HS256_SECRET must be at least {MIN_HS256_SECRET_BYTES} bytes (HS256 needs a "
                "secret as long as its hash)"
            )
        if self.oidc_issuer and not self.oidc_issuer.startswith(("https://", "http://")):
            raise ValueError("FABRIK_OIDC_ISSUER must be an http(s) URL")

    def secret(self, name: str, *, empty_file_ok: bool = True) -> str:
        """The value of the secret setting `name`, from `name` itself or from the file `name_file`
        (a mounted Secret; stripped of surrounding whitespace); "" when neither is set. A setting
        that only exists as a file (`github_app_private_key_file`) is read the same way. Raises a
        ValueError naming the variable when both are set, when the file cannot be read, and (not
        `empty_file_ok`) when the file is empty."""
        value: str = getattr(self, name, "")
        file: str = getattr(self, f"{name}_file").strip()
        variable = f"FABRIK_{name.upper()}"
        if value.strip() and file:
            raise ValueError(f"set one of {variable} or {variable}_FILE, not both")
        if file:
            try:
                text = Path(file).expanduser().read_text().strip()
            except OSError as exc:
                raise ValueError(f"{variable}_FILE={file!r} cannot be read: {exc.strerror or exc}") from None
            if not text and not empty_file_ok:
                raise ValueError(f"{variable}_FILE={file!r} is empty")
            return text
        return value.strip()

    @property
    def link_base(self) -> str:
        """Base of links to runs in messages sent to people (GitHub, Slack)."""
        return (self.public_url or f"http://127.0.0.1:{self.http_port}").rstrip("/")


MIN_HS256_SECRET_BYTES = 32
SECRETS = (
    "jwt_hs256_secret",
    "github_webhook_secret",
    "github_token",
    "slack_signing_secret",
    "slack_bot_token",
)
