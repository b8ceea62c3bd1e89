"""docs/configuration.md lists every common setting, and every service's default port."""

from __future__ import annotations

import importlib
from pathlib import Path

import msgspec

from fabrik_common.settings import CommonSettings, env_name

DOC = Path(__file__).resolve().parents[3] / "docs" / "configuration.md"


def test_every_common_setting_is_documented() -> None:
    text = DOC.read_text()
    missing = [
        env_name(f.name)
        for f in msgspec.structs.fields(CommonSettings)
        if f"`{env_name(f.name)}`" not in text
    ]
    assert missing == []


def test_documented_ports_are_the_services_defaults() -> None:
    text = DOC.read_text()
    for module, name in [
        ("fabrik_gateway.settings", "GatewaySettings"),
        ("fabrik_llm_proxy.settings", "LlmProxySettings"),
        ("fabrik_scheduler.settings", "SchedulerSettings"),
        ("fabrik_executor.settings", "ExecutorSettings"),
        ("fabrik_optimizer.settings", "OptimizerSettings"),
        ("fabrik_backup.settings", "BackupSettings"),
    ]:
        settings = getattr(importlib.import_module(module), name)()
        service = module.split(".")[0].removeprefix("fabrik_").replace("_", "-")
        assert f"| {service} | {settings.http_port} |" in text
