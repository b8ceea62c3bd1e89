"""`fabrik init`: the wizard and the flags, pre-flight checks, the files it writes."""

from __future__ import annotations

import asyncio
import base64
import socket
import stat
import threading
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import click
import pytest
import yaml
from click.testing import CliRunner

from fabrik_cli.client import ApiClient
from fabrik_cli.commands.common import output_option, project_required
from fabrik_cli.credentials import CredentialStore, StoredCredential
from fabrik_cli.infra.config import load
from fabrik_cli.main import cli
from fabrik_cli.userconfig import ConfigFileError, default_project, load_user_config
from fabrik_common.natsserver import port_is_free
from fabrik_common.testing.hcloud_double import HcloudDouble
from fabrik_common.testing.k8s_double_cluster import ClusterDouble

PUBLIC_KEY = (
    "ssh-ed25519 " + base64.b64encode(b"\x00\x00\x00\x0bssh-ed25519\x00\x00\x00 " + bytes(32)).decode()
)
OFFSETS = (4222, 8080, 8081, 9101, 9102, 9103, 9104)


def free_port_base() -> int:
    """A port base under which every port of the local stack is free."""
    for base in range(31000, 50000, 37):
        if all(port_is_free(p + base) for p in OFFSETS):
            return base
    raise RuntimeError("no free port range")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "config"


def env_for(home: Path, **extra: str) -> dict[str, str]:
    return {
        "FABRIK_HOME": str(home),
        "OPENAI_API_KEY": "",
        "ANTHROPIC_API_KEY": "",
        "HCLOUD_TOKEN": "",
        "KUBECONFIG": "",
        **extra,
    }


def test_non_interactive_local_writes_the_config_and_prints_the_command(home: Path) -> None:
    base = free_port_base()
    result = CliRunner().invoke(
        cli,
        ["init", "-y", "--target", "local", "--project", "web-shop", "--port-base", str(base)],
        env=env_for(home, OPENAI_API_KEY="sk-test-123"),
    )
    assert result.exit_code == 0, result.output
    assert "ok   local ports free" in result.output
    config = yaml.safe_load((home / "config.yaml").read_text())
    assert config == {
        "version": 1,
        "target": "local",
        "project": "web-shop",
        "llm_providers": ["openai"],
        "port_base": base,
    }
    llm_env = home / "llm.env"
    assert llm_env.read_text() == "FABRIK_LLM_OPENAI_API_KEY=sk-test-123\n"
    assert mode(llm_env) == 0o600 and mode(home / "config.yaml") == 0o600 and mode(home) == 0o700
    assert f"set -a && . {llm_env} && set +a && fabrik up --port-base {base}" in result.output
    assert "sk-test-123" not in result.output


def test_a_busy_port_fails_the_check_with_the_fix_and_writes_nothing(home: Path) -> None:
    base = free_port_base()
    with closing(socket.socket()) as busy:
        busy.bind(("127.0.0.1", 9101 + base))
        busy.listen()
        result = CliRunner().invoke(cli, ["init", "-y", "--port-base", str(base)], env=env_for(home))
    assert result.exit_code == 1, result.output
    assert (
        f"FAIL local ports free: port {9101 + base} on 127.0.0.1 is already in use (wanted by scheduler)"
        in result.output
    )
    assert "fix: stop what listens there, or choose other ports with --port-base N" in result.output
    assert "1 pre-flight check(s) failed; nothing was written" in result.output
    assert not home.exists()


def test_the_wizard_asks_and_writes(home: Path) -> None:
    base = free_port_base()
    answers = "\n".join(["1", "data-team", "", "sk-ant-9", str(base), ""]) + "\n"
    result = CliRunner().invoke(cli, ["init"], env=env_for(home), input=answers)
    assert result.exit_code == 0, result.output
    assert "Where should Fabrik run?" in result.output and "this machine" in result.output
    config = yaml.safe_load((home / "config.yaml").read_text())
    assert config["target"] == "local" and config["project"] == "data-team"
    assert config["llm_providers"] == ["anthropic"]
    assert (home / "llm.env").read_text() == "FABRIK_LLM_ANTHROPIC_API_KEY=sk-ant-9\n"
    assert "sk-ant-9" not in result.output  # hidden input is not echoed


def test_the_wizard_refuses_a_bad_project_name(home: Path) -> None:
    base = free_port_base()
    answers = "\n".join(["local", "Web_Shop", "", "", str(base), ""]) + "\n"
    result = CliRunner().invoke(cli, ["init"], env=env_for(home), input=answers)
    assert result.exit_code == 2
    assert "--project: must be a DNS-1123 label" in result.output and not home.exists()


