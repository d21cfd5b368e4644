"""Claim checks on a results file: the comparisons the suites' claims are made of.

Each returns a `stats.Outcome` by the 2-SE rule of `experiments.library.stats`:
  lower(a, b)             metric of member(s) a minus that of b, paired by seed, predicted
                          negative
  trend(members, tag)     slope of the metric against log2(tag): per seed, then over seeds
  rate_lower(a, b)        diverged share of a minus that of b
  speedup(a, b)           per-seed ratio of the steps (or training seconds) b needs over those a
                          needs to reach the loss both reach, minus 1 (predicted positive)
Groups (lists of members) are compared pair by pair (see `lower`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from experiments.library import stats
from experiments.library.results import (
    BENCHMARK_KEY,
    DIVERGED,
    FINISHED,
    METRICS,
    TIME_BASIS_KEY,
    Results,
    Run,
    history_values,
)

Members = str | Sequence[str]
CURVE_KEY = "train/cross_entropy"
SMOOTH_HALF_WIDTH = 2  # centred mean over 5 logged points (log_every steps each)


def _members(group: Members) -> list[str]:
    return [group] if isinstance(group, str) else list(group)


def _label(group: Members) -> str:
    names = _members(group)
    return names[0] if len(names) == 1 else "{" + ", ".join(names) + "}"


def lower(results: Results, a: Members, b: Members, metric: str = "eval_loss",
          expect: str = "negative") -> stats.Outcome:
    """metric(a) - metric(b), predicted negative (a lower) unless expect="positive".

    Differences are paired by seed (members of one seed see the same data order), and with
    groups also by position: a[i] pairs with b[i]; a single member on one side pairs with each
    member of the other. The estimate is the mean paired difference, its SE their SD / sqrt(n).
    """
    left, right = _members(a), _members(b)
    if len(left) == 1:
        left = left * len(right)
    if len(right) == 1:
        right = right * len(left)
    if len(left) != len(right):
        raise ValueError(f"cannot pair {left} with {right}: give equally long groups or one "
                         "member on a side.")
    fn = METRICS[metric].fn
    diffs = []
    for x, y in zip(left, right, strict=True):
        vx, vy = results.by_seed(x, fn), results.by_seed(y, fn)
        diffs += [vx[s] - vy[s] for s in sorted(vx.keys() & vy.keys())]
    estimate, se = stats.mean_se(diffs)
    what = f"{metric}({_label(a)}) - {metric}({_label(b)})"
    out = stats.outcome(estimate, se, expect, what, digits=METRICS[metric].digits)
    return stats.Outcome(out.verdict, f"{out.measured}, {len(diffs)} seed-paired differences",
                         out.rule)


def trend(results: Results, members: Sequence[str], tag: str, metric: str = "eval_loss",
          expect: str = "negative", log2: bool = True) -> stats.Outcome:
    """Slope of metric against log2(tag) (or tag): within each seed over the members, then
    mean ± SE over seeds (seed-paired), beside the pooled least-squares slope over every
    finished run. The results file's rule (`stats.rule_of`) decides which gives the verdict;
    the other is shown, the seed-paired one labelled post hoc where the pooled rule decided."""
    by_seed: dict[int, tuple[list[float], list[float]]] = {}
    xs, ys = [], []
    fn = METRICS[metric].fn
    for m in members:
        x = results.tags(m).get(tag)  # None: the member has no runs in these results
        for seed, v in results.by_seed(m, fn).items() if x is not None else ():
            x_value = math.log2(x) if log2 else x
            by_seed.setdefault(seed, ([], []))[0].append(x_value)
            by_seed[seed][1].append(v)
            xs.append(x_value)
            ys.append(v)
    axis = f"log2({tag})" if log2 else tag
    digits = METRICS[metric].digits
    slopes = stats.paired_slopes(by_seed)
    paired = stats.outcome(*stats.mean_se(slopes), expect,
                           f"per-seed slope of {metric} vs {axis}", digits=digits)
    pooled = stats.outcome(*stats.slope(xs, ys), expect, f"pooled slope of {metric} vs {axis}",
                           digits=digits)
    paired_text = f"{paired.measured} over {len(slopes)} seeds"
    if stats.rule_of(results.data) == stats.SEED_PAIRED:
        return stats.Outcome(paired.verdict, f"{paired_text}; {pooled.measured}", paired.rule)
    return stats.Outcome(pooled.verdict, f"{pooled.measured}; post hoc: {paired_text} "
                         f"({paired.verdict})", pooled.rule)


def rate_lower(results: Results, a: Members, b: Members) -> stats.Outcome:
    """Divergence rate of a minus that of b (runs that finished or diverged), predicted
    negative; failed and missing runs are left out."""
    def counts(group: Members) -> tuple[int, int]:
        diverged = sum(results.count(m, DIVERGED) for m in _members(group))
        done = diverged + sum(results.count(m, FINISHED) for m in _members(group))
        return diverged, done

    (k_a, n_a), (k_b, n_b) = counts(a), counts(b)
    estimate, se = stats.rate_difference(k_a, n_a, k_b, n_b)
    out = stats.outcome(estimate, se, "negative",
                        f"diverged share({_label(a)}) - share({_label(b)})", digits=2)
    return stats.Outcome(out.verdict, f"{k_a}/{n_a} vs {k_b}/{n_b} diverged; {out.measured}",
                         out.rule + " (Agresti-Caffo SE)")


def smoothed(values: np.ndarray, half_width: int = SMOOTH_HALF_WIDTH) -> np.ndarray:
    """Centred running mean over 2 * half_width + 1 logged points, the window shrinking
    symmetrically at both ends (the last point is itself), so a linear trend has no lag."""
    n = values.size
    out = np.empty(n)
    for i in range(n):
        h = min(half_width, i, n - 1 - i)
        out[i] = values[i - h:i + h + 1].mean()
    return out


def training_seconds(run: Run, steps: np.ndarray) -> np.ndarray:
    """Training time (compilation and evaluation excluded) at each logged step: steps x
    tokens/step / tokens/s, from the suite's controlled throughput benchmark when the results
    have one (`results.BENCHMARK_KEY`: one rate per member, measured on an idle machine), else
    the loop's own running tokens/s (NaN before its first measurement; it reflects whatever
    else the machine did during the run)."""
    summary = run.get("summary") or {}
    tokens_per_step = summary.get("train_tokens", 0) / max(summary.get("steps", 1), 1)
    if run.get(BENCHMARK_KEY):
        return steps * tokens_per_step / run[BENCHMARK_KEY]
    tps_steps, tps = history_values(run, "train/tokens_per_second")
    rate = np.interp(steps, tps_steps, tps, left=np.nan) if tps.size else np.full(steps.shape,
                                                                                   np.nan)
    return steps * tokens_per_step / rate


def curve(run: Run, axis: str = "step") -> tuple[np.ndarray, np.ndarray]:
    """(x, smoothed train cross-entropy) with x = step or training seconds."""
    steps, values = history_values(run, CURVE_KEY)
    x = steps if axis == "step" else training_seconds(run, steps)
    keep = np.isfinite(x)
    return x[keep], smoothed(values)[keep]


def first_reach(x: np.ndarray, y: np.ndarray, target: float) -> float:
    """The first x at which y falls to `target` (linear interpolation); the last x if never."""
    below = np.nonzero(y <= target)[0]
    if below.size == 0:
        return float(x[-1])
    i = int(below[0])
    if i == 0:
        return float(x[0])
    x0, x1, y0, y1 = x[i - 1], x[i], y[i - 1], y[i]
    return float(x0 + (x1 - x0) * (y0 - target) / (y0 - y1)) if y0 != y1 else float(x1)


def pair_speedup(fast: Run, slow: Run, axis: str = "step") -> float:
    """How many times fewer steps (or seconds) `fast` needs than `slow` to reach the loss both
    reach: the higher of their final smoothed losses. > 1 when `fast` is faster."""
    (xf, yf), (xs, ys) = curve(fast, axis), curve(slow, axis)
    if xf.size < 2 or xs.size < 2:
        return math.nan
    target = max(yf[-1], ys[-1])
    return first_reach(xs, ys, target) / first_reach(xf, yf, target)


def speedup(results: Results, fast: str, slow: str, axis: str = "step") -> stats.Outcome:
    """Per-seed pair_speedup(fast, slow) over the seeds both finished, tested against 1."""
    fast_runs = {r["seed"]: r for r in results.runs_of(fast)}
    values = [pair_speedup(fast_runs[r["seed"]], r, axis) for r in results.runs_of(slow)
              if r["seed"] in fast_runs]
    values = [v for v in values if math.isfinite(v)]
    mean, se = stats.mean_se(values)
    unit = "steps" if axis == "step" else "training seconds"
    out = stats.outcome(mean - 1.0, se, "positive", f"speed-up({fast} over {slow}, {unit}) - 1",
                        digits=2)
    seeds = ", ".join(f"{v:.2f}x" for v in values)
    measured = f"{mean:.2f}x per seed [{seeds}]; {out.measured}"
    if axis == "time" and results.data.get(TIME_BASIS_KEY) == "benchmark" \
            and results.throughput is None:
        # The file was pre-registered with the controlled benchmark as its time basis: the
        # loop's own tokens/s (whatever else ran beside it) only gets reported.
        return stats.Outcome(stats.INCONCLUSIVE, f"awaiting the throughput benchmark "
                             f"(experiments.benchmarks.suite_throughput); the loop's own tokens/s "
                             f"under load gives {measured}", out.rule)
    return stats.Outcome(out.verdict, measured, out.rule)
