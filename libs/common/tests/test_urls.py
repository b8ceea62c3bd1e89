from __future__ import annotations

import pytest

from fabrik_common.urls import redact_url


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("nats://gateway:s3cret@nats:4222", "nats://gateway:***@nats:4222"),
        ("nats://a:x@n1:4222,nats://a:y@n2:4222", "nats://a:***@n1:4222,nats://a:***@n2:4222"),
        ("nats://t0ken@nats:4222", "nats://***@nats:4222"),
        ("https://user@example.org/x", "https://user@example.org/x"),
        ("nats://127.0.0.1:4222", "nats://127.0.0.1:4222"),
        ("postgresql://fabrik:p%40ss@db/analytics", "postgresql://fabrik:***@db/analytics"),
        ("not a url", "not a url"),
    ],
)
def test_passwords_never_shown(url: str, shown: str) -> None:
    assert redact_url(url) == shown
