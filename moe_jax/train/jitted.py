"""The jitted functions of a run and their shardings: the one place that decides device
placement (`setup`), and reading a checkpoint into them (`restore_state`).

    model, fns = setup(experiment, seq_len, mesh)
    fns["init"], fns["train_step"], fns["eval_step"], fns["abstract_state"], ...
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from moe_jax.models import Transformer, stack
from moe_jax.parallel import expert_parallel, sharding
from moe_jax.train import evaluate, optim, placement
from moe_jax.train import inputs as train_input
from moe_jax.train.checkpoint import Checkpoints
from moe_jax.train.state import TrainState, init_train_state, logical_axes
from moe_jax.train.step import make_train_step


def _jit_functions(model: Transformer, experiment: Any, seq_len: int, mesh: Mesh,
                   rules: sharding.Rules) -> dict[str, Any]:
    """The jitted init, train and eval functions with their shardings on `mesh`: the one place
    that decides device placement.

    init(seed) creates the state directly sharded (out_shardings; no full copy on the host).
    The init traces the model on one dummy row, so it uses the model without its MoE sharding
    (the parameters are the same). train_step(state, batch) and eval_step(params, model_state,
    batch, batch_index) take global batches (`batch_sharding`) and return replicated metrics.
    """
    train = experiment.train
    optimizer = optim.make_optimizer(train)
    plain = model.clone(moe_sharding=None)

    def init(seed: jax.Array) -> TrainState:
        return init_train_state(jax.random.key(seed), plain, optimizer, seq_len=seq_len)

    abstract = jax.eval_shape(init, 0)
    shardings = placement.state_shardings(abstract, logical_axes(plain, seq_len), mesh, rules)
    batch = placement.batch_sharding(mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    objective = {"objective_name": train.objective, "mask_rate": train.mask_rate}
    train_step = make_train_step(model, optimizer, experiment.model, experiment.moe,
                                 grad_accum_steps=train.grad_accum_steps,
                                 schedule=optim.learning_rate_schedule(train), **objective)
    eval_step = evaluate.make_eval_step(model, experiment.model, experiment.moe,
                                        num_domains=len(train_input.domain_names(experiment.data)),
                                        seed=experiment.seed, **objective)
    return {
        "init": jax.jit(init, out_shardings=shardings),
        "abstract_state": placement.with_shardings(abstract, shardings),
        "state_shardings": shardings,
        "batch_sharding": batch,
        "abstract_batch": train_input.abstract_batch(train.batch_size, seq_len, batch),
        "train_step": jax.jit(placement.in_mesh_context(train_step, mesh, rules),
                              in_shardings=(shardings, batch),
                              out_shardings=(shardings, replicated), donate_argnums=0),
        "eval_step": jax.jit(placement.in_mesh_context(eval_step, mesh, rules),
                             in_shardings=(shardings.params, shardings.model_state, batch,
                                           replicated),
                             out_shardings=replicated),
    }


def setup(experiment: Any, seq_len: int, mesh: Mesh | None = None
          ) -> tuple[Transformer, dict[str, Any]]:
    """(model, jitted functions) of `experiment` on `mesh` (default: `experiment.mesh`'s),
    after checking that the experiment splits over the mesh."""
    if mesh is None:
        mesh = sharding.make_mesh(experiment.mesh)
    rules = experiment.mesh.logical_rules()
    placement.check_experiment(mesh, experiment, rules)
    moe_sharding = expert_parallel.MoeSharding.from_rules(mesh, experiment.mesh.expert_parallel,
                                                          rules)
    model = Transformer(experiment.model, experiment.moe, moe_sharding=moe_sharding)
    return model, _jit_functions(model, experiment, seq_len, mesh, rules)


def restore_state(checkpoints: Checkpoints, step: int, experiment: Any, seq_len: int,
                  fns: dict[str, Any]) -> tuple[TrainState, dict[str, Any]]:
    """(state, host state) of checkpoint `step`, sharded as `fns` (from `setup`) say. A
    checkpoint of the other block layout (`model.scan_layers`) is read in its own layout and
    converted (`models.stack.convert_layout`)."""
    try:
        saved_scanned = stack.SCAN_NAME in checkpoints.saved_state_tree(step)["params"]
    except Exception:  # unreadable: the restore below raises CheckpointError naming it
        saved_scanned = experiment.model.scan_layers
    if saved_scanned == experiment.model.scan_layers:
        return checkpoints.restore(step, fns["abstract_state"])
    saved = dataclasses.replace(experiment,
                                model=experiment.model.replace(scan_layers=saved_scanned))
    _, saved_fns = setup(saved, seq_len, fns["batch_sharding"].mesh)
    state, host = checkpoints.restore(step, saved_fns["abstract_state"])
    convert = functools.partial(stack.convert_layout, config=experiment.model,
                                scanned=experiment.model.scan_layers)
    return jax.jit(convert, out_shardings=fns["state_shardings"])(state), host
