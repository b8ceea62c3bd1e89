"""Query parameters: parsed by hand so that every invalid one is named in a single 400."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable
from typing import Final, get_args

from fabrik_common.events import RunState
from fabrik_common.ids import DNS1123_RULE, is_dns1123_label, is_ulid
from fabrik_common.specs import FieldError
from fabrik_gateway.problems import invalid

RUN_STATES: Final = get_args(RunState)
_CURSOR_PREFIX: Final = "r1:"


class QueryErrors:
    """Collects invalid query parameters; `raise_if_any()` answers 400 naming all of them."""

    def __init__(self) -> None:
        self.errors: list[FieldError] = []

    def add(self, field: str, rule: str) -> None:
        self.errors.append((field, rule))

    def raise_if_any(self) -> None:
        if self.errors:
            raise invalid(self.errors, status=400, detail="invalid query parameters: " + _names(self.errors))


def _names(errors: Iterable[FieldError]) -> str:
    return ", ".join(dict.fromkeys(f for f, _ in errors))


def int_param(
    errors: QueryErrors,
    name: str,
    text: str | None,
    *,
    default: int | None,
    minimum: int,
    maximum: int | None,
) -> int | None:
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        errors.add(name, "must be an integer")
        return default
    if value < minimum or (maximum is not None and value > maximum):
        rule = (
            f"must be between {minimum} and {maximum}"
            if maximum is not None
            else f"must be at least {minimum}"
        )
        errors.add(name, rule)
        return default
    return value


def bool_param(errors: QueryErrors, name: str, text: str | None, *, default: bool) -> bool:
    if text is None or text == "":
        return default
    lowered = text.lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    errors.add(name, "must be true or false")
    return default


def project_param(errors: QueryErrors, text: str | None, name: str = "project") -> str | None:
    if text is None or text == "":
        return None
    if not is_dns1123_label(text):
        errors.add(name, DNS1123_RULE)
    return text


def states_param(errors: QueryErrors, values: list[str] | None) -> list[str]:
    states: list[str] = []
    for value in values or ():
        for state in value.split(","):
            state = state.strip()
            if not state:
                continue
            if state not in RUN_STATES:
                errors.add("state", f"{state!r} is not a run state; use one of: " + ", ".join(RUN_STATES))
            else:
                states.append(state)
    return states


def labels_param(errors: QueryErrors, values: list[str] | None) -> list[tuple[str, str]]:
    labels: list[tuple[str, str]] = []
    for value in values or ():
        key, sep, label_value = value.partition("=")
        if not sep or not key:
            errors.add("label", f"{value!r} must have the form key=value")
        else:
            labels.append((key, label_value))
    return labels


def encode_cursor(run_id: str) -> str:
    return base64.urlsafe_b64encode((_CURSOR_PREFIX + run_id).encode()).decode().rstrip("=")


def cursor_param(errors: QueryErrors, text: str | None) -> str | None:
    if text is None or text == "":
        return None
    try:
        decoded = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        decoded = ""
    run_id = decoded.removeprefix(_CURSOR_PREFIX)
    if not decoded.startswith(_CURSOR_PREFIX) or not is_ulid(run_id):
        errors.add("cursor", "is not a cursor this API returned (use next_cursor of the previous page)")
        return None
    return run_id
