"""Token positions: defaults for packed rows, rotary embeddings and their YaRN scaling (pure
functions).

Shape letters: B batch, L sequence length, N heads, h head dimension (rotated part).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def default_positions(batch: int, length: int) -> Array:
    """[B, L] int32 positions 0..L-1 for rows that hold one sequence each."""
    return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))


def rotary_inverse_frequencies(dim: int, base: float) -> np.ndarray:
    """[h/2] float32 RoPE frequencies base**(-2i/h) (Su et al. 2021, RoFormer eq. 15)."""
    return (1.0 / base ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))).astype(
        np.float32)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature term 0.1 * mscale * ln(factor) + 1 (Peng et al. 2023, YaRN,
    eq. 22 with sqrt(1/t) = 0.1 ln(s) + 1), 1 for factor <= 1."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


@dataclasses.dataclass(frozen=True)
class Yarn:
    """YaRN rotary scaling (Peng et al. 2023, "YaRN: Efficient Context Window Extension").

    factor: context extension s; original_max_seq_len: the pre-training context L; beta_fast,
    beta_slow: the ramp's rotation counts (alpha, beta of Sec. 3.2's "NTK-by-parts");
    mscale, mscale_all_dim: DeepSeek-V2/V3's split of the temperature between the rotated part
    (`attention_factor`) and the whole logit (`softmax_scale`); truncate: round the ramp's ends
    to whole dimensions (transformers' default; GPT-OSS sets False).
    """

    factor: float
    original_max_seq_len: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0
    truncate: bool = True

    def inverse_frequencies(self, dim: int, base: float) -> np.ndarray:
        """[h/2] float32: each frequency interpolated (divided by `factor`) below the ramp,
        kept above it, mixed linearly on it (YaRN eq. 18-20, "NTK-by-parts")."""
        def correction_dim(rotations: float) -> float:  # dimension making `rotations` turns
            return dim * math.log(self.original_max_seq_len / (rotations * 2 * math.pi)) / (
                2 * math.log(base))

        low, high = correction_dim(self.beta_fast), correction_dim(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
        keep = (1 - ramp).astype(np.float32)  # 1: extrapolate (original frequency)
        extrapolated = rotary_inverse_frequencies(dim, base)
        interpolated = extrapolated / np.float32(self.factor)
        return (interpolated * (1 - keep) + extrapolated * keep).astype(np.float32)

    @property
    def attention_factor(self) -> float:
        """Multiplier of the rotated queries and keys: mscale(s, mscale) / mscale(s,
        mscale_all_dim) when both are set (DeepSeek), else mscale(s) (YaRN eq. 22)."""
        if self.mscale and self.mscale_all_dim:
            return yarn_mscale(self.factor, self.mscale) / yarn_mscale(self.factor,
                                                                       self.mscale_all_dim)
        return yarn_mscale(self.factor)

    @property
    def softmax_scale(self) -> float:
        """Multiplier of the softmax scale 1/sqrt(h): mscale(s, mscale_all_dim)^2 when
        mscale_all_dim is set (DeepSeek-V2/V3's attention), else 1."""
        return yarn_mscale(self.factor, self.mscale_all_dim) ** 2 if self.mscale_all_dim else 1.0


def yarn_of(config: Any) -> Yarn | None:
    """The `Yarn` of a `ModelConfig` with rope_scaling='yarn', else None."""
    if config.rope_scaling != "yarn":
        return None
    return Yarn(config.yarn_factor, config.yarn_original_max_seq_len, config.yarn_beta_fast,
                config.yarn_beta_slow, config.yarn_mscale, config.yarn_mscale_all_dim,
                config.yarn_truncate)


def apply_rotary(x: Array, positions: Array, base: float, *, yarn: Yarn | None = None,
                 interleaved: bool = False) -> Array:
    """Rotary position embedding (Su et al. 2021, RoFormer eq. 34).

    x: [B, L, N, h] queries or keys (h even); positions: [B, L] int, restarting at 0 in each
    packed segment so that q.k depends only on the distance within the segment. Half-split
    layout: dimension pairs (i, i + h/2) are rotated by the angle `position * base**(-2i/h)`.
    interleaved: pairs (2i, 2i + 1) instead (RoFormer's own layout; DeepSeek-V3's
    `rope_interleave`), returned de-interleaved (even dimensions, then odd ones) as
    transformers does; q.k is the same either way, since queries and keys are permuted alike.
    yarn: YaRN frequencies, and the result times `yarn.attention_factor`.
    Computed in float32 and returned in x's dtype.
    """
    dim = x.shape[-1]
    inv_freq = jnp.asarray(yarn.inverse_frequencies(dim, base) if yarn is not None
                           else rotary_inverse_frequencies(dim, base))  # [h/2]
    angle = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, L, h/2]
    sin = jnp.sin(angle)[:, :, None, :]
    cos = jnp.cos(angle)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    if interleaved:
        x1, x2 = x32[..., 0::2], x32[..., 1::2]
    else:
        x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    if yarn is not None:
        rotated = rotated * yarn.attention_factor
    return rotated.astype(x.dtype)