def test_without_keys_the_echo_provider_answers_and_the_command_is_plain(home: Path) -> None:
    base = free_port_base()
    result = CliRunner().invoke(cli, ["init", "-y", "--port-base", str(base)], env=env_for(home))
    assert result.exit_code == 0, result.output
    assert yaml.safe_load((home / "config.yaml").read_text())["llm_providers"] == ["echo"]
    assert not (home / "llm.env").exists()
    assert f"\n  fabrik up --port-base {base}\n" in result.output


@pytest.fixture
def hcloud() -> Iterator[HcloudDouble]:
    double = HcloudDouble()
    with double.running_in_thread():
        yield double


def test_hetzner_checks_the_token_and_the_key_and_writes_a_valid_cluster_file(
    home: Path, tmp_path: Path, hcloud: HcloudDouble
) -> None:
    key = tmp_path / "id_ed25519.pub"
    key.write_text(PUBLIC_KEY + "\n")
    (tmp_path / "id_ed25519").write_text("private\n")
    infra = tmp_path / "cluster.yaml"
    args = [
        "init",
        "-y",
        "--target",
        "hetzner",
        "--cluster-name",
        "prod",
        "--location",
        "fsn1",
        "--ssh-key",
        str(key),
        "--allow-cidr",
        "203.0.113.0/24",
        "--infra-file",
        str(infra),
    ]
    env = env_for(home, FABRIK_HCLOUD_ENDPOINT=hcloud.endpoint)
    result = CliRunner().invoke(cli, args, env={**env, "HCLOUD_TOKEN": "wrong"})
    assert result.exit_code == 1, result.output
    assert "FAIL Hetzner Cloud token valid: the API refused the token (unauthorized)" in result.output
    assert "fix: create a token with read & write access" in result.output
    assert not infra.exists() and not home.exists()

    result = CliRunner().invoke(cli, args, env={**env, "HCLOUD_TOKEN": "hcloud-test-token"})
    assert result.exit_code == 0, result.output
    assert (
        "ok   Hetzner Cloud token valid" in result.output and "ok   SSH public key present" in result.output
    )
    token_file = home / "hcloud-token"
    assert token_file.read_text().strip() == "hcloud-test-token" and mode(token_file) == 0o600
    config = load(infra)
    assert config.name == "prod" and config.spec.location == "fsn1"
    assert config.spec.firewall.ssh_allowed_cidrs == ["203.0.113.0/24"]
    assert f"fabrik infra apply -f {infra}" in result.output
    # the stored token is what `fabrik infra` uses when $HCLOUD_TOKEN is unset
    plan = CliRunner().invoke(cli, ["infra", "plan", "-f", str(infra)], env={**env, "HCLOUD_TOKEN": ""})
    assert plan.exit_code == 3, plan.output
    assert "+ server prod-cp-1" in plan.output


def test_hetzner_without_an_ssh_key_says_how_to_make_one(
    home: Path, tmp_path: Path, hcloud: HcloudDouble
) -> None:
    missing = tmp_path / "nothing.pub"
    result = CliRunner().invoke(
        cli,
        ["init", "-y", "--target", "hetzner", "--ssh-key", str(missing), "--allow-cidr", "10.0.0.0/8"],
        env=env_for(home, FABRIK_HCLOUD_ENDPOINT=hcloud.endpoint, HCLOUD_TOKEN="hcloud-test-token"),
    )
    assert result.exit_code == 1
    assert f"FAIL SSH public key present: no file {missing}" in result.output
    assert f"ssh-keygen -t ed25519 -f {tmp_path / 'nothing'}" in result.output


def test_hetzner_needs_its_flags(home: Path) -> None:
    result = CliRunner().invoke(cli, ["init", "-y", "--target", "hetzner"], env=env_for(home))
    assert result.exit_code == 2
    assert "--hcloud-token: required" in result.output and "--allow-cidr: give at least one" in result.output


