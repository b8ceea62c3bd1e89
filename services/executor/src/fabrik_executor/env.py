"""The environment a local workload starts with.

Clean, not inherited: a workload sees only what is listed here, in increasing precedence:

1. basics: `PATH` (the executor's, or `FABRIK_WORKLOAD_PATH`), `HOME` = the workspace, `LANG`,
   `PYTHONUNBUFFERED=1` (so Python workloads stream their output instead of buffering it);
2. the project environment file `<data>/env/<project>/<env>.env` (dotenv `KEY=VALUE` lines);
3. `workload.env` of the run;
4. the LLM endpoints: `OPENAI_BASE_URL=<llm-proxy>/v1`, `ANTHROPIC_BASE_URL=<llm-proxy>`;
5. the run-scoped LLM key from the `RunKeyProvider` hook (none yet: a later issue signs one);
6. the run's metadata: `FABRIK_RUN_ID`, `FABRIK_PROJECT`, `FABRIK_ENV`, `FABRIK_ATTEMPT`,
   `FABRIK_WORKSPACE`, `FABRIK_SPEC_FILE` / `FABRIK_TODO_FILE` (when there is one).

Keys starting `FABRIK_` or `SMITHERS_` are reserved (DESIGN §3): in the env file or `workload.env`
they are skipped with a warning, which the executor also writes into the run's log.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

from fabrik_common.events import RunDispatched

RESERVED_PREFIXES = ("FABRIK_", "SMITHERS_")
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_DOUBLE_QUOTED_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\", "$": "$"}


def is_reserved(key: str) -> bool:
    return key.upper().startswith(RESERVED_PREFIXES)


def parse_dotenv(text: str, source: str = ".env") -> tuple[dict[str, str], list[str]]:
    """`KEY=VALUE` lines: `#` comments, blank lines, an optional `export `, single quotes taken
    literally, double quotes with `\\n`-style escapes, unquoted values trimmed and cut at ` #`.
    Returns the values and one warning per line that was skipped."""
    values: dict[str, str] = {}
    warnings: list[str] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export ") :].lstrip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not _KEY.match(key):
            warnings.append(f"{source}:{number}: not a KEY=VALUE line, skipped")
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == "'":
            value = value[1:-1]
        elif len(value) >= 2 and value[0] == value[-1] == '"':
            value = _unescape(value[1:-1])
        elif value[:1] in ("'", '"'):
            warnings.append(f"{source}:{number}: unterminated quote in {key}, skipped")
            continue
        else:
            comment = value.find(" #")
            if comment >= 0:
                value = value[:comment].rstrip()
        if is_reserved(key):
            warnings.append(f"{source}:{number}: {key} is reserved (FABRIK_*, SMITHERS_*), skipped")
            continue
        values[key] = value
    return values, warnings


def _unescape(text: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char == "\\" and i + 1 < len(text) and text[i + 1] in _DOUBLE_QUOTED_ESCAPES:
            out.append(_DOUBLE_QUOTED_ESCAPES[text[i + 1]])
            i += 2
            continue
        out.append(char)
        i += 1
    return "".join(out)


def project_env_file(root: Path, project: str, env: str) -> Path:
    return root / "env" / project / f"{env}.env"


def load_project_env(root: Path, project: str, env: str) -> tuple[dict[str, str], list[str]]:
    """The project's env file for `env`, if there is one."""
    path = project_env_file(root, project, env)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}, []
    except OSError as exc:
        return {}, [f"cannot read {path}: {exc.strerror or exc}"]
    return parse_dotenv(text, source=str(path))


class RunKeyProvider(Protocol):
    """Hook for the run-scoped LLM key (signed: run, project, budget, expiry).

    A later issue implements it (the llm-proxy verifies the key); it returns the variables that
    carry the key, e.g. `OPENAI_API_KEY`, `ANTHROPIC_API_KEY` and `FABRIK_LLM_KEY`.
    """

    def llm_key_env(self, dispatch: RunDispatched) -> dict[str, str]: ...


class NoRunKey:
    """No run-scoped key yet: the llm-proxy's offline/echo provider needs none."""

    def llm_key_env(self, dispatch: RunDispatched) -> dict[str, str]:
        return {}


def llm_endpoint_env(llm_proxy_url: str) -> dict[str, str]:
    base = llm_proxy_url.rstrip("/")
    return {"OPENAI_BASE_URL": f"{base}/v1", "ANTHROPIC_BASE_URL": base}


def build_env(
    dispatch: RunDispatched,
    *,
    workspace: Path,
    project_env: Mapping[str, str],
    llm_proxy_url: str,
    run_key_env: Mapping[str, str] | None = None,
    spec_file: Path | None = None,
    todo_file: Path | None = None,
    path: str | None = None,
    host_env: Mapping[str, str] | None = None,
) -> tuple[dict[str, str], list[str]]:
    """The workload's environment and the warnings about what was left out."""
    host = os.environ if host_env is None else host_env
    warnings: list[str] = []
    env: dict[str, str] = {
        "PATH": path or host.get("PATH") or DEFAULT_PATH,
        "HOME": str(workspace),
        "LANG": host.get("LANG") or "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
    }
    for key, value in project_env.items():
        if is_reserved(key):
            warnings.append(f"project env: {key} is reserved (FABRIK_*, SMITHERS_*), skipped")
            continue
        env[key] = value
    for key, value in dispatch.params.workload.env.items():
        if is_reserved(key):
            warnings.append(f"workload.env: {key} is reserved (FABRIK_*, SMITHERS_*), skipped")
            continue
        if not _KEY.match(key):
            warnings.append(f"workload.env: {key!r} is not a valid variable name, skipped")
            continue
        env[key] = value
    env.update(llm_endpoint_env(llm_proxy_url))
    env.update(run_key_env or {})
    env.update(
        {
            "FABRIK_RUN_ID": dispatch.run_id,
            "FABRIK_PROJECT": dispatch.project,
            "FABRIK_ENV": dispatch.env,
            "FABRIK_ATTEMPT": str(dispatch.attempt),
            "FABRIK_WORKSPACE": str(workspace),
        }
    )
    if spec_file is not None:
        env["FABRIK_SPEC_FILE"] = str(spec_file)
    if todo_file is not None:
        env["FABRIK_TODO_FILE"] = str(todo_file)
    return env, warnings
