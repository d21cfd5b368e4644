"""Transformer models and the objective: shapes, causality, packing, aux losses in the loss."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import MoeConfig
from moe_jax.models import ModelConfig, Transformer
from moe_jax.train import objective

B, L = 2, 16
TINY = ModelConfig(vocab_size=259, vocab_multiple=128, d_model=32, num_layers=2, num_heads=4,
                   d_ff=64, max_seq_len=L)
MOE = MoeConfig(num_experts=4, d_ff=32, top_k=1)
SPARSE = TINY.replace(moe_every=1)
ROOMY = MOE.replace(capacity_factor=4.0)  # nothing drops


# Routing settings that do not change the parameters: variables are shared across them, so
# each test config costs one compile of the forward pass and no new init.
_ROUTING_DEFAULTS = dict(top_k=1, capacity_factor=1.25, drop_priority="rank", group_size=None,
                         dispatch="gather", renormalize_gates=False, allow_non_causal=False)


def _variables(model_cfg: ModelConfig, moe_cfg: MoeConfig):
    model_cfg = model_cfg.replace(causal=True, dtype="float32")
    if not model_cfg.sparse_layers:
        moe_cfg = MOE
    elif moe_cfg.router in ("top_k", "expert_choice"):
        moe_cfg = moe_cfg.replace(router="top_k", **_ROUTING_DEFAULTS)
    return _init(model_cfg, moe_cfg)


@functools.cache
def _init(model_cfg: ModelConfig, moe_cfg: MoeConfig):
    """Variables drawn on the host with the model's shapes and logical-axis boxes.

    Compiling `model.init` costs ~0.3 s per parameter on CPU (one threefry program per shape),
    so these tests use host-side values: norm scales 1, biases 0, embeddings N(0, 1), other
    kernels N(0, 0.2^2). The initializers themselves are traced by `_trace` below.
    """
    model = Transformer(model_cfg, moe_cfg)
    shapes = jax.eval_shape(lambda: model.init({"params": jax.random.key(0)},
                                               jnp.ones((B, L), jnp.int32), train=False))
    rng = np.random.default_rng(0)

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            return jnp.ones(leaf.shape, leaf.dtype)
        if "bias" in name:
            return jnp.zeros(leaf.shape, leaf.dtype)
        std = 1.0 if "embedding" in name else 0.2
        return jnp.asarray(rng.normal(0.0, std, leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


@functools.cache
def _model(model_cfg: ModelConfig, moe_cfg: MoeConfig):
    """(variables, jitted apply(variables, inputs, segment_ids, positions)) for a config pair."""
    model = Transformer(model_cfg, moe_cfg)

    @jax.jit
    def apply(variables, inputs, segment_ids, positions):
        return model.apply(variables, inputs, segment_ids=segment_ids, positions=positions,
                           train=True, rngs={"dropout": jax.random.key(1),
                                             "router": jax.random.key(2)})

    return _variables(model_cfg, moe_cfg), apply


def _tokens(seed: int = 0) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), (B, L), 3, 259, jnp.int32)


def _run(model_cfg, moe_cfg, inputs, segment_ids=None, positions=None):
    variables, apply = _model(model_cfg, moe_cfg)
    segment_ids = jnp.ones((B, L), jnp.int32) if segment_ids is None else segment_ids
    positions = jnp.broadcast_to(jnp.arange(L), (B, L)) if positions is None else positions
    return apply(variables, inputs, segment_ids, positions)


def test_sparse_layer_selection():
    assert ModelConfig(num_layers=6, moe_every=2).sparse_layers == (1, 3, 5)
    assert ModelConfig(num_layers=3, moe_every=1).sparse_layers == (0, 1, 2)
    assert ModelConfig(num_layers=4).sparse_layers == ()
    assert ModelConfig(num_layers=4, moe_every=2, moe_layers=(3, 0)).sparse_layers == (0, 3)
    with pytest.raises(ValueError, match="moe_layers"):
        ModelConfig(num_layers=4, moe_layers=(4,))


def test_forward_shapes_and_aux_stacking():
    logits, aux = _run(TINY, MOE, _tokens())
    assert logits.shape == (B, L, 259) and logits.dtype == jnp.float32
    assert aux == {}
    logits, aux = _run(SPARSE, ROOMY, _tokens())
    assert logits.shape == (B, L, 259)
    assert aux["load_balancing_loss"].shape == (2,)
    assert aux["expert_load"].shape == (2, 4)
    assert np.all(np.isfinite(logits))


def _leaks(model_cfg, moe_cfg, position: int, replacements=(5, 77, 200)) -> bool:
    """Whether changing token `position` of row 0 changes row 0's logits before it."""
    inputs = _tokens(1)
    base, _ = _run(model_cfg, moe_cfg, inputs)
    for token in replacements:
        changed, _ = _run(model_cfg, moe_cfg, inputs.at[0, position].set(token))
        if not np.allclose(base[0, :position], changed[0, :position], atol=1e-6):
            return True
    return False


