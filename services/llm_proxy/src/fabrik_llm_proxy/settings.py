"""Configuration of the llm-proxy service, from `FABRIK_*` environment variables.

Routing (model aliases, deployments, limits, retries) lives in the file named by
`FABRIK_LLM_CONFIG_FILE`; provider keys live in files under `FABRIK_LLM_KEYS_DIR`. Both are
re-read when they change. See docs/llm-proxy.md.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from fabrik_common.settings import CommonSettings, Port, PositiveFloat

NonNegFloat = Annotated[float, msgspec.Meta(ge=0)]


class LlmProxySettings(CommonSettings, frozen=True, kw_only=True):
    http_port: Port = 8081
    # Routing config (YAML or JSON). Empty: every model answered by the offline `echo` provider,
    # or by OpenAI / Anthropic when FABRIK_LLM_OPENAI_API_KEY / FABRIK_LLM_ANTHROPIC_API_KEY is set.
    llm_config_file: str = ""
    # Directory of key pools: one file per pool, one provider key per line (a mounted Secret).
    llm_keys_dir: str = ""
    # How often config, key pool and operator key files are checked for changes.
    llm_reload_seconds: PositiveFloat = 2.0
    # Shortcut provider settings used only when no config file is given.
    llm_openai_api_key: str = ""
    llm_openai_base_url: str = ""
    llm_anthropic_api_key: str = ""
    llm_anthropic_base_url: str = ""
    # Price data (JSON); empty: prices/models.json of the source tree when present.
    llm_prices_file: str = ""
    # HMAC secret shared with the executor, which issues run keys (value or file; the file wins).
    run_key_secret: str = ""
    run_key_secret_file: str = ""
    # Operator keys: JSON list of {"id", "sha256", "project", "admin"} (value or file).
    llm_operator_keys: str = ""
    llm_operator_keys_file: str = ""
    # Largest accepted request body.
    llm_max_body_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 32 * 1024 * 1024
    # Upstream connection pool size (all deployments together).
    llm_max_connections: Annotated[int, msgspec.Meta(ge=1)] = 1024
    # Counters (tokens, spend) are written to the `limits` KV bucket at this interval.
    llm_flush_seconds: PositiveFloat = 0.1
    # Time a stopping replica gives pending usage events and counters to reach NATS.
    llm_drain_seconds: NonNegFloat = 5.0
