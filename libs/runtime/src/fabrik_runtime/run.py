"""The run's own identity and its LLM endpoints, as the executor provides them in the environment."""

from __future__ import annotations

import os
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
