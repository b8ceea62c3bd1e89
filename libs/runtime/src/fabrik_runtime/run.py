"""The run's own identity and its LLM endpoints, as the executor provides them in the environment."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class LlmEndpoints:
    """Base URLs of the llm-proxy and the run-scoped key (never a provider key)."""

    openai_base_url: str | None
    anthropic_base_url: str | None
    api_key: str | None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> LlmEndpoints:
        env = os.environ if env is None else env
        key = env.get("FABRIK_LLM_KEY") or env.get("OPENAI_API_KEY") or env.get("ANTHROPIC_API_KEY")
        key_file = env.get("FABRIK_LLM_KEY_FILE")
        if not key and key_file and Path(key_file).is_file():
            key = Path(key_file).read_text().strip()
        return cls(env.get("OPENAI_BASE_URL"), env.get("ANTHROPIC_BASE_URL"), key)


@dataclass(frozen=True)
class RunContext:
    run_id: str
    project: str
    env: str
    attempt: int
    workspace: Path

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> RunContext:
        env = os.environ if env is None else env
        missing = [
            name
            for name in ("FABRIK_RUN_ID", "FABRIK_PROJECT", "FABRIK_ENV", "FABRIK_ATTEMPT")
            if name not in env
        ]
        if missing:
            raise RuntimeError(f"not inside a Fabrik run: {', '.join(missing)} not set")
        return cls(
            run_id=env["FABRIK_RUN_ID"],
            project=env["FABRIK_PROJECT"],
            env=env["FABRIK_ENV"],
            attempt=int(env["FABRIK_ATTEMPT"]),
            workspace=Path(env.get("FABRIK_WORKSPACE", ".")),
        )


HARNESS_PREFIX = "FABRIK_HARNESS_"
_HARNESS_KEY = re.compile(r"^[a-z][a-z0-9_]{0,62}$")


def _setting_text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    return json.dumps(value)


def harness_settings(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The harness settings of this run, key -> text.

    First the spec's harness file (`FABRIK_SPEC_HARNESS_FILE`, set when the run works from a spec in its
    repository: `specs/x.json` -> `specs/x.harness.json`, a JSON object whose `harness` object maps
    keys to values), then the `FABRIK_HARNESS_<KEY>` variables the run configuration sets (the
    platform's defaults and experiment arms) over it: an experiment must be able to change what the
    spec fixes. A missing file is no settings; a file that is not such an object is an error, so
    that a broken file is not silently ignored."""
    env = os.environ if env is None else env
    settings: dict[str, str] = {}
    path = env.get("FABRIK_SPEC_HARNESS_FILE")
    if path and Path(path).is_file():
        try:
            document = json.loads(Path(path).read_text(encoding="utf-8"))
        except ValueError as exc:
            raise ValueError(f"{path}: not JSON ({exc})") from exc
        harness = document.get("harness") if isinstance(document, dict) else None
        if not isinstance(harness, dict):
            raise ValueError(f'{path}: must be a JSON object with a "harness" object')
        for key, value in harness.items():
            if not _HARNESS_KEY.match(key):
                raise ValueError(f"{path}: harness key {key!r} must match {_HARNESS_KEY.pattern}")
            settings[key] = _setting_text(value)
    for name, value in env.items():
        key = name.removeprefix(HARNESS_PREFIX)
        if key != name and _HARNESS_KEY.match(key.lower()):
            settings[key.lower()] = value
    return settings
