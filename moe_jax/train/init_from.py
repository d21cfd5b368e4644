"""A run that starts from a checkpoint's parameters (`InitConfig`): fine-tuning a converted
model, continuing a dense run with a fresh optimizer, or sparse upcycling.

    state = initial_state(fresh_state, experiment, shardings)

`fresh_state` is the run's own fresh init (step 0, optimizer state of zeros, the run's RNG);
the result carries the checkpoint's parameters and model state instead, upcycled when
`init.upcycle` (`models.upcycling`), placed with `shardings`. The optimizer state is re-created
from the new parameters, so nothing of the source run's optimizer carries over.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from moe_jax.models import upcycling
from moe_jax.models.multi_token import MTP_NAME
from moe_jax.train import checkpoint
from moe_jax.train.state import TrainState

UPCYCLE_KEY = 0x5C  # folded into the run's seed: the upcycling noise and re-init draws


def initial_variables(experiment: Any, fresh: TrainState) -> dict[str, Any]:
    """{"params", "model_state"} of `experiment.init.checkpoint` in the structure of `fresh`
    (upcycled when `init.upcycle`). Raises CheckpointError or ValueError naming the problem."""
    init = experiment.init
    source = checkpoint.read_weights(init.checkpoint)[0]
    what = (f"cannot start from {init.checkpoint}: its parameters do not match this run's "
            "model config")
    source = with_fresh_mtp(source, jax.device_get({n: getattr(fresh, n)
                                                     for n in checkpoint.VARIABLES}))
    if not init.upcycle:
        return {name: upcycling.copy_parameters(source[name], getattr(fresh, name), what)
                for name in checkpoint.VARIABLES}
    key = jax.random.fold_in(jax.random.key(experiment.seed), UPCYCLE_KEY)
    params = upcycling.upcycle(source["params"], jax.device_get(fresh.params), experiment.model,
                               key=key, noise=init.expert_noise,
                               reinit_fraction=init.reinit_fraction)
    return {"params": params, "model_state": jax.device_get(fresh.model_state)}


def with_fresh_mtp(source: dict[str, Any], fresh: dict[str, Any]) -> dict[str, Any]:
    """`source` {"params", "model_state"} with the fresh multi-token-prediction modules
    (`ModelConfig.mtp_depth`) of `fresh` where the checkpoint has none: a converted model
    fine-tunes with MTP modules that start from their random init."""
    params = dict(source["params"])
    if MTP_NAME in fresh["params"] and MTP_NAME not in params:
        params[MTP_NAME] = fresh["params"][MTP_NAME]
    model_state = {name: dict(collection) for name, collection in source["model_state"].items()}
    for name, collection in fresh["model_state"].items():
        if MTP_NAME in collection and MTP_NAME not in model_state.get(name, {}):
            model_state.setdefault(name, {})[MTP_NAME] = collection[MTP_NAME]
    return {**source, "params": params, "model_state": model_state}


def initial_state(fresh: TrainState, experiment: Any, shardings: TrainState,
                  optimizer: optax.GradientTransformation) -> TrainState:
    """`fresh` with the parameters and model state of `experiment.init.checkpoint`, a new
    optimizer state for them, placed with `shardings` (a TrainState of shardings)."""
    variables = initial_variables(experiment, fresh)
    params = jax.device_put(variables["params"], shardings.params)
    opt_state = jax.jit(optimizer.init, out_shardings=shardings.opt_state)(params)
    return fresh.replace(params=params, opt_state=opt_state,
                         model_state=jax.device_put(variables["model_state"],
                                                    shardings.model_state))
