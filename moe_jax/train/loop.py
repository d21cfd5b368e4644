"""The training loop: `train_and_evaluate(config, workdir) -> summary`.

Files in the workdir:
  config.json          the full config of the run (written once the state is restored)
  checkpoints/<step>/  orbax checkpoints: train state + data-iterator position + elapsed time
  metrics.jsonl        train metrics every `log_every` steps (also per MoE layer), eval metrics
                       every `eval_every`
  tensorboard/         the same metrics as TensorBoard events, and the routing alarms
  alerts.jsonl         the routing alarms (`moe_jax.train.monitor`), one JSON object per line
  routing_profiles/    `<step>.json` at every evaluation (`moe_jax.train.profiles`)
  summary.json         final losses, params, FLOPs per token, tokens/s, wall time (at the end)
  writer.lock          held while a process trains here (`moe_jax.train.lock`)

The workdir may be a gs:// URL (`moe_jax.utils.storage`): the same files, with metrics.jsonl and
alerts.jsonl as series of objects (`storage.JsonLines`) and the lock a Cloud Storage object.

The run is laid out on the mesh of `config.mesh` (`moe_jax.parallel.sharding`; one device by
default): the state is created sharded by jitting the init with out_shardings, each process feeds
its own rows of every batch, checkpoints are written and read by every process (and restore onto any
mesh), and only process 0 writes config, metrics and summary files.

A run restarted with the same workdir resumes from its latest checkpoint and continues with the
same batches and randomness, so its losses equal an uninterrupted run's; a new run with
`init.checkpoint` starts from another run's (or a converted model's) parameters. A non-finite
loss stops the run with `NonFiniteLossError` naming the step, an alarm of `monitor.stop_on`
with `RoutingAlarmError`; checkpoints are only written after the metrics up to their step were
checked, so the last checkpoint is always a good one.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from moe_jax import routing, schema
from moe_jax.analysis import flops
from moe_jax.train import evaluate, init_from, jitted, lock, monitor, optim, placement, profiles
from moe_jax.train import inputs as train_input
from moe_jax.train.checkpoint import (
    CheckpointError,
    Checkpoints,
    check_not_initial,
    complete_steps,
)
from moe_jax.train.metrics import (
    MetricsWriter,
    ProgressBar,
    has_metrics,
    is_logging_process,
    per_layer,
    read_metrics,
    write_json,
)
from moe_jax.train.state import TrainState, num_params
from moe_jax.utils import storage

CONFIG_FILE = "config.json"
SUMMARY_FILE = "summary.json"
CHECKPOINT_DIR = "checkpoints"


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or Inf."""


class AnotherRunError(RuntimeError):
    """The run directory holds another run (a different config and no checkpoint to resume)."""


def _kept(last_good: int | None, checkpoint_dir: str) -> str:
    """Which checkpoint a stopped run leaves."""
    return (f"the last good checkpoint is step {last_good} in {checkpoint_dir}"
            if last_good is not None else f"no checkpoint was written to {checkpoint_dir}")


def _check_finite(fetched: list[tuple[int, dict[str, np.ndarray]]], last_good: int | None,
                  checkpoint_dir: str) -> None:
    """Raises NonFiniteLossError at the first fetched step with a bad loss."""
    for step, metrics in fetched:
        if not math.isfinite(metrics["loss"]):
            raise NonFiniteLossError(
                f"training loss is {float(metrics['loss'])} at step {step}; stopping. Nothing "
                f"from this step on was saved: {_kept(last_good, checkpoint_dir)}. Common fixes: "
                "lower train.learning_rate, keep train.grad_clip_norm > 0, add router z-loss "
                "(moe.z_loss_coef), or keep the router in float32 (moe.router_dtype).")


def _mean_metrics(fetched: list[tuple[int, dict[str, np.ndarray]]]) -> dict[str, np.ndarray]:
    """The logged steps' metrics combined: means, or maxima (`routing.reduction`), of scalars
    and of per-layer arrays alike."""
    def combine(name: str) -> np.ndarray:
        values = np.stack([np.asarray(m[name], np.float64) for _, m in fetched])
        return values.max(0) if routing.reduction(name) == "max" else values.mean(0)

    return {name: combine(name) for name in fetched[0][1]}


