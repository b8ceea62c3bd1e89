"""`fabrik env` with click's CliRunner against a real gateway (its own process) over a real NATS."""

from __future__ import annotations

import json
import stat
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from fabrik_cli.commands import env as env_commands
from fabrik_cli.main import cli
from fabrik_common.envs import format_dotenv_value, generate_env_key, parse_dotenv
from fabrik_common.testing import ServiceProcess

TRICKY = "p@ss word with 'quotes', \"doubles\", $HOME and a\nnewline"


class Fabrik:
    def __init__(self, api: str, home: Path) -> None:
        self.env = {
            "FABRIK_API_URL": api,
            "FABRIK_HOME": str(home),
            "FABRIK_PROJECT": None,
            "FABRIK_ENV": None,
        }

    def __call__(self, *args: str, input: str | None = None) -> Result:
        return CliRunner().invoke(cli, list(args), env=self.env, input=input, catch_exceptions=False)

    def ok(self, *args: str, input: str | None = None) -> Result:
        result = self(*args, input=input)
        assert result.exit_code == 0, (result.stdout, result.stderr)
        return result

    def json(self, *args: str) -> Any:
        return json.loads(self.ok(*args, "-o", "json").stdout)


@pytest.fixture
def fabrik(nats_url: str, tmp_path: Path) -> Iterator[Fabrik]:
    gateway = ServiceProcess(
        "fabrik_gateway",
        {
            "FABRIK_NATS_URL": nats_url,
            "FABRIK_ENV_ENCRYPTION_KEY": generate_env_key(),
            "FABRIK_ANONYMOUS_ROLE": "admin",
            "FABRIK_LOG_FORMAT": "text",
        },
        log_path=tmp_path / "gateway.log",
    )
    try:
        gateway.start(60)
        yield Fabrik(gateway.base_url, tmp_path / "home")
    finally:
        gateway.kill()


def test_set_ls_and_pull_round_trip(fabrik: Fabrik, tmp_path: Path) -> None:
    result = fabrik.ok("env", "set", "-p", "demo", "A=1", "B=two words")
    assert result.stdout.strip() == "demo/dev (created): 2 added (A, B); 2 key(s), revision 1"
    env_file = tmp_path / "in.env"
    env_file.write_text(f"# comment\nexport C='3'\nTRICKY={format_dotenv_value(TRICKY)}\nB=2\n")
    result = fabrik.ok("env", "set", "-p", "demo", "--from-file", str(env_file), "A=one")
    assert "2 added (C, TRICKY), 2 changed (A, B)" in result.stdout

    listed = fabrik.ok("env", "ls", "-p", "demo")
    assert listed.stdout.split() == ["A", "B", "C", "TRICKY"]
    assert "demo/dev: 4 key(s), revision 2" in listed.stderr
    assert "one" not in listed.stdout + listed.stderr

    out = tmp_path / "pulled.env"
    fabrik.ok("env", "pull", "-p", "demo", str(out))
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert parse_dotenv(out.read_text()) == {"A": "one", "B": "2", "C": "3", "TRICKY": TRICKY}

    piped = fabrik.ok("env", "pull", "-p", "demo")  # stdout is not a terminal here
    assert parse_dotenv(piped.stdout) == {"A": "one", "B": "2", "C": "3", "TRICKY": TRICKY}


def test_pull_on_a_terminal_hides_values_unless_revealed(
    fabrik: Fabrik, monkeypatch: pytest.MonkeyPatch
) -> None:
    fabrik.ok("env", "set", "-p", "demo", "SECRET=hunter2")
    monkeypatch.setattr(env_commands, "_stdout_is_terminal", lambda: True)
    hidden = fabrik.ok("env", "pull", "-p", "demo")
    assert hidden.stdout.strip() == "SECRET=********"
    assert "--reveal" in hidden.stderr
    assert "hunter2" not in hidden.stdout + hidden.stderr
    shown = fabrik.ok("env", "pull", "-p", "demo", "--reveal")
    assert "SECRET=hunter2" in shown.stdout


def test_unset_replace_and_json(fabrik: Fabrik) -> None:
    fabrik.ok("env", "set", "-p", "demo", "-e", "staging", "A=1", "B=2", "C=3")
    body = fabrik.json("env", "set", "-p", "demo", "-e", "staging", "--unset", "A", "--unset", "B")
    assert body["changes"]["removed"] == ["A", "B"]
    body = fabrik.json("env", "set", "-p", "demo", "-e", "staging", "--replace", "Z=26")
    assert body["mode"] == "replace"
    assert body["keys"] == ["Z"]
    assert fabrik.json("env", "ls", "-p", "demo", "-e", "staging")["keys"] == ["Z"]
    envs = fabrik.ok("env", "envs", "-p", "demo")
    assert envs.stdout.splitlines()[0].split() == ["ENV", "KEYS", "REVISION", "UPDATED", "BY"]
    assert envs.stdout.splitlines()[1].split()[:3] == ["staging", "1", "3"]


