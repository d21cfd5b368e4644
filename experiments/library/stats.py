"""Verdict rules: does a measured difference agree with a paper's claim, at what confidence?

Which estimate decides (`SEED_PAIRED`, fixed before the runs it applies to): the members of a
suite run with the same seeds, and a seed fixes the data order and the initial draws, so runs of
one seed share most of their noise. Every claim that compares members is therefore decided on
seed-paired estimates: per seed a difference (or a slope over the members, or a speed-up), then
the mean and its standard error over the seeds. The pooled estimate (all runs as independent
points) is reported beside it. Results files record the rule they were collected under
(`rule_of`): the tiny-scale files committed before this rule keep their pooled verdicts, and
their seed-paired reading is shown beside them, labelled post hoc.

One threshold everywhere (`THRESHOLD_SE`): a claim predicts the sign of a quantity (a mean of
seed-paired differences, a slope, a difference of rates, a value minus a reference). The run
*agrees* when the measured quantity has the predicted sign and lies more than 2 standard errors
from zero, *disagrees* when it has the opposite sign by more than 2 standard errors, and is
*inconclusive* otherwise (including when fewer than two seeds finished). Standard errors come
from the spread over seeds, never from a fixed tolerance; 2 SE is roughly a 95% two-sided
interval for a normal estimate (with 3 seeds the t-distribution is wider, so the rule is
lenient: read "agrees" as "consistent in sign and well outside seed noise", not as a
significance test).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

THRESHOLD_SE = 2.0
AGREES, DISAGREES, INCONCLUSIVE = "agrees", "disagrees", "inconclusive"
# The rules a results file can record: seed-paired estimates decide (every file collected from
# now on), or the pooled slope decided the trend claims (the tiny files committed before).
SEED_PAIRED, POOLED = "seed_paired", "pooled"


def rule_of(data: dict) -> str:
    """The verdict rule a results file was collected under (files without the field predate
    the seed-paired rule)."""
    return data.get("statistics", POOLED)


@dataclasses.dataclass(frozen=True)
class Outcome:
    """A claim's verdict with our number (`measured`) and the rule that decided it."""

    verdict: str
    measured: str
    rule: str


def verdict(estimate: float, se: float, expect: str) -> str:
    """agrees / disagrees / inconclusive for an estimate whose predicted sign is `expect`
    ("positive" or "negative"), by the 2-SE rule. se == 0 (identical seeds) counts any nonzero
    estimate as resolved; a NaN estimate or SE is inconclusive."""
    if expect not in ("positive", "negative"):
        raise ValueError(f"expect={expect!r} must be 'positive' or 'negative'.")
    if not (math.isfinite(estimate) and math.isfinite(se)) or estimate == 0:
        return INCONCLUSIVE
    if abs(estimate) <= THRESHOLD_SE * se:
        return INCONCLUSIVE
    return AGREES if (estimate > 0) == (expect == "positive") else DISAGREES


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """(mean, standard error of the mean) over seeds; SE is NaN with fewer than 2 values."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], np.float64)
    if x.size == 0:
        return float("nan"), float("nan")
    if x.size < 2:
        return float(x.mean()), float("nan")
    return float(x.mean()), float(x.std(ddof=1) / math.sqrt(x.size))


def slope(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """Least-squares slope of y on x over all (run) points and its standard error
    (residual variance / sum of squared x deviations; NaN with fewer than 3 points)."""
    xs = np.asarray(x, np.float64)
    ys = np.asarray(y, np.float64)
    keep = np.isfinite(xs) & np.isfinite(ys)
    xs, ys = xs[keep], ys[keep]
    if xs.size < 3 or np.ptp(xs) == 0:
        return float("nan"), float("nan")
    dx = xs - xs.mean()
    b = float(dx @ (ys - ys.mean()) / (dx @ dx))
    residual = ys - ys.mean() - b * dx
    se = math.sqrt(float(residual @ residual) / (xs.size - 2) / float(dx @ dx))
    return b, se


def paired_slopes(points: dict[int, tuple[list[float], list[float]]]) -> list[float]:
    """Least-squares slope of y on x within each seed: points {seed: (xs, ys)}; seeds with
    fewer than two distinct x are left out."""
    out = []
    for xs, ys in points.values():
        x, y = np.asarray(xs, np.float64), np.asarray(ys, np.float64)
        keep = np.isfinite(x) & np.isfinite(y)
        x, y = x[keep], y[keep]
        if x.size >= 2 and np.ptp(x) > 0:
            dx = x - x.mean()
            out.append(float(dx @ (y - y.mean()) / (dx @ dx)))
    return out


def rate_difference(k_a: int, n_a: int, k_b: int, n_b: int) -> tuple[float, float]:
    """Difference of two rates k_a/n_a - k_b/n_b with the Agresti-Caffo standard error (one
    success and one failure added to each group, so 0/3 vs 0/3 still has a finite SE)."""
    if n_a < 1 or n_b < 1:
        return float("nan"), float("nan")
    p_a, p_b = (k_a + 1) / (n_a + 2), (k_b + 1) / (n_b + 2)
    se = math.sqrt(p_a * (1 - p_a) / (n_a + 2) + p_b * (1 - p_b) / (n_b + 2))
    return k_a / n_a - k_b / n_b, se


def describe(estimate: float, se: float, unit: str = "", digits: int = 3) -> str:
    """'0.012 ± 0.004 nats (2 SE = 0.008)'-style text for a report cell."""
    if not math.isfinite(estimate):
        return "n/a (too few finished runs)"
    unit = f" {unit}" if unit else ""
    if not math.isfinite(se):
        return f"{estimate:+.{digits}f}{unit} (SE n/a: < 2 seeds)"
    return f"{estimate:+.{digits}f} ± {se:.{digits}f}{unit} (SE)"


def outcome(estimate: float, se: float, expect: str, what: str, unit: str = "",
            digits: int = 3) -> Outcome:
    """The Outcome of a signed estimate: `what` names the quantity (e.g. 'loss(E=64) - loss(dense)')
    and the rule text states the predicted sign."""
    sign = "< 0" if expect == "negative" else "> 0"
    rule = f"{what} {sign} by more than {THRESHOLD_SE:g} SE"
    measured = f"{what} = {describe(estimate, se, unit, digits)}"
    return Outcome(verdict(estimate, se, expect), measured, rule)
