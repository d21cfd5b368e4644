"""The blocked grouped matmul equals jax.lax.ragged_dot in values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.grouped_matmul import blocked_grouped_matmul, grouped_matmul


@pytest.mark.parametrize("sizes", [
    [0, 300, 5, 33, 0, 1],  # empty groups, full 256-row blocks, 32-row tails
    [64, 0, 0, 0, 0, 0],    # one expert takes everything
    [1, 1, 1, 1, 1, 300],
])
def test_blocked_equals_ragged_dot(sizes):
    rng = np.random.default_rng(0)
    group_sizes = jnp.array(sizes, jnp.int32)
    rows = sum(sizes) + 7  # rows past the last group must come out as zeros
    x = jnp.asarray(rng.normal(size=(rows, 16)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(6, 16, 24)), jnp.float32)
    out = blocked_grouped_matmul(x, w, group_sizes)
    np.testing.assert_allclose(out, jax.lax.ragged_dot(x, w, group_sizes), rtol=1e-5, atol=1e-5)
    assert not np.any(np.asarray(out[sum(sizes):]))

    def loss(mm):
        return lambda x, w: jnp.sum(jnp.sin(mm(x, w, group_sizes)))

    grads = jax.grad(loss(blocked_grouped_matmul), argnums=(0, 1))(x, w)
    expected = jax.grad(loss(jax.lax.ragged_dot), argnums=(0, 1))(x, w)
    for g, e in zip(grads, expected):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4)


def test_unknown_impl_is_refused():
    with pytest.raises(ValueError, match="unknown grouped matmul 'dense'"):
        grouped_matmul(jnp.zeros((2, 2)), jnp.zeros((1, 2, 2)), jnp.array([2]), "dense")
