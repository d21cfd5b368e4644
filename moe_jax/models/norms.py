"""Normalisation layers: RMSNorm and LayerNorm as pure functions, and the flax `Norm` holding
their parameters (used by the blocks, the final norm and attention's optional QK-norm).

Shape letters: d the normalised (last) axis.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


def rms_norm(x: Array, scale: Array, eps: float) -> Array:
    """RMSNorm (Zhang & Sennrich 2019, eq. 4): x / sqrt(mean(x^2) + eps) * scale, computed in
    float32 (eps inside the square root, as in T5 and the Llama/Mixtral/Qwen/OLMoE releases)."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return (y * scale.astype(jnp.float32)).astype(x.dtype)


def layer_norm(x: Array, scale: Array, bias: Array, eps: float) -> Array:
    """LayerNorm (Ba et al. 2016): (x - mean) / std * scale + bias, computed in float32."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


class Norm(nn.Module):
    """RMSNorm or LayerNorm over the last axis; params scale [d] (+ bias [d]) with logical axis
    `axis` ("embed" for the model width)."""

    kind: str
    eps: float
    param_dtype: Any = jnp.float32
    axis: str | None = "embed"

    @nn.compact
    def __call__(self, x: Array) -> Array:
        d = x.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones,
                                                                 (self.axis,)),
                           (d,), self.param_dtype)
        if self.kind == "rmsnorm":
            return rms_norm(x, scale, self.eps)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros,
                                                               (self.axis,)),
                          (d,), self.param_dtype)
        return layer_norm(x, scale, bias, self.eps)
