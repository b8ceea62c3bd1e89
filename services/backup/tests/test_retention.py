"""Retention tiers, the age limit, and the backups that are never deleted."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from fabrik_backup.retention import BackupInfo, RetentionPolicy, plan_retention

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


def daily_backups(days: int, per_day: int = 2) -> list[BackupInfo]:
    """`per_day` backups a day (11:00, 07:00, ...) for `days` days before NOW."""
    out = []
    for d in range(days):
        for i in range(per_day):
            at = NOW - timedelta(days=d, hours=1 + 4 * i)
            out.append(BackupInfo(f"b-{d:03d}-{i}", at))
    return out


def test_retention_off_keeps_everything() -> None:
    plan = plan_retention(daily_backups(10), RetentionPolicy(), NOW)
    assert plan.delete == [] and len(plan.keep) == 20


def test_tiers_keep_the_newest_of_each_period() -> None:
    backups = daily_backups(100)
    plan = plan_retention(
        backups, RetentionPolicy(keep_last=3, keep_daily=7, keep_weekly=4, keep_monthly=3), NOW
    )
    kept = set(plan.keep)
    assert {"b-000-0", "b-000-1", "b-001-0"} <= kept  # the latest three
    assert all(f"b-{d:03d}-0" in kept for d in range(7))  # the newest of each of 7 days
    assert "b-007-0" not in kept or "weekly" in plan.keep["b-007-0"] or "monthly" in plan.keep["b-007-0"]
    monthly = [b for b, why in plan.keep.items() if "monthly" in why]
    assert len(monthly) == 3
    weekly = [b for b, why in plan.keep.items() if "weekly" in why]
    assert len(weekly) == 4
    assert len(plan.keep) + len(plan.delete) == len(backups)
    assert len(plan.delete) > 150


def test_age_limit_and_the_last_verified_backup_is_never_deleted() -> None:
    backups = daily_backups(60, per_day=1)
    verified_old = BackupInfo("verified-old", NOW - timedelta(days=90), verified_at=NOW - timedelta(days=89))
    plan = plan_retention([*backups, verified_old], RetentionPolicy(keep_monthly=12, max_age_days=30), NOW)
    assert "verified-old" in plan.keep and plan.keep["verified-old"] == ["last verified"]
    assert all(b.created_at >= NOW - timedelta(days=30) for b in backups if b.backup_id in plan.keep)
    # A newer verified backup takes the protection over.
    newer = BackupInfo("b-045-0", NOW - timedelta(days=45, hours=1), verified_at=NOW)
    plan = plan_retention(
        [*[b for b in backups if b.backup_id != "b-045-0"], newer, verified_old],
        RetentionPolicy(keep_last=1),
        NOW,
    )
    assert plan.keep["b-045-0"] == ["last verified"] and "verified-old" in plan.delete


def test_everything_would_go_but_in_use_and_verified_stay() -> None:
    backups = daily_backups(5, per_day=1)
    backups[2] = BackupInfo(backups[2].backup_id, backups[2].created_at, verified_at=NOW)
    plan = plan_retention(backups, RetentionPolicy(max_age_days=0.001), NOW, in_use=["b-004-0"])
    assert sorted(plan.keep) == ["b-002-0", "b-004-0"]
    assert sorted(plan.delete) == ["b-000-0", "b-001-0", "b-003-0"]
