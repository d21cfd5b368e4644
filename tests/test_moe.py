"""The composed MoE layer: reference equality, invariants, gradients, transforms, bad input."""

import functools

import flax.linen as nn
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from moe_reference import reference_apply

from moe_jax import MoeConfig, experts, moe, routing
from moe_jax.layers import MoeLayer

D_MODEL, D_FF, E = 8, 16, 4
X = jax.random.normal(jax.random.key(1), (2, 8, D_MODEL))  # 16 tokens
BASE = MoeConfig(num_experts=E, top_k=1, d_ff=D_FF, group_size=8)


@functools.partial(jax.jit, static_argnames=("config", "train"))
def apply_jit(params, x, config, train=True, rng=None):
    return moe.apply(params, x, config, train=train, rng=rng)


@functools.cache
def params_for(config: MoeConfig):
    return moe.init_params(jax.random.key(0), config, D_MODEL)


CAPACITY_CASES = [
    (dispatch, k, factor, priority, renorm, act)
    for dispatch in ("gather", "einsum")
    for k in (1, 2)
    for factor, act in ((0.5, "relu"), (1.0, "gelu"), (2.0, "swiglu"))
    for priority, renorm in (("rank", False), ("batch_priority", True))
]


@pytest.mark.parametrize(("dispatch", "k", "factor", "priority", "renorm", "act"),
                         CAPACITY_CASES + [("dropless", k, 1.0, "rank", r, "swiglu")
                                           for k in (1, 2) for r in (False, True)])
def test_matches_float64_reference(dispatch, k, factor, priority, renorm, act):
    config = BASE.replace(top_k=k, capacity_factor=factor, drop_priority=priority,
                          renormalize_gates=renorm, activation=act, dispatch=dispatch)
    params = params_for(config)
    y, aux = apply_jit(params, X, config)
    y_ref, dropped_ref, load_ref = reference_apply(params, np.asarray(X), config, train=True)
    if factor == 0.5:
        assert dropped_ref > 0, "the low-capacity case must actually drop"
    np.testing.assert_allclose(y, y_ref, rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(aux["dropped_fraction"], dropped_ref, atol=1e-6)
    np.testing.assert_allclose(aux["expert_load"], load_ref, atol=1e-6)


def test_matches_reference_with_shared_experts_and_eval_capacity():
    config = BASE.replace(top_k=2, capacity_factor=0.5, eval_capacity_factor=1.5,
                          num_shared_experts=2, activation="swiglu")
    params = params_for(config)
    for train in (True, False):
        y, aux = apply_jit(params, X, config, train=train)
        y_ref, dropped_ref, _ = reference_apply(params, np.asarray(X), config, train=train)
        np.testing.assert_allclose(y, y_ref, rtol=2e-4, atol=2e-5)
        np.testing.assert_allclose(aux["dropped_fraction"], dropped_ref, atol=1e-6)


def _loss(params, x, config):
    y, aux = moe.apply(params, x, config, train=True)
    return jnp.sum(jnp.sin(y)) + aux["load_balancing_loss"] + aux["router_z_loss"]


@pytest.mark.parametrize(("k", "act"), [(1, "gelu"), (2, "swiglu")])
def test_dispatch_strategies_agree_in_values_and_gradients(k, act):
    # With a capacity of every token, nothing drops and all strategies compute the same function.
    configs = [BASE.replace(top_k=k, activation=act, dispatch=d, expert_capacity=8)
               for d in ("gather", "einsum", "dropless")]
    # "auto" is the BLAS custom call on CPU for float32; the XLA loop and ragged_dot as well.
    configs += [configs[-1].replace(grouped_matmul=g) for g in ("blocked", "ragged_dot")]
    params = params_for(configs[0])
    outs = [jax.jit(jax.value_and_grad(_loss, argnums=(0, 1)), static_argnums=2)(params, X, c)
            for c in configs]
    (value0, grads0) = outs[0]
    leaves0 = jax.tree.leaves(grads0)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves0)
    assert float(jnp.abs(grads0[0]["router"]["kernel"]).sum()) > 0, "router gets no gradient"
    for value, grads in outs[1:]:
        np.testing.assert_allclose(value, value0, rtol=1e-5)
        for g, g0 in zip(jax.tree.leaves(grads), leaves0):
            np.testing.assert_allclose(g, g0, rtol=1e-4, atol=1e-6)


