from __future__ import annotations

from typing import Annotated, Literal

import msgspec
import pytest

from fabrik_common.settings import CommonSettings, SettingsError, load_settings, settings_env


class ExampleSettings(CommonSettings, frozen=True, kw_only=True):
    api_secret: str
    workers: Annotated[int, msgspec.Meta(ge=1, le=64)] = 4
    mode: Literal["fast", "safe"] = "safe"
    allowed_cidrs: list[str] = msgspec.field(default_factory=list)
    weights: dict[str, float] = msgspec.field(default_factory=dict)
    debug: bool = False


def test_defaults_and_environment_values() -> None:
    settings = load_settings(
        ExampleSettings,
        {
            "FABRIK_API_SECRET": "s3cret",
            "FABRIK_WORKERS": "8",
            "FABRIK_ALLOWED_CIDRS": "10.0.0.0/8, 192.168.0.0/16",
            "FABRIK_WEIGHTS": '{"a": 1.5}',
            "FABRIK_DEBUG": "true",
            "UNRELATED": "x",
        },
    )
    assert settings.workers == 8
    assert settings.allowed_cidrs == ["10.0.0.0/8", "192.168.0.0/16"]
    assert settings.weights == {"a": 1.5}
    assert settings.debug is True
    assert settings.mode == "safe"
    assert settings.nats_url == "nats://127.0.0.1:4222"


def test_every_problem_names_the_variable_and_the_rule() -> None:
    with pytest.raises(SettingsError) as info:
        load_settings(
            ExampleSettings,
            {
                "FABRIK_WORKERS": "0",
                "FABRIK_MODE": "reckless",
                "FABRIK_HTTP_PORT": "http",
                "FABRIK_DEBUG": "maybe",
            },
        )
    problems = info.value.problems
    text = str(info.value)
    assert len(problems) == 5
    assert "FABRIK_API_SECRET is required" in text
    assert "FABRIK_WORKERS='0' is invalid" in text and ">= 1" in text
    assert "FABRIK_MODE='reckless'" in text and "'fast', 'safe'" in text
    assert "FABRIK_HTTP_PORT='http'" in text and "int" in text
    assert "FABRIK_DEBUG='maybe'" in text


def test_json_list_form_and_malformed_json() -> None:
    ok = load_settings(ExampleSettings, {"FABRIK_API_SECRET": "x", "FABRIK_ALLOWED_CIDRS": '["1.2.3.4/32"]'})
    assert ok.allowed_cidrs == ["1.2.3.4/32"]
    with pytest.raises(SettingsError, match="FABRIK_WEIGHTS"):
        load_settings(ExampleSettings, {"FABRIK_API_SECRET": "x", "FABRIK_WEIGHTS": "{oops"})


def test_settings_env_reproduces_the_settings() -> None:
    original = ExampleSettings(
        api_secret="x", workers=3, allowed_cidrs=["a", "b"], weights={"k": 2.0}, debug=True
    )
    assert load_settings(ExampleSettings, settings_env(original)) == original
