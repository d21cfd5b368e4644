"""megablox (Pallas interpret mode on CPU) and tokamax (its "xla" implementation on CPU) give
the grouped matmul of a float64 loop reference and of the other grouped paths, in values and
gradients: empty groups, rows past the last group, bfloat16, under jit and vmap."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.benchmarks.train import synthetic_batch
from moe_jax import MoeConfig, config, moe, schema
from moe_jax.analysis import kernels_hlo
from moe_jax.kernels import grouped_matmul_kernels
from moe_jax.kernels.grouped_matmul import IMPLEMENTATIONS, grouped_matmul
from moe_jax.models import Transformer
from moe_jax.train import step
from moe_jax.train.state import init_train_state

requires_tokamax = pytest.mark.skipif(not grouped_matmul_kernels.tokamax_available(),
                                      reason="tokamax (the gpu extra) is not installed")
KERNELS = ["megablox", pytest.param("tokamax", marks=requires_tokamax)]

SIZES = [0, 30, 5, 1, 0, 3]  # empty groups first, in the middle and last; one 1-row group
TRAILING = 7  # rows past the last group (padding, discarded choices): zeros out, zero gradient


def _problem(dtype=jnp.float32):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(sum(SIZES) + TRAILING, 16))
    w = rng.normal(size=(len(SIZES), 16, 24))
    return jnp.asarray(x, dtype), jnp.asarray(w, dtype), jnp.array(SIZES, jnp.int32)


def _reference(x, w):
    """float64 loop: out, and the gradients of sum(sin(out)) with respect to x and w."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    out, dx, dw = np.zeros((x.shape[0], w.shape[2])), np.zeros_like(x), np.zeros_like(w)
    start = 0
    for e, size in enumerate(SIZES):
        rows = slice(start, start + size)
        out[rows] = x[rows] @ w[e]
        dy = np.cos(out[rows])
        dx[rows] = dy @ w[e].T
        dw[e] = x[rows].T @ dy
        start += size
    return out, dx, dw


def _loss(impl):
    return lambda x, w, sizes: jnp.sum(jnp.sin(grouped_matmul(x, w, sizes, impl)))


