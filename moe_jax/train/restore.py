"""A trained run, back from its workdir: the config it wrote and its newest checkpoint.

    run = restore_run("runs/main_job/switch")
    model = Transformer(run.experiment.model, run.experiment.moe)
    logits, aux = model.apply({"params": run.params, **run.model_state}, inputs, train=False)

The training loop writes `config.json` (the full config) at the start of a run and orbax
checkpoints under `checkpoints/<step>/`; this rebuilds the `schema.Experiment` from the first
(`reevaluate.run_experiment`) and reads the parameters and model state (e.g. the sigmoid_bias
router's bias) of the second (`checkpoint.read_weights`) onto one device. Nothing in the
workdir is written.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax

from moe_jax import schema
from moe_jax.models import Transformer
from moe_jax.train import optim
from moe_jax.train.checkpoint import read_weights
from moe_jax.train.reevaluate import run_experiment
from moe_jax.train.state import init_train_state

PyTree = Any


@dataclasses.dataclass(frozen=True)
class RestoredRun:
    """A run's experiment and the parameters and model state of checkpoint `step`."""

    experiment: schema.Experiment
    params: PyTree
    model_state: dict[str, PyTree]
    step: int

    @property
    def variables(self) -> dict[str, PyTree]:
        """The model's variables: {"params": ..., **model_state}."""
        return {"params": self.params, **self.model_state}


def restore_run(workdir: str, step: int | None = None) -> RestoredRun:
    """The run in `workdir` at checkpoint `step` (default: the newest), on one device.

    Raises FileNotFoundError when the workdir has no config.json, and `CheckpointError`
    (naming the directory and the saved steps) when it has no such checkpoint or the
    checkpoint does not fit the config.
    """
    experiment = run_experiment(workdir)
    model = Transformer(experiment.model, experiment.moe)
    seq_len = experiment.train.seq_len or experiment.model.max_seq_len
    init = functools.partial(init_train_state, model=model,
                             optimizer=optim.make_optimizer(experiment.train), seq_len=seq_len)
    weights, step = read_weights(workdir, jax.eval_shape(init, jax.random.key(0)), step)
    return RestoredRun(experiment=experiment, params=weights["params"],
                       model_state=weights["model_state"], step=int(step))