def test_gather_and_einsum_gradients_agree_when_dropping():
    # Capacity 2 per expert for 16 top-2 assignments per group forces drops: dropped
    # assignments must get no gradient in either strategy.
    configs = [BASE.replace(top_k=2, capacity_factor=0.5, dispatch=d,
                            drop_priority="batch_priority") for d in ("gather", "einsum")]
    params = params_for(configs[0])
    (v0, g0), (v1, g1) = [
        jax.jit(jax.value_and_grad(_loss, argnums=(0, 1)), static_argnums=2)(params, X, c)
        for c in configs]
    np.testing.assert_allclose(v0, v1, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_one_expert_top1_equals_dense_ffn():
    config = MoeConfig(num_experts=1, top_k=1, d_ff=D_FF, capacity_factor=1.0,
                       activation="swiglu")
    params = moe.init_params(jax.random.key(3), config, D_MODEL)
    y, aux = moe.apply(params, X, config)
    dense = experts.ffn(jax.tree.map(lambda w: w[0], params["experts"]), X, "swiglu")
    np.testing.assert_allclose(y, dense, rtol=1e-5, atol=1e-6)
    assert float(aux["dropped_fraction"]) == 0.0
    np.testing.assert_allclose(aux["load_balancing_loss"], 1.0, rtol=1e-6)


def test_few_rows_matmul_equals_the_plain_matmul_in_values_and_gradients():
    a = jax.random.normal(jax.random.key(0), (3, 5, D_MODEL))  # [E, N, i]
    w = jax.random.normal(jax.random.key(1), (3, D_MODEL, D_FF))  # [E, i, o]
    g = jax.random.normal(jax.random.key(2), (3, 5, D_FF))

    def loss(matmul):
        return jax.jit(jax.value_and_grad(
            lambda a, w: jnp.vdot(jax.vmap(matmul)(a, w), g), argnums=(0, 1)))

    (v0, (da0, dw0)), (v1, (da1, dw1)) = loss(jnp.matmul)(a, w), loss(experts.few_rows_matmul)(a, w)
    np.testing.assert_allclose(v1, v0, rtol=1e-6)
    np.testing.assert_allclose(da1, da0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw1, dw0, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [experts.FEW_ROWS, experts.FEW_ROWS + 1])
def test_expert_ffn_takes_the_few_rows_matmul_up_to_few_rows_on_cpu_only(rows):
    """`few_rows_matmul`'s input gradient sits behind an optimization barrier on CPU; the
    program lowered for TPU or GPU has none."""
    params = experts.init_ffn(jax.random.key(0), 8, 16, "gelu", batch=(2,))
    x = jnp.ones((2, rows, 8))
    grad = jax.jit(jax.grad(lambda p, x: jnp.sum(experts.expert_ffn(p, x, "gelu") ** 2),
                            argnums=1)).trace(params, x)

    def barrier(platform: str) -> bool:
        return "optimization_barrier" in grad.lower(lowering_platforms=(platform,)).as_text()

    assert barrier("cpu") == (rows <= experts.FEW_ROWS)
    assert not barrier("tpu") and not barrier("cuda")


def test_expert_choice_matches_loop_reference():
    config = BASE.replace(router="expert_choice", top_k=1, capacity_factor=1.0)
    params = params_for(config)
    y, aux = apply_jit(params, X, config)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    tokens = np.asarray(X, np.float64).reshape(2, 8, D_MODEL)
    expected = np.zeros_like(tokens)
    capacity = config.capacity(8, train=True)  # ceil(8 / 4) = 2
    for g in range(2):
        logits = tokens[g] @ p["router"]["kernel"]
        probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
        for e in range(E):
            for t in np.argsort(-probs[:, e], kind="stable")[:capacity]:
                h = jax.nn.gelu(tokens[g, t] @ p["experts"]["wi"][e])
                expected[g, t] += probs[t, e] * np.asarray(h) @ p["experts"]["wo"][e]
    np.testing.assert_allclose(y, expected.reshape(X.shape), rtol=2e-4, atol=2e-5)
    assert float(aux["load_balancing_loss"]) == 0.0


def test_soft_moe_matches_formula():
    config = BASE.replace(router="soft", dispatch="einsum", slots_per_expert=2, group_size=None,
                          activation="relu")
    params = moe.init_params(jax.random.key(4), config, D_MODEL)
    assert params["router"]["kernel"].shape == (D_MODEL, E * 2)
    y, _ = moe.apply(params, X, config)
    tokens = X.reshape(-1, D_MODEL)
    logits = tokens @ params["router"]["kernel"]
    dispatch_w, combine_w = jax.nn.softmax(logits, 0), jax.nn.softmax(logits, 1)
    slots = dispatch_w.T @ tokens  # [S, d], slot s -> expert s // 2
    out = jnp.stack([experts.ffn(jax.tree.map(lambda w, s=s: w[s // 2], params["experts"]),
                                 slots[s], "relu") for s in range(E * 2)])
    np.testing.assert_allclose(y.reshape(-1, D_MODEL), combine_w @ out, rtol=1e-4, atol=1e-5)


def test_jit_and_vmap():
    params = params_for(BASE)
    xs = jnp.stack([X, 2 * X, -X])
    ys, aux = jax.jit(jax.vmap(lambda x: moe.apply(params, x, BASE)))(xs)
    assert ys.shape == xs.shape and aux["expert_load"].shape == (3, E)
    for i in range(3):
        np.testing.assert_allclose(ys[i], moe.apply(params, xs[i], BASE)[0], rtol=1e-5,
                                   atol=1e-6)


def test_bfloat16_activations_with_float32_router():
    config = BASE.replace(top_k=2, expert_capacity=16)
    params = params_for(config)
    y16, aux16 = apply_jit(params, X.astype(jnp.bfloat16), config)
    y32, _ = apply_jit(params, X, config)
    assert y16.dtype == jnp.bfloat16
    logits = moe.router_logits(params, X.astype(jnp.bfloat16).reshape(-1, D_MODEL), config,
                               train=False, rng=None)
    assert logits.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(y16.astype(jnp.float32))))
    np.testing.assert_allclose(y16.astype(jnp.float32), y32, rtol=0.05, atol=0.05)
    assert aux16["router_z_loss"].dtype == jnp.float32


def test_rng_only_matters_when_routing_is_random():
    params = params_for(BASE)
    y1, _ = apply_jit(params, X, BASE, rng=jax.random.key(1))
    y2, _ = apply_jit(params, X, BASE, rng=jax.random.key(2))
    np.testing.assert_array_equal(y1, y2)  # deterministic router ignores the rng
    jitter = BASE.replace(jitter_eps=0.2)
    j1, _ = apply_jit(params, X, jitter, rng=jax.random.key(1))
    j2, _ = apply_jit(params, X, jitter, rng=jax.random.key(2))
    assert not np.allclose(j1, j2)
    e1, _ = apply_jit(params, X, jitter, train=False)
    np.testing.assert_allclose(e1, apply_jit(params, X, BASE, train=False)[0], rtol=1e-6)
    with pytest.raises(ValueError, match="needs `rng`"):
        moe.apply(params, X, jitter, train=True)


def test_gshard_random_second_expert_drops_some_second_choices():
    config = BASE.replace(top_k=2, second_expert_policy="random", renormalize_gates=True,
                          expert_capacity=16)
    params = params_for(config)
    _, aux = apply_jit(params, X, config, rng=jax.random.key(0))
    assert 0 < float(aux["dropped_fraction"]) < 0.5
    _, aux_eval = apply_jit(params, X, config, train=False)
    assert float(aux_eval["dropped_fraction"]) == 0.0


@pytest.mark.parametrize(("changes", "message"), [
    ({"top_k": 5}, "top_k=5 is larger than num_experts=4"),
    ({"capacity_factor": 0.0}, "capacity_factor"),
    ({"capacity_factor": -1.0}, "capacity_factor"),
    ({"eval_capacity_factor": float("nan")}, "eval_capacity_factor"),
    ({"router": "hash"}, "router='hash'"),
    ({"dispatch": "sparse"}, "dispatch='sparse'"),
    ({"activation": "tanh"}, "activation='tanh'"),
    ({"drop_priority": "random"}, "drop_priority='random'"),
    ({"num_experts": 0}, "num_experts"),
    ({"expert_capacity": 0}, "expert_capacity"),
    ({"group_size": -8}, "group_size"),
    ({"router_dtype": "int8"}, "router_dtype"),
    ({"jitter_eps": 1.5}, "jitter_eps"),
    ({"second_expert_policy": "random"}, "needs router='top_k' and top_k=2"),
    ({"router": "soft", "dispatch": "gather"}, "dispatch='einsum'"),
    ({"router": "expert_choice", "dispatch": "dropless"}, "token-choice"),
    ({"num_shared_experts": -1}, "num_shared_experts"),
])
def test_bad_config_names_the_field(changes, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        BASE.replace(**changes)


def test_bad_input_shapes_name_both_shapes():
    params = params_for(BASE)
    with pytest.raises(ValueError, match=r"x.shape=\(2, 2, 4, 8\)"):
        moe.apply(params, jnp.zeros((2, 2, 4, D_MODEL)), BASE)
    with pytest.raises(ValueError, match=r"d_model=8.*x.shape=\(16, 5\)"):
        moe.apply(params, jnp.zeros((16, 5)), BASE)
    with pytest.raises(ValueError, match="group_size=8 does not divide the 12 tokens"):
        moe.apply(params, jnp.zeros((12, D_MODEL)), BASE)


@st.composite
def routing_problems(draw):
    tokens = draw(st.integers(1, 24))
    num_experts = draw(st.integers(1, 8))
    k = draw(st.integers(1, min(3, num_experts)))
    factor = draw(st.floats(0.1, 3.0))
    priority = draw(st.sampled_from(["rank", "batch_priority"]))
    renorm = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    logits = np.random.default_rng(seed).normal(size=(tokens, num_experts)) * 3
    return tokens, num_experts, k, factor, priority, renorm, logits


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(routing_problems())
def test_slot_assignment_properties(problem):
    tokens, num_experts, k, factor, priority, renorm, logits = problem
    config = MoeConfig(num_experts=num_experts, top_k=k, capacity_factor=factor)
    capacity = config.capacity(tokens, train=True)
    probs = jax.nn.softmax(jnp.asarray(logits, jnp.float32), -1)
    choice = routing.route_top_k(probs, k, renormalize=renorm)
    slots = routing.assign_slots(choice, capacity, num_experts, priority, probs.max(-1))
    token, gate, kept = map(np.asarray, (slots.token, slots.gate, slots.kept))
    expert_index, choice_gate = np.asarray(choice.expert_index), np.asarray(choice.gate)
    filled = token < tokens
    # No expert holds more than its capacity, and filled slots = kept assignments.
    assert token.shape == (num_experts, capacity)
    assert filled.sum() == kept.sum() and kept.size == tokens * k
    for e in range(num_experts):
        held = token[e][filled[e]]
        assert len(set(held.tolist())) == len(held), "a token sits twice in one expert"
        # Work conservation: an expert that dropped an assignment is full.
        dropped_here = np.any((expert_index == e) & ~kept)
        assert not dropped_here or filled[e].all()
    # Every kept assignment sits in its expert with its gate as the combine weight.
    for t in range(tokens):
        for r in range(k):
            e = expert_index[t, r]
            where = np.flatnonzero(token[e] == t)
            assert len(where) == int(kept[t, r])
            if kept[t, r]:
                assert gate[e, where[0]] == pytest.approx(choice_gate[t, r])
    assert np.all(gate[~filled] == 0)


@hypothesis.settings(max_examples=12, deadline=None)
@hypothesis.given(k=st.integers(1, 2), factor=st.floats(0.2, 2.5),
                  priority=st.sampled_from(["rank", "batch_priority"]),
                  dispatch=st.sampled_from(["gather", "einsum"]), seed=st.integers(0, 100))
def test_layer_properties(k, factor, priority, dispatch, seed):
    config = BASE.replace(top_k=k, capacity_factor=factor, drop_priority=priority,
                          dispatch=dispatch)
    params = params_for(BASE.replace(top_k=k))
    x = X * (1 + seed / 10)
    y, aux = apply_jit(params, x, config)
    assert bool(jnp.all(jnp.isfinite(y)))
    np.testing.assert_allclose(jnp.sum(aux["expert_load"]), 1 - aux["dropped_fraction"],
                               atol=1e-6)
    capacity = config.capacity(8, train=True)
    # Per group, each expert keeps at most C assignments: expert_load * N*K / G <= C.
    assert float(jnp.max(aux["expert_load"])) * 16 * k <= 2 * capacity + 1e-6
    np.testing.assert_allclose(jnp.sum(aux["assignment_fraction"]), 1.0, rtol=1e-6)


def test_flax_layer_holds_params_and_calls_pure_apply():
    config = BASE.replace(top_k=2, activation="swiglu", num_shared_experts=1)
    layer = MoeLayer(config)
    variables = layer.init(jax.random.key(0), X, train=False)
    specs = nn.get_partition_spec(variables)["params"]
    assert specs["experts"]["wi"] == jax.sharding.PartitionSpec("expert", "embed", "mlp")
    assert specs["experts"]["wo"] == jax.sharding.PartitionSpec("expert", "mlp", "embed")
    assert specs["router"]["kernel"] == jax.sharding.PartitionSpec("embed", None)
    params = nn.unbox(variables)["params"]
    assert params["experts"]["wi_gate"].shape == (E, D_MODEL, D_FF)
    assert params["shared"]["wi"].shape == (D_MODEL, D_FF)
    y, aux = layer.apply(variables, X, train=True)
    y_pure, aux_pure = moe.apply(params, X, config, train=True)
    np.testing.assert_allclose(y, y_pure, rtol=1e-6)
    np.testing.assert_allclose(aux["expert_load"], aux_pure["expert_load"])


def test_flax_layer_sigmoid_bias_state_and_causal_refusal():
    config = BASE.replace(router="sigmoid_bias", top_k=2)
    variables = MoeLayer(config).init(jax.random.key(0), X, train=False)
    assert variables["moe_state"]["score_bias"].shape == (E,)
    assert "score_bias" not in variables["params"]["router"]
    with pytest.raises(ValueError, match="leaks future tokens"):
        MoeLayer(BASE.replace(router="expert_choice")).init(jax.random.key(0), X, train=False)
    encoder = MoeLayer(BASE.replace(router="expert_choice"), causal=False)
    y, _ = encoder.apply(encoder.init(jax.random.key(0), X, train=False), X, train=False)
    assert y.shape == X.shape


@pytest.mark.parametrize("config", [
    BASE.replace(top_k=2, expert_capacity=3, group_size=None),
    BASE.replace(top_k=2, dispatch="dropless", group_size=None),
    BASE.replace(router="expert_choice", expert_capacity=3, group_size=None),
    BASE.replace(router="soft", dispatch="einsum", group_size=None),
    BASE.replace(router="sigmoid_bias", top_k=2, expert_capacity=3, group_size=None),
], ids=["top2", "dropless", "expert_choice", "soft", "sigmoid_bias"])
def test_masked_tokens_take_no_slot_and_leave_statistics_unchanged(config):
    # Padding placed first would claim capacity under rank priority if it were routed.
    valid = X.reshape(-1, D_MODEL)
    padded = jnp.concatenate([10 * jax.random.normal(jax.random.key(5), valid.shape), valid])
    mask = jnp.arange(padded.shape[0]) >= valid.shape[0]
    params = moe.init_params(jax.random.key(0), config, D_MODEL)
    y, aux = moe.apply(params, padded, config, token_mask=mask)
    y_ref, aux_ref = moe.apply(params, valid, config)
    np.testing.assert_allclose(y[valid.shape[0]:], y_ref, rtol=1e-5, atol=1e-6)
    assert not np.any(np.asarray(y[: valid.shape[0]]))
    for name in aux_ref:
        np.testing.assert_allclose(aux[name], aux_ref[name], rtol=1e-5, atol=1e-6,
                                   err_msg=name)
    with pytest.raises(ValueError, match=r"token_mask\.shape"):
        moe.apply(params, padded, config, token_mask=mask[:4])


@pytest.mark.parametrize("dispatch", ["gather", "einsum"])
def test_one_routing_group_adds_no_size1_axis_to_reductions(dispatch):
    """XLA:CPU runs reductions over arrays with a size-1 axis ~30x slower (benchmarks README):
    with one routing group, the compiled fwd+bwd must reduce only over arrays without one."""
    import re

    config = BASE.replace(group_size=None, top_k=2, dispatch=dispatch)
    params = params_for(config)
    grad = jax.jit(jax.grad(lambda p, x: jnp.sum(moe.apply(p, x, config, train=True)[0] ** 2)))
    hlo = grad.lower(params, X).compile().as_text()
    reduces = [line for line in hlo.splitlines() if re.search(r" reduce\(", line)]
    assert reduces
    size1 = [line.strip()[:100] for line in reduces
             if re.search(r"= \w+\[(1,|[0-9,]*,1,|[0-9,]*,1\])", line)]
    assert not size1, size1