def test_bad_input_is_exit_2_with_line_numbers(fabrik: Fabrik, tmp_path: Path) -> None:
    bad = tmp_path / "bad.env"
    bad.write_text("A=1\nNOEQUALS\nA=2\nB='open\n")
    result = fabrik("env", "set", "-p", "demo", "--from-file", str(bad))
    assert result.exit_code == 2
    assert f"{bad}:2: expected KEY=VALUE" in result.stderr
    assert f"{bad}:3: A is set twice: already on line 1" in result.stderr
    assert f"{bad}:4: unterminated single quote" in result.stderr

    reserved = tmp_path / "reserved.env"
    reserved.write_text("OK=1\n\nFABRIK_TOKEN=x\n")
    result = fabrik("env", "set", "-p", "demo", "--from-file", str(reserved))
    assert result.exit_code == 2
    assert f"{reserved}:3: FABRIK_TOKEN is reserved" in result.stderr

    result = fabrik("env", "set", "-p", "demo", "SMITHERS_X=1")
    assert result.exit_code == 2
    assert "SMITHERS_X: is reserved" in result.stderr
    result = fabrik("env", "set", "-p", "Bad_Project", "A=1")
    assert result.exit_code == 2
    assert "--project: must be a DNS-1123 label" in result.stderr
    assert fabrik("env", "ls", "-p", "demo").exit_code == 1  # nothing was stored: 404


def test_protected_env_asks(fabrik: Fabrik) -> None:
    refused = fabrik("env", "set", "-p", "demo", "-e", "prod", "A=1", input="n\n")
    assert refused.exit_code == 1
    assert "protected environment" in refused.stderr
    assert "nothing was changed" in refused.stderr
    assert fabrik("env", "ls", "-p", "demo", "-e", "prod").exit_code == 1
    fabrik.ok("env", "set", "-p", "demo", "-e", "prod", "A=1", input="y\n")
    fabrik.ok("env", "set", "-p", "demo", "-e", "prod", "B=2", "--yes")
    assert fabrik.json("env", "ls", "-p", "demo", "-e", "prod")["keys"] == ["A", "B"]
    assert fabrik("env", "delete", "-p", "demo", "-e", "prod", input="n\n").exit_code == 1
    deleted = fabrik.ok("env", "delete", "-p", "demo", "-e", "prod", "--yes")
    assert deleted.stdout.strip() == "deleted demo/prod (2 key(s))"


def test_run_with_the_env(fabrik: Fabrik) -> None:
    fabrik.ok("env", "set", "-p", "demo", "GREETING=hello from the env", "CODE=7")
    script = "import os, sys; print(os.environ['GREETING']); sys.exit(int(os.environ['CODE']))"
    result = fabrik("env", "run", "-p", "demo", "--", sys.executable, "-c", script)
    assert result.exit_code == 7


def test_run_with_the_env_output(fabrik: Fabrik, tmp_path: Path) -> None:
    fabrik.ok("env", "set", "-p", "demo", "GREETING=hello from the env")
    marker = tmp_path / "out.txt"
    script = f"import os; open({str(marker)!r}, 'w').write(os.environ['GREETING'] + os.environ['PATH'][:0])"
    fabrik.ok("env", "run", "-p", "demo", "--", sys.executable, "-c", script)
    assert marker.read_text() == "hello from the env"


def test_diff_and_promote(fabrik: Fabrik) -> None:
    fabrik.ok("env", "set", "-p", "demo", "-e", "staging", "A=1", "B=2", "C=3")
    fabrik.ok("env", "set", "-p", "demo", "-e", "prod", "--yes", "B=2", "C=old", "D=prod-only")
    diff = fabrik.ok("env", "diff", "-p", "demo", "--from", "staging", "--to", "prod")
    lines = diff.stdout.splitlines()
    assert lines[0] == "demo: staging -> prod"
    assert [line.split()[:2] for line in lines[1:4]] == [["+", "A"], ["-", "D"], ["~", "C"]]
    assert "1 key(s) unchanged" in lines[4]
    assert "old" not in diff.stdout and "prod-only" not in diff.stdout
    assert (
        fabrik("env", "diff", "-p", "demo", "--from", "staging", "--to", "prod", "--exit-code").exit_code == 1
    )

    declined = fabrik("env", "promote", "-p", "demo", "--from", "staging", "--to", "prod", input="n\n")
    assert declined.exit_code == 1
    assert "+ A" in declined.stdout
    assert fabrik.json("env", "ls", "-p", "demo", "-e", "prod")["keys"] == ["B", "C", "D"]

    done = fabrik.ok("env", "promote", "-p", "demo", "--from", "staging", "--to", "prod", input="y\n")
    assert "promoted demo/staging to prod: revision 2" in done.stdout
    assert fabrik.json("env", "ls", "-p", "demo", "-e", "prod")["keys"] == ["A", "B", "C"]
    again = fabrik.ok("env", "promote", "-p", "demo", "--from", "staging", "--to", "prod", "--yes")
    assert "nothing to promote" in again.stdout
    same = fabrik.ok("env", "diff", "-p", "demo", "--from", "staging", "--to", "prod", "--exit-code")
    assert "no differences" in same.stdout


def test_unreachable_api(tmp_path: Path) -> None:
    result = Fabrik("http://127.0.0.1:9", tmp_path)("env", "ls", "-p", "demo")
    assert result.exit_code == 1
    assert "cannot reach the Fabrik API" in result.stderr