# Causality of the MoE layer. A capacity-limited token-choice router couples the tokens of a
# routing group (here the whole batch). With top-1 and "rank" priority, slots go in token order,
# so token t's drop depends only on tokens <= t: causal even with drops. With top-2 and "rank",
# every first choice precedes every second choice, so a later token's first choice can take
# the slot an earlier token's second choice wanted; with "batch_priority" a later token with a
# higher gate goes first: both leak when something drops. A routing group of one token
# (group_size=1) makes any token-choice router causal. Across the rows of one group, capacity
# couples examples too (row b's drops depend on rows < b for top-1/rank); only within a row is
# it causal.
@pytest.mark.parametrize("moe_cfg", [
    None,  # dense
    MOE.replace(capacity_factor=0.5, drop_priority="rank"),
    MOE.replace(top_k=2, capacity_factor=0.5, drop_priority="batch_priority", group_size=1),
    MOE.replace(top_k=2, renormalize_gates=True, dispatch="dropless"),
], ids=["dense", "top1_rank_drops", "top2_bpr_per_token_groups", "top2_dropless"])
def test_causal(moe_cfg):
    model_cfg = TINY if moe_cfg is None else TINY.replace(moe_every=1)
    moe_cfg = moe_cfg or MOE
    _, aux = _run(model_cfg, moe_cfg, _tokens(1))
    if moe_cfg.capacity_factor == 0.5 and moe_cfg.group_size is None:
        assert float(jnp.min(aux["dropped_fraction"])) > 0.1  # the drops are real
    for position in (3, 9, L - 1):
        assert not _leaks(model_cfg, moe_cfg, position), position


@pytest.mark.parametrize("moe_cfg", [
    MOE.replace(top_k=2, capacity_factor=0.5, drop_priority="rank"),
    MOE.replace(capacity_factor=0.5, drop_priority="batch_priority"),
], ids=["top2_rank_drops", "top1_bpr_drops"])
def test_capacity_drops_can_leak_the_future(moe_cfg):
    """Pins the caveat above: these settings are not causal (the test must see a leak)."""
    model_cfg = TINY.replace(moe_every=1)
    assert any(_leaks(model_cfg, moe_cfg, p) for p in (8, 12, L - 1))


def _trace(model_cfg: ModelConfig, moe_cfg: MoeConfig):
    """Shapes of (variables, (logits, aux)) without compiling: runs all the model's checks."""
    model = Transformer(model_cfg, moe_cfg)

    def init_and_apply():
        variables = model.init({"params": jax.random.key(0)}, _tokens(), train=False)
        return variables, model.apply(variables, _tokens(), train=False)

    return jax.eval_shape(init_and_apply)


