"""The routing file (`FABRIK_LLM_CONFIG_FILE`, YAML or JSON): aliases, deployments, limits, retries.

```yaml
models:
  gpt-4o:                          # the model name clients send
    - provider: openai             # openai | anthropic | echo
      model: gpt-4o-2024-08-06     # upstream model (default: the requested name)
      keys: openai-main            # key pool: file FABRIK_LLM_KEYS_DIR/openai-main
    - provider: openai             # next in order: failover target
      base_url: https://openrouter.ai/api/v1
      model: openai/gpt-4o
      keys: openrouter
  "claude-*":                      # glob patterns are tried after exact names, in file order
    - provider: anthropic
      keys: anthropic
  "*":
    - provider: echo
limits:
  project: {rpm: 600, tpm: 400000} # default for every project
  run: {rpm: 120}                  # default for every run
  projects: {ml: {rpm: 1200}}      # per-project overrides
retry: {max_attempts: 4}
circuit: {failure_threshold: 5, cooldown_seconds: 30}
```
"""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import yaml

from fabrik_llm_proxy.wire import Endpoint

ProviderName = Literal["openai", "anthropic", "echo"]
PosFloat = Annotated[float, msgspec.Meta(gt=0)]
NonNegFloat = Annotated[float, msgspec.Meta(ge=0)]
PosInt = Annotated[int, msgspec.Meta(ge=1)]


class ConfigError(ValueError):
    """The routing file cannot be used; the message says where and why."""


class DeploymentConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    provider: ProviderName
    model: str = ""
    base_url: str = ""
    keys: str = ""
    weight: PosFloat = 1.0
    # Lower goes first; deployments with equal priority share load by weight. Default: position.
    priority: int | None = None
    name: str = ""
    # Endpoints this deployment serves (default: all its provider speaks).
    endpoints: tuple[Endpoint, ...] | None = None
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    connect_timeout_seconds: PosFloat = 5.0
    # Longest silence while waiting for the response or between two chunks of it.
    read_timeout_seconds: PosFloat = 300.0


class RateLimit(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    rpm: PosInt | None = None
    tpm: PosInt | None = None

    def merged(self, override: RateLimit | None) -> RateLimit:
        if override is None:
            return self
        return RateLimit(
            rpm=override.rpm if override.rpm is not None else self.rpm,
            tpm=override.tpm if override.tpm is not None else self.tpm,
        )


class LimitsConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    project: RateLimit = RateLimit()
    run: RateLimit = RateLimit()
    projects: dict[str, RateLimit] = msgspec.field(default_factory=dict)
    window_seconds: PosFloat = 60.0

    def for_project(self, project: str) -> RateLimit:
        return self.project.merged(self.projects.get(project))


class RetryConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    # Upstream attempts of one call, over all deployments.
    max_attempts: PosInt = 4
    # Attempts on one deployment before failing over (key rotation after a 401/429 is free).
    attempts_per_deployment: PosInt = 2
    backoff_base_seconds: NonNegFloat = 0.2
    backoff_max_seconds: NonNegFloat = 5.0
    # A Retry-After up to this long is waited for; a longer one cools the key and fails over.
    max_retry_after_seconds: NonNegFloat = 10.0


class CircuitConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    # Consecutive failures (5xx, timeouts, connection errors) that open a deployment's circuit.
    failure_threshold: PosInt = 5
    cooldown_seconds: PosFloat = 30.0
    # A key answered 401/403: out of rotation this long (or until its pool file changes).
    auth_cooldown_seconds: PosFloat = 300.0
    # A key answered 429 without Retry-After: out of rotation this long.
    rate_limit_cooldown_seconds: PosFloat = 10.0


class ProxyConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    models: dict[str, tuple[DeploymentConfig, ...]]
    limits: LimitsConfig = LimitsConfig()
    retry: RetryConfig = RetryConfig()
    circuit: CircuitConfig = CircuitConfig()

    def __post_init__(self) -> None:
        for alias, deployments in self.models.items():
            if not deployments:
                raise ValueError(f"models.{alias}: needs at least one deployment")


def is_pattern(alias: str) -> bool:
    return any(c in alias for c in "*?[")


def matches(alias: str, model: str) -> bool:
    return fnmatch.fnmatchcase(model, alias)


def parse_config(text: str | bytes, source: str = "config") -> ProxyConfig:
    try:
        data: Any = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML/JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping with a `models` key")
    try:
        return msgspec.convert(data, ProxyConfig, strict=False)
    except (msgspec.ValidationError, ValueError) as exc:
        raise ConfigError(f"{source}: {exc}") from exc


def load_config(path: str | Path) -> ProxyConfig:
    p = Path(path)
    try:
        text = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read: {exc.strerror or exc}") from exc
    return parse_config(text, str(p))


def default_config(
    *,
    openai_api_key: str = "",
    openai_base_url: str = "",
    anthropic_api_key: str = "",
    anthropic_base_url: str = "",
) -> ProxyConfig:
    """No routing file: every model to OpenAI / Anthropic if configured, the offline echo otherwise."""
    deployments: list[DeploymentConfig] = []
    echo_endpoints: list[Endpoint] = []
    if openai_api_key or openai_base_url:
        deployments.append(
            DeploymentConfig(
                provider="openai",
                base_url=openai_base_url,
                keys="env:openai" if openai_api_key else "",
                name="openai",
            )
        )
    else:
        echo_endpoints += ["chat.completions", "responses"]
    if anthropic_api_key or anthropic_base_url:
        deployments.append(
            DeploymentConfig(
                provider="anthropic",
                base_url=anthropic_base_url,
                keys="env:anthropic" if anthropic_api_key else "",
                name="anthropic",
            )
        )
    else:
        echo_endpoints.append("messages")
    if echo_endpoints:
        deployments.append(DeploymentConfig(provider="echo", name="echo", endpoints=tuple(echo_endpoints)))
    return ProxyConfig(models={"*": tuple(deployments)})
