"""A trained run, back from its workdir: the config it wrote and its newest checkpoint.

    run = restore_run("runs/main_job/switch")
    model = Transformer(run.experiment.model, run.experiment.moe)
    logits, aux = model.apply({"params": run.params, **run.model_state}, inputs, train=False)

The training loop writes `config.json` (the full config) at the start of a run and orbax
checkpoints under `checkpoints/<step>/`; this rebuilds the `schema.Experiment` from the first
and reads the parameters and model state (e.g. the sigmoid_bias router's bias) of the second
onto one device. Nothing in the workdir is written.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

import jax
import ml_collections

from moe_jax import schema
from moe_jax.models import Transformer
from moe_jax.train import optim
from moe_jax.train.checkpoint import Checkpoints
from moe_jax.train.loop import CHECKPOINT_DIR, CONFIG_FILE
from moe_jax.train.state import init_train_state

PyTree = Any


@dataclasses.dataclass(frozen=True)
class RestoredRun:
    """A run's experiment, its config as a ConfigDict, and the state of checkpoint `step`."""

    experiment: schema.Experiment
    config: ml_collections.ConfigDict
    params: PyTree
    model_state: dict[str, PyTree]
    step: int

    @property
    def variables(self) -> dict[str, PyTree]:
        """The model's variables: {"params": ..., **model_state}."""
        return {"params": self.params, **self.model_state}


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
    """The validated ConfigDict of workdir/config.json (written by the training loop)."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: --workdir must be a run directory "
                                "written by `python -m moe_jax.main` (it writes config.json at "
                                "the start of training).")
    with open(path) as f:
        written = json.load(f)
    config = schema.base_config()
    for name, value in written.items():
        if name not in config:
            raise ValueError(f"{path}: unknown key {name!r}; was it written by another version "
                             "of moe_jax?")
        if isinstance(value, dict):
            for key, item in value.items():
                config[name][key] = tuple(item) if isinstance(item, list) else item
        else:
            config[name] = value
    return schema.checked(config)


def restore_run(workdir: str, step: int | None = None) -> RestoredRun:
    """The run in `workdir` at checkpoint `step` (default: the newest), on one device.

    Raises FileNotFoundError when the workdir has no config.json or no checkpoint, and
    `CheckpointError` (naming the step and directory) when a checkpoint cannot be read.
    """
    config = load_run_config(workdir)
    experiment = schema.parse_config(config)
    directory = os.path.join(workdir, CHECKPOINT_DIR)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{workdir} has no checkpoint ({directory} does not exist): "
                                "train the run first (python -m moe_jax.main --workdir=...).")
    checkpoints = Checkpoints(directory, max_to_keep=1, async_save=False)
    try:
        step = checkpoints.latest_step() if step is None else step
        if step is None or step not in checkpoints.all_steps():
            raise FileNotFoundError(
                f"no checkpoint {'of step ' + str(step) + ' ' if step is not None else ''}in "
                f"{directory} (steps there: {checkpoints.all_steps()}); train the run first "
                "or pick one of those steps.")
        model = Transformer(experiment.model, experiment.moe)
        seq_len = experiment.train.seq_len or experiment.model.max_seq_len
        init = functools.partial(init_train_state, model=model,
                                 optimizer=optim.make_optimizer(experiment.train),
                                 seq_len=seq_len)
        state, _ = checkpoints.restore(step, jax.eval_shape(init, jax.random.key(0)))
    finally:
        checkpoints.close()
    return RestoredRun(experiment=experiment, config=config, params=state.params,
                       model_state=state.model_state, step=int(step))
