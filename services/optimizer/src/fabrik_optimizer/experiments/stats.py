"""Sequential statistics for the optimizer's experiments: always-valid decisions under continuous monitoring.

Plain functions on per-arm aggregates; no I/O. `decide(control, treatment, policy)` gives a `Verdict`
(INVALID, ROLLBACK, SHIP, CONTINUE or STOP) with every number behind it; `emergency(control, treatment)`
gives the reasons for an immediate rollback. The method, its parameters and its measured error rates
are described in docs/optimizer.md (section "Statistics").

- Primary metric (success rate): the normal-mixture sequential probability ratio test (mSPRT) of
  Johari, Pekelis & Walsh on the difference of the two rates, with plug-in variances; its confidence
  sequence holds at every sample size at once, so the verdict may be recomputed as often as wanted.
- Sample-ratio mismatch: chi-squared goodness of fit of the run counts against the expected split.
- Guardrails (non-inferiority): failure rate and OOM rate (difference of rates), cost per run (log of
  the ratio of means, delta method), all with the same normal-mixture confidence sequence; duration
  p95 with an exact confidence sequence for each arm's quantile (beta-binomial mixture on the count of
  observations below the quantile, Howard & Ramdas), combined into bounds on the ratio of the p95s.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist
from typing import Final, Literal

import msgspec

__all__ = [
    "GUARDRAILS",
    "ArmSample",
    "DecisionPolicy",
    "Verdict",
    "chi2_sf",
    "decide",
    "emergency",
    "mixture_halfwidth",
    "mixture_p_value",
    "normal_cdf",
    "normal_quantile",
    "quantile_confidence_sequence",
    "regularized_gamma_q",
    "srm_test",
    "success_rate_bounds",
]

Decision = Literal["INVALID", "ROLLBACK", "SHIP", "CONTINUE", "STOP"]
Number = float | int | bool | None

GUARDRAILS: Final[tuple[str, ...]] = ("failure_rate", "cost_per_run", "duration_p95", "oom_rate")
_P95: Final = 0.95
# Concentration of the beta mixture used for the quantile confidence sequence (prior mean = the
# quantile level, prior variance = p(1 - p) / (k + 1)); it makes the bound tightest around k runs.
_QUANTILE_MIXTURE_K: Final = 100.0
_STD_NORMAL: Final = NormalDist()


class ArmSample(msgspec.Struct, frozen=True):
    """Aggregates of one arm: `runs` finished runs, of which `successes`, `failures` and `ooms`
    (an OOM is also a failure); `costs` in USD per finished run and `durations` in seconds (one value
    per run that has one)."""

    name: str
    runs: int
    successes: int
    failures: int
    ooms: int
    costs: Sequence[float]
    durations: Sequence[float]


class DecisionPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """Parameters of `decide`. Margins are non-inferiority margins: absolute for rates, relative to the
    control for cost per run and duration p95. `tau` is the standard deviation of the normal mixture
    in units of one observation's standard deviation (a standardized effect size); see docs/optimizer.md.
    `max_duration_elapsed` turns CONTINUE into STOP."""

    alpha: float = 0.05
    guardrail_alpha: float = 0.05
    srm_p: float = 0.001
    expected_treatment_share: float = 0.1
    min_runs_per_arm: int = 30
    failure_rate_abs: float = 0.02
    cost_per_run_rel: float = 0.10
    duration_p95_rel: float = 0.15
    oom_rate_abs: float = 0.02
    tau: float = 0.2
    guardrails: tuple[str, ...] = GUARDRAILS
    max_duration_elapsed: bool = False


class Verdict(msgspec.Struct, frozen=True):
    """The decision, the reasons in plain words, and every statistic behind it (keys such as
    `primary.lower`, `srm.p`, `guardrail.cost_per_run.upper`; an infinite bound is null)."""

    decision: Decision
    reasons: list[str]
    numbers: dict[str, Number]


# ---------------------------------------------------------------------------------------------------
# Distribution functions


def normal_cdf(x: float) -> float:
    """Standard normal distribution function."""
    return _STD_NORMAL.cdf(x)


def normal_quantile(p: float) -> float:
    """Standard normal quantile (0 < p < 1)."""
    return _STD_NORMAL.inv_cdf(p)


def regularized_gamma_q(a: float, x: float) -> float:
    """Upper regularized incomplete gamma function Q(a, x) = Gamma(a, x) / Gamma(a), for a > 0, x >= 0.

    Series for P when x < a + 1, Lentz's continued fraction for Q otherwise (relative error ~1e-14)."""
    if a <= 0:
        raise ValueError("a must be positive")
    if x < 0:
        raise ValueError("x must be non-negative")
    if x == 0:
        return 1.0
    log_prefactor = a * math.log(x) - x - math.lgamma(a)
    if x < a + 1:
        term = 1.0 / a
        total = term
        ap = a
        for _ in range(10_000):
            ap += 1
            term *= x / ap
            total += term
            if abs(term) < abs(total) * 1e-16:
                break
        return max(0.0, 1.0 - total * math.exp(log_prefactor))
    tiny = 1e-300
    b = x + 1 - a
    c = 1 / tiny
    d = 1 / b
    h = d
    for i in range(1, 10_000):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        if abs(d) < tiny:
            d = tiny
        c = b + an / c
        if abs(c) < tiny:
            c = tiny
        d = 1 / d
        delta = d * c
        h *= delta
        if abs(delta - 1) < 1e-16:
            break
    return min(1.0, math.exp(log_prefactor) * h)


