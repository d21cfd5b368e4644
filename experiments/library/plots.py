"""Plot helpers shared by the suites' figures (matplotlib, Agg backend, PNG).

Every helper draws mean ± one standard deviation over seeds with the individual seeds as faint
points, so the spread the verdicts use is visible. Figures are written by `save`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from experiments.library.results import Results, Run

COLORS = plt.rcParams["axes.prop_cycle"].by_key()["color"]


def figure(ncols: int = 1, nrows: int = 1, width: float = 6.0,
           height: float = 4.2) -> tuple[plt.Figure, np.ndarray]:
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False)
    return fig, axes


DPI = 130  # of the report's PNGs; notebooks lower it to stay small


def save(fig: plt.Figure, path: str, title: str) -> None:
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    x = np.asarray(values, np.float64)
    if x.size == 0:
        return math.nan, math.nan
    return float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else 0.0


def series(ax: plt.Axes, x: Sequence[float], samples: Sequence[Sequence[float]], label: str,
           color: str | None = None, marker: str = "o") -> None:
    """Mean ± SD of `samples[i]` at `x[i]` as a line with error bars, seeds as dots."""
    stats = [_mean_sd(s) for s in samples]
    keep = [i for i, (m, _) in enumerate(stats) if math.isfinite(m)]
    if not keep:
        return
    xs = np.asarray(x, np.float64)[keep]
    means = np.asarray([stats[i][0] for i in keep])
    sds = np.asarray([stats[i][1] for i in keep])
    line = ax.errorbar(xs, means, yerr=sds, marker=marker, capsize=3, label=label, color=color)
    for xi, s in zip(x, samples, strict=True):
        ax.scatter([xi] * len(s), s, s=10, alpha=0.35, color=line[0].get_color())


def hline(ax: plt.Axes, samples: Sequence[float], label: str, color: str | None = None) -> None:
    """A horizontal reference (e.g. the dense baseline): mean line and ± SD band."""
    mean, sd = _mean_sd(samples)
    if not math.isfinite(mean):
        return
    line = ax.axhline(mean, linestyle="--", label=label, color=color)
    ax.axhspan(mean - sd, mean + sd, alpha=0.12, color=line.get_color())


def bars(ax: plt.Axes, labels: Sequence[str], samples: Sequence[Sequence[float]],
         color: str | None = None) -> None:
    """One bar per label (mean ± SD), seeds as dots."""
    stats = [_mean_sd(s) for s in samples]
    xs = np.arange(len(labels))
    ax.bar(xs, [m if math.isfinite(m) else 0 for m, _ in stats],
           yerr=[sd if math.isfinite(sd) else 0 for _, sd in stats], capsize=3, color=color,
           alpha=0.8)
    for xi, s in zip(xs, samples, strict=True):
        ax.scatter([xi] * len(s), s, s=10, color="k", alpha=0.5, zorder=3)
    ax.set_xticks(xs, labels, rotation=30, ha="right")


def curves(ax: plt.Axes, runs: Sequence[Run], x_of: Callable[[Run], np.ndarray],
           y_of: Callable[[Run], np.ndarray], label: str, color: str | None = None) -> None:
    """One faint line per seed and their mean (on the first run's x grid, interpolated)."""
    pairs = [(x_of(r), y_of(r)) for r in runs]
    pairs = [(x, y) for x, y in pairs if x.size and x.size == y.size]
    if not pairs:
        return
    grid = pairs[0][0]
    stacked = np.stack([np.interp(grid, x, y, left=np.nan, right=np.nan) for x, y in pairs])
    line, = ax.plot(grid, np.nanmean(stacked, axis=0), label=f"{label} (n={len(pairs)})",
                    color=color)
    for x, y in pairs:
        ax.plot(x, y, color=line.get_color(), alpha=0.25, linewidth=0.8)


def heatmap(ax: plt.Axes, matrix: np.ndarray, row_labels: Sequence[str],
            col_labels: Sequence[str], label: str, vmin: float | None = None,
            vmax: float | None = None) -> None:
    image = ax.imshow(matrix, aspect="auto", cmap="viridis", vmin=vmin, vmax=vmax)
    ax.set_yticks(range(len(row_labels)), row_labels)
    ax.set_xticks(range(len(col_labels)), col_labels, fontsize=7)
    ax.figure.colorbar(image, ax=ax, label=label)


def metric_vs_tag(results: Results, ax: plt.Axes, members_by_line: Mapping[str, Sequence[str]],
                  tag: str, metric: str) -> None:
    """For each line, `metric` of its members against their `tag` value."""
    for i, (label, members) in enumerate(members_by_line.items()):
        xs = [results.tags(m).get(tag) for m in members]
        samples = [results.values(m, metric) for m in members]
        series(ax, xs, samples, label, COLORS[i % len(COLORS)])


def annotate_missing(ax: plt.Axes, results: Results, members: Sequence[str]) -> None:
    """Notes members with diverged/failed runs in the corner of the axes."""
    notes = []
    for m in members:
        bad = {s: results.count(m, s) for s in ("diverged", "failed", "missing")}
        text = ", ".join(f"{n} {s}" for s, n in bad.items() if n)
        if text:
            notes.append(f"{m}: {text}")
    if notes:
        ax.text(0.01, 0.01, "\n".join(notes), transform=ax.transAxes, fontsize=7, va="bottom",
                alpha=0.8)


def label_axes(ax: plt.Axes, xlabel: str, ylabel: str, **kwargs: Any) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, **kwargs)
