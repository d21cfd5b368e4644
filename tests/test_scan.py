"""Scanned layers and remat (`moe_jax.models.stack`).

The scanned model (the repeating unit of blocks under `nn.scan`, parameters stacked along
"layers") computes the unrolled model's logits, aux statistics and gradients, trains the same
(router bias state and weight decay included), and a checkpoint of either layout restores into
the other; every remat policy gives the same gradients.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from multihost_worker import CONFIG, SETTINGS

from moe_jax import schema
from moe_jax.config import MoeConfig
from moe_jax.models import ModelConfig, Transformer, stack
from moe_jax.train import evaluate, jitted, objective, optim
from moe_jax.train.checkpoint import Checkpoints
from moe_jax.train.config import TrainConfig
from moe_jax.train.state import TrainState
from moe_jax.train.step import make_train_step

MODEL = ModelConfig(vocab_size=64, vocab_multiple=64, d_model=32, num_layers=4, num_heads=2,
                    d_ff=64, max_seq_len=16)
MOE = MoeConfig(num_experts=4, top_k=2, d_ff=32, group_size=16, capacity_factor=1.0)
CASES = {  # (model, moe): dense; every other block sparse; a dense block, then all sparse
    "dense": (MODEL, MOE),
    "every_other": (MODEL.replace(moe_every=2), MOE),
    "dense_first": (MODEL.replace(moe_layers=(1, 2, 3)),
                    MOE.replace(router="sigmoid_bias", top_k=1, bias_update_rate=0.01)),
}


def make_batch(rows: int = 4) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    inputs = rng.integers(1, 64, (rows, 16)).astype(np.int32)
    ones = np.ones((rows, 16), np.float32)
    return {"inputs": inputs, "targets": np.roll(inputs, -1, 1), "weights": ones,
            "segment_ids": ones.astype(np.int32),
            "positions": np.broadcast_to(np.arange(16, dtype=np.int32), (rows, 16)),
            "domains": np.zeros((rows, 16), np.int32), "target_bytes": ones}


BATCH = make_batch()


def scanned(model: ModelConfig) -> ModelConfig:
    return model.replace(scan_layers=True)


@functools.cache
def unrolled_variables(case: str) -> dict:
    model, moe = CASES[case]
    init = jax.jit(lambda key: Transformer(model, moe).init({"params": key}, BATCH["inputs"],
                                                            train=False))
    return nn.meta.unbox(init(jax.random.key(0)))


def loss_and_grads(model: ModelConfig, moe: MoeConfig):
    net = Transformer(model, moe)

    def loss(params, variables):
        logits, aux = net.apply({**variables, "params": params}, BATCH["inputs"], train=True)
        return objective.compute_loss(logits, BATCH, aux, moe)

    return jax.jit(jax.value_and_grad(loss, has_aux=True))


def assert_trees_close(actual, expected, rtol=1e-5):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, e, rtol=rtol, atol=rtol * float(np.max(np.abs(e)) + 1e-30))


def test_scan_plan_finds_the_repeating_unit():
    plan = stack.scan_plan
    assert plan(MODEL.replace(num_layers=24, moe_every=2)) == stack.ScanPlan(0, (False, True), 12)
    assert plan(MODEL.replace(num_layers=28, moe_layers=tuple(range(1, 28)))) == \
        stack.ScanPlan(1, (True,), 27)  # DeepSeekMoE-16B: block 0 dense, unrolled
    assert plan(MODEL.replace(moe_every=1)) == stack.ScanPlan(0, (True,), 4)
    assert plan(MODEL.replace(num_layers=6, moe_every=3)) == \
        stack.ScanPlan(0, (False, False, True), 2)
    assert plan(MODEL.replace(num_layers=10, moe_layers=(3, 7))) == \
        stack.ScanPlan(2, (False, True, False, False), 2)
    # Sparse blocks that never repeat: every block unrolled.
    assert plan(MODEL.replace(num_layers=8, moe_layers=(1, 2, 6))) == stack.ScanPlan(8, (), 0)


def test_layouts_convert_both_ways_with_the_layers_axis_first():
    model, moe = CASES["every_other"]
    variables = unrolled_variables("every_other")
    converted = stack.convert_layout(variables, model, scanned=True)
    boxed = jax.eval_shape(lambda key: Transformer(scanned(model), moe).init(
        {"params": key}, BATCH["inputs"], train=False), jax.random.key(0))
    assert jax.tree.map(np.shape, converted) == jax.tree.map(np.shape, nn.meta.unbox(boxed))
    wi = converted["params"][stack.SCAN_NAME]["block_1"]["moe"]["experts"]["wi"]
    np.testing.assert_array_equal(wi[1], variables["params"]["block_3"]["moe"]["experts"]["wi"])
    spec = nn.get_partition_spec(boxed)["params"][stack.SCAN_NAME]["block_1"]["moe"]["experts"]
    assert spec["wi"] == jax.sharding.PartitionSpec("layers", "expert", "embed", "mlp")
    back = stack.convert_layout(converted, model, scanned=False)
    jax.tree.map(np.testing.assert_array_equal, back, variables)
    # Already in the target layout: unchanged.
    jax.tree.map(np.testing.assert_array_equal,
                 stack.convert_layout(variables, model, scanned=False), variables)


@pytest.mark.parametrize("case", CASES)
def test_scanned_model_equals_unrolled_values_and_gradients(case):
    model, moe = CASES[case]
    variables = unrolled_variables(case)
    (loss, metrics), grads = loss_and_grads(model, moe)(variables["params"], variables)
    stacked = stack.convert_layout(variables, model, scanned=True)
    (s_loss, s_metrics), s_grads = loss_and_grads(scanned(model), moe)(stacked["params"], stacked)
    np.testing.assert_allclose(s_loss, loss, rtol=1e-6)
    for name in metrics:  # aux statistics are stacked in block order in both layouts
        np.testing.assert_allclose(s_metrics[name], metrics[name], rtol=1e-5, atol=1e-7)
    assert_trees_close(stack.convert_layout(s_grads, model, scanned=False), grads, rtol=1e-4)


@pytest.mark.parametrize(("policy", "scan"), [("full", False), ("save_dots", True),
                                              pytest.param("full", True, marks=pytest.mark.slow),
                                              pytest.param("save_dots", False,
                                                           marks=pytest.mark.slow)])
def test_every_remat_policy_gives_the_same_gradients(policy, scan):
    model, moe = CASES["every_other"]
    model = model.replace(scan_layers=scan)
    variables = stack.convert_layout(unrolled_variables("every_other"), model, scanned=scan)
    (loss, _), grads = loss_and_grads(model, moe)(variables["params"], variables)
    (r_loss, _), r_grads = loss_and_grads(model.replace(remat_policy=policy), moe)(
        variables["params"], variables)
    np.testing.assert_allclose(r_loss, loss, rtol=1e-6)
    assert_trees_close(r_grads, grads, rtol=1e-5)


def test_scanned_training_and_evaluation_follow_the_unrolled_model():
    """Three AdamW steps with weight decay and the sigmoid_bias router's state updates, then
    an eval step whose per-domain routing sums read the sown routing of every MoE block."""
    model, moe = CASES["dense_first"]
    optimizer = optim.make_optimizer(TrainConfig(learning_rate=1e-2, warmup_steps=0,
                                                 num_train_steps=3, weight_decay=0.1))

    def run(config: ModelConfig):
        net = Transformer(config, moe)
        variables = stack.convert_layout(unrolled_variables("dense_first"), model,
                                         scanned=config.scan_layers)
        state = TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                                opt_state=optimizer.init(variables["params"]),
                                model_state={k: v for k, v in variables.items() if k != "params"},
                                rng=jax.random.key_data(jax.random.key(1)))
        step = jax.jit(make_train_step(net, optimizer, config, moe))
        losses = []
        for _ in range(3):
            state, metrics = step(state, BATCH)
            losses.append(float(metrics["loss"]))
        eval_step = jax.jit(evaluate.make_eval_step(net, config, moe, num_domains=2))
        return losses, state, eval_step(state.params, state.model_state, BATCH)

    losses, state, sums = run(model)
    s_losses, s_state, s_sums = run(scanned(model))
    np.testing.assert_allclose(s_losses, losses, rtol=1e-5)
    assert_trees_close(stack.convert_layout(s_state.params, model, scanned=False), state.params,
                       rtol=1e-4)
    bias = state.model_state["moe_state"]
    assert_trees_close(stack.convert_layout(s_state.model_state["moe_state"], model,
                                            scanned=False), bias)
    assert float(jnp.abs(bias["block_1"]["moe"]["score_bias"]).max()) > 0  # the bias moved
    assert_trees_close(s_sums, sums, rtol=1e-5)


def test_a_checkpoint_restores_into_the_other_layout(tmp_path):
    settings = {**SETTINGS, "model.num_layers": 4}
    unrolled = schema.parse_config(schema.override(schema.load_config(CONFIG), settings))
    stacked = schema.parse_config(schema.override(schema.load_config(CONFIG), {
        **settings, "model.scan_layers": True}))
    seq = unrolled.model.max_seq_len
    fns = jitted.setup(unrolled, seq)[1]
    state = fns["init"](unrolled.seed)
    checkpoints = Checkpoints(str(tmp_path), max_to_keep=1, async_save=False)
    try:
        checkpoints.save(1, state, {"data_iterator": {}})
        restored, _ = jitted.restore_state(checkpoints, 1, stacked, seq,
                                              jitted.setup(stacked, seq)[1])
    finally:
        checkpoints.close()
    assert stack.SCAN_NAME in restored.params
    back = stack.convert_layout(restored, unrolled.model, scanned=False)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 back, state)


def test_weight_decay_mask_ignores_the_stacked_dimension():
    model, _ = CASES["every_other"]
    params = stack.convert_layout(unrolled_variables("every_other"), model,
                                  scanned=True)["params"]
    mask = optim.weight_decay_mask(params)
    unit = mask[stack.SCAN_NAME]
    assert unit["block_0"]["ffn_norm"]["scale"] is False  # [R, d]: a vector per block
    assert unit["block_0"]["ffn"]["wi"] is True
