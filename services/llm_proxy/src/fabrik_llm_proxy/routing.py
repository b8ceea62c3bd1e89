"""Model aliases to ordered deployments, per endpoint.

A request for model M on endpoint E uses the first alias that matches M (exact names first,
then glob patterns in file order) and, of its deployments, those whose provider speaks E.
Deployments are tried by priority (lower first; default: their position in the list); those
sharing a priority are shuffled by weight for each call, so traffic spreads in proportion.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from fabrik_llm_proxy.config import DeploymentConfig, ProxyConfig, is_pattern, matches
from fabrik_llm_proxy.providers import PROVIDERS, Provider
from fabrik_llm_proxy.tokens import TokenCounter
from fabrik_llm_proxy.wire import Endpoint


@dataclass(eq=False)
class Deployment:
    name: str
    alias: str
    provider: Provider
    upstream_model: str  # "" means: the model the client asked for
    key_pool: str
    weight: float
    priority: int
    endpoints: frozenset[Endpoint]
    connect_timeout: float
    read_timeout: float

    @property
    def provider_name(self) -> str:
        return self.provider.name

    def model_for(self, requested: str) -> str:
        return self.upstream_model or requested


@dataclass
class Route:
    alias: str
    deployments: tuple[Deployment, ...]
    _tiers: list[list[Deployment]] = field(default_factory=list)

    def __post_init__(self) -> None:
        tiers: dict[int, list[Deployment]] = {}
        for dep in self.deployments:
            tiers.setdefault(dep.priority, []).append(dep)
        self._tiers = [tiers[p] for p in sorted(tiers)]

    def plan(self, rng: Callable[[], float] = random.random) -> list[Deployment]:
        """Deployments in the order this call tries them."""
        if len(self.deployments) == 1:
            return list(self.deployments)
        ordered: list[Deployment] = []
        for tier in self._tiers:
            if len(tier) == 1:
                ordered.extend(tier)
                continue
            # Weighted shuffle (Efraimidis-Spirakis): sort by u^(1/w) descending.
            ordered.extend(sorted(tier, key=lambda d: rng() ** (1.0 / d.weight), reverse=True))
        return ordered


def _deployment(alias: str, index: int, cfg: DeploymentConfig, counter: TokenCounter) -> Deployment:
    provider_cls = PROVIDERS[cfg.provider]
    provider: Provider
    if cfg.provider == "echo":
        from fabrik_llm_proxy.providers.echo import EchoProvider

        provider = EchoProvider(cfg.base_url, cfg.headers, counter=counter)
    else:
        provider = provider_cls(cfg.base_url, cfg.headers)
    endpoints = frozenset(cfg.endpoints) if cfg.endpoints is not None else provider_cls.endpoints
    unsupported = endpoints - provider_cls.endpoints
    if unsupported:
        speaks = ", ".join(sorted(unsupported))
        raise ValueError(f"models.{alias}[{index}]: provider {cfg.provider} does not speak {speaks}")
    upstream = cfg.model
    if not upstream and not is_pattern(alias):
        upstream = alias
    return Deployment(
        name=cfg.name or f"{alias}#{index}",
        alias=alias,
        provider=provider,
        upstream_model=upstream,
        key_pool=cfg.keys,
        weight=cfg.weight,
        priority=cfg.priority if cfg.priority is not None else index,
        endpoints=endpoints,
        connect_timeout=cfg.connect_timeout_seconds,
        read_timeout=cfg.read_timeout_seconds,
    )


class RouteTable:
    def __init__(self, config: ProxyConfig, counter: TokenCounter) -> None:
        self.config = config
        self._exact: dict[str, list[Deployment]] = {}
        self._patterns: list[tuple[str, list[Deployment]]] = []
        names: set[str] = set()
        for alias, deployments in config.models.items():
            built = [_deployment(alias, i, d, counter) for i, d in enumerate(deployments)]
            for dep in built:
                if dep.name in names:
                    raise ValueError(f"deployment name {dep.name!r} is used twice")
                names.add(dep.name)
            if is_pattern(alias):
                self._patterns.append((alias, built))
            else:
                self._exact[alias] = built
        self._cache: dict[tuple[str, Endpoint], Route | None] = {}

    @property
    def aliases(self) -> list[str]:
        return list(self._exact)

    def deployments(self) -> list[Deployment]:
        return [d for deps in self._exact.values() for d in deps] + [
            d for _, deps in self._patterns for d in deps
        ]

    def resolve(self, model: str, endpoint: Endpoint) -> Route | None:
        """The route for a model on an endpoint, or None (unknown model, or none speaks E)."""
        key = (model, endpoint)
        try:
            return self._cache[key]
        except KeyError:
            pass
        route = self._resolve(model, endpoint)
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[key] = route
        return route

    def _resolve(self, model: str, endpoint: Endpoint) -> Route | None:
        found = self._exact.get(model)
        alias = model
        if found is None:
            for pattern, deps in self._patterns:
                if matches(pattern, model):
                    alias, found = pattern, deps
                    break
        if found is None:
            return None
        usable = tuple(d for d in found if endpoint in d.endpoints)
        return Route(alias, usable) if usable else None

    def knows(self, model: str) -> bool:
        return model in self._exact or any(matches(p, model) for p, _ in self._patterns)
