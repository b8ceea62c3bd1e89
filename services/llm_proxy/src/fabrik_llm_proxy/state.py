"""Everything a replica of the proxy holds, built once the bus is connected."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fabrik_llm_proxy.accounting import EventPublisher
from fabrik_llm_proxy.budgets import Budgets
from fabrik_llm_proxy.circuits import Circuits
from fabrik_llm_proxy.config import ConfigError, ProxyConfig, default_config, load_config
from fabrik_llm_proxy.keypools import KeyPools
from fabrik_llm_proxy.keys import Authenticator
from fabrik_llm_proxy.limits import RateLimiter, SharedCounters
from fabrik_llm_proxy.metrics import ProxyMetrics
from fabrik_llm_proxy.pricing import PriceTable
from fabrik_llm_proxy.routing import RouteTable
from fabrik_llm_proxy.settings import LlmProxySettings
from fabrik_llm_proxy.tokens import TokenCounter
from fabrik_llm_proxy.upstream import HttpTransport

log = logging.getLogger(__name__)


@dataclass
class ProxyState:
    settings: LlmProxySettings
    config: ProxyConfig
    routes: RouteTable
    pools: KeyPools
    auth: Authenticator
    circuits: Circuits
    counters: SharedCounters
    limiter: RateLimiter
    budgets: Budgets
    prices: PriceTable
    publisher: EventPublisher
    transport: HttpTransport
    metrics: ProxyMetrics
    counter: TokenCounter
    config_stamp: tuple[int, int, int] | None = None
    config_kv: Any = None
    tokens_kv: Any = None

    def apply_config(self, config: ProxyConfig) -> None:
        self.routes = RouteTable(config, self.counter)
        self.config = config

    def reload(self) -> None:
        """Re-read key pools, operator keys and the routing file if they changed."""
        self.pools.reload()
        self.auth.reload_operator_keys()
        path = self.settings.llm_config_file
        if not path:
            return
        try:
            st = os.stat(path)
        except OSError as exc:
            log.warning("routing file unreadable; keeping the current routes", extra={"error": str(exc)})
            return
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp == self.config_stamp:
            return
        self.config_stamp = stamp
        try:
            config = load_config(path)
            self.apply_config(config)
        except (ConfigError, ValueError) as exc:
            log.error("routing file invalid; keeping the current routes", extra={"error": str(exc)})  # noqa: TRY400
            return
        log.info("routing file reloaded", extra={"file": path, "aliases": len(config.models)})


def initial_config(settings: LlmProxySettings) -> tuple[ProxyConfig, tuple[int, int, int] | None]:
    if settings.llm_config_file:
        st = Path(settings.llm_config_file).stat()
        return load_config(settings.llm_config_file), (st.st_mtime_ns, st.st_size, st.st_ino)
    return (
        default_config(
            openai_api_key=settings.llm_openai_api_key,
            openai_base_url=settings.llm_openai_base_url,
            anthropic_api_key=settings.llm_anthropic_api_key,
            anthropic_base_url=settings.llm_anthropic_base_url,
        ),
        None,
    )
