"""`fabrik up` gives the services the stack's own encryption key of project environments (made
once per data directory) and anonymous admin access, unless the environment says otherwise."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from fabrik_cli.local import SERVICES, LocalStack, ManagedService, PortPlan, StackConfig, StackPaths
from fabrik_common.envs import load_env_cipher, local_key_file


class Quiet:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def info(self, message: str) -> None:
        self.lines.append(message)

    def error(self, message: str) -> None:
        self.lines.append(message)


def config(data_dir: Path, **extra_env: str) -> StackConfig:
    ports = PortPlan(
        nats=4222, nats_monitor=8222, services={s.name: 9000 + i for i, s in enumerate(SERVICES)}
    )
    return StackConfig(data_dir=data_dir, ports=ports, extra_env=extra_env)


def test_services_get_the_stack_key_file_and_admin_role(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("FABRIK_ENV_ENCRYPTION_KEY", "FABRIK_ENV_ENCRYPTION_KEY_FILE", "FABRIK_ANONYMOUS_ROLE"):
        monkeypatch.delenv(name, raising=False)
    cfg = config(tmp_path)
    gateway = ManagedService(SERVICES[0], cfg, StackPaths(tmp_path))
    env = gateway.env("nats://127.0.0.1:4222")
    assert env["FABRIK_ENV_ENCRYPTION_KEY_FILE"] == str(local_key_file(tmp_path))
    assert env["FABRIK_ANONYMOUS_ROLE"] == "admin"

    console = Quiet()
    stack = LocalStack(cfg, console=console)
    stack._ensure_env_key()
    key_file = local_key_file(tmp_path)
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert load_env_cipher(file=str(key_file)) is not None
    assert any("encryption key" in line for line in console.lines)
    first = key_file.read_text()
    stack._ensure_env_key()
    assert key_file.read_text() == first  # made once, kept


def test_a_configured_key_and_role_win(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FABRIK_ENV_ENCRYPTION_KEY", "configured")
    monkeypatch.setenv("FABRIK_ANONYMOUS_ROLE", "viewer")
    cfg = config(tmp_path)
    env = ManagedService(SERVICES[0], cfg, StackPaths(tmp_path)).env("nats://x")
    assert "FABRIK_ENV_ENCRYPTION_KEY_FILE" not in env
    assert env["FABRIK_ANONYMOUS_ROLE"] == "viewer"
    LocalStack(cfg, console=Quiet())._ensure_env_key()
    assert not local_key_file(tmp_path).exists()