@contextmanager
def serving(double: ClusterDouble) -> Iterator[ClusterDouble]:
    loop = asyncio.new_event_loop()
    ready = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(double.start())
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        yield double
    finally:
        asyncio.run_coroutine_threadsafe(double.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def test_cluster_target_checks_the_kubeconfig(home: Path, tmp_path: Path) -> None:
    missing = tmp_path / "none.yaml"
    result = CliRunner().invoke(
        cli, ["init", "-y", "--target", "cluster", "--kubeconfig", str(missing)], env=env_for(home)
    )
    assert result.exit_code == 1
    assert f"FAIL Kubernetes API reachable: no kubeconfig at {missing}" in result.output
    assert "fabrik infra kubeconfig" in result.output

    with serving(ClusterDouble()) as k8s:
        good = k8s.kubeconfig(tmp_path / "kubeconfig")
        result = CliRunner().invoke(
            cli,
            ["init", "-y", "--target", "cluster", "--kubeconfig", str(good)],
            env=env_for(home, OPENAI_API_KEY="sk-x"),
        )
        assert result.exit_code == 0, result.output
        assert "ok   Kubernetes API reachable" in result.output
        assert "kubectl --kubeconfig" in result.output and "fabrik-llm-keys" in result.output
        assert f"helm upgrade --install fabrik charts/fabrik --kubeconfig {good}" in result.output
        assert yaml.safe_load((home / "config.yaml").read_text())["kubeconfig"] == str(good)

        bad = k8s.kubeconfig(tmp_path / "refused")
        bad.write_text(bad.read_text().replace(k8s.cluster.token, "not-the-token"))
        result = CliRunner().invoke(
            cli, ["init", "-y", "--target", "cluster", "--kubeconfig", str(bad)], env=env_for(home)
        )
        assert result.exit_code == 1 and "FAIL Kubernetes API reachable" in result.output


def test_an_unreachable_nats_fails_its_check(home: Path) -> None:
    base = free_port_base()
    with closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    result = CliRunner().invoke(
        cli,
        ["init", "-y", "--port-base", str(base), "--nats-url", f"nats://127.0.0.1:{dead}"],
        env=env_for(home),
    )
    assert result.exit_code == 1, result.output
    assert "FAIL NATS reachable" in result.output and "fix:" in result.output


# --------------------------------------------------------------------------------------------
# what the other commands read back (fabrik_cli.userconfig)


def test_the_other_commands_take_the_written_defaults_flags_and_variables_first(
    home: Path, tmp_path: Path
) -> None:
    base = free_port_base()
    args = ["init", "-y", "--port-base", str(base), "--project", "shop", "--api", "http://gw.test:9000"]
    result = CliRunner().invoke(cli, [*args, "--token", "fbk_secret", "-o", "json"], env=env_for(home))
    assert result.exit_code == 0, result.output
    config = yaml.safe_load((home / "config.yaml").read_text())
    token_file = home / "token"
    assert config["api_url"] == "http://gw.test:9000" and config["output"] == "json"
    assert config["token_file"] == str(token_file) and "fbk_secret" not in (home / "config.yaml").read_text()
    assert token_file.read_text() == "fbk_secret\n" and stat.S_IMODE(token_file.stat().st_mode) == 0o600

    env = {"FABRIK_HOME": str(home)}
    client = ApiClient.from_env(None, env)
    assert client.target.url == "http://gw.test:9000"
    assert client.target.source == f"api_url in {home / 'config.yaml'}"
    assert client.credential is not None and client.credential.token == "fbk_secret"
    assert client.credential.source == "config"
    # flags and variables come first
    assert ApiClient.from_env("http://flag.test", env).target.url == "http://flag.test"
    assert (
        ApiClient.from_env(None, {**env, "FABRIK_API_URL": "http://var.test"}).target.url == "http://var.test"
    )
    other = ApiClient.from_env(None, {**env, "FABRIK_TOKEN": "from-env"}).credential
    assert other is not None and (other.token, other.source) == ("from-env", "env")
    # `fabrik login`'s credential for that API beats the configured token
    CredentialStore.default(env).save(
        "http://gw.test:9000", StoredCredential(token="from-login", subject="u", kind="token")
    )
    stored = ApiClient.from_env(None, env).credential
    assert stored is not None and stored.token == "from-login"


def test_project_and_output_defaults_and_their_overrides(home: Path) -> None:
    home.mkdir()
    (home / "config.yaml").write_text("target: local\nproject: shop\noutput: yaml\n")
    seen: list[tuple[str, str]] = []

    @click.command()
    @click.option(
        "--project", "-p", envvar="FABRIK_PROJECT", default=default_project, callback=project_required
    )
    @output_option
    def probe(project: str, output: str) -> None:
        seen.append((project, output))

    runner = CliRunner()
    for args, extra, expected in (
        ([], {}, ("shop", "yaml")),
        (["-p", "web", "-o", "json"], {}, ("web", "json")),
        ([], {"FABRIK_PROJECT": "env-proj", "FABRIK_OUTPUT": "table"}, ("env-proj", "table")),
    ):
        result = runner.invoke(probe, args, env={"FABRIK_HOME": str(home), **extra})
        assert result.exit_code == 0, result.output
        assert seen[-1] == expected
    (home / "config.yaml").write_text("target: local\n")
    result = runner.invoke(probe, [], env={"FABRIK_HOME": str(home), "FABRIK_PROJECT": ""})
    assert result.exit_code == 2 and "Missing option '--project'" in result.output
    (home / "config.yaml").write_text("output: xml\n")
    with pytest.raises(ConfigFileError) as info:
        load_user_config({"FABRIK_HOME": str(home)})
    assert info.value.details == ["output: must be one of table, json, yaml (got 'xml')"]
