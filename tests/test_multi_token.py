"""Multi-token prediction (DeepSeek-V3 Sec. 2.2): the shifted targets of packed rows by hand,
the parameter count, weight 0 equals training without MTP, and the MTP loss trains."""

from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moe_jax import interop, schema
from moe_jax.analysis import flops
from moe_jax.models import Transformer
from moe_jax.models.multi_token import mtp_targets, shifted_tokens
from moe_jax.train import objective, step
from moe_jax.train.state import init_train_state

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "hf", "deepseek_v3")


def test_targets_shift_within_each_packed_sequence():
    targets = jnp.asarray([[11, 12, 13, 21, 22, 23]])
    weights = jnp.ones((1, 6))
    segments = jnp.asarray([[1, 1, 1, 2, 2, 2]])
    np.testing.assert_array_equal(shifted_tokens(targets, 1), [[12, 13, 21, 22, 23, 0]])
    # module 1 at position i predicts target i + 1; positions 2 (its target 21 starts the
    # next sequence) and 5 (none left) get no weight
    shifted, w = mtp_targets(targets, weights, segments, 1)
    np.testing.assert_array_equal(shifted, [[12, 13, 21, 22, 23, 0]])
    np.testing.assert_array_equal(w, [[1, 1, 0, 1, 1, 0]])
    _, w2 = mtp_targets(targets, weights, segments, 2)
    np.testing.assert_array_equal(w2, [[1, 0, 0, 1, 0, 0]])
    batch = {"targets": targets, "weights": weights, "segment_ids": segments}
    uniform = jnp.zeros((2, 1, 6, 30))  # D = 2 modules, uniform over 30 tokens
    np.testing.assert_allclose(objective.mtp_loss(uniform, batch), math.log(30), rtol=1e-6)


@functools.cache
def _experiment(depth: int, weight: float):
    config = interop.load(FIXTURE).config
    config.model.mtp_depth, config.model.mtp_loss_weight = depth, weight
    return schema.parse_config(config)


def _batch() -> dict[str, jax.Array]:
    tokens = jax.random.randint(jax.random.key(1), (2, 17), 3, 300)
    segments = jnp.asarray([[1] * 16, [1] * 8 + [2] * 8])
    positions = jnp.asarray([list(range(16)), list(range(8)) * 2])
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": jnp.ones((2, 16)),
            "segment_ids": segments, "positions": positions}


def _step(depth: int, weight: float, optimizer: optax.GradientTransformation):
    experiment = _experiment(depth, weight)
    model = Transformer(experiment.model, experiment.moe)
    return model, jax.jit(step.make_train_step(model, optimizer, experiment.model,
                                               experiment.moe))


def test_mtp_parameters_are_counted():
    experiment = _experiment(1, 0.3)
    model = Transformer(experiment.model, experiment.moe)
    shapes = jax.eval_shape(lambda: model.init({"params": jax.random.key(0)},
                                               jnp.zeros((1, 8), jnp.int32), train=False))
    count = flops.count_model(experiment.model, experiment.moe)
    assert count.total_params == sum(int(np.prod(x.shape)) for x in jax.tree.leaves(
        shapes["params"]))
    assert "mtp" in shapes["params"]


@pytest.mark.slow
def test_weight_zero_equals_training_without_mtp():
    sgd = optax.sgd(0.5)
    model, with_mtp = _step(1, 0.0, sgd)
    state = init_train_state(jax.random.key(0), model, sgd, seq_len=16)
    _, without = _step(0, 0.3, sgd)
    params = {k: v for k, v in state.params.items() if k != "mtp"}
    plain = state.replace(params=params, opt_state=sgd.init(params))
    batch = _batch()
    new, metrics = with_mtp(state, batch)
    new_plain, plain_metrics = without(plain, batch)
    np.testing.assert_allclose(metrics["loss"], plain_metrics["loss"], rtol=1e-6)
    assert metrics["mtp_cross_entropy"] > 0 and "mtp_cross_entropy" not in plain_metrics
    for name, value in new_plain.params.items():
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                     new.params[name], value)


@pytest.mark.slow
def test_the_mtp_loss_trains():
    adam = optax.adam(1e-2)
    model, train_step = _step(1, 0.3, adam)
    state = init_train_state(jax.random.key(0), model, adam, seq_len=16)
    batch = _batch()
    first = None
    for _ in range(30):
        state, metrics = train_step(state, batch)
        first = first if first is not None else float(metrics["mtp_cross_entropy"])
    assert float(metrics["mtp_cross_entropy"]) < 0.5 * first
    np.testing.assert_allclose(metrics["loss"], metrics["cross_entropy"]
                               + 0.3 * metrics["mtp_cross_entropy"], rtol=1e-5)
