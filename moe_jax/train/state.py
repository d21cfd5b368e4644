"""The train state: one pytree holding everything a resumed run needs besides the data order.

    state = init_train_state(key, model, optimizer, seq_len=128)
    state.params       the "params" collection (the only thing the optimiser updates)
    state.model_state  the other variable collections, e.g. {"moe_state": {...: {"score_bias"}}}
    state.opt_state    optax state of `state.params`
    state.step         int32 [], the number of optimiser steps taken
    state.rng          uint32 [2] raw key data; step s uses fold_in(rng, s), so a resumed run
                       draws the same randomness as an uninterrupted one

Parameters are stored unboxed (plain arrays); `logical_axes` recovers the models' logical axis
names (LogicallyPartitioned metadata) for the sharding code.
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

Array = jax.Array
PyTree = Any


@flax.struct.dataclass
class TrainState:
    step: Array
    params: PyTree
    opt_state: optax.OptState
    model_state: dict[str, PyTree]
    rng: Array

    def step_key(self) -> Array:
        """The typed PRNG key of the current step: fold_in(rng, step)."""
        return jax.random.fold_in(jax.random.wrap_key_data(self.rng), self.step)


def _init_variables(model: nn.Module, key: Array, seq_len: int) -> dict[str, PyTree]:
    inputs = jnp.zeros((1, seq_len), jnp.int32)
    return model.init({"params": key}, inputs, train=False)


def init_train_state(key: Array, model: nn.Module, optimizer: optax.GradientTransformation, *,
                     seq_len: int) -> TrainState:
    """A fresh state: parameters from `key`, the step-randomness key from `key` too (split).

    key: a typed PRNG key (`jax.random.key(seed)`). jit-friendly: wrap in `jax.jit` (with
    out_shardings for a mesh) to create the state directly on the devices.
    """
    k_params, k_train = jax.random.split(key)
    variables = nn.meta.unbox(_init_variables(model, k_params, seq_len))
    params = variables["params"]
    model_state = {name: value for name, value in variables.items() if name != "params"}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params), model_state=model_state,
                      rng=jax.random.key_data(k_train))


def logical_axes(model: nn.Module, seq_len: int) -> PyTree:
    """PartitionSpecs of logical axis names for every variable collection (no arrays built)."""
    abstract = jax.eval_shape(lambda k: _init_variables(model, k, seq_len), jax.random.key(0))
    return nn.get_partition_spec(abstract)


def num_params(params: PyTree) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(params))