def chi2_sf(x: float, df: int) -> float:
    """Survival function of the chi-squared distribution with `df` degrees of freedom."""
    if df < 1:
        raise ValueError("df must be at least 1")
    if x <= 0:
        return 1.0
    if df == 1:
        return math.erfc(math.sqrt(x / 2))
    return regularized_gamma_q(df / 2, x / 2)


# ---------------------------------------------------------------------------------------------------
# Sequential building blocks


def mixture_halfwidth(variance: float, pooled_variance: float, alpha: float, tau: float) -> float:
    """Half-width of the normal-mixture confidence sequence for a difference estimated with
    `variance` (plug-in Var of the estimate), mixture N(0, tau^2 * pooled_variance):

        h = sqrt( V (V + tau2) / tau2 * (2 log(1/alpha) + log((V + tau2) / V)) ),
        tau2 = tau^2 * pooled_variance.

    The set {theta : |est - theta| <= h} covers theta at every sample size simultaneously with
    probability >= 1 - alpha
    (Robbins' mixture martingale and Ville's inequality; exact for Gaussian increments of known
    variance, asymptotic with plug-in variances)."""
    if variance <= 0:
        return 0.0
    tau2 = tau * tau * pooled_variance
    if tau2 <= 0:
        return math.inf
    return math.sqrt(
        variance * (variance + tau2) / tau2 * (2 * math.log(1 / alpha) + math.log1p(tau2 / variance))
    )


def mixture_p_value(estimate: float, variance: float, pooled_variance: float, tau: float) -> float:
    """Always-valid p-value of theta = 0: 1 / L capped at 1, with the mixture likelihood ratio

        L = sqrt(V / (V + tau2)) * exp( est^2 tau2 / (2 V (V + tau2)) ).

    Computed on the current sample alone; the running minimum over earlier looks is also valid."""
    if variance <= 0:
        return 1.0 if estimate == 0 else 0.0
    tau2 = tau * tau * pooled_variance
    if tau2 <= 0:
        return 1.0
    log_lambda = -0.5 * math.log1p(tau2 / variance) + estimate * estimate * tau2 / (
        2 * variance * (variance + tau2)
    )
    return 1.0 if log_lambda <= 0 else math.exp(-log_lambda)


def _log_beta(a: float, b: float) -> float:
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


def _count_interval(n: int, p: float, alpha: float) -> tuple[int, int]:
    """Counts S in [lo, hi] for which the beta-binomial mixture martingale of Bernoulli(p) stays
    below 1/alpha. log M(S) is convex in S, so the set is an interval around n*p."""
    k = _QUANTILE_MIXTURE_K
    a, b = p * k, (1 - p) * k
    base = _log_beta(a, b)
    log_p, log_q = math.log(p), math.log1p(-p)
    threshold = math.log(1 / alpha)

    def log_m(s: int) -> float:
        return _log_beta(a + s, b + n - s) - base - s * log_p - (n - s) * log_q

    centre = min(n, max(0, round(n * p)))
    # The minimum of log M is at or next to n*p; log M(centre) < threshold for any n (M(np) <= 1 roughly).
    if log_m(centre) >= threshold:
        return (centre + 1, centre - 1)  # empty (cannot happen for alpha < 1, kept for safety)
    lo_bad, lo_good = -1, centre  # log_m(lo_good) < threshold; find the smallest good S
    while lo_good - lo_bad > 1:
        mid = (lo_bad + lo_good) // 2
        if log_m(mid) < threshold:
            lo_good = mid
        else:
            lo_bad = mid
    hi_good, hi_bad = centre, n + 1
    while hi_bad - hi_good > 1:
        mid = (hi_good + hi_bad) // 2
        if log_m(mid) < threshold:
            hi_good = mid
        else:
            hi_bad = mid
    return lo_good, hi_good


