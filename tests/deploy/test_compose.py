"""compose.yaml against the code: each service built from its Dockerfile here, configured with
variables its settings class knows (and that load), healthy before what depends on it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml

from fabrik_backup.settings import BackupSettings
from fabrik_common.settings import CommonSettings, load_settings
from fabrik_executor.settings import ExecutorSettings
from fabrik_gateway.settings import GatewaySettings
from fabrik_llm_proxy.config import default_config
from fabrik_llm_proxy.settings import LlmProxySettings
from fabrik_optimizer.settings import OptimizerSettings
from fabrik_scheduler.settings import SchedulerSettings

REPO = Path(__file__).resolve().parents[2]
SERVICES: dict[str, tuple[str, type[CommonSettings]]] = {
    # compose service: (source directory, settings)
    "gateway": ("gateway", GatewaySettings),
    "scheduler": ("scheduler", SchedulerSettings),
    "executor": ("executor", ExecutorSettings),
    "backup": ("backup", BackupSettings),
    "llm-proxy": ("llm_proxy", LlmProxySettings),
    "optimizer": ("optimizer", OptimizerSettings),
}
INTERPOLATION = re.compile(r"\$\{([A-Z_][A-Z0-9_]*)(?::?-([^}]*))?\}")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((REPO / "compose.yaml").read_text())
    return data


def resolve(value: Any, shell: dict[str, str] | None = None) -> str:
    """Compose's `${VAR:-default}` as an empty shell would resolve it."""
    shell = shell or {}
    return INTERPOLATION.sub(lambda m: shell.get(m.group(1)) or (m.group(2) or ""), str(value))


def environment(service: dict[str, Any], shell: dict[str, str] | None = None) -> dict[str, str]:
    env = service.get("environment") or {}
    assert isinstance(env, dict), "environment as a map"
    return {k: resolve(v, shell) for k, v in env.items()}


def test_nats_runs_jetstream_on_a_volume(compose: dict[str, Any]) -> None:
    nats = compose["services"]["nats"]
    assert re.match(r"^nats:\d+\.\d+\.\d+(-alpine)?$", nats["image"]), "a pinned NATS release"
    assert "--jetstream" in nats["command"]
    store = nats["command"][nats["command"].index("--store_dir") + 1]
    volumes = {v.split(":")[1]: v.split(":")[0] for v in nats["volumes"]}
    assert volumes[store] in compose["volumes"]
    assert "healthz" in " ".join(nats["healthcheck"]["test"])


@pytest.mark.parametrize("name", SERVICES)
def test_service_is_built_here_and_configured_with_its_settings(compose: dict[str, Any], name: str) -> None:
    directory, cls = SERVICES[name]
    service = compose["services"][name]
    # the image is built from this repository's Dockerfile
    build = service["build"]
    assert build["context"] == "."
    assert build["dockerfile"] == f"services/{directory}/Dockerfile"
    assert (REPO / build["dockerfile"]).is_file()
    assert service["image"] == f"fabrik-{name}:0.1.0"
    # every variable is a setting of this service; every required one is set; they load
    fields = {f"FABRIK_{f.name.upper()}": f for f in msgspec.structs.fields(cls)}
    env = environment(service)
    unknown = sorted(k for k in env if k not in fields)
    assert unknown == [], f"{name}: not settings of {cls.__name__}: {unknown}"
    missing = sorted(k for k, f in fields.items() if f.required and k not in env)
    assert missing == []
    settings = load_settings(cls, env)
    assert settings.nats_url == "nats://nats:4222"
    assert settings.http_host == "0.0.0.0"
    assert settings.http_port == cls().http_port, "the service's documented port"
    # healthy before its dependents; NATS healthy before it
    assert service["healthcheck"]["test"][:2] == ["CMD", "python"]
    assert "/healthz" in service["healthcheck"]["test"][-1]
    assert service["depends_on"]["nats"] == {"condition": "service_healthy"}
    for dependency, condition in service["depends_on"].items():
        assert condition == {"condition": "service_healthy"}
        assert "healthcheck" in compose["services"][dependency]
    # read-only root, writable /tmp and declared volumes only
    assert service["read_only"] is True
    assert service["tmpfs"] == ["/tmp"]
    assert service["cap_drop"] == ["ALL"]
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        assert source in compose["volumes"]
        if "FABRIK_DATA_DIR" in env:
            assert env["FABRIK_DATA_DIR"] == target


def test_every_image_is_built_by_a_dockerfile_here(compose: dict[str, Any]) -> None:
    built = {name for name, service in compose["services"].items() if "build" in service}
    assert built == set(SERVICES)
    assert set(compose["services"]) == {*SERVICES, "nats"}


def test_the_dashboard_port_and_the_fake_llm(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert "127.0.0.1:8080:8080" in services["gateway"]["ports"]
    proxy = load_settings(LlmProxySettings, environment(services["llm-proxy"]))
    assert proxy.llm_config_file == ""
    config = default_config(
        openai_api_key=proxy.llm_openai_api_key, anthropic_api_key=proxy.llm_anthropic_api_key
    )
    assert [d.provider for d in config.models["*"]] == ["echo"]
    # with a key in the shell, OpenAI answers instead
    keyed = load_settings(
        LlmProxySettings, environment(services["llm-proxy"], {"FABRIK_LLM_OPENAI_API_KEY": "sk-x"})
    )
    assert keyed.llm_openai_api_key == "sk-x"
    # runs reach the proxy by its compose name, and both sides share the run-key secret
    executor = environment(services["executor"])
    assert executor["FABRIK_LLM_PROXY_URL"] == "http://llm-proxy:8081"
    assert executor["FABRIK_RUN_KEY_SECRET"] == environment(services["llm-proxy"])["FABRIK_RUN_KEY_SECRET"]
    assert executor["FABRIK_BACKEND"] == "local"