class _Throughput:
    """Training tokens per second in this process, excluding the first step (compilation) and
    evaluation time."""

    def __init__(self, tokens_per_step: int) -> None:
        self.tokens_per_step = tokens_per_step
        self.start: float | None = None
        self.steps = 0
        self.excluded = 0.0

    def step_done(self, first_result: Any) -> None:
        if self.start is None:
            jax.block_until_ready(first_result)
            self.start = time.perf_counter()
        else:
            self.steps += 1

    def tokens_per_second(self) -> float | None:
        if self.start is None or self.steps == 0:
            return None
        return self.steps * self.tokens_per_step / (time.perf_counter() - self.start
                                                    - self.excluded)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       mesh: Mesh | None = None) -> dict[str, Any]:
    """Trains `config` in `workdir` (resuming from its latest checkpoint), evaluates, and returns
    the summary that is also written to workdir/summary.json (by process 0).

    mesh: a (data, expert, model) `Mesh` to run on instead of the one `config.mesh` describes
      (the expert-parallel form and the rules still come from `config.mesh`).

    Raises `lock.WorkdirLockedError` (naming the holder) if another run writes `workdir`.
    """
    with lock.hold(workdir):  # one writer per run directory (`moe_jax.train.lock`)
        return _train_and_evaluate(config, workdir, mesh)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                        mesh: Mesh | None) -> dict[str, Any]:
    experiment = schema.parse_config(config)
    workdir = storage.absolute(workdir)
    storage.makedirs(workdir)
    check_not_initial(workdir)
    config_json = config.to_json_best_effort(indent=2, sort_keys=True) + "\n"
    check_same_run(workdir, config_json)
    run = _Run(experiment, workdir, mesh)
    try:
        state = run.restore_or_init()
        if is_logging_process():  # once the checkpoint (if any) was restored with this config
            storage.write_text(storage.join(workdir, CONFIG_FILE), config_json)
        state, last_train, last_eval = run.train(state)
    finally:
        run.close()
    if not last_train:  # nothing trained in this process: the last logged train metrics
        logged = [m for m in read_metrics(workdir).values() if "train/loss" in m]
        last_train = {k[len("train/"):]: v for k, v in (logged[-1] if logged else {}).items()
                      if k.startswith("train/")}
    summary = _summary(experiment, state, run.seq_len, last_train, last_eval,
                       run.throughput.tokens_per_second() or last_train.get("tokens_per_second"),
                       run.elapsed())
    if is_logging_process():
        write_json(storage.join(workdir, SUMMARY_FILE), summary)
    return summary


def check_same_run(workdir: str, config_json: str) -> None:
    """Raises AnotherRunError, naming the differences, if `workdir` holds the config.json of
    a run with another config and no checkpoint: training there would mix that run's metrics
    with this one's and replace its config. (With a checkpoint, resuming checks that it fits.)"""
    path = storage.join(workdir, CONFIG_FILE)
    if not storage.exists(path) or complete_steps(storage.join(workdir, CHECKPOINT_DIR)):
        return
    theirs, ours = json.loads(storage.read_text(path)), json.loads(config_json)
    if theirs == ours:
        return
    differences = [f"{key} ({theirs_value!r} there, {ours_value!r} here)"
                   for key, theirs_value, ours_value in _differences(theirs, ours)]
    raise AnotherRunError(
        f"{workdir} holds another run: its config.json differs in "
        f"{', '.join(differences[:5])}{' and more' if len(differences) > 5 else ''}, and it has "
        "no checkpoint to resume. Nothing was written. Use another --workdir, or delete "
        f"{workdir} if that run is not needed.")


