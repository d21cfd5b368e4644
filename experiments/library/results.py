"""The results file of a suite: one JSON (and a flat CSV) per suite and scale, committed.

    experiments/results/<suite>/<scale>.json
      {"suite", "scale", "created", "machine", "statistics", "runs": [run, ...],
       "other_runs": [run, ...]}
      run: {"member", "seed", "config", "overrides", "tags", "status", "workdir", "command",
            "summary" (summary.json, or null), "history" ([{step, scalar metrics...}] from
            metrics.jsonl), "diverged_step", "error", "runner_seconds", "analysis",
            "machine" (where and when it was collected)}
    experiments/results/<suite>/<scale>.csv   one row per run: `CSV_METRICS` and status

The file is the record of a suite, not the run directories (git-ignored, gone in a fresh
clone): the runner records each run as soon as it finishes (`record`), skips runs the file
already holds, and never drops an entry it did not produce. Runs are identified by member,
seed and settings (`run_key`: config and overrides); "runs" holds those with the settings of
the latest invocation (plus "missing" placeholders for the ones not done yet), "other_runs"
every recorded run of other settings. "statistics" is the verdict rule the file is decided by
(`stats.rule_of`).

status is "finished" (summary.json with the requested steps), "diverged" (the training loop's
non-finite-loss guard stopped it; `diverged_step` says where), "failed" (any other error; `error`
holds the end of its log) or "missing" (not run yet). `Results` reads the file back and gives the
report per-member metric values over seeds (`METRICS`).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from moe_jax import schema

FINISHED, DIVERGED, FAILED, MISSING = "finished", "diverged", "failed", "missing"
# A run's training tokens/s from the suite's controlled throughput benchmark (one process on an
# idle machine, members interleaved: experiments/benchmarks/suite_throughput.py), set on the runs
# by `Results.load` from `<scale>_throughput.json` beside the results file when there is one.
BENCHMARK_KEY = "benchmark_tokens_per_second"
# A results file whose "time_basis" is "benchmark" decides its time-basis claims only with the
# controlled throughput benchmark beside it (`<scale>_throughput.json`), never with the loop's
# tokens/s under load (set when the scale's pre-registration says so).
TIME_BASIS_KEY = "time_basis"
THROUGHPUT_SUFFIX = "_throughput.json"
Run = dict[str, Any]


def _layer_values(eval_metrics: dict[str, Any], name: str) -> list[Any]:
    """Values of `layer_<i>/<name>` (not per-domain) in layer order."""
    keys = [k for k in eval_metrics if k.startswith("layer_") and k.endswith("/" + name)]
    return [eval_metrics[k] for k in sorted(keys, key=lambda k: int(k.split("/")[0][6:]))]


def _mean_or_none(values: Sequence[float]) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(values)) if values else None


def layer_assignment_shares(eval_metrics: dict[str, Any]) -> list[np.ndarray]:
    """Per MoE layer, each expert's share of assignments *before* capacity drops: the
    token-weighted mean of the per-domain `expert_share` when the evaluation recorded it, else
    the kept `expert_load` renormalised to sum to 1."""
    out = []
    for key in sorted((k for k in eval_metrics if k.startswith("layer_")
                       and k.endswith("/expert_load")), key=lambda k: int(k.split("/")[0][6:])):
        layer = key.split("/")[0]
        domains = sorted({k.split("/")[1] for k in eval_metrics
                          if k.startswith("domain/") and k.endswith(f"{layer}/expert_share")})
        if domains:
            weights = np.array([eval_metrics[f"domain/{d}/num_tokens"] for d in domains])
            shares = np.array([eval_metrics[f"domain/{d}/{layer}/expert_share"] for d in domains])
            share = weights @ shares / weights.sum()
        else:
            load = np.asarray(eval_metrics[key], np.float64)
            share = load / max(load.sum(), 1e-12)
        out.append(share)
    return out


def max_violation(share: np.ndarray) -> float:
    """MaxVio = max_e load_e / mean load - 1 (Wang et al. 2024, eq. 7): 0 when balanced."""
    return float(np.max(share) / np.mean(share) - 1.0)


def history_values(run: Run, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of a logged scalar metric (e.g. "train/cross_entropy")."""
    points = [(h["step"], h[key]) for h in run.get("history") or [] if key in h]
    if not points:
        return np.zeros(0), np.zeros(0)
    steps, values = zip(*points, strict=True)
    return np.asarray(steps, np.float64), np.asarray(values, np.float64)


