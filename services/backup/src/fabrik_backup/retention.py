"""Which backups to keep: the latest N, daily/weekly/monthly tiers, an age limit — and never the
last verified backup.

A backup is kept when any rule keeps it:

- `keep_last`: the newest N backups;
- `keep_daily` / `keep_weekly` / `keep_monthly`: the newest backup of each of the latest N UTC days
  / ISO weeks / months that have a backup;
- always: the newest backup that passed verification (a restore must have something proven to
  restore from), and backups an operation is still using.

`max_age_days` then removes backups older than that, whichever tier kept them — except the
protected ones above. A policy with every field 0 keeps everything (retention is off).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta


@dataclass(frozen=True)
class RetentionPolicy:
    keep_last: int = 0
    keep_daily: int = 0
    keep_weekly: int = 0
    keep_monthly: int = 0
    max_age_days: float = 0

    @property
    def enabled(self) -> bool:
        return any((self.keep_last, self.keep_daily, self.keep_weekly, self.keep_monthly, self.max_age_days))


@dataclass(frozen=True)
class BackupInfo:
    backup_id: str
    created_at: datetime
    verified_at: datetime | None = None


@dataclass
class RetentionPlan:
    keep: dict[str, list[str]] = field(default_factory=dict)
    """Backup id → the rules that keep it."""
    delete: list[str] = field(default_factory=list)


def _tier(backups: list[BackupInfo], count: int, key: Callable[[datetime], Hashable]) -> list[str]:
    """The newest backup of each of the latest `count` periods (backups sorted newest first)."""
    kept: list[str] = []
    seen: set[Hashable] = set()
    for backup in backups:
        period = key(backup.created_at)
        if period in seen:
            continue
        if len(seen) >= count:
            break
        seen.add(period)
        kept.append(backup.backup_id)
    return kept


def plan_retention(
    backups: Iterable[BackupInfo], policy: RetentionPolicy, now: datetime, in_use: Iterable[str] = ()
) -> RetentionPlan:
    ordered = sorted(backups, key=lambda b: b.created_at, reverse=True)
    result = RetentionPlan()
    if not policy.enabled:
        result.keep = {b.backup_id: ["retention off"] for b in ordered}
        return result

    def keep(backup_id: str, reason: str) -> None:
        result.keep.setdefault(backup_id, []).append(reason)

    for b in ordered[: policy.keep_last]:
        keep(b.backup_id, "last")
    for backup_id in _tier(ordered, policy.keep_daily, lambda t: t.date()):
        keep(backup_id, "daily")
    for backup_id in _tier(ordered, policy.keep_weekly, lambda t: t.isocalendar()[:2]):
        keep(backup_id, "weekly")
    for backup_id in _tier(ordered, policy.keep_monthly, lambda t: (t.year, t.month)):
        keep(backup_id, "monthly")
    if policy.max_age_days:
        limit = now - timedelta(days=policy.max_age_days)
        if not (policy.keep_last or policy.keep_daily or policy.keep_weekly or policy.keep_monthly):
            for b in ordered:
                keep(b.backup_id, "age")  # only an age limit: everything younger stays
        for b in ordered:
            if b.created_at < limit:
                result.keep.pop(b.backup_id, None)
    protected = set(in_use)
    verified = [b for b in ordered if b.verified_at is not None]
    if verified:
        keep(verified[0].backup_id, "last verified")
    for b in ordered:
        if b.backup_id in protected:
            keep(b.backup_id, "in use")
    result.delete = [b.backup_id for b in ordered if b.backup_id not in result.keep]
    return result