def _differences(a: Any, b: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, a's value, b's value) where two JSON objects differ."""
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return [] if a == b else [(prefix or "(the whole file)", a, b)]
    return [d for key in sorted(set(a) | set(b))
            for d in _differences(a.get(key), b.get(key), f"{prefix}.{key}" if prefix else key)]


class _Run:
    """One training run in its workdir: the jitted functions, the inputs, the checkpoints and
    the metric outputs, with the steps of `train_and_evaluate` as methods."""

    def __init__(self, experiment: schema.Experiment, workdir: str, mesh: Mesh | None) -> None:
        self.wall_start = time.perf_counter()
        self.experiment = experiment
        train = experiment.train
        self.seq_len = train.seq_len or experiment.model.max_seq_len
        _, self.fns = jitted.setup(experiment, self.seq_len, mesh)
        self.data = train_input.make_inputs(experiment.data, experiment.model,
                                            batch_size=train.batch_size, seq_len=self.seq_len,
                                            seed=experiment.seed)
        self.checkpoint_dir = os.path.join(workdir, CHECKPOINT_DIR)
        self.checkpoints = Checkpoints(self.checkpoint_dir, max_to_keep=train.max_to_keep,
                                       async_save=train.async_checkpointing)
        self.last_good = self.checkpoints.latest_step()
        self.elapsed_before = 0.0
        self.workdir = workdir
        self.writer: MetricsWriter | None = None  # opened once the state is restored
        self.bar: ProgressBar | None = None
        self.throughput = _Throughput(train.batch_size * self.seq_len)

    def elapsed(self) -> float:
        """Training wall time of the run so far, earlier processes' (resumed runs) included."""
        return self.elapsed_before + time.perf_counter() - self.wall_start

    def restore_or_init(self) -> TrainState:
        """The latest checkpoint's state (and data position), or a fresh state (with the
        parameters of `init.checkpoint`, when set)."""
        if self.last_good is None:
            state = self.fns["init"](self.experiment.seed)
            if self.experiment.init.checkpoint:
                state = init_from.initial_state(state, self.experiment,
                                                self.fns["state_shardings"],
                                                optim.make_optimizer(self.experiment.train))
            return state
        step = self.last_good
        state, host = jitted.restore_state(self.checkpoints, step, self.experiment,
                                              self.seq_len, self.fns)
        try:
            self.data.train.set_state(_iterator_state(host))
        except (ValueError, KeyError) as err:
            raise CheckpointError(
                f"the checkpoint of step {step} in {self.checkpoints.step_directory(step)} "
                f"was written with a different input pipeline: {err} Nothing was deleted; "
                "resume with the original data/batch settings or use a new --workdir.") from err
        self.elapsed_before = float(host.get("elapsed_seconds", 0.0))
        return state

    def host_state(self) -> dict[str, Any]:
        """What a checkpoint carries besides the state; only process 0 writes this JSON, so it
        holds every process's iterator position."""
        iterators = placement.allgather_json(self.data.train.get_state())
        return {"data_iterator": iterators[0],
                **({"data_iterator_by_process": iterators} if len(iterators) > 1 else {}),
                "elapsed_seconds": self.elapsed()}

    def global_batch(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        return placement.global_batch(local, self.fns["batch_sharding"],
                                      self.experiment.train.batch_size)

    def train(self, state: TrainState
              ) -> tuple[TrainState, dict[str, float], dict[str, Any]]:
        """Steps from the state's step to the last, logging, checkpointing and evaluating on
        the train config's schedule. Returns (state, last logged train metrics, last eval)."""
        train = self.experiment.train
        start_step = int(state.step)
        self.writer = MetricsWriter(self.workdir)
        self.bar = ProgressBar(train.num_train_steps, start_step, enabled=train.progress_bar)
        self.monitor = monitor.Monitor(self.experiment.monitor, self.workdir, self.writer,
                                       self.bar.write)
        if start_step and has_metrics(self.workdir):
            earlier = sorted(read_metrics(self.workdir).items())
        else:  # a new run (or one restarted from step 0)
            earlier = []
        self.monitor.resume(start_step, [
            {"step": step, **{k[len("train/"):]: v for k, v in m.items()
                              if k.startswith("train/")}}
            for step, m in earlier if "train/loss" in m])
        pending: list[tuple[int, dict[str, jax.Array]]] = []
        last_train: dict[str, float] = {}
        last_eval: dict[str, Any] = {}
        for step in range(start_step + 1, train.num_train_steps + 1):
            state, metrics = self.fns["train_step"](state, self.global_batch(next(self.data.train)))
            self.throughput.step_done(metrics["loss"])
            pending.append((step, metrics))
            is_last = step == train.num_train_steps
            save = is_last or (train.checkpoint_every and step % train.checkpoint_every == 0)
            if save or step % train.log_every == 0:
                last_train = self.log_train(pending)
                pending = []
            else:
                self.bar.update(step)
            if save:
                self.checkpoints.save(step, state, self.host_state())
                self.last_good = step
            if is_last or (train.eval_every and step % train.eval_every == 0):
                last_eval = self.evaluate(state, step)
        if not last_eval:  # resumed at the final step: evaluate the restored state
            last_eval = self.evaluate(state, int(state.step))
        return state, last_train, last_eval

    def log_train(self, pending: list[tuple[int, dict[str, jax.Array]]]) -> dict[str, Any]:
        """Checks and logs the metrics of the steps since the last log (per MoE layer too) and
        lets the monitor raise its alarms; returns their means."""
        fetched = [(step, jax.device_get(m)) for step, m in pending]
        step = fetched[-1][0]
        logged = per_layer(_mean_metrics(fetched), self.experiment.model.sparse_layers)
        alarms = self.monitor.observe(step, logged)
        _check_finite(fetched, self.last_good, self.checkpoint_dir)
        self.monitor.stop_if_asked(alarms, _kept(self.last_good, self.checkpoint_dir))
        tokens_per_second = self.throughput.tokens_per_second()
        if tokens_per_second:
            logged["tokens_per_second"] = tokens_per_second
        self.writer.write(step, {f"train/{k}": v for k, v in logged.items()})
        self.bar.update(step, loss=logged["loss"],
                        **({"tok/s": tokens_per_second} if tokens_per_second else {}))
        return logged

    def evaluate(self, state: TrainState, step: int) -> dict[str, Any]:
        """Evaluates on every validation batch and logs the metrics; its time is left out of
        the training throughput."""
        eval_start = time.perf_counter()
        totals = evaluate.evaluate_batches(self.fns["eval_step"], state.params,
                                           state.model_state, self.data.eval_batches(),
                                           self.global_batch)
        domains = train_input.domain_names(self.experiment.data)
        metrics = evaluate.summarize(totals, self.experiment.model, domains)
        self.writer.write(step, {f"eval/{k}": v for k, v in metrics.items()})
        if self.experiment.model.sparse_layers and is_logging_process():
            profiles.save(self.workdir, profiles.from_totals(
                totals, self.experiment.model, self.experiment.moe, domains, step=step))
        self.bar.write(f"step {step}: eval loss {metrics['loss']:.4f}"
                       + (f", {metrics['bits_per_byte']:.4f} bits/byte"
                          if "bits_per_byte" in metrics else ""))
        self.throughput.excluded += time.perf_counter() - eval_start
        return metrics

    def close(self) -> None:
        """Waits for pending checkpoint writes and closes every output."""
        self.checkpoints.wait()
        self.checkpoints.close()
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


def _iterator_state(host: dict[str, Any]) -> dict[str, Any]:
    """This process's data-iterator position from a checkpoint's host state."""
    states = host.get("data_iterator_by_process", [host["data_iterator"]])
    if len(states) != jax.process_count():
        raise ValueError(f"it was written by {len(states)} processes and this run has "
                         f"{jax.process_count()};")
    return states[jax.process_index()]


def _summary(experiment: Any, state: TrainState, seq_len: int, last_train: dict[str, float],
             last_eval: dict[str, Any], tokens_per_second: float | None,
             wall_seconds: float) -> dict[str, Any]:
    """summary.json: the numbers an experiment runner compares across runs.

    train_loss / train_cross_entropy: means over the last `log_every` steps. eval_*: the final
    evaluation (eval_loss is the cross-entropy in nats per token; `eval` holds every eval
    metric). params_total / params_active and FLOPs per token: `moe_jax.analysis.flops` at the
    training sequence length; params_in_state counts the created parameters (equal to params_total).
    tokens_per_second: training throughput of the last process that trained (compilation and
    evaluation excluded). wall_time_seconds: over all resumed segments.
    """
    step = int(state.step)
    count = flops.count_model(experiment.model, experiment.moe, seq_len=seq_len)
    return {
        "steps": step,
        "train_tokens": step * experiment.train.batch_size * seq_len,
        "train_loss": last_train.get("loss"),
        "train_cross_entropy": last_train.get("cross_entropy"),
        "eval_loss": last_eval.get("loss"),
        "eval_bits_per_byte": last_eval.get("bits_per_byte"),
        "eval_accuracy": last_eval.get("accuracy"),
        "params_total": count.total_params,
        "params_active": count.active_params,
        "params_in_state": num_params(state.params),
        "forward_flops_per_token": count.forward_flops_per_token,
        "training_flops_per_token": count.training_flops_per_token,
        "tokens_per_second": tokens_per_second,
        "wall_time_seconds": wall_seconds,
        "seed": experiment.seed,
        "eval": last_eval,
    }