def late_mean(run: Run, key: str, fraction: float = 0.2) -> float | None:
    """Mean of a logged train metric over the last `fraction` of its logged points."""
    _, values = history_values(run, key)
    if values.size == 0:
        return None
    return float(np.mean(values[-max(1, round(values.size * fraction)):]))


def _history_max(run: Run, key: str) -> float | None:
    values = history_values(run, key)[1]
    finite = values[np.isfinite(values)]
    return float(finite.max()) if finite.size else None


def _summary(run: Run, key: str) -> float | None:
    return (run.get("summary") or {}).get(key)


def _eval(run: Run) -> dict[str, Any]:
    return (run.get("summary") or {}).get("eval") or {}


@functools.cache
def _routing_group(config: str, overrides: str) -> tuple[int, int, int] | None:
    """(tokens per routing group T, top_k, num_experts) of a run's config (spec and JSON
    overrides), None for a dense model. T is the micro-batch's tokens unless moe.group_size is
    set (`moe._check_input`). The init overrides are left out: they name where a run starts
    (an upcycled run's dense checkpoint is set by the runner, not recorded), not its routing."""
    settings = {k: v for k, v in json.loads(overrides).items() if not k.startswith("init.")}
    experiment = schema.parse_config(schema.override(schema.load_config(config), settings))
    if not experiment.model.sparse_layers:
        return None
    train, moe = experiment.train, experiment.moe
    seq_len = train.seq_len or experiment.model.max_seq_len
    return moe.group_size or train.micro_batch_size * seq_len, moe.top_k, moe.num_experts


def tokens_per_expert_group(run: Run) -> float | None:
    """Assignments per expert per routing group if routing were uniform: T * k / E (Switch
    Sec. 2.2's expert capacity before the capacity factor); None for a dense model."""
    try:
        group = _routing_group(run["config"], json.dumps(run.get("overrides") or {},
                                                         sort_keys=True))
    except FileNotFoundError:  # a config file this checkout does not have
        return None
    return None if group is None else group[0] * group[1] / group[2]


@dataclasses.dataclass(frozen=True)
class Metric:
    """A per-run number for tables and claims: `fn(run)` or None when the run lacks it."""

    name: str
    label: str
    fn: Callable[[Run], float | None]
    digits: int = 3


METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("eval_loss", "val loss (nats/token)", lambda r: _summary(r, "eval_loss"), 4),
    Metric("bits_per_byte", "val bits/byte", lambda r: _summary(r, "eval_bits_per_byte"), 4),
    Metric("accuracy", "val accuracy", lambda r: _summary(r, "eval_accuracy"), 4),
    Metric("train_ce", "train CE, last 20% (nats)",
           lambda r: late_mean(r, "train/cross_entropy"), 4),
    Metric("dropped_train", "dropped, train (last 20%)",
           lambda r: late_mean(r, "train/dropped_fraction"), 4),
    Metric("dropped_eval", "dropped, val (eval CF)",
           lambda r: _mean_or_none(_layer_values(_eval(r), "dropped_fraction")), 4),
    Metric("load_cv", "expert-load CV (val)",
           lambda r: _mean_or_none(_layer_values(_eval(r), "load_cv")), 3),
    Metric("max_violation", "MaxVio (val)", lambda r: _mean_or_none(
        [max_violation(s) for s in layer_assignment_shares(_eval(r))]), 3),
    Metric("max_router_logit", "max router logit (train)",
           lambda r: _history_max(r, "train/max_router_logit"), 2),
    Metric("router_entropy", "router entropy (val, nats)",
           lambda r: _mean_or_none(_layer_values(_eval(r), "router_entropy")), 3),
    Metric("tokens_per_second", "train tokens/s", lambda r: _summary(r, "tokens_per_second"), 0),
    Metric("benchmark_tokens_per_second", "benchmark tokens/s (idle, interleaved)",
           lambda r: r.get(BENCHMARK_KEY), 0),
    Metric("tokens_per_expert_group", "tokens/expert/group (T k / E)", tokens_per_expert_group,
           1),
    Metric("wall_time", "run wall time (s)", lambda r: _summary(r, "wall_time_seconds"), 0),
    Metric("params_total", "params total", lambda r: _summary(r, "params_total"), 0),
    Metric("params_active", "params active", lambda r: _summary(r, "params_active"), 0),
    Metric("train_flops", "train FLOPs/token", lambda r: _summary(r, "training_flops_per_token"),
           0),
)}
CSV_METRICS = tuple(METRICS)


class Results:
    """A loaded results file with per-member accessors (runs keep the file's order)."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data
        self.runs: list[Run] = data["runs"]
        self.throughput: dict[str, Any] | None = None

    @classmethod
    def load(cls, path: str) -> Results:
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"no results file {path}; run `python -m experiments.run --suite=<name>` first "
                "(or pass --results_dir to where it wrote).")
        with open(path) as f:
            results = cls(json.load(f))
        throughput = os.path.splitext(path)[0] + THROUGHPUT_SUFFIX
        if os.path.exists(throughput):
            with open(throughput) as f:
                results.set_throughput(json.load(f))
        return results

    def set_throughput(self, benchmark: dict[str, Any]) -> None:
        """Gives each run of a member that `benchmark` (a suite_throughput file) timed that
        member's tokens/s (`BENCHMARK_KEY`): the time basis of the report's speed-ups."""
        rates = {row["member"]: row["tokens_per_s"] for row in benchmark["rows"]}
        self.throughput = benchmark
        for run in self.runs:
            if run["member"] in rates:
                run[BENCHMARK_KEY] = rates[run["member"]]

    @property
    def suite(self) -> str:
        return self.data["suite"]

    @property
    def scale(self) -> str:
        return self.data["scale"]

    def members(self) -> list[str]:
        seen: dict[str, None] = {}
        for run in self.runs:
            seen.setdefault(run["member"], None)
        return list(seen)

    def runs_of(self, member: str, statuses: Sequence[str] = (FINISHED,)) -> list[Run]:
        return [r for r in self.runs if r["member"] == member and r["status"] in statuses]

    def count(self, member: str, status: str) -> int:
        return len(self.runs_of(member, (status,)))

    def tags(self, member: str) -> dict[str, Any]:
        return next((r.get("tags") or {} for r in self.runs if r["member"] == member), {})

    def values(self, member: str, metric: str,
               statuses: Sequence[str] = (FINISHED,)) -> list[float]:
        """`metric` (a METRICS name) of the member's runs that have it, in seed order."""
        fn = METRICS[metric].fn
        out = [fn(r) for r in self.runs_of(member, statuses)]
        return [float(v) for v in out if v is not None and math.isfinite(v)]

    def by_seed(self, member: str, fn: Callable[[Run], float | None]) -> dict[int, float]:
        """{seed: fn(run)} over the member's finished runs (for paired comparisons)."""
        out = {}
        for run in self.runs_of(member):
            value = fn(run)
            if value is not None and math.isfinite(value):
                out[run["seed"]] = float(value)
        return out


def run_key(run: Run) -> str:
    """A run's identity: member, seed and settings (config and every override)."""
    return json.dumps([run["member"], run["seed"], run["config"], run["overrides"]],
                      sort_keys=True, default=str)


