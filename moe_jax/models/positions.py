"""Token positions: defaults for packed rows and rotary embeddings (pure functions).

Shape letters: B batch, L sequence length, N heads, h head dimension.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def default_positions(batch: int, length: int) -> Array:
    """[B, L] int32 positions 0..L-1 for rows that hold one sequence each."""
    return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))


def apply_rotary(x: Array, positions: Array, base: float) -> Array:
    """Rotary position embedding (Su et al. 2021, RoFormer eq. 34), half-split layout.

    x: [B, L, N, h] queries or keys (h even); positions: [B, L] int, restarting at 0 in each
    packed segment so that q.k depends only on the distance within the segment. Dimension pairs
    (i, i + h/2) are rotated by the angle `position * base**(-2i/h)`. Computed in float32 and
    returned in x's dtype.
    """
    half = x.shape[-1] // 2
    inv_freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)  # [h/2]
    angle = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, L, h/2]
    sin = jnp.sin(angle)[:, :, None, :]
    cos = jnp.cos(angle)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)
