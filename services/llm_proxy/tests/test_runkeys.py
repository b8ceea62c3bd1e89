"""Run-scoped keys (fabrik_common.runkeys): signed claims, verified without a lookup."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from fabrik_common.runkeys import (
    RevocationSet,
    RunKeyError,
    issue_run_key,
    load_run_key_secret,
    revocation_key,
    verify_run_key,
)

SECRET = b"unit-test-secret-0123456789"
RUN = "01JABCDEFGHJKMNPQRSTVWXYZ0"


def issue(**kw: object) -> str:
    args: dict[str, object] = {
        "run_id": RUN,
        "project": "demo",
        "budget_usd": 2.5,
        "expires_at": datetime.now(UTC) + timedelta(hours=1),
    }
    args.update(kw)
    return issue_run_key(SECRET, **args)  # type: ignore[arg-type]


def test_round_trip_carries_the_claims() -> None:
    expires = datetime.now(UTC).replace(microsecond=0) + timedelta(hours=2)
    key = issue(key_id="key-1", expires_at=expires)
    assert key.startswith("fk-run-") and key.count(".") == 1
    claims = verify_run_key(SECRET, key)
    assert (claims.run_id, claims.project, claims.budget_usd, claims.key_id) == (RUN, "demo", 2.5, "key-1")
    assert claims.expires_at == expires
    assert issue(budget_usd=None).startswith("fk-run-")
    assert verify_run_key(SECRET, issue(budget_usd=None)).budget_usd is None


def test_a_key_id_is_generated_when_not_given() -> None:
    assert verify_run_key(SECRET, issue()).key_id != verify_run_key(SECRET, issue()).key_id


def test_changed_claims_or_another_secret_fail_the_signature() -> None:
    key = issue()
    payload, sig = key[len("fk-run-") :].split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["bud"] = 1000.0
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    with pytest.raises(RunKeyError) as exc:
        verify_run_key(SECRET, f"fk-run-{forged}.{sig}")
    assert exc.value.reason == "bad_signature"
    with pytest.raises(RunKeyError) as exc:
        verify_run_key(b"another-secret-of-enough-length", key)
    assert exc.value.reason == "bad_signature"


@pytest.mark.parametrize(
    "key", ["", "sk-something", "fk-run-", "fk-run-abc", "fk-run-a.b.c", "fk-run-!!!.abc", "fk-run-abc.***"]
)
def test_malformed_keys_are_refused(key: str) -> None:
    with pytest.raises(RunKeyError) as exc:
        verify_run_key(SECRET, key)
    assert exc.value.reason in ("malformed", "bad_signature")
    assert key not in str(exc.value) or not key


def test_expired_keys_are_refused() -> None:
    key = issue(expires_at=datetime.now(UTC) + timedelta(seconds=10))
    verify_run_key(SECRET, key)
    with pytest.raises(RunKeyError) as exc:
        verify_run_key(SECRET, key, now=datetime.now(UTC).timestamp() + 11)
    assert exc.value.reason == "expired" and "expired at" in str(exc.value)


def test_secret_rules(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 16 bytes"):
        issue_run_key(b"short", run_id=RUN, project="p", budget_usd=None, expires_at=datetime.now(UTC))
    with pytest.raises(ValueError, match="timezone-aware"):
        issue(expires_at=datetime(2030, 1, 1))
    (tmp_path / "secret").write_text("  file-secret-0123456789  \n")
    assert (
        load_run_key_secret("ignored-value-0123456789", str(tmp_path / "secret")) == b"file-secret-0123456789"
    )
    assert load_run_key_secret("value-secret-0123456789") == b"value-secret-0123456789"
    assert load_run_key_secret("") is None


def test_revocation_set_by_key_id_and_by_run() -> None:
    revoked = RevocationSet()
    revoked.apply(revocation_key(key_id="k1"), deleted=False)
    revoked.apply(revocation_key(run_id=RUN), deleted=False)
    revoked.apply("other.key", deleted=False)
    assert revoked.is_revoked("k1") and revoked.is_revoked("k2", RUN) and not revoked.is_revoked("k2", "x")
    revoked.apply(revocation_key(run_id=RUN), deleted=True)
    assert not revoked.is_revoked("k2", RUN)
    with pytest.raises(ValueError, match="exactly one"):
        revocation_key()