def settings_key(run: Run) -> str:
    """A run's member and settings without its seed: runs of one experiment share it."""
    overrides = {k: v for k, v in run["overrides"].items() if k != "seed"}
    return json.dumps([run["member"], run["config"], overrides], sort_keys=True, default=str)


def load_or_new(path: str, suite: str, scale: str, statistics: str) -> dict[str, Any]:
    """The results file at `path`, or a new empty one decided by the rule `statistics`.
    Raises ValueError if the file belongs to another suite or scale."""
    if not os.path.exists(path):
        return {"suite": suite, "scale": scale, "statistics": statistics, "runs": [],
                "other_runs": []}
    with open(path) as f:
        data = json.load(f)
    if (data.get("suite"), data.get("scale")) != (suite, scale):
        raise ValueError(f"{path} holds suite {data.get('suite')!r} at scale "
                         f"{data.get('scale')!r}, not {suite!r} at {scale!r}; pass the matching "
                         "--suite/--scale or another --results_dir.")
    data.setdefault("other_runs", [])
    return data


def recorded(data: dict[str, Any], run: Run) -> Run | None:
    """The recorded entry (not a placeholder) with `run`'s key, or None."""
    key = run_key(run)
    return next((r for r in data["runs"] + data["other_runs"]
                 if r["status"] != MISSING and run_key(r) == key), None)


def record(data: dict[str, Any], entry: Run) -> None:
    """Puts `entry` in place of any entry with its key (in "runs" or "other_runs"), else at the
    end of "runs"."""
    key = run_key(entry)
    for group in ("runs", "other_runs"):
        for i, run in enumerate(data[group]):
            if run_key(run) == key:
                data[group][i] = entry
                return
    data["runs"].append(entry)


def arrange(data: dict[str, Any], expected: Sequence[Run]) -> list[Run]:
    """Lays the file out for an invocation that expects `expected` (placeholder entries of its
    runs, in suite order). "runs": every recorded run with the settings of an expected run
    (other seeds included), a "missing" placeholder for each expected run not recorded, in
    member order, then seed order. "other_runs": every recorded run of other settings. Returns
    the runs this moved from "runs" to "other_runs"."""
    pool = [r for r in data["runs"] + data["other_runs"] if r["status"] != MISSING]
    keys = {run_key(r) for r in pool}
    order = {}
    for r in expected:
        order.setdefault(settings_key(r), len(order))
    runs = [r for r in pool if settings_key(r) in order]
    runs += [r for r in expected if run_key(r) not in keys]
    runs.sort(key=lambda r: (order[settings_key(r)], r["seed"]))
    others = [r for r in pool if settings_key(r) not in order]
    moved = [r for r in others if any(r is x for x in data["runs"])]
    data["runs"], data["other_runs"] = runs, others
    return moved


def write(data: dict[str, Any], json_path: str) -> str:
    """Writes the JSON results file and its CSV sibling atomically; returns the CSV path."""
    os.makedirs(os.path.dirname(json_path) or ".", exist_ok=True)
    tmp = json_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=False, allow_nan=True)
        f.write("\n")
    os.replace(tmp, json_path)
    csv_path = os.path.splitext(json_path)[0] + ".csv"
    with open(csv_path + ".tmp", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["suite", "scale", "member", "seed", "status", "steps", "diverged_step",
                         *CSV_METRICS])
        for run in data["runs"]:
            values = [METRICS[m].fn(run) for m in CSV_METRICS]
            writer.writerow([data["suite"], data["scale"], run["member"], run["seed"],
                             run["status"], (run.get("summary") or {}).get("steps", ""),
                             run.get("diverged_step") or "",
                             *("" if v is None else f"{v:.6g}" for v in values)])
    os.replace(csv_path + ".tmp", csv_path)
    return csv_path
