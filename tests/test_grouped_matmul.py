"""The blocked and BLAS grouped matmuls equal jax.lax.ragged_dot in values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import grouped_matmul_cpu
from moe_jax.grouped_matmul import blas_grouped_matmul, blocked_grouped_matmul, grouped_matmul

IMPLS = {"blocked": blocked_grouped_matmul, "blas": blas_grouped_matmul}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("sizes", [
    [0, 300, 5, 33, 0, 1],  # empty groups, full 256-row blocks, 32-row tails
    [64, 0, 0, 0, 0, 0],    # one expert takes everything
    [1, 1, 1, 1, 1, 300],
])
def test_grouped_matmul_equals_ragged_dot(impl, sizes):
    rng = np.random.default_rng(0)
    group_sizes = jnp.array(sizes, jnp.int32)
    rows = sum(sizes) + 7  # rows past the last group must come out as zeros
    x = jnp.asarray(rng.normal(size=(rows, 16)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(6, 16, 24)), jnp.float32)
    matmul = IMPLS[impl]
    out = jax.jit(matmul)(x, w, group_sizes)
    np.testing.assert_allclose(out, jax.lax.ragged_dot(x, w, group_sizes), rtol=1e-5, atol=1e-5)
    assert not np.any(np.asarray(out[sum(sizes):]))

    def loss(mm):
        return lambda x, w: jnp.sum(jnp.sin(mm(x, w, group_sizes)))

    grads = jax.jit(jax.grad(loss(matmul), argnums=(0, 1)))(x, w)
    expected = jax.grad(loss(jax.lax.ragged_dot), argnums=(0, 1))(x, w)
    for g, e in zip(grads, expected):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4)


def test_auto_is_the_blas_custom_call_on_cpu_for_every_float_type():
    rng = np.random.default_rng(2)
    sizes = jnp.array([5, 0, 11], jnp.int32)
    x = jnp.asarray(rng.normal(size=(16, 8)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(3, 8, 4)), jnp.bfloat16)
    assert "moe_jax_grouped_matmul" in jax.jit(grouped_matmul).lower(x, w, sizes).as_text()
    out = grouped_matmul(x, w, sizes)
    assert out.dtype == jnp.bfloat16
    # float32 products of the bfloat16 inputs, rounded once to bfloat16 (within 2^-8 relative)
    expected = jax.lax.ragged_dot(x.astype(jnp.float32), w.astype(jnp.float32), sizes)
    np.testing.assert_allclose(out.astype(jnp.float32), expected, rtol=2**-8, atol=1e-6)


def test_blas_under_vmap_runs_each_batch_element():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(3, 10, 4)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 2, 4, 5)), jnp.float32)
    sizes = jnp.array([[4, 6], [0, 10], [7, 1]], jnp.int32)
    out = jax.vmap(blas_grouped_matmul)(x, w, sizes)
    np.testing.assert_allclose(out, jax.vmap(jax.lax.ragged_dot)(x, w, sizes), rtol=1e-5,
                               atol=1e-5)


def test_blas_error_inside_the_custom_call_is_raised_not_crashed():
    grouped_matmul_cpu._register()
    wrong_shape = jax.ffi.ffi_call("moe_jax_grouped_matmul",
                                   jax.ShapeDtypeStruct((4, 7), jnp.float32))  # w gives 3 columns
    with pytest.raises(Exception, match="moe_jax grouped matmul \\(CPU\\): ValueError"):
        jax.block_until_ready(wrong_shape(jnp.ones((4, 2)), jnp.ones((2, 2, 3)),
                                          jnp.array([1, 3], jnp.int32)))


def test_unknown_or_unusable_impl_is_refused():
    with pytest.raises(ValueError, match="unknown grouped matmul 'dense'"):
        grouped_matmul(jnp.zeros((2, 2)), jnp.zeros((1, 2, 2)), jnp.array([2]), "dense")
    with pytest.raises(ValueError, match="'blas' needs floating operands"):
        grouped_matmul(jnp.zeros((2, 2), jnp.int32), jnp.zeros((1, 2, 2), jnp.int32),
                       jnp.array([2]), "blas")
    with pytest.raises(ValueError, match="takes float32 operands"):
        blas_grouped_matmul(jnp.zeros((2, 2), jnp.bfloat16), jnp.zeros((1, 2, 2)),
                            jnp.array([2]))
