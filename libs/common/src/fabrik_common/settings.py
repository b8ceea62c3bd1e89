"""Typed settings from environment variables.

Each service declares one frozen msgspec Struct; every field is read from `FABRIK_<FIELD>`
(upper-case). A missing required variable or a value that breaks the field's type or constraint
stops start-up with a message naming the variable and the rule.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Annotated, Any, Literal, TypeVar, get_args, get_origin

import msgspec

S = TypeVar("S", bound=msgspec.Struct)

ENV_PREFIX = "FABRIK_"

Port = Annotated[int, msgspec.Meta(ge=0, le=65535, description="TCP port; 0 picks a free one")]
PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]
PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]


class SettingsError(ValueError):
    """One or more environment variables are missing or invalid."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid configuration:\n  " + "\n  ".join(problems))


class CommonSettings(msgspec.Struct, frozen=True, kw_only=True):
    """What every service needs: where NATS is, where to serve health and metrics, how to log."""

    nats_url: str = "nats://127.0.0.1:4222"
    nats_connect_timeout: PositiveFloat = 2.0
    nats_max_reconnect_wait: PositiveFloat = 5.0
    http_host: str = "127.0.0.1"
    http_port: Port = 8080
    log_level: LogLevel = "INFO"
    log_format: Literal["json", "text"] = "json"
    stream_replicas: Annotated[int, msgspec.Meta(ge=1, le=5)] = 1
    logs_max_age_seconds: PositiveInt = 7 * 24 * 3600
    logs_max_bytes: PositiveInt = 10 * 1024**3
    dedupe_window_seconds: PositiveInt = 600
    shutdown_grace_seconds: PositiveFloat = 20.0
    shutdown_deadline_seconds: PositiveFloat = 28.0
    """After SIGTERM the process exits within this time, clean or not (stacks dumped to stderr)."""
    instance_id: str = ""


def env_name(field: str, prefix: str = ENV_PREFIX) -> str:
    return f"{prefix}{field.upper()}"


def _base_type(tp: Any) -> Any:
    while get_origin(tp) is Annotated:
        tp = get_args(tp)[0]
    return tp


def _raw_value(text: str, tp: Any) -> Any:
    """Environment text as the shape msgspec expects: JSON for containers, lists by comma."""
    base = _base_type(tp)
    origin = get_origin(base)
    if origin in (list, tuple, set, frozenset) or base in (list, tuple):
        stripped = text.strip()
        if stripped.startswith("["):
            return msgspec.json.decode(stripped)
        return [part.strip() for part in stripped.split(",") if part.strip()]
    if origin is dict or base is dict or (isinstance(base, type) and issubclass(base, msgspec.Struct)):
        return msgspec.json.decode(text)
    return text


def _describe_rule(tp: Any) -> str:
    base = _base_type(tp)
    if get_origin(base) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(base))
    return getattr(base, "__name__", str(base))


def load_settings(cls: type[S], environ: Mapping[str, str] | None = None, prefix: str = ENV_PREFIX) -> S:
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    problems: list[str] = []
    for field in msgspec.structs.fields(cls):
        name = env_name(field.name, prefix)
        if name not in env:
            if field.required:
                problems.append(f"{name} is required ({_describe_rule(field.type)})")
            continue
        text = env[name]
        try:
            values[field.name] = msgspec.convert(_raw_value(text, field.type), field.type, strict=False)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            problems.append(f"{name}={text!r} is invalid: {exc} (expected {_describe_rule(field.type)})")
    if problems:
        raise SettingsError(problems)
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise SettingsError([str(exc)]) from exc


def settings_env(settings: msgspec.Struct, prefix: str = ENV_PREFIX) -> dict[str, str]:
    """The environment that reproduces `settings` (for starting a service as a subprocess)."""
    env: dict[str, str] = {}
    for field in msgspec.structs.fields(type(settings)):
        value = getattr(settings, field.name)
        if isinstance(value, str):
            env[env_name(field.name, prefix)] = value
        elif isinstance(value, bool):
            env[env_name(field.name, prefix)] = "true" if value else "false"
        elif isinstance(value, int | float):
            env[env_name(field.name, prefix)] = str(value)
        elif value is not None:
            env[env_name(field.name, prefix)] = msgspec.json.encode(value).decode()
    return env