@pytest.mark.parametrize("impl", KERNELS)
def test_kernel_equals_float64_reference_and_blocked(impl):
    x, w, sizes = _problem()
    out = jax.jit(grouped_matmul, static_argnums=3)(x, w, sizes, impl)
    grads = jax.jit(jax.grad(_loss(impl), argnums=(0, 1)))(x, w, sizes)
    ref_out, ref_dx, ref_dw = _reference(x, w)
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
    assert not np.any(np.asarray(out[sum(SIZES):]))
    np.testing.assert_allclose(grads[0], ref_dx, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(grads[1], ref_dw, rtol=1e-4, atol=1e-4)
    assert not np.any(np.asarray(grads[0][sum(SIZES):]))
    blocked = jax.grad(_loss("blocked"), argnums=(0, 1))(x, w, sizes)
    np.testing.assert_allclose(out, grouped_matmul(x, w, sizes, "blocked"), atol=1e-5)
    for g, b in zip(grads, blocked):
        np.testing.assert_allclose(g, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", KERNELS)
def test_kernel_bfloat16_operands_accumulate_in_float32(impl):
    x, w, sizes = _problem(jnp.bfloat16)
    out = jax.jit(grouped_matmul, static_argnums=3)(x, w, sizes, impl)
    assert out.dtype == jnp.bfloat16
    # float32 sums of the bfloat16 products, rounded once: within bfloat16's 2^-8 relative
    ref_out, ref_dx, ref_dw = _reference(x.astype(jnp.float32), w.astype(jnp.float32))
    np.testing.assert_allclose(out.astype(jnp.float32), ref_out, rtol=2**-8, atol=1e-2)
    dx, dw = jax.jit(jax.grad(_loss(impl), argnums=(0, 1)))(x, w, sizes)
    assert dx.dtype == dw.dtype == jnp.bfloat16
    # the cotangent cos(out) is itself bfloat16 here: a looser bound than the product's
    np.testing.assert_allclose(dx.astype(jnp.float32), ref_dx, rtol=0.05, atol=0.3)
    np.testing.assert_allclose(dw.astype(jnp.float32), ref_dw, rtol=0.05, atol=0.3)


def test_megablox_under_vmap_runs_each_batch_element():
    x, w, sizes = _problem()
    xs, ws = jnp.stack([x, -2 * x]), jnp.stack([w, w[::-1]])
    sizes2 = jnp.stack([sizes, sizes[::-1]])
    out = jax.jit(jax.vmap(lambda x, w, s: grouped_matmul(x, w, s, "megablox")))(xs, ws, sizes2)
    for i in range(2):
        np.testing.assert_allclose(out[i], jax.lax.ragged_dot(xs[i], ws[i], sizes2[i]),
                                   rtol=1e-5, atol=1e-5)


def test_tokamax_missing_is_an_error_that_says_how_to_install(monkeypatch):
    monkeypatch.setattr(grouped_matmul_kernels, "tokamax_available", lambda: False)
    x, w, sizes = _problem()
    with pytest.raises(ImportError, match=r"pip install \"moe_jax\[gpu\]\""):
        grouped_matmul(x, w, sizes, "tokamax")


def test_row_tiles_cover_the_rows_and_dimension_tiles_divide_exactly():
    assert grouped_matmul_kernels._row_tile(45, 512) == 48  # all rows, rounded up to 16
    assert grouped_matmul_kernels._row_tile(5000, 512) == 512
    assert grouped_matmul_kernels._dim_tile(24, 1024) == 24  # small: one block
    assert grouped_matmul_kernels._dim_tile(14336, 1024) == 1024
    assert grouped_matmul_kernels._dim_tile(1536, 1024) == 512
    assert grouped_matmul_kernels._dim_tile(1100, 1024) == 1100  # no 128-multiple divides


def test_config_accepts_every_grouped_matmul():
    assert config.GROUPED_MATMULS == IMPLEMENTATIONS
    for impl in IMPLEMENTATIONS:
        assert config.MoeConfig(dispatch="dropless", grouped_matmul=impl).grouped_matmul == impl


# --- the dropless layer and a tiny Mixtral train step on megablox (interpret mode) ----------


def _layer_loss(params, x, config):
    y, aux = moe.apply(params, x, config, train=True)
    return jnp.sum(jnp.sin(y)) + aux["load_balancing_loss"] + aux["router_z_loss"]


def test_dropless_layer_on_megablox_equals_blocked():
    config = MoeConfig(num_experts=4, top_k=2, d_ff=16, activation="swiglu", dispatch="dropless",
                       renormalize_gates=True)
    x = jax.random.normal(jax.random.key(1), (2, 8, 8))
    params = moe.init_params(jax.random.key(0), config, 8)
    results = [jax.jit(jax.value_and_grad(_layer_loss, argnums=(0, 1)), static_argnums=2)(
        params, x, config.replace(grouped_matmul=impl)) for impl in ("megablox", "blocked")]
    (value, grads), (ref_value, ref_grads) = results
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    for g, ref in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(g, ref, rtol=1e-4, atol=1e-6)


def _mixtral_sgd_step(impl: str):
    """One SGD step of the tiny Mixtral (configs/mixtral.py:e8, dropless top-2 SwiGLU experts)
    on a synthetic batch: (new params, metrics). SGD so that the update is the gradient."""
    config = schema.override(schema.load_config("mixtral.py:e8"), {
        "moe.grouped_matmul": impl, "model.num_layers": 2, "train.batch_size": 2,
        "train.seq_len": 16})
    experiment = schema.parse_config(config)
    model = Transformer(experiment.model, experiment.moe)
    sgd = optax.sgd(1.0)
    state = init_train_state(jax.random.key(0), model, sgd, seq_len=16)
    batch = synthetic_batch(2, 16, experiment.model.vocab_size)
    new_state, metrics = jax.jit(step.make_train_step(model, sgd, experiment.model,
                                                      experiment.moe))(state, batch)
    return new_state.params, metrics


@pytest.mark.slow  # ~50 s of CPU: the dropless layer test above is the fast check
def test_tiny_mixtral_train_step_on_megablox_equals_blocked():
    params, metrics = _mixtral_sgd_step("megablox")
    ref_params, ref_metrics = _mixtral_sgd_step("blocked")
    np.testing.assert_allclose(metrics["cross_entropy"], ref_metrics["cross_entropy"],
                               rtol=1e-6)
    for p, ref in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(p, ref, rtol=1e-4, atol=1e-6)


def test_kernels_are_refused_where_gspmd_would_partition_them():
    x, w, sizes = _problem()
    for impl in ("megablox", "tokamax"):
        with pytest.raises(ValueError, match="expert_parallel='explicit'"):
            grouped_matmul(x, w, sizes, impl, partitioned=True)
    out = grouped_matmul(x, w, sizes, "auto", partitioned=True)  # the CPU choice on CPU
    np.testing.assert_allclose(out, _reference(x, w)[0], rtol=1e-5, atol=1e-5)


HLO = """
ENTRY %main {
  %gmm.7 = bf16[1024,255]{1,0} custom-call(%a, %b), custom_call_target="tpu_custom_call"
  %tgmm = bf16[2,192,255]{2,1,0} custom-call(%a, %c), custom_call_target="tpu_custom_call"
  %ragged-dot-none.4 = bf16[64,255]{1,0} custom-call(%a, %w), custom_call_target="tpu_custom_call"
  %ragged_all_to_all.5 = bf16[1024,192]{1,0} ragged-all-to-all(%x, %y, %i, %s, %o, %r)
  %all-to-all.2 = s32[4,1,1]{2,1,0} all-to-all(%p), dimensions={0}
  %dot.3 = bf16[2,64,255]{2,1,0} dot(bf16[2,64,192]{2,1,0} %x, bf16[2,192,255]{2,1,0} %w)
  ROOT %dot.4 = f32[64,8]{1,0} dot(f32[64,192]{1,0} %x, f32[192,8]{1,0} %router)
}
"""


def test_kernel_facts_read_off_hand_made_hlo():
    shapes = kernels_hlo.expert_weight_shapes(MoeConfig(num_experts=8, d_ff=255), 192, 4)
    assert shapes == {(2, 192, 255), (2, 255, 192)}
    facts = kernels_hlo.kernel_facts(HLO, shapes)
    assert facts.mosaic_kernels == {"gmm": 1, "tgmm": 1, "ragged-dot-none": 1}
    assert kernels_hlo.megablox_calls(facts) == 2
    assert (facts.ragged_all_to_alls, facts.all_to_alls) == (1, 1)
    assert len(facts.dense_expert_dots) == 1 and "%dot.3" in facts.dense_expert_dots[0]