def quantile_confidence_sequence(values: Sequence[float], p: float, alpha: float) -> tuple[float, float]:
    """Confidence sequence [lower, upper] for the p-quantile of i.i.d. continuous observations.

    The number S_n of observations at or below the true quantile q is a Binomial(n, p) process; the
    beta-binomial mixture of its likelihood ratio is a non-negative martingale, so with probability
    >= 1 - alpha it stays below 1/alpha at every n (Ville), i.e. S_n in [lo_n, hi_n], which gives
    X_(lo_n) <= q < X_(hi_n + 1). Exact (no asymptotics); -inf / +inf when too few observations."""
    n = len(values)
    if n == 0:
        return (-math.inf, math.inf)
    ordered = sorted(values)
    lo, hi = _count_interval(n, p, alpha)
    lower = ordered[lo - 1] if lo >= 1 else -math.inf
    upper = ordered[hi] if hi + 1 <= n else math.inf
    return (lower, upper)


def srm_test(control_runs: int, treatment_runs: int, treatment_share: float) -> tuple[float, float]:
    """Chi-squared goodness of fit (1 df) of (control, treatment) runs against the expected split:
    (chi2, p). p = 1 while an expected count is below 5 (the approximation is not trusted there)."""
    total = control_runs + treatment_runs
    expected_t = total * treatment_share
    expected_c = total - expected_t
    if expected_t < 5 or expected_c < 5:
        return (0.0, 1.0)
    chi2 = (control_runs - expected_c) ** 2 / expected_c + (treatment_runs - expected_t) ** 2 / expected_t
    return (chi2, chi2_sf(chi2, 1))


# ---------------------------------------------------------------------------------------------------
# Estimates


class _Diff(msgspec.Struct, frozen=True):
    """A difference (treatment - control) with its plug-in variance and pooled per-observation variance."""

    estimate: float
    variance: float
    pooled: float
    defined: bool = True


def _rate_diff(x_t: int, n_t: int, x_c: int, n_c: int) -> _Diff:
    """Difference of proportions. The variance of the estimate is the larger of the unpooled one and
    the pooled one (the variance under "no difference"): with a small arm and a rate near 0 or 1 the
    unpooled plug-in alone underestimates it and makes early looks anticonservative. Rates in the
    variances use (x + 1)/(n + 2), so that 0 or n events do not give a zero-width interval."""
    if n_t <= 0 or n_c <= 0:
        return _Diff(0.0, 0.0, 0.0, defined=False)
    pt, pc = x_t / n_t, x_c / n_c
    st = (x_t + 1) / (n_t + 2)
    sc = (x_c + 1) / (n_c + 2)
    unpooled = st * (1 - st) / n_t + sc * (1 - sc) / n_c
    pooled_rate = (x_t + x_c + 1) / (n_t + n_c + 2)
    pooled = pooled_rate * (1 - pooled_rate)
    return _Diff(pt - pc, max(unpooled, pooled * (1 / n_t + 1 / n_c)), pooled)