def test_causal_lm_refuses_token_mixing_routers_and_encoder_accepts_them():
    for router in ("expert_choice", "soft"):
        moe_cfg = MOE.replace(router=router, dispatch="einsum", capacity_factor=2.0)
        with pytest.raises(ValueError, match="allow_non_causal"):
            _trace(TINY.replace(moe_every=2), moe_cfg)
        _, (logits, aux) = _trace(TINY.replace(moe_every=2, causal=False), moe_cfg)
        assert logits.shape == (B, L, 259) and aux["expert_load"].shape == (1, 4)
        # The explicit opt-in is honoured by the causal LM.
        _trace(TINY.replace(moe_every=2), moe_cfg.replace(allow_non_causal=True))


def test_packed_rows_match_separate_rows():
    """Two sequences packed in row 0 (positions restart) give the logits they get alone."""
    a, b = _tokens(3)[0, :6], _tokens(4)[0, :10]
    packed = jnp.stack([jnp.concatenate([a, b]), jnp.zeros(L, jnp.int32)])
    segments = jnp.stack([jnp.array([1] * 6 + [2] * 10), jnp.zeros(L, jnp.int32)])
    positions = jnp.stack([jnp.concatenate([jnp.arange(6), jnp.arange(10)]),
                           jnp.zeros(L, jnp.int32)])
    alone = jnp.stack([jnp.concatenate([b, jnp.zeros(6, jnp.int32)]),
                       jnp.concatenate([a, jnp.zeros(10, jnp.int32)])])
    for model_cfg in (TINY, TINY.replace(causal=False)):
        got, _ = _run(model_cfg, MOE, packed, segments, positions)
        ref_segments = jnp.stack([jnp.array([1] * 10 + [0] * 6), jnp.array([1] * 6 + [0] * 10)])
        ref, _ = _run(model_cfg, MOE, alone, ref_segments)
        np.testing.assert_allclose(got[0, 6:], ref[0, :10], atol=2e-5)
        np.testing.assert_allclose(got[0, :6], ref[1, :6], atol=2e-5)


def test_logical_axes_on_every_param():
    model_cfg = TINY.replace(moe_every=2, tie_embeddings=False, qkv_bias=True,
                             positions="learned", norm="layernorm")
    variables, _ = _trace(model_cfg, MOE.replace(num_shared_experts=1))
    leaves = jax.tree.leaves(variables["params"],
                             is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    allowed = {None, "embed", "mlp", "heads", "kv_heads", "kv", "vocab", "expert"}
    for leaf in leaves:
        assert isinstance(leaf, nn.LogicallyPartitioned), leaf
        assert len(leaf.names) == len(leaf.value.shape) and set(leaf.names) <= allowed, leaf.names


def test_bfloat16_activations_float32_params():
    ref, _ = _run(SPARSE, ROOMY, _tokens())
    variables, apply = _model(SPARSE.replace(dtype="bfloat16"), ROOMY)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nn.unbox(variables)))
    got, aux = apply(variables, _tokens(), jnp.ones((B, L), jnp.int32),
                     jnp.broadcast_to(jnp.arange(L), (B, L)))
    assert got.dtype == jnp.float32 and aux["router_z_loss"].dtype == jnp.float32
    assert float(jnp.mean(jnp.abs(got - ref))) < 0.05 * float(jnp.mean(jnp.abs(ref)))


def _batch(inputs):
    return {"inputs": inputs, "targets": jnp.roll(inputs, -1, axis=1),
            "weights": jnp.ones((B, L), jnp.float32), "segment_ids": jnp.ones((B, L), jnp.int32),
            "positions": jnp.broadcast_to(jnp.arange(L), (B, L)),
            "target_bytes": jnp.ones((B, L), jnp.float32)}


