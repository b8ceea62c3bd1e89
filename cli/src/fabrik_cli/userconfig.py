"""The defaults `fabrik init` writes to `config.yaml`, as every command reads them.

The file lives in the CLI's configuration directory (`$FABRIK_HOME`, else
`$XDG_CONFIG_HOME/fabrik`, else `~/.config/fabrik`). The keys the commands use:

- `api_url`: the gateway; `--api` and `$FABRIK_API_URL` come first;
- `token_file`: a file holding the API token or JWT to send; `$FABRIK_TOKEN` and the credential
  `fabrik login` stored for that API come first;
- `project`: the project of the commands that need one (`fabrik run`, `fabrik env ...`);
  `--project` and `$FABRIK_PROJECT` come first;
- `output`: `table`, `json` or `yaml`; `-o/--output` and `$FABRIK_OUTPUT` come first.

The other keys `fabrik init` writes (`target`, `llm_providers`, `port_base`, ...) describe the
installation and are ignored here. A missing file is no configuration; a file that cannot be read
or holds a wrong value is an error naming the file and the key.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import yaml

from fabrik_cli.credentials import credentials_file
from fabrik_cli.errors import CliError

CONFIG_FILE: Final = "config.yaml"
TOKEN_FILE: Final = "token"  # noqa: S105 - a file name, not a secret
ENV_OUTPUT: Final = "FABRIK_OUTPUT"
ENV_PROJECT: Final = "FABRIK_PROJECT"
OUTPUT_FORMATS: Final = ("table", "json", "yaml")


class ConfigFileError(CliError):
    """config.yaml cannot be read or holds a value that cannot be used."""


@dataclass(frozen=True)
class UserConfig:
    path: Path
    api_url: str = ""
    token_file: str = ""
    project: str = ""
    output: str = ""

    def token(self) -> str | None:
        """The token in `token_file` (stripped), None when no file is configured."""
        if not self.token_file:
            return None
        path = self.token_path()
        try:
            token = path.read_text().strip()
        except OSError as exc:
            raise ConfigFileError(
                f"cannot read the token file {path} named by token_file in {self.path}: "
                f"{exc.strerror or exc}",
                ["write the token there, or remove token_file (or run `fabrik init` again)"],
            ) from None
        if not token:
            raise ConfigFileError(f"the token file {path} named by token_file in {self.path} is empty")
        return token

    def token_path(self) -> Path:
        path = Path(self.token_file).expanduser()
        # relative to the configuration directory, where `fabrik init --token` writes it
        return path if path.is_absolute() else self.path.parent / path


def config_path(environ: Mapping[str, str] | None = None) -> Path:
    return credentials_file(environ).parent / CONFIG_FILE


def load_user_config(environ: Mapping[str, str] | None = None) -> UserConfig:
    env = os.environ if environ is None else environ
    path = config_path(env)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return UserConfig(path)
    except OSError as exc:
        raise ConfigFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        data: Any = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigFileError(
            f"{path} is not valid YAML: {exc}", ["fix it, or run `fabrik init` again"]
        ) from None
    if data is None:
        return UserConfig(path)
    if not isinstance(data, dict):
        raise ConfigFileError(f"{path} must be a mapping of keys to values", ["run `fabrik init` again"])
    values: dict[str, str] = {}
    problems: list[str] = []
    for key in ("api_url", "token_file", "project", "output"):
        value = data.get(key)
        if value is None:
            continue
        if not isinstance(value, str):
            problems.append(f"{key}: must be a string (got {value!r})")
            continue
        values[key] = value.strip()
    if values.get("output") and values["output"] not in OUTPUT_FORMATS:
        problems.append(f"output: must be one of {', '.join(OUTPUT_FORMATS)} (got {values['output']!r})")
    if problems:
        raise ConfigFileError(f"{path} holds values that cannot be used", problems)
    return UserConfig(path, **values)


def default_output() -> str:
    """The `-o` default: config.yaml's `output`, else a table (flag and $FABRIK_OUTPUT come first)."""
    return load_user_config().output or "table"


def default_project() -> str | None:
    """A command's project when neither `--project` nor $FABRIK_PROJECT names one."""
    return load_user_config().project or None
