"""Routing alarms during training: expert collapse, imbalance, drops, router instability and
non-finite values, per MoE layer, from the logged training metrics.

    monitor = Monitor(experiment.monitor, workdir, writer, echo=print)
    alarms = monitor.observe(step, logged)    # console line, alerts.jsonl, TensorBoard
    monitor.stop_if_asked(alarms, kept="the last good checkpoint is step 100 in ...")

The decisions are pure functions of a history of logged records (`alarms_at`), testable on
hand-made series. A record is one training log: {"step": s, "loss": x, ...,
"layer_<i>/assignment_fraction": [E], "layer_<i>/dropped_fraction": x,
"layer_<i>/max_router_logit": x, "layer_<i>/router_z_loss": x, ...} (the train metrics of
`metrics.per_layer`, means over the steps since the previous log). The alarms (`MonitorConfig`
holds the thresholds):

  collapse     an expert's share of the assignments (before capacity) below
               collapse_fraction / E for `patience` consecutive logs
  imbalance    MaxVio = max_e share_e / mean_e share_e - 1 (Wang et al. 2024, eq. 7) above
               max_violation for `patience` consecutive logs
  drops        the dropped share of the assignments above max_dropped_fraction for `patience`
               consecutive logs
  instability  the largest router logit above max_router_logit, a layer's router z-loss (ST-MoE
               eq. 5) above max_router_z_loss, or the largest logit grown more than
               logit_growth times over the last growth_window logs (and above
               max_router_logit / 2)
  non_finite   any logged value NaN or infinite

An alarm fires once when its condition starts to hold (after `patience` logs for the first
three; the logs before `grace_steps` never count for them) and again only after it has cleared.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from moe_jax.train.config import MonitorConfig
from moe_jax.train.metrics import MetricsWriter, is_logging_process
from moe_jax.utils import storage

ALERTS_FILE = "alerts.jsonl"
Record = Mapping[str, Any]
_LAYER = re.compile(r"^layer_(\d+)/(.+)$")
# What to change when an alarm stops a run.
FIXES = {
    "collapse": "raise moe.load_balance_coef, lower train.learning_rate, or use "
                "moe.router='sigmoid_bias' (auxiliary-loss-free balancing)",
    "imbalance": "raise moe.load_balance_coef or lower train.learning_rate",
    "drops": "raise moe.capacity_factor, balance the load (moe.load_balance_coef), or use "
             "moe.dispatch='dropless'",
    "instability": "add the router z-loss (moe.z_loss_coef=1e-3), lower train.learning_rate, "
                   "shrink the MoE init (moe.init_scale=0.1), keep moe.router_dtype='float32'",
    "non_finite": "lower train.learning_rate, keep train.grad_clip_norm > 0, add the router "
                  "z-loss (moe.z_loss_coef)",
}


class RoutingAlarmError(RuntimeError):
    """A routing alarm listed in `MonitorConfig.stop_on` fired."""


@dataclasses.dataclass(frozen=True)
class Alarm:
    """One alarm: what fired, where, and the value against its threshold."""

    kind: str  # one of `config.ALARMS`
    step: int
    metric: str  # the logged metric, e.g. "layer_1/assignment_fraction"
    value: float
    threshold: float | None  # None for non_finite
    layer: int | None = None
    expert: int | None = None
    detail: str = ""  # how the threshold is read, e.g. "< 0.1 / E for 3 consecutive logs"

    def message(self) -> str:
        where = ", ".join(f"{name} {value}" for name, value in
                          (("layer", self.layer), ("expert", self.expert)) if value is not None)
        return (f"routing alarm [{self.kind}] at step {self.step}" + (f", {where}" if where else "")
                + f": {self.metric} = {self.value:.4g} {self.detail}")

    def record(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"message": self.message()}


# --- the pure part: conditions per record, alarms from a history ---------------------------------

def layers(record: Record) -> list[int]:
    """The MoE layers (block indices) a record has metrics of, in order."""
    return sorted({int(m.group(1)) for m in map(_LAYER.match, record) if m})


def max_violation(share: Sequence[float]) -> float:
    """MaxVio = max_e share_e / mean share - 1 (Wang et al. 2024, eq. 7): 0 when balanced."""
    share = np.asarray(share, np.float64)
    return float(np.max(share) / max(float(np.mean(share)), 1e-12) - 1.0)


def _get(record: Record, layer: int, name: str) -> Any:
    return record.get(f"layer_{layer}/{name}")


def _conditions(record: Record, config: MonitorConfig) -> dict[tuple, tuple[float, float, str]]:
    """The thresholds one record violates: {(kind, metric, layer, expert): (value, threshold,
    detail)}; the distribution alarms only from `grace_steps` on."""
    out: dict[tuple, tuple[float, float, str]] = {}
    late = record["step"] >= config.grace_steps
    for layer in layers(record):
        share = _get(record, layer, "assignment_fraction")
        if late and share is not None and np.all(np.isfinite(share)):
            bound = config.collapse_fraction / len(share)
            for expert, value in enumerate(share):
                if value < bound:
                    out["collapse", f"layer_{layer}/assignment_fraction", layer, expert] = (
                        float(value), bound, f"< {config.collapse_fraction:g} / E = {bound:.4g}")
            vio = max_violation(share)
            if vio > config.max_violation:
                out["imbalance", f"layer_{layer}/max_violation", layer, int(np.argmax(share))] = (
                    vio, config.max_violation, f"> {config.max_violation:g}")
        bounds = ((late, "dropped_fraction", config.max_dropped_fraction, "drops"),
                  (True, "max_router_logit", config.max_router_logit, "instability"),
                  (True, "router_z_loss", config.max_router_z_loss, "instability"))
        for active, name, bound, kind in bounds:
            value = _get(record, layer, name)
            if active and value is not None and value > bound:
                out[kind, f"layer_{layer}/{name}", layer, None] = (value, bound, f"> {bound:g}")
    return out


def _non_finite(record: Record) -> dict[tuple, tuple[float, None, str]]:
    out = {}
    for name, value in record.items():
        if name in ("step", "time"):
            continue
        values = np.asarray(value, np.float64).reshape(-1)
        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size:
            m = _LAYER.match(name)
            expert = int(bad[0]) if values.size > 1 else None
            out["non_finite", name, int(m.group(1)) if m else None, expert] = (
                float(values[bad[0]]), None, "is not finite")
    return out


def _growth(history: Sequence[Record], config: MonitorConfig, index: int
            ) -> dict[tuple, tuple[float, float, str]]:
    """Largest-logit growth at history[index] over the `growth_window` logs before it."""
    out = {}
    if index < config.growth_window:
        return out
    now, before = history[index], history[index - config.growth_window]
    for layer in layers(now):
        value, old = _get(now, layer, "max_router_logit"), _get(before, layer, "max_router_logit")
        if value is None or old is None or not (old > 0 and math.isfinite(value)):
            continue
        if value > config.logit_growth * old and value > config.max_router_logit / 2:
            out["instability", f"layer_{layer}/max_router_logit", layer, None] = (
                value, config.logit_growth * old,
                f"> {config.logit_growth:g} x {old:.4g} ({config.growth_window} logs before)")
    return out


def _all_conditions(history: Sequence[Record], config: MonitorConfig, index: int) -> dict:
    record = history[index]
    return (_conditions(record, config) | _growth(history, config, index)
            | _non_finite(record))


PATIENT = ("collapse", "imbalance", "drops")


def alarms_at(history: Sequence[Record], config: MonitorConfig) -> list[Alarm]:
    """The alarms raised at the last record of `history` (records in step order): conditions
    holding at exactly `patience` consecutive records (collapse, imbalance, drops) or starting
    now (instability, non_finite)."""
    if not history:
        return []
    depth = config.patience + 1
    recent = [_all_conditions(history, config, i)
              for i in range(max(0, len(history) - depth), len(history))]
    alarms = []
    for key, (value, threshold, detail) in recent[-1].items():
        kind, metric, layer, expert = key
        run = 0
        for conditions in reversed(recent):
            if key not in conditions:
                break
            run += 1
        needed = config.patience if kind in PATIENT else 1
        if run != needed:
            continue
        if kind in PATIENT:
            detail += f" for {needed} consecutive logs"
        alarms.append(Alarm(kind, int(history[-1]["step"]), metric, value, threshold, layer,
                            expert, detail))
    return alarms


def scan(records: Sequence[Record], config: MonitorConfig) -> list[Alarm]:
    """Every alarm a whole series of records raises, in order (e.g. a metrics.jsonl read back)."""
    return [a for i in range(len(records)) for a in alarms_at(records[:i + 1], config)]


# --- the stateful part: history, outputs, stopping ----------------------------------------------

class Monitor:
    """Keeps the recent logged records of a run, reports each alarm (a console line through
    `echo`, a line of workdir/alerts.jsonl, a TensorBoard scalar and text `alerts/<kind>`), and
    stops the run on the alarms of `config.stop_on`. Only process 0 writes."""

    def __init__(self, config: MonitorConfig, workdir: str, writer: MetricsWriter | None,
                 echo: Callable[[str], None] = print) -> None:
        self.config = config
        self.path = storage.join(workdir, ALERTS_FILE)
        self._alerts = storage.JsonLines(self.path)
        self.writer = writer
        self.echo = echo
        self.history: list[Record] = []

    def resume(self, start_step: int, logged: Sequence[Record]) -> None:
        """Continues a run restarted at `start_step`: its earlier logged records (`logged`,
        e.g. metrics.jsonl's train records without the "train/" prefix) become the history, and
        the alarms of steps after `start_step`, which the restarted steps raise again, leave
        alerts.jsonl. A resumed run's alarms are then those of an uninterrupted one."""
        self.history = [dict(r) for r in logged if r["step"] <= start_step]
        del self.history[:-(self.config.patience + self.config.growth_window + 1)]
        if is_logging_process() and self._alerts.exists():
            self._alerts.rewrite([a for a in self._alerts.read() if a["step"] <= start_step])

    def observe(self, step: int, logged: Mapping[str, Any]) -> list[Alarm]:
        """Adds one log's metrics; reports and returns the alarms they raise."""
        if not self.config.enabled:
            return []
        self.history.append({"step": step, **logged})
        del self.history[:-(self.config.patience + self.config.growth_window + 1)]
        alarms = alarms_at(self.history, self.config)
        if alarms and is_logging_process():
            self._alerts.append([alarm.record() for alarm in alarms])
            for alarm in alarms:
                self.echo(alarm.message())
                if self.writer is not None:
                    self.writer.alert(step, f"alerts/{alarm.kind}", alarm.value, alarm.message())
        return alarms

    def stop_if_asked(self, alarms: Sequence[Alarm], kept: str) -> None:
        """Raises RoutingAlarmError for the first alarm whose kind is in `stop_on`; `kept` says
        which checkpoint is left."""
        for alarm in alarms:
            if alarm.kind in self.config.stop_on:
                raise RoutingAlarmError(
                    f"{alarm.message()}. monitor.stop_on lists {alarm.kind!r}: stopping before "
                    f"the checkpoint of this step; {kept}. Common fixes: {FIXES[alarm.kind]}.")


def read_alerts(workdir: str) -> list[dict[str, Any]]:
    """workdir/alerts.jsonl as a list of alarm records ([] when there is none)."""
    alerts = storage.JsonLines(storage.join(workdir, ALERTS_FILE))
    return alerts.read() if alerts.exists() else []