def test_aux_losses_reach_the_training_loss_and_the_router_gradient():
    variables, apply = _model(SPARSE, ROOMY)
    batch = _batch(_tokens())
    coefs = ROOMY.replace(load_balance_coef=0.5, z_loss_coef=0.25)

    def terms(params):
        """[loss, cross_entropy, sum of lb, sum of z] for the batch."""
        logits, aux = apply({"params": params}, batch["inputs"], batch["segment_ids"],
                            batch["positions"])
        loss, m = objective.compute_loss(logits, batch, aux, coefs)
        return jnp.stack([loss, m["cross_entropy"], jnp.sum(aux["load_balancing_loss"]),
                          jnp.sum(aux["router_z_loss"])])

    @jax.jit
    def values_and_grads(params):  # one batched backward pass for the four terms
        values, vjp = jax.vjp(terms, params)
        return values, jax.vmap(vjp)(jnp.eye(4))[0]

    values, grads = values_and_grads(variables["params"])
    loss, ce, lb, z = (float(v) for v in values)
    np.testing.assert_allclose(loss, ce + 0.5 * lb + 0.25 * z, rtol=1e-6)
    assert lb >= 2 * 0.99  # two sparse layers, each >= ~1 (1 = perfectly balanced)
    router = nn.unbox(grads)["block_0"]["moe"]["router"]["kernel"]  # [4 terms, d, E]
    np.testing.assert_allclose(router[0], router[1] + 0.5 * router[2] + 0.25 * router[3],
                               atol=1e-6)
    assert float(jnp.max(jnp.abs(router[2]))) > 0 and float(jnp.max(jnp.abs(router[3]))) > 0


def test_metrics_cross_entropy_accuracy_and_bits_per_byte():
    logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]]))
    batch = {"targets": jnp.array([[0, 2]]), "weights": jnp.array([[1.0, 1.0]]),
             "target_bytes": jnp.array([[1.0, 3.0]])}
    loss, m = jax.jit(objective.compute_loss, static_argnums=3)(logits, batch, {}, MOE)
    nll = -np.log(0.5) - np.log(0.1)
    np.testing.assert_allclose(m["cross_entropy"], nll / 2, rtol=1e-6)
    np.testing.assert_allclose(loss, nll / 2, rtol=1e-6)
    np.testing.assert_allclose(m["accuracy"], 0.5)
    np.testing.assert_allclose(m["bits_per_byte"], nll / np.log(2) / 4, rtol=1e-6)


def test_mask_for_mlm():
    inputs = jax.random.randint(jax.random.key(0), (8, 64), 3, 259, jnp.int32)
    segments = jnp.ones((8, 64), jnp.int32).at[:, 48:].set(0)
    batch = {"inputs": inputs, "targets": inputs, "weights": jnp.ones((8, 64)),
             "segment_ids": segments, "target_bytes": jnp.ones((8, 64))}
    mask = jax.jit(functools.partial(objective.mask_for_mlm, mask_id=259, vocab_size=259))
    out = mask(jax.random.key(1), batch)
    selected = out["weights"] > 0
    assert "target_bytes" not in out
    assert not bool(jnp.any(selected & (segments == 0)))
    assert 0.08 < float(jnp.mean(selected[:, :48])) < 0.22
    np.testing.assert_array_equal(out["targets"], inputs)
    np.testing.assert_array_equal(out["inputs"][~selected], inputs[~selected])
    masked = out["inputs"][selected] == 259
    assert 0.6 < float(jnp.mean(masked)) < 0.95
    with pytest.raises(ValueError, match="mask_rate"):
        objective.mask_for_mlm(jax.random.key(1), batch, mask_id=259, vocab_size=259,
                               mask_rate=0.0)


def test_bad_model_configs():
    with pytest.raises(ValueError, match="num_kv_heads"):
        ModelConfig(num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match=r"ModelConfig\.norm="):
        ModelConfig(norm="batchnorm")
    with pytest.raises(ValueError, match="even head dimension"):
        ModelConfig(d_model=36, num_heads=4)
    model = Transformer(TINY.replace(positions="learned"), MOE)
    with pytest.raises(ValueError, match="max_seq_len"):
        jax.eval_shape(lambda: model.init({"params": jax.random.key(0)},
                                          jnp.ones((1, L + 1), jnp.int32), train=False))

