"""The experiments' statistics: distribution functions against known values, the sample-ratio check,
the decision order on crafted samples, the emergency rules, and seeded simulations of the error rates
under continuous monitoring (the figures quoted in docs/optimizer.md come from these simulations)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import msgspec
import pytest

from fabrik_optimizer.experiments.stats import (
    ArmSample,
    DecisionPolicy,
    Verdict,
    chi2_sf,
    decide,
    emergency,
    mixture_halfwidth,
    mixture_p_value,
    normal_cdf,
    normal_quantile,
    quantile_confidence_sequence,
    regularized_gamma_q,
    srm_test,
    success_rate_bounds,
)

Z_975 = 1.959963984540054

# ---------------------------------------------------------------------------------------------------
# Distribution functions


def test_normal_known_values() -> None:
    assert normal_quantile(0.975) == pytest.approx(Z_975, abs=1e-12)
    assert normal_quantile(0.5) == pytest.approx(0.0, abs=1e-15)
    assert normal_cdf(1.96) == pytest.approx(0.9750021048517795, abs=1e-12)
    assert normal_cdf(-3.0) == pytest.approx(0.0013498980316301, abs=1e-14)


@pytest.mark.parametrize(
    ("x", "df", "expected"),
    [
        (3.841458820694124, 1, 0.05),
        (10.827566170662733, 1, 0.001),
        (5.991464547107979, 2, 0.05),
        (7.814727903251178, 3, 0.05),
        (9.487729036781154, 4, 0.05),
        (20.515005652432873, 5, 0.001),
        (1.0, 4, 0.9097959895689501),  # exp(-1/2) * (1 + 1/2): the series branch
        # Q(3/2, 20) = erfc(sqrt 20) + 2 sqrt(20/pi) exp(-20): the continued-fraction branch, far tail
        (40.0, 3, math.erfc(math.sqrt(20)) + 2 * math.sqrt(20 / math.pi) * math.exp(-20)),
        (0.0, 2, 1.0),
    ],
)
def test_chi2_sf_known_values(x: float, df: int, expected: float) -> None:
    assert chi2_sf(x, df) == pytest.approx(expected, rel=1e-9)


def test_regularized_gamma_identities() -> None:
    for x in (0.01, 0.5, 1.0, 2.0, 7.5, 30.0):
        assert regularized_gamma_q(1.0, x) == pytest.approx(math.exp(-x), rel=1e-12)
        assert regularized_gamma_q(0.5, x) == pytest.approx(math.erfc(math.sqrt(x)), rel=1e-10)
        # Q(3, x) = exp(-x) (1 + x + x^2/2)
        assert regularized_gamma_q(3.0, x) == pytest.approx(math.exp(-x) * (1 + x + x * x / 2), rel=1e-12)
    with pytest.raises(ValueError, match="positive"):
        regularized_gamma_q(0.0, 1.0)


def test_mixture_boundary_formula_and_p_value_agree() -> None:
    # V = 0.01, tau2 = 0.2^2 * 1: h = sqrt(0.01 * 0.05 / 0.04 * (2 ln 20 + ln 5)) = 0.308239...
    h = mixture_halfwidth(0.01, 1.0, 0.05, 0.2)
    assert h == pytest.approx(math.sqrt(0.0125 * (2 * math.log(20) + math.log(5))), rel=1e-12)
    assert h == pytest.approx(0.308239, rel=1e-6)
    # The boundary is where the always-valid p-value equals alpha.
    assert mixture_p_value(h, 0.01, 1.0, 0.2) == pytest.approx(0.05, rel=1e-9)
    assert mixture_p_value(0.9 * h, 0.01, 1.0, 0.2) > 0.05
    assert mixture_p_value(0.0, 0.01, 1.0, 0.2) == 1.0
    # Always wider than the fixed-sample interval, and shrinking with the sample.
    widths = [mixture_halfwidth(0.25 * 2 / n, 0.25, 0.05, 0.2) for n in (50, 500, 5000, 50000)]
    assert all(
        w > Z_975 * math.sqrt(0.25 * 2 / n) for w, n in zip(widths, (50, 500, 5000, 50000), strict=True)
    )
    assert widths == sorted(widths, reverse=True)


def test_quantile_confidence_sequence_brackets_and_covers() -> None:
    lo, hi = quantile_confidence_sequence([float(i) for i in range(1, 2001)], 0.95, 0.05)
    assert 1800 < lo < 1900 < hi < 1990
    assert quantile_confidence_sequence([1.0, 2.0], 0.95, 0.05) == (-math.inf, math.inf)
    assert quantile_confidence_sequence([], 0.95, 0.05) == (-math.inf, math.inf)
    # Time-uniform coverage: Uniform(0, 1) observations, true p95 = 0.95, looked at every 10
    # observations up to 1,000; the miss rate at any look must stay below alpha (0.1 here, so that
    # 200 replications can see a violation: Binomial(200, 0.1) >= 33 has probability < 0.01).
    rng = random.Random(95)
    misses = 0
    for _ in range(200):
        values: list[float] = []
        for _ in range(100):
            values.extend(rng.random() for _ in range(10))
            lower, upper = quantile_confidence_sequence(values, 0.95, 0.1)
            if not lower <= 0.95 < upper:
                misses += 1
                break
    assert misses / 200 <= 0.1


# ---------------------------------------------------------------------------------------------------
# Sample-ratio mismatch


def test_srm() -> None:
    chi2, p = srm_test(1000, 1000, 0.5)
    assert chi2 == 0.0
    assert p == 1.0
    chi2, p = srm_test(1012, 988, 0.5)
    assert p > 0.5
    chi2, p = srm_test(1000, 850, 0.5)
    assert chi2 == pytest.approx(2 * 75**2 / 925, rel=1e-12)
    assert p == pytest.approx(chi2_sf(chi2, 1))
    assert p < 0.001
    _, p = srm_test(900, 100, 0.1)
    assert p == 1.0
    _, p = srm_test(950, 50, 0.1)  # expected 100: chi2 = 27.8
    assert p < 0.001
    assert srm_test(3, 1, 0.1) == (0.0, 1.0)  # expected counts below 5: not judged


def _arm(
    name: str, runs: int, successes: int, *, ooms: int = 0, cost: float = 1.0, duration: float = 60.0
) -> ArmSample:
    """An arm with spread-out costs and durations (i, i+1, ... scaled), identical across arms by default."""
    costs = [cost * (0.5 + (i % 100) / 100) for i in range(runs)]
    durations = [duration * (0.5 + (i % 100) / 100) for i in range(runs)]
    return ArmSample(name, runs, successes, runs - successes, ooms, costs, durations)


def test_decide_flags_broken_split_first() -> None:
    verdict = decide(
        _arm("control", 1000, 700), _arm("t", 850, 100), DecisionPolicy(expected_treatment_share=0.5)
    )
    assert verdict.decision == "INVALID"
    assert verdict.numbers["srm.p"] is not None
    assert float(verdict.numbers["srm.p"]) < 0.001
    assert "sample ratio mismatch" in verdict.reasons[0]
    ok = decide(
        _arm("control", 1000, 700), _arm("t", 1000, 700), DecisionPolicy(expected_treatment_share=0.5)
    )
    assert ok.decision == "CONTINUE"


# ---------------------------------------------------------------------------------------------------
# Decision order on crafted samples

HALF = DecisionPolicy(expected_treatment_share=0.5)


def test_decide_ship_when_better_and_guardrails_non_inferior() -> None:
    verdict = decide(_arm("control", 2000, 1400), _arm("t", 2000, 1600), HALF)
    assert verdict.decision == "SHIP", verdict.reasons
    lower = verdict.numbers["primary.lower"]
    assert isinstance(lower, float)
    assert lower > 0
    for name in ("failure_rate", "cost_per_run", "duration_p95", "oom_rate"):
        assert verdict.numbers[f"guardrail.{name}.noninferior"] is True
        upper = verdict.numbers[f"guardrail.{name}.upper"]
        margin = verdict.numbers[f"guardrail.{name}.margin"]
        assert isinstance(upper, float)
        assert isinstance(margin, float)
        assert upper <= margin
    # Serializable as it is (no infinities, plain JSON).
    assert msgspec.json.decode(msgspec.json.encode(verdict), type=Verdict) == verdict


def test_decide_rollback_beats_ship() -> None:
    # Success much better, but cost per run doubled: a guardrail significantly worse wins.
    verdict = decide(_arm("control", 2000, 1400), _arm("t", 2000, 1700, cost=2.0), HALF)
    assert verdict.decision == "ROLLBACK"
    assert any("cost_per_run" in r for r in verdict.reasons)
    primary_lower = verdict.numbers["primary.lower"]
    assert isinstance(primary_lower, float)
    assert primary_lower > 0  # the primary alone would have shipped


def test_decide_rollback_on_primary_and_on_ooms() -> None:
    worse = decide(_arm("control", 1000, 800), _arm("t", 1000, 600), HALF)
    assert worse.decision == "ROLLBACK"
    assert "success rate significantly worse" in worse.reasons[0]
    ooms = decide(_arm("control", 1000, 700, ooms=5), _arm("t", 1000, 700, ooms=80), HALF)
    assert ooms.decision == "ROLLBACK"
    assert any("oom_rate" in r for r in ooms.reasons)
    slow = decide(_arm("control", 2000, 1400), _arm("t", 2000, 1400, duration=90.0), HALF)
    assert slow.decision == "ROLLBACK"
    assert any("duration_p95" in r for r in slow.reasons)


def test_decide_no_decision_before_min_runs() -> None:
    verdict = decide(_arm("control", 29, 29), _arm("t", 29, 0), HALF)
    assert verdict.decision == "CONTINUE"
    assert "fewer than 30 runs" in verdict.reasons[0]
    assert decide(_arm("control", 30, 30), _arm("t", 30, 0), HALF).decision == "ROLLBACK"


def test_decide_stop_at_max_duration_without_winner() -> None:
    stop = DecisionPolicy(expected_treatment_share=0.5, max_duration_elapsed=True)
    verdict = decide(_arm("control", 1000, 700), _arm("t", 1000, 705), stop)
    assert verdict.decision == "STOP"
    assert verdict.reasons[0] == "maximum duration reached without a winner"
    assert decide(_arm("control", 5, 3), _arm("t", 5, 3), stop).decision == "STOP"
    # A winner or a loser at the deadline is still decided.
    assert decide(_arm("control", 2000, 1400), _arm("t", 2000, 1600), stop).decision == "SHIP"
    assert decide(_arm("control", 1000, 800), _arm("t", 1000, 600), stop).decision == "ROLLBACK"
    # And SRM still comes first.
    assert decide(_arm("control", 1000, 800), _arm("t", 850, 500), stop).decision == "INVALID"


def test_decide_continue_while_a_guardrail_is_not_yet_non_inferior() -> None:
    # 10% share: the treatment's p95 cannot be bounded from 120 runs, so a clear primary win waits.
    policy = DecisionPolicy(expected_treatment_share=0.1)
    verdict = decide(_arm("control", 1080, 756), _arm("t", 120, 114), policy)
    assert verdict.decision == "CONTINUE"
    assert verdict.numbers["guardrail.duration_p95.noninferior"] is False
    assert verdict.numbers["guardrail.duration_p95.upper"] is None  # +inf
    assert any("duration_p95" in r for r in verdict.reasons)
    # 0 OOMs in 120 runs cannot bound the OOM rate below 2% either (exact bound: -ln(0.006)/120 = 4%).
    assert verdict.numbers["guardrail.oom_rate.noninferior"] is False
    # With the failure-rate and cost guardrails only, the same data ships.
    two = DecisionPolicy(expected_treatment_share=0.1, guardrails=("failure_rate", "cost_per_run"))
    shipped = decide(_arm("control", 1080, 756), _arm("t", 120, 114), two)
    assert shipped.decision == "SHIP", shipped.reasons
    assert "guardrail.duration_p95.upper" not in shipped.numbers


def test_decide_skips_guardrails_not_measured_in_either_arm() -> None:
    control = ArmSample("control", 2000, 1400, 600, 0, [], [])
    treatment = ArmSample("t", 2000, 1600, 400, 0, [], [])
    verdict = decide(control, treatment, HALF)
    assert verdict.decision == "SHIP"
    assert verdict.numbers["guardrail.cost_per_run.measured"] is False
    assert any("not measured" in r for r in verdict.reasons)
    # Measured in one arm only: not shown non-inferior, so no SHIP.
    half_measured = ArmSample("t", 2000, 1600, 400, 0, [1.0] * 2000, [])
    assert decide(control, half_measured, HALF).decision == "CONTINUE"
    with pytest.raises(ValueError, match="unknown guardrails"):
        decide(control, treatment, DecisionPolicy(guardrails=("latency",)))


# ---------------------------------------------------------------------------------------------------
# Emergency rollback


def test_emergency_rules() -> None:
    control = _arm("control", 100, 80)
    assert emergency(control, _arm("t", 20, 16)) == []
    # 0.65 < 0.9 x 0.8 as a point estimate, but well inside the noise of 20 runs: no alarm.
    assert emergency(control, _arm("t", 20, 13)) == []
    low = emergency(control, _arm("t", 20, 4))  # 0.2: far below 0.72
    assert len(low) == 1
    assert "success rate" in low[0]
    failing = emergency(_arm("control", 100, 95), _arm("t", 20, 5))  # failures 0.75 > 2 x 0.05
    assert any("failure rate" in r for r in failing)
    # Mean cost: control 0.995, treatment 30 x 0.595 = 17.85 (the first 20 values of the spread).
    costly = emergency(control, _arm("t", 20, 16, cost=30.0))
    assert [r for r in costly if "cost per run" in r]
    assert emergency(control, _arm("t", 20, 16, cost=30.0), approved_cost_ceiling=40.0) == []
    assert emergency(control, _arm("t", 20, 16, cost=4.8)) == []  # 2.86 x control


def test_emergency_needs_a_minimum_sample() -> None:
    perfect = _arm("control", 100, 100)
    # One early failure against a flawless control: not enough to fire.
    assert emergency(perfect, _arm("t", 12, 11)) == []
    assert emergency(perfect, _arm("t", 9, 0)) == []  # fewer than 10 runs
    assert emergency(perfect, _arm("t", 10, 0)) != []
    few_costs = ArmSample("t", 9, 9, 0, 0, [100.0] * 9, [])
    assert emergency(perfect, few_costs) == []


def test_emergency_under_continuous_monitoring() -> None:
    # Looks after every 12 runs (20 % to the treatment) up to 576 runs: equal arms almost never
    # alarm, a broken treatment alarms at the first look with 10 treatment runs.
    rng = random.Random(11)

    def first_alarm(p_control: float, p_treatment: float) -> int | None:
        """The look (counted from the first with 10 treatment runs) that alarmed."""
        xc = nc = xt = nt = 0
        eligible = 0
        for _ in range(48):
            for _ in range(12):
                if rng.random() < 0.2:
                    nt += 1
                    xt += rng.random() < p_treatment
                else:
                    nc += 1
                    xc += rng.random() < p_control
            control = ArmSample("c", nc, xc, nc - xc, 0, [], [])
            if emergency(control, ArmSample("t", nt, xt, nt - xt, 0, [], [])):
                return eligible
            eligible += nt >= 10 and nc >= 10
        return None

    for p in (0.5, 0.7, 0.9):
        assert sum(first_alarm(p, p) is not None for _ in range(300)) <= 6  # alpha 1 %, 2 % allowed
    broken = [first_alarm(0.7, 0.0) for _ in range(100)]
    assert broken == [0] * 100


# ---------------------------------------------------------------------------------------------------
# Simulations under continuous monitoring


def _monitor_primary(
    rng: random.Random, p_control: float, p_treatment: float, max_per_arm: int = 2000, every: int = 10
) -> tuple[str | None, bool]:
    """One experiment with equal arms, looked at every `every` runs per arm: the first sequential
    decision (SHIP / ROLLBACK / None), and whether a naive fixed-sample z-test (pooled, two-sided 5%)
    was ever significant at the same looks."""
    xc = xt = 0
    decision: str | None = None
    naive = False
    for n in range(every, max_per_arm + 1, every):
        for _ in range(every):
            xc += rng.random() < p_control
            xt += rng.random() < p_treatment
        if n < 30:
            continue
        if decision is None:
            _, lower, upper = success_rate_bounds(xt, n, xc, n)
            decision = "SHIP" if lower > 0 else "ROLLBACK" if upper < 0 else None
        if not naive:
            pooled = (xc + xt) / (2 * n)
            se = math.sqrt(pooled * (1 - pooled) * 2 / n)
            naive = se > 0 and abs(xt - xc) / n / se > Z_975
        if decision is not None and naive:
            break
    return decision, naive


def test_aa_continuous_monitoring_keeps_alpha_and_naive_peeking_does_not() -> None:
    # 400 A/A experiments, a look every 10 runs per arm up to 2,000 per arm (200 looks each).
    rng = random.Random(20260101)
    reps = 400
    outcomes = [_monitor_primary(rng, 0.7, 0.7) for _ in range(reps)]
    false_decisions = sum(d is not None for d, _ in outcomes) / reps
    naive_rate = sum(n for _, n in outcomes) / reps
    # alpha = 0.05; 0.08 leaves room for Monte-Carlo error (sd ~0.011 at 0.05 with 400 replications).
    assert false_decisions <= 0.08
    assert naive_rate > 0.15
    assert naive_rate > 3 * max(false_decisions, 0.01)


def test_real_lift_ships_and_harm_rolls_back_primary() -> None:
    rng = random.Random(7)
    lift = [_monitor_primary(rng, 0.70, 0.80)[0] for _ in range(200)]
    assert lift.count("SHIP") / 200 >= 0.95
    assert "ROLLBACK" not in lift
    harm = [_monitor_primary(rng, 0.80, 0.65)[0] for _ in range(200)]
    assert harm.count("ROLLBACK") / 200 >= 0.95
    assert "SHIP" not in harm


@dataclass
class _SimArm:
    name: str
    p_success: float
    cost_scale: float = 1.0
    runs: int = 0
    successes: int = 0
    ooms: int = 0
    costs: list[float] = field(default_factory=list)
    durations: list[float] = field(default_factory=list)

    def step(self, rng: random.Random) -> None:
        self.runs += 1
        if rng.random() < self.p_success:
            self.successes += 1
        elif rng.random() < 0.1:
            self.ooms += 1
        self.costs.append(self.cost_scale * rng.lognormvariate(-1.0, 0.5))
        self.durations.append(rng.lognormvariate(4.0, 0.3))

    def sample(self) -> ArmSample:
        return ArmSample(
            self.name,
            self.runs,
            self.successes,
            self.runs - self.successes,
            self.ooms,
            self.costs,
            self.durations,
        )


def _monitor_full(
    rng: random.Random,
    control: tuple[float, float],
    treatment: tuple[float, float],
    max_per_arm: int,
    every: int,
) -> list[str]:
    """Decisions of `decide` at every look (all four guardrails on), until the first SHIP/ROLLBACK."""
    c = _SimArm("control", *control)
    t = _SimArm("t", *treatment)
    decisions: list[str] = []
    for _ in range(every, max_per_arm + 1, every):
        for _ in range(every):
            c.step(rng)
            t.step(rng)
        verdict = decide(c.sample(), t.sample(), HALF)
        decisions.append(verdict.decision)
        if verdict.decision in ("SHIP", "ROLLBACK", "INVALID"):
            break
    return decisions


def test_aa_full_decision_with_guardrails() -> None:
    # 100 A/A experiments through `decide` with every guardrail, a look every 50 runs per arm up to
    # 1,000. Primary (alpha 0.05) and guardrails (0.05 split four ways) can each end it wrongly; the
    # measured rate is far below their sum. 0.11: P(Binomial(100, 0.05) >= 12) < 0.005.
    rng = random.Random(11)
    final = [_monitor_full(rng, (0.7, 1.0), (0.7, 1.0), 1000, 50)[-1] for _ in range(100)]
    assert "INVALID" not in final
    assert (final.count("SHIP") + final.count("ROLLBACK")) / 100 <= 0.11


def test_real_lift_ships_through_decide_with_guardrails() -> None:
    rng = random.Random(12)
    final = [_monitor_full(rng, (0.70, 1.0), (0.80, 1.0), 2000, 50)[-1] for _ in range(40)]
    assert final.count("SHIP") / 40 >= 0.8


def test_better_success_but_forty_percent_dearer_is_not_shipped() -> None:
    # Documented rule: CONTINUE while the cost guardrail is neither non-inferior nor significantly
    # worse, then ROLLBACK once its lower bound passes 0; never SHIP.
    rng = random.Random(13)
    runs = [_monitor_full(rng, (0.70, 1.0), (0.80, 1.4), 2000, 50) for _ in range(40)]
    assert all("SHIP" not in decisions for decisions in runs)
    assert all(set(decisions[:-1]) <= {"CONTINUE"} for decisions in runs)
    assert sum(decisions[-1] == "ROLLBACK" for decisions in runs) / 40 >= 0.9
