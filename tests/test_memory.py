"""The memory planner: its byte counts equal the bytes of the Flax parameters, the AdamW state and
the decoding cache of small configs, and its per-device figures equal the shards of the arrays
laid out on 8 simulated devices."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moe_jax import schema
from moe_jax.analysis import memory
from moe_jax.models import Transformer, decode
from moe_jax.parallel import sharding
from moe_jax.train import placement
from moe_jax.train.state import init_train_state, logical_axes


def small(spec: str, **model: object) -> schema.Experiment:
    """A config file's experiment at a few thousand parameters (its structure kept)."""
    config = schema.load_config(spec)
    config.model.update(dict(d_model=16, num_heads=4, d_ff=32, max_seq_len=16, **model))
    config.moe.d_ff = 8
    return schema.parse_config(config)


EXPERIMENTS = {
    "switch": small("configs/switch.py:e8", num_layers=2),
    "fine_grained": small("configs/fine_grained.py:e62k6s2", num_layers=2, moe_layers=(1,),
                          num_kv_heads=2, qkv_bias=True),
    "learned_tied": small("configs/dense.py:tiny", num_layers=1, positions="learned",
                          tie_embeddings=True, norm="layernorm"),
}


def nbytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_byte_counts_equal_the_flax_parameters_and_adamw_state(name):
    experiment = EXPERIMENTS[name]
    plan = memory.plan(experiment)
    model = Transformer(experiment.model, experiment.moe)
    params = model.init({"params": jax.random.key(0)}, jnp.zeros((1, 4), jnp.int32),
                        train=False)["params"]
    params = jax.tree.map(lambda x: x.unbox() if hasattr(x, "unbox") else x, params,
                          is_leaf=lambda x: hasattr(x, "unbox"))
    assert plan.weight_bytes["float32"] == nbytes(params)
    assert plan.weight_bytes["bfloat16"] == nbytes(jax.tree.map(
        lambda x: x.astype(jnp.bfloat16), params))
    assert plan.weight_bytes["int8"] == nbytes(jax.tree.map(lambda x: x.astype(jnp.int8), params))
    assert plan.weight_bytes["int4"] == plan.weight_bytes["int8"] / 2
    moments = [x for x in jax.tree.leaves(optax.adamw(1e-3).init(params)) if x.ndim]
    gradients = params
    assert plan.training_state_bytes == nbytes(params) + nbytes(gradients) + nbytes(moments)
    assert plan.per_device["weights"]["float32"] == nbytes(params)  # one device


def test_kv_cache_bytes_equal_the_decoding_cache():
    experiment = EXPERIMENTS["fine_grained"]  # grouped-query: 2 key/value heads of 4
    plan = memory.plan(experiment)
    model = decode.decoding_model(experiment.model, experiment.moe)
    variables = model.init({"params": jax.random.key(0)}, jnp.zeros((1, 4), jnp.int32),
                           train=False)
    cache = decode.init_cache(model, variables, 3, experiment.model.max_seq_len)
    keys_values = [v for path, v in jax.tree_util.tree_leaves_with_path(cache)
                   if jax.tree_util.keystr(path).endswith(("'key']", "'value']"))]
    assert nbytes(keys_values) == plan.kv_cache_per_token * 3 * experiment.model.max_seq_len


@pytest.mark.parametrize("sizes", [{"data": 2, "expert": 2, "model": 2}, {"expert": 8},
                                   {"data": 2, "model": 4}, {"fsdp": 2, "expert": 4}])
def test_per_device_bytes_equal_the_sharded_arrays_on_8_devices(sizes):
    experiment = EXPERIMENTS["switch"]
    sizes = {axis: sizes.get(axis, 1) for axis in sharding.MESH_AXES}
    mesh = sharding.make_mesh(sharding.MeshConfig(**sizes))
    rules = sharding.DEFAULT_RULES
    model = Transformer(experiment.model, experiment.moe)
    optimizer = optax.adamw(1e-3)

    def init(key):
        return init_train_state(key, model, optimizer, seq_len=4)

    abstract = jax.eval_shape(init, jax.random.key(0))
    shardings = placement.state_shardings(abstract, logical_axes(model, 4), mesh, rules)
    state = jax.jit(init, out_shardings=shardings)(jax.random.key(0))
    device = mesh.devices.flat[0]

    def on_device(tree) -> int:
        return sum(s.data.nbytes for x in jax.tree.leaves(tree) if x.ndim
                   for s in x.addressable_shards if s.device == device)

    plan = memory.plan(experiment, sizes)
    local = on_device(state.params)
    assert plan.per_device["weights"]["float32"] == local
    assert plan.per_device["training_state"] == 2 * local + on_device(state.opt_state)
    assert local < plan.weight_bytes["float32"]  # every mesh here shards something


def test_fsdp_divides_parameters_and_optimizer_state():
    experiment = EXPERIMENTS["switch"]
    one = memory.plan(experiment, {"expert": 2})
    four = memory.plan(experiment, {"expert": 2, "fsdp": 4})
    assert four.per_device["params_per_device"] == -(-one.per_device["params_per_device"] // 4)
    assert four.per_device["training_state"] == pytest.approx(
        one.per_device["training_state"] / 4, rel=1e-3)
    with pytest.raises(ValueError, match="positive shard count"):
        memory.plan(experiment, {"expert": 0})
    with pytest.raises(ValueError, match="not mesh axes"):
        memory.plan(experiment, {"experts": 8})
    with pytest.raises(ValueError, match="axis=size"):
        memory.parse_axis_sizes("expert=two")


def test_mixtral_headline_numbers():
    """Mixtral-8x7B: ~93 GB of bfloat16 weights to serve ~12.9B active parameters per token."""
    plan = memory.plan(schema.load_config("configs/published/mixtral_8x7b.py"), {"expert": 8})
    assert plan.weight_bytes["bfloat16"] == pytest.approx(93.4e9, rel=2e-3)
    assert plan.active_params == pytest.approx(12.9e9, rel=5e-3)
    # KV cache: 32 layers x 8 key/value heads x 128 x (key + value) x 2 bytes = 128 KiB/token.
    assert memory.kv_cache_bytes_per_token(schema.parse_config(schema.load_config(
        "configs/published/mixtral_8x7b.py")), dtype="bfloat16") == 131072
    # 8-way expert parallelism: each device holds one expert per layer plus the rest.
    assert plan.per_device["params_per_device"] == pytest.approx(
        plan.total_params - 32 * 7 / 8 * 8 * 3 * 4096 * 14336, rel=1e-9)
    np.testing.assert_allclose(plan.per_device["weights"]["bfloat16"],
                               plan.per_device["params_per_device"] * 2)
