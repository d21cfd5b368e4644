"""Where metrics go: TensorBoard event files, a JSON-lines file, and a console progress bar.

    writer = MetricsWriter(workdir)       # workdir/tensorboard/ and workdir/metrics.jsonl
    writer.write(step, {"train/loss": 2.3, "eval/layer_1/expert_load": [0.2, 0.3, ...]})

Each metrics.jsonl line is {"step": s, "time": unix seconds, name: value, ...}; lists are
per-expert histograms (TensorBoard shows them as histograms over the expert index). A resumed run
appends, so a step re-run after a restart can appear twice: `read_metrics` keeps the last line.
Only process 0 writes (multi-host runs); elsewhere the writer and the progress bar do nothing.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def is_logging_process() -> bool:
    return jax.process_index() == 0


def _plain(value: Any) -> Any:
    """A JSON-ready float, int or list of floats."""
    if isinstance(value, list | tuple | np.ndarray) or (hasattr(value, "ndim") and value.ndim):
        return [float(v) for v in np.asarray(value).reshape(-1)]
    if isinstance(value, int | str):
        return value
    return float(value)


class MetricsWriter:
    """Appends metrics to workdir/metrics.jsonl and TensorBoard events in workdir/tensorboard."""

    def __init__(self, workdir: str) -> None:
        self.enabled = is_logging_process()
        self._jsonl = None
        self._tb = None
        if self.enabled:
            from tensorboardX import SummaryWriter

            os.makedirs(workdir, exist_ok=True)
            self._jsonl = open(os.path.join(workdir, METRICS_FILE), "a")  # noqa: SIM115
            self._tb = SummaryWriter(os.path.join(workdir, TENSORBOARD_DIR))

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        values = {name: _plain(value) for name, value in metrics.items()}
        record = {"step": int(step), "time": time.time(), **values}
        self._jsonl.write(json.dumps(record, allow_nan=True) + "\n")
        self._jsonl.flush()
        for name, value in values.items():
            if isinstance(value, list):
                self._histogram_over_index(name, value, step)
            elif isinstance(value, int | float):
                self._tb.add_scalar(name, value, step)
        self._tb.flush()

    def alert(self, step: int, tag: str, value: float, text: str) -> None:
        """An alarm in TensorBoard: the scalar `tag` at `value`, and `text` (not in
        metrics.jsonl: alarms have their own file)."""
        if not self.enabled:
            return
        self._tb.add_scalar(tag, value, step)
        self._tb.add_text(tag, text, step)
        self._tb.flush()

    def _histogram_over_index(self, name: str, values: list[float], step: int) -> None:
        """A per-expert vector as a TensorBoard histogram whose x-axis is the expert index."""
        counts = [v if math.isfinite(v) else 0.0 for v in values]
        self._tb.add_histogram_raw(
            name, min=0, max=len(counts) - 1, num=sum(counts), sum=sum(i * c for i, c in
                                                                      enumerate(counts)),
            sum_squares=sum(i * i * c for i, c in enumerate(counts)),
            bucket_limits=[i + 0.5 for i in range(len(counts))], bucket_counts=counts,
            global_step=step)

    def close(self) -> None:
        if self.enabled and not self._jsonl.closed:
            self._jsonl.close()
            self._tb.close()


def per_layer(metrics: Mapping[str, Any], sparse_layers: Sequence[int]) -> dict[str, Any]:
    """Metrics as logged: floats, lists for per-expert vectors, and each `layer/<name>` value
    stacked over the MoE layers ([M] or [M, E], block order) split into `layer_<i>/<name>` for
    block i of `sparse_layers`."""
    def plain(value: np.ndarray) -> float | list[float]:
        return value.tolist() if value.ndim else float(value)

    out: dict[str, Any] = {}
    for name, value in metrics.items():
        value = np.asarray(value, np.float64)
        if name.startswith("layer/"):
            for m, layer in enumerate(sparse_layers):
                out[f"layer_{layer}/{name[len('layer/'):]}"] = plain(value[m])
        else:
            out[name] = plain(value)
    return out


def write_json(path: str, value: Any) -> None:
    """Writes `value` as JSON atomically (temp file + rename): readers never see half a file."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=2, sort_keys=True, allow_nan=True)
        f.write("\n")
    os.replace(tmp, path)


def read_metrics(workdir: str) -> dict[int, dict[str, Any]]:
    """metrics.jsonl as {step: merged metrics}; later lines win (a resumed run's re-run steps)."""
    path = os.path.join(workdir, METRICS_FILE)
    by_step: dict[int, dict[str, Any]] = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                by_step.setdefault(record["step"], {}).update(record)
    return by_step


class ProgressBar:
    """tqdm bar over training steps showing loss and tokens/s; tqdm's own ETA is the remaining
    steps at the current rate. Disabled off process 0 or with enabled=False."""

    def __init__(self, total_steps: int, initial_step: int, *, enabled: bool) -> None:
        self._bar = None
        if enabled and is_logging_process():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=initial_step, unit="step",
                             dynamic_ncols=True, smoothing=0.1)

    def update(self, step: int, **postfix: float) -> None:
        if self._bar is None:
            return
        self._bar.update(step - self._bar.n)
        if postfix:
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def write(self, message: str) -> None:
        """Prints above the bar (or plainly when disabled)."""
        if self._bar is not None:
            self._bar.write(message)
        elif is_logging_process():
            print(message, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
