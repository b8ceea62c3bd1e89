"""Cron schedules without NATS: validation, slot arithmetic (DST included), catch-up, health."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import pytest

from fabrik_common.schedules.model import (
    ALIASES,
    CronError,
    Expectations,
    SlotRecord,
    cron_errors,
    expand_cron,
)
from fabrik_common.schedules.timing import due_slots, iter_slots, next_slot, plan_slots
from fabrik_scheduler.schedules.health import evaluate

T0 = datetime(2026, 3, 1, 0, 0, tzinfo=UTC)


# ---------------------------------------------------------------------------- validation


@pytest.mark.parametrize("alias", sorted(ALIASES))
def test_every_alias_maps_to_a_valid_expression(alias: str) -> None:
    assert expand_cron(alias) == ALIASES[alias]
    assert expand_cron(alias.upper()) == ALIASES[alias]
    assert next_slot(alias, "UTC", T0) is not None


def test_aliases_fire_when_expected() -> None:
    assert next_slot("@hourly", "UTC", T0) == T0 + timedelta(hours=1)
    assert next_slot("@daily", "UTC", T0) == T0 + timedelta(days=1)
    assert next_slot("@weekly", "UTC", T0) == datetime(2026, 3, 8, tzinfo=UTC)  # a Sunday
    assert next_slot("@monthly", "UTC", T0) == datetime(2026, 4, 1, tzinfo=UTC)
    assert next_slot("@yearly", "UTC", T0) == datetime(2027, 1, 1, tzinfo=UTC)
    assert next_slot("@annually", "UTC", T0) == next_slot("@yearly", "UTC", T0)
    assert next_slot("@midnight", "UTC", T0) == next_slot("@daily", "UTC", T0)


@pytest.mark.parametrize(
    ("expression", "fragment"),
    [
        ("", "5 fields"),
        ("* * * *", "has 4 field(s)"),
        ("0 0 * * * *", "has 6 field(s)"),
        ("61 * * * *", "bad minute field '61'"),
        ("0 24 * * *", "bad hour field '24'"),
        ("0 0 32 * *", "bad day-of-month field '32'"),
        ("0 0 * 13 *", "bad month field '13'"),
        ("0 0 * * 8", "bad day-of-week field '8'"),
        ("*/0 * * * *", "bad minute field"),
        ("@fortnightly", "unknown alias '@fortnightly'"),
        ("0 0 30 2 *", "never fires"),
        ("0 0 * * $", "characters"),
    ],
)
def test_invalid_cron_names_the_rule(expression: str, fragment: str) -> None:
    with pytest.raises(CronError) as info:
        expand_cron(expression)
    assert fragment in str(info.value)
    errors = cron_errors(expression, "UTC")
    assert [field for field, _ in errors] == ["cron"]
    assert "cron expression of 5 fields" in errors[0][1]


def test_valid_expressions_are_normalised() -> None:
    assert expand_cron("  30   2 * *  1-5 ") == "30 2 * * 1-5"
    assert expand_cron("0 9 * JAN,JUL MON") == "0 9 * JAN,JUL MON"
    assert cron_errors("*/15 * * * *", "Europe/Berlin") == []


@pytest.mark.parametrize("name", ["Mars/Olympus", "", "../etc/passwd", "/etc/localtime", "utc+2"])
def test_invalid_timezone_is_named(name: str) -> None:
    errors = cron_errors("@daily", name, field_prefix="")
    assert [field for field, _ in errors] == ["timezone"]
    assert "IANA time zone" in errors[0][1]


# ---------------------------------------------------------------------------- slots


def test_slots_follow_the_wall_clock_of_the_time_zone() -> None:
    # 09:00 in New York is 14:00 UTC in winter (EST) and 13:00 UTC in summer (EDT).
    winter = next_slot("0 9 * * *", "America/New_York", datetime(2026, 1, 10, tzinfo=UTC))
    summer = next_slot("0 9 * * *", "America/New_York", datetime(2026, 7, 10, tzinfo=UTC))
    assert winter == datetime(2026, 1, 10, 14, 0, tzinfo=UTC)
    assert summer == datetime(2026, 7, 10, 13, 0, tzinfo=UTC)


def test_spring_forward_slot_in_the_skipped_hour_fires_once() -> None:
    # Europe/Berlin skips 02:00-03:00 on 2026-03-29: a 02:30 job runs once, at 03:00 CEST.
    after = datetime(2026, 3, 28, 12, 0, tzinfo=UTC)
    slots = [s for s, _ in zip(iter_slots("30 2 * * *", "Europe/Berlin", after), range(3), strict=False)]
    assert slots == [
        datetime(2026, 3, 29, 1, 0, tzinfo=UTC),  # 03:00 CEST, the first valid time after 02:30
        datetime(2026, 3, 30, 0, 30, tzinfo=UTC),  # 02:30 CEST
        datetime(2026, 3, 31, 0, 30, tzinfo=UTC),
    ]


def test_fall_back_slot_in_the_repeated_hour_fires_once() -> None:
    # Europe/Berlin repeats 02:00-03:00 on 2026-10-25: a 02:30 job runs once (the first 02:30).
    after = datetime(2026, 10, 24, 12, 0, tzinfo=UTC)
    slots = [s for s, _ in zip(iter_slots("30 2 * * *", "Europe/Berlin", after), range(2), strict=False)]
    assert slots == [
        datetime(2026, 10, 25, 0, 30, tzinfo=UTC),  # 02:30 CEST
        datetime(2026, 10, 26, 1, 30, tzinfo=UTC),  # 02:30 CET
    ]


def test_hourly_slots_across_fall_back_stay_strictly_increasing() -> None:
    after = datetime(2026, 10, 24, 22, 0, tzinfo=UTC)
    slots = list(zip(iter_slots("0 * * * *", "Europe/Berlin", after), range(6), strict=False))
    times = [s for s, _ in slots]
    assert times == sorted(set(times))
    assert all(b - a >= timedelta(hours=1) for a, b in itertools.pairwise(times))


def test_due_slots_keep_the_newest_within_the_bound() -> None:
    due, dropped = due_slots("@hourly", "UTC", T0, T0 + timedelta(hours=5, minutes=1), limit=3)
    assert due == [T0 + timedelta(hours=h) for h in (3, 4, 5)]
    assert dropped == 2
    assert due_slots("@hourly", "UTC", T0, T0 + timedelta(minutes=59), limit=3) == ([], 0)
    # A slot exactly at `now` is due; the `after` bound is exclusive.
    assert due_slots("@hourly", "UTC", T0, T0 + timedelta(hours=1), limit=3) == ([T0 + timedelta(hours=1)], 0)


# ---------------------------------------------------------------------------- catch-up


def _outage_slots(now: datetime) -> list[datetime]:
    due, _ = due_slots("@hourly", "UTC", T0, now, limit=10)
    return due


GRACE = timedelta(minutes=5)


def test_on_time_slots_fire_whatever_the_policy() -> None:
    now = T0 + timedelta(hours=1, seconds=2)
    for policy in ("skip", "latest", "all"):
        plan = plan_slots(_outage_slots(now), now, grace=GRACE, policy=policy, limit=10)
        assert plan.fire == [T0 + timedelta(hours=1)]
        assert plan.missed == []


def test_catch_up_after_a_three_hour_outage() -> None:
    now = T0 + timedelta(hours=3, minutes=30)  # slots 01:00, 02:00, 03:00 all past the grace
    due = _outage_slots(now)
    assert len(due) == 3

    skip = plan_slots(due, now, grace=GRACE, policy="skip", limit=10)
    assert skip.fire == []
    assert skip.missed == due

    latest = plan_slots(due, now, grace=GRACE, policy="latest", limit=10)
    assert latest.fire == [due[-1]]
    assert latest.missed == due[:2]

    every = plan_slots(due, now, grace=GRACE, policy="all", limit=10)
    assert every.fire == due
    assert every.missed == []

    bounded = plan_slots(due, now, grace=GRACE, policy="all", limit=2)
    assert bounded.fire == due[1:]  # the newest two, oldest first
    assert bounded.missed == due[:1]


def test_latest_yields_to_an_on_time_slot() -> None:
    now = T0 + timedelta(hours=3, seconds=30)  # 03:00 is on time, 01:00 and 02:00 were missed
    due = _outage_slots(now)
    plan = plan_slots(due, now, grace=GRACE, policy="latest", limit=10)
    assert plan.fire == [due[-1]]
    assert plan.missed == due[:2]
    plan = plan_slots(due, now, grace=GRACE, policy="all", limit=10)
    assert plan.fire == due


# ---------------------------------------------------------------------------- health


def slot(
    hours: int,
    status: str = "fired",
    outcome: str | None = "succeeded",
    started: float | None = 0,
    took: float | None = 600,
) -> SlotRecord:
    at = T0 + timedelta(hours=hours)
    start = at + timedelta(seconds=started) if started is not None else None
    return SlotRecord(
        slot=at,
        status=status,  # type: ignore[arg-type]
        run_id=f"run-{hours}" if status == "fired" else None,
        outcome=outcome if status == "fired" else None,
        started_at=start,
        finished_at=start + timedelta(seconds=took) if start is not None and took is not None else None,
        recorded_at=at,
    )


EXPECT = Expectations(
    start_grace_seconds=300,
    expected_duration_seconds=1800,
    max_runtime_seconds=3600,
    min_runtime_seconds=60,
    failure_tolerance=2,
)


def at(hours: float) -> datetime:
    return T0 + timedelta(hours=hours)


def test_healthy_schedule_is_ok() -> None:
    health = evaluate([slot(0), slot(1)], 0, EXPECT, at(1.5))
    assert health.state == "ok"
    assert health.conditions == {}


def test_failing_after_the_tolerance() -> None:
    history = [slot(0, outcome="failed"), slot(1, outcome="failed")]
    assert evaluate(history, 1, EXPECT, at(1.5)).state == "ok"
    failing = evaluate(history, 2, EXPECT, at(1.5))
    assert failing.state == "failing"
    assert "2 consecutive" in failing.message


def test_too_fast_success() -> None:
    health = evaluate([slot(0, took=10)], 0, EXPECT, at(1))
    assert health.state == "too_fast"
    assert "succeeded in 10 s" in health.message
    # A fast failure is not "too fast": it failed.
    assert "too_fast" not in evaluate([slot(0, outcome="failed", took=10)], 1, EXPECT, at(1)).conditions


def test_too_slow_while_running_and_after_the_end() -> None:
    running = slot(0, outcome="running", took=None)
    assert evaluate([running], 0, EXPECT, at(0.5)).state == "ok"
    slow = evaluate([running], 0, EXPECT, at(1.1))
    assert slow.state == "too_slow"
    assert "has been running" in slow.message
    ended_late = evaluate([slot(0, took=2000)], 0, EXPECT, at(1))
    assert ended_late.state == "too_slow"
    assert "took 2000 s" in ended_late.message


def test_late_start_within_and_past_the_grace() -> None:
    waiting = slot(0, outcome="queued", started=None, took=None)
    assert evaluate([waiting], 0, EXPECT, at(0) + timedelta(seconds=299)).state == "ok"
    late = evaluate([waiting], 0, EXPECT, at(0) + timedelta(seconds=301))
    assert late.state == "late"


def test_missed_until_a_later_slot_fires() -> None:
    history = [slot(0), slot(1, status="skipped"), slot(2, status="missed")]
    assert evaluate(history, 0, EXPECT, at(2.5)).state == "missed"
    history.append(slot(3))
    assert evaluate(history, 0, EXPECT, at(3.5)).state == "ok"


def test_priority_of_conditions() -> None:
    history = [slot(0, outcome="failed"), slot(1, outcome="failed", took=10), slot(2, status="missed")]
    health = evaluate(history, 2, EXPECT, at(2.5))
    assert health.state == "failing"
    assert set(health.conditions) == {"failing", "missed"}


# ---------------------------------------------------------------------------- run ids


def test_a_slot_has_one_run_id_sorting_by_its_slot() -> None:
    from fabrik_common.ids import is_ulid, ulid_time
    from fabrik_scheduler.schedules.engine import run_id_for

    first = run_id_for("01JH3Z9W4R8Q0M6Y2V5T7K1B3C", at(1))
    assert first == run_id_for("01JH3Z9W4R8Q0M6Y2V5T7K1B3C", at(1))
    assert is_ulid(first)
    assert ulid_time(first) == at(1)
    assert first != run_id_for("01JH3Z9W4R8Q0M6Y2V5T7K1B3D", at(1))
    assert first < run_id_for("01JH3Z9W4R8Q0M6Y2V5T7K1B3C", at(2))