def _mean_var(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    mean = math.fsum(values) / n
    if n < 2:
        return mean, 0.0
    return mean, math.fsum((v - mean) ** 2 for v in values) / (n - 1)


def _log_ratio_of_means(treatment: Sequence[float], control: Sequence[float]) -> _Diff:
    """log(mean_T / mean_C) with the delta-method variance CV_T^2/n_T + CV_C^2/n_C."""
    n_t, n_c = len(treatment), len(control)
    if n_t < 2 or n_c < 2:
        return _Diff(0.0, 0.0, 0.0, defined=False)
    m_t, v_t = _mean_var(treatment)
    m_c, v_c = _mean_var(control)
    if m_t == 0 and m_c == 0:
        return _Diff(0.0, 0.0, 0.0)
    if m_t <= 0 or m_c <= 0:
        return _Diff(0.0, 0.0, 0.0, defined=False)
    cv2_t, cv2_c = v_t / (m_t * m_t), v_c / (m_c * m_c)
    pooled = (cv2_t * n_t + cv2_c * n_c) / (n_t + n_c)
    return _Diff(math.log(m_t / m_c), cv2_t / n_t + cv2_c / n_c, pooled)


def success_rate_bounds(
    treatment_successes: int,
    treatment_runs: int,
    control_successes: int,
    control_runs: int,
    alpha: float = 0.05,
    tau: float = 0.2,
) -> tuple[float, float, float]:
    """(estimate, lower, upper) of treatment - control success rate: the primary metric's confidence
    sequence as `decide` computes it (infinite bounds while an arm is empty)."""
    d = _rate_diff(treatment_successes, treatment_runs, control_successes, control_runs)
    if not d.defined:
        return (0.0, -math.inf, math.inf)
    h = mixture_halfwidth(d.variance, d.pooled, alpha, tau)
    return (d.estimate, d.estimate - h, d.estimate + h)


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


# ---------------------------------------------------------------------------------------------------
# Decision


class _Guardrail(msgspec.Struct, frozen=True):
    name: str
    estimate: float | None
    lower: float
    upper: float
    margin: float
    harmful: bool
    noninferior: bool


def _mean_guardrail(
    name: str, diff: _Diff, margin: float, alpha: float, tau: float, log_scale: bool
) -> _Guardrail:
    """Bad side is up. For log ratios the bounds are reported as relative differences (ratio - 1)."""
    if not diff.defined:
        return _Guardrail(name, None, -math.inf, math.inf, margin, harmful=False, noninferior=False)
    h = mixture_halfwidth(diff.variance, diff.pooled, alpha, tau)
    lower, upper = diff.estimate - h, diff.estimate + h
    estimate = diff.estimate
    if log_scale:
        estimate, lower, upper = math.expm1(estimate), math.expm1(lower), math.expm1(upper)
    return _Guardrail(name, estimate, lower, upper, margin, harmful=lower > 0, noninferior=upper <= margin)


def _p95_guardrail(
    control: Sequence[float], treatment: Sequence[float], margin: float, alpha: float
) -> _Guardrail:
    """Ratio of p95s minus 1, from the two arms' quantile confidence sequences at alpha/2 each."""
    c_lo, c_hi = quantile_confidence_sequence(control, _P95, alpha / 2)
    t_lo, t_hi = quantile_confidence_sequence(treatment, _P95, alpha / 2)
    estimate: float | None = None
    if control and treatment:
        qc, qt = _empirical_quantile(control, _P95), _empirical_quantile(treatment, _P95)
        estimate = qt / qc - 1 if qc > 0 else None
    lower = t_lo / c_hi - 1 if t_lo > 0 and math.isfinite(c_hi) and c_hi > 0 else -math.inf
    finite_upper = math.isfinite(t_hi) and math.isfinite(c_lo) and c_lo > 0
    upper = t_hi / c_lo - 1 if finite_upper else math.inf
    return _Guardrail(
        "duration_p95", estimate, lower, upper, margin, harmful=lower > 0, noninferior=upper <= margin
    )


def _empirical_quantile(values: Sequence[float], p: float) -> float:
    """The smallest observation with at least a fraction p at or below it."""
    ordered = sorted(values)
    index = max(0, math.ceil(p * len(ordered)) - 1)
    return ordered[index]


def _arm_numbers(arm: str, sample: ArmSample) -> dict[str, Number]:
    n = sample.runs
    return {
        f"{arm}.runs": n,
        f"{arm}.success_rate": sample.successes / n if n else None,
        f"{arm}.failure_rate": sample.failures / n if n else None,
        f"{arm}.oom_rate": sample.ooms / n if n else None,
        f"{arm}.cost_values": len(sample.costs),
        f"{arm}.cost_per_run": math.fsum(sample.costs) / len(sample.costs) if sample.costs else None,
        f"{arm}.duration_values": len(sample.durations),
        f"{arm}.duration_p95": _empirical_quantile(sample.durations, _P95) if sample.durations else None,
    }


def decide(control: ArmSample, treatment: ArmSample, policy: DecisionPolicy | None = None) -> Verdict:
    """The experiment's decision now. Order: INVALID (sample-ratio mismatch) → ROLLBACK (primary or a
    guardrail significantly worse) → SHIP (primary significantly better and every guardrail
    non-inferior) → CONTINUE, or STOP when the maximum duration has elapsed without a winner. No
    ROLLBACK or SHIP before `min_runs_per_arm` runs in each arm."""
    policy = policy or DecisionPolicy()
    unknown = sorted(set(policy.guardrails) - set(GUARDRAILS))
    if unknown:
        raise ValueError(f"unknown guardrails: {', '.join(unknown)}")
    numbers: dict[str, Number] = {}
    for arm, sample in (("control", control), ("treatment", treatment)):
        numbers.update(_arm_numbers(arm, sample))
    numbers.update(
        {
            "alpha": policy.alpha,
            "guardrail_alpha": policy.guardrail_alpha,
            "tau": policy.tau,
            "min_runs_per_arm": policy.min_runs_per_arm,
        }
    )

    chi2, srm_p = srm_test(control.runs, treatment.runs, policy.expected_treatment_share)
    numbers.update(
        {
            "srm.chi2": chi2,
            "srm.p": srm_p,
            "srm.threshold": policy.srm_p,
            "srm.expected_share": policy.expected_treatment_share,
        }
    )
    if srm_p < policy.srm_p:
        share = treatment.runs / (control.runs + treatment.runs)
        return Verdict(
            "INVALID",
            [
                f"sample ratio mismatch: treatment share {share:.4f}, expected "
                f"{policy.expected_treatment_share:.4f} (chi2 {chi2:.2f}, p {srm_p:.2e} < {policy.srm_p})"
            ],
            numbers,
        )

    # Primary metric: success rate, always-valid two-sided test of treatment - control.
    primary = _rate_diff(treatment.successes, treatment.runs, control.successes, control.runs)
    _, p_lower, p_upper = success_rate_bounds(
        treatment.successes, treatment.runs, control.successes, control.runs, policy.alpha, policy.tau
    )
    numbers.update(
        {
            "primary.estimate": primary.estimate if primary.defined else None,
            "primary.lower": _finite(p_lower),
            "primary.upper": _finite(p_upper),
            "primary.variance": primary.variance,
            "primary.p_value": mixture_p_value(primary.estimate, primary.variance, primary.pooled, policy.tau)
            if primary.defined
            else 1.0,
        }
    )

    # Guardrails, Bonferroni-split across the active ones.
    k = max(1, len(policy.guardrails))
    g_alpha = policy.guardrail_alpha / k
    numbers["guardrail.alpha_each"] = g_alpha
    guardrails: list[_Guardrail] = []
    unmeasured: list[str] = []
    observed = {
        "cost_per_run": bool(control.costs) or bool(treatment.costs),
        "duration_p95": bool(control.durations) or bool(treatment.durations),
    }
    for name in policy.guardrails:
        if not observed.get(name, True):
            unmeasured.append(name)
            numbers[f"guardrail.{name}.measured"] = False
            continue
        if name == "failure_rate":
            d = _rate_diff(treatment.failures, treatment.runs, control.failures, control.runs)
            g = _mean_guardrail(name, d, policy.failure_rate_abs, g_alpha, policy.tau, log_scale=False)
        elif name == "oom_rate":
            d = _rate_diff(treatment.ooms, treatment.runs, control.ooms, control.runs)
            g = _mean_guardrail(name, d, policy.oom_rate_abs, g_alpha, policy.tau, log_scale=False)
        elif name == "cost_per_run":
            d = _log_ratio_of_means(treatment.costs, control.costs)
            g = _mean_guardrail(name, d, policy.cost_per_run_rel, g_alpha, policy.tau, log_scale=True)
        else:
            g = _p95_guardrail(control.durations, treatment.durations, policy.duration_p95_rel, g_alpha)
        guardrails.append(g)
        prefix = f"guardrail.{name}."
        numbers.update(
            {
                prefix + "measured": True,
                prefix + "estimate": g.estimate,
                prefix + "lower": _finite(g.lower),
                prefix + "upper": _finite(g.upper),
                prefix + "margin": g.margin,
                prefix + "harmful": g.harmful,
                prefix + "noninferior": g.noninferior,
            }
        )

    enough = min(control.runs, treatment.runs) >= policy.min_runs_per_arm
    reasons = [f"guardrail {name} not measured in either arm: skipped" for name in unmeasured]
    if enough:
        rollback: list[str] = []
        if p_upper < 0:
            rollback.append(
                f"success rate significantly worse: {primary.estimate:+.4f} [{p_lower:+.4f}, {p_upper:+.4f}]"
            )
        rollback.extend(
            f"guardrail {g.name} significantly worse: lower bound {g.lower:+.4f} > 0"
            for g in guardrails
            if g.harmful
        )
        if rollback:
            return Verdict("ROLLBACK", rollback, numbers)
        if p_lower > 0:
            pending = [g for g in guardrails if not g.noninferior]
            if not pending:
                return Verdict(
                    "SHIP",
                    [
                        "success rate significantly better: "
                        f"{primary.estimate:+.4f} [{p_lower:+.4f}, {p_upper:+.4f}]",
                        "every measured guardrail non-inferior",
                        *reasons,
                    ],
                    numbers,
                )
            reasons.append("success rate significantly better, but guardrails not yet shown non-inferior")
            reasons.extend(
                f"guardrail {g.name}: upper bound {_fmt(g.upper)} above margin {g.margin:+.4f}"
                for g in pending
            )
        else:
            reasons.append(f"no significant difference in success rate yet: [{p_lower:+.4f}, {p_upper:+.4f}]")
    else:
        reasons.append(
            f"fewer than {policy.min_runs_per_arm} runs in an arm "
            f"(control {control.runs}, treatment {treatment.runs})"
        )
    if policy.max_duration_elapsed:
        return Verdict("STOP", ["maximum duration reached without a winner", *reasons], numbers)
    return Verdict("CONTINUE", reasons, numbers)


def _fmt(x: float) -> str:
    return f"{x:+.4f}" if math.isfinite(x) else ("+inf" if x > 0 else "-inf")


# ---------------------------------------------------------------------------------------------------
# Emergency rollback


def _ratio_breach(x_t: int, n_t: int, x_c: int, n_c: int, factor: float) -> _Diff:
    """rate_T - factor x rate_C, with the plug-in variance of the estimate (smoothed rates, as in
    `_rate_diff`, so that 0 or n events do not give a zero-width interval)."""
    st = (x_t + 1) / (n_t + 2)
    sc = (x_c + 1) / (n_c + 2)
    variance = st * (1 - st) / n_t + factor * factor * sc * (1 - sc) / n_c
    pooled_rate = (x_t + x_c + 1) / (n_t + n_c + 2)
    return _Diff(x_t / n_t - factor * x_c / n_c, variance, pooled_rate * (1 - pooled_rate))


def emergency(
    control: ArmSample,
    treatment: ArmSample,
    approved_cost_ceiling: float = 3.0,
    *,
    min_runs: int = 10,
    min_failures: int = 3,
    alpha: float = 0.01,
    tau: float = 1.0,
) -> list[str]:
    """Reasons for an immediate rollback (empty: fine), checked at every evaluation. Each rule fires
    when an always-valid confidence sequence (level `alpha`, normal mixture of standard deviation
    `tau`: tuned to large effects) excludes "no breach":

    - treatment success rate < 0.9 x control success rate
    - treatment failure rate > 2 x control failure rate
    - treatment cost per run > approved_cost_ceiling x control cost per run

    Point estimates would not do: with 10 to 100 treatment runs, 0.9 x the control's rate is inside
    the noise, and an A/A experiment looked at every interval would be rolled back more often than
    not. Each rule also needs `min_runs` runs (or cost values) in both arms, and the failure rule
    `min_failures` failed treatment runs."""
    reasons: list[str] = []
    if control.runs >= min_runs and treatment.runs >= min_runs:
        sc, st = control.successes / control.runs, treatment.successes / treatment.runs
        low = _ratio_breach(treatment.successes, treatment.runs, control.successes, control.runs, 0.9)
        if low.estimate + mixture_halfwidth(low.variance, low.pooled, alpha, tau) < 0:
            reasons.append(f"success rate {st:.3f} below 0.9 x control {sc:.3f}")
        fc, ft = control.failures / control.runs, treatment.failures / treatment.runs
        high = _ratio_breach(treatment.failures, treatment.runs, control.failures, control.runs, 2.0)
        if (
            treatment.failures >= min_failures
            and high.estimate - mixture_halfwidth(high.variance, high.pooled, alpha, tau) > 0
        ):
            reasons.append(f"failure rate {ft:.3f} above 2 x control {fc:.3f}")
    if len(control.costs) >= min_runs and len(treatment.costs) >= min_runs:
        ratio = _log_ratio_of_means(treatment.costs, control.costs)
        ceiling = math.log(approved_cost_ceiling)
        if (
            ratio.defined
            and ratio.estimate - ceiling - mixture_halfwidth(ratio.variance, ratio.pooled, alpha, tau) > 0
        ):
            cc = math.fsum(control.costs) / len(control.costs)
            ct = math.fsum(treatment.costs) / len(treatment.costs)
            reasons.append(
                f"cost per run {ct:.4f} USD above {approved_cost_ceiling:g} x control {cc:.4f} USD"
            )
    return reasons
