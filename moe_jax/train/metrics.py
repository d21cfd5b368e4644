"""Where metrics go: TensorBoard event files, a JSON-lines file, and a console progress bar.

    writer = MetricsWriter(workdir)       # workdir/tensorboard/ and workdir/metrics.jsonl
    writer.write(step, {"train/loss": 2.3, "eval/layer_1/expert_load": [0.2, 0.3, ...]})

Each metrics.jsonl line is {"step": s, "time": unix seconds, name: value, ...}; lists are
per-expert histograms (TensorBoard shows them as histograms over the expert index). A resumed run
appends, so a step re-run after a restart can appear twice: `read_metrics` keeps the last line.
Only process 0 writes (multi-host runs); elsewhere the writer and the progress bar do nothing.

On object storage (a gs:// workdir), which cannot append, metrics.jsonl is a series of objects
(`storage.JsonLines`: metrics.jsonl, metrics.jsonl.0001, ...) that `read_metrics` reads as one,
and the TensorBoard events are written to a local directory and uploaded at every flush, one
event file at a time (`_TensorBoard`).
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from moe_jax.utils import storage

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


class _TensorBoard:
    """tensorboardX's SummaryWriter for `directory`. For object storage it writes to a local
    directory and `flush` uploads the event file whole; past `segment_bytes` the file is closed
    and the next flush starts a new one (TensorBoard reads a directory's event files in order),
    so an upload stays small however long the run."""

    def __init__(self, directory: str, segment_bytes: int = storage.SEGMENT_BYTES) -> None:
        self.directory = directory
        self.remote = storage.is_url(directory)
        self.segment_bytes = segment_bytes
        self._local = tempfile.mkdtemp(prefix="moe_jax_tensorboard_") if self.remote \
            else directory
        self._files = 0
        self.writer = self._open()

    def _open(self) -> Any:
        from tensorboardX import SummaryWriter

        self._files += 1
        # A suffix keeps the names of files opened within one second apart.
        return SummaryWriter(self._local, filename_suffix=f".{self._files}" if self.remote
                             else "")

    def flush(self) -> None:
        self.writer.flush()
        if not self.remote:
            return
        # The local directory holds the one open event file (earlier ones were uploaded whole).
        for name in storage.upload(self._local, self.directory):
            if os.path.getsize(os.path.join(self._local, name)) >= self.segment_bytes:
                self.writer.close()
                storage.copy_file(os.path.join(self._local, name),
                                  storage.join(self.directory, name))
                os.remove(os.path.join(self._local, name))
                self.writer = self._open()

    def close(self) -> None:
        self.flush()
        self.writer.close()
        if self.remote:
            shutil.rmtree(self._local, ignore_errors=True)


class MetricsWriter:
    """Appends metrics to workdir/metrics.jsonl and TensorBoard events in workdir/tensorboard."""

    def __init__(self, workdir: str) -> None:
        self.enabled = is_logging_process()
        self._jsonl: storage.JsonLines | None = None
        self._tensorboard: _TensorBoard | None = None
        if self.enabled:
            storage.makedirs(workdir)
            self._jsonl = storage.JsonLines(storage.join(workdir, METRICS_FILE))
            self._tensorboard = _TensorBoard(storage.join(workdir, TENSORBOARD_DIR))

    @property
    def _tb(self) -> Any:
        return self._tensorboard.writer

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        values = {name: _plain(value) for name, value in metrics.items()}
        self._jsonl.append([{"step": int(step), "time": time.time(), **values}])
        for name, value in values.items():
            if isinstance(value, list):
                self._histogram_over_index(name, value, step)
            elif isinstance(value, int | float):
                self._tb.add_scalar(name, value, step)
        self._tensorboard.flush()

    def alert(self, step: int, tag: str, value: float, text: str) -> None:
        """An alarm in TensorBoard: the scalar `tag` at `value`, and `text` (not in
        metrics.jsonl: alarms have their own file)."""
        if not self.enabled:
            return
        self._tb.add_scalar(tag, value, step)
        self._tb.add_text(tag, text, step)
        self._tensorboard.flush()

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
        if self.enabled and self._tensorboard is not None:
            self._jsonl.close()
            self._tensorboard.close()
            self._tensorboard = None


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
    """Writes `value` as JSON atomically (temp file + rename, or one upload to object storage):
    readers never see half a file."""
    storage.write_json(path, value)


def read_metrics(workdir: str) -> dict[int, dict[str, Any]]:
    """metrics.jsonl as {step: merged metrics}; later lines win (a resumed run's re-run steps).
    FileNotFoundError when the run wrote none."""
    by_step: dict[int, dict[str, Any]] = {}
    for record in storage.JsonLines(storage.join(workdir, METRICS_FILE)).read():
        by_step.setdefault(record["step"], {}).update(record)
    return by_step


def has_metrics(workdir: str) -> bool:
    return storage.JsonLines(storage.join(workdir, METRICS_FILE)).exists()


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
