"""Token positions: defaults for packed rows, rotary embeddings and their frequency scalings
(YaRN, Llama 3.1's) (pure functions).

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


def blend_frequencies(inv_freq: np.ndarray, factor: float, keep: np.ndarray) -> np.ndarray:
    """[h/2] float32: each frequency of `inv_freq` [h/2] divided by `factor` (interpolated) where
    `keep` [h/2] is 0, unchanged (extrapolated) where it is 1, mixed linearly in between: the
    "NTK-by-parts" blend that YaRN and Llama 3.1 share, with different `keep` ramps."""
    interpolated = inv_freq / np.float32(factor)
    return (interpolated * (1 - keep) + inv_freq * keep).astype(np.float32)


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
        return blend_frequencies(rotary_inverse_frequencies(dim, base), self.factor, keep)

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


@dataclasses.dataclass(frozen=True)
class Llama3Scaling:
    """Llama 3.1's rotary scaling (Meta 2024, Llama 3.1 release: `apply_scaling` in
    meta-llama/llama-models; transformers' `_compute_llama3_parameters`, rope_type "llama3").

    NTK-by-parts with the ramp on the wavelength 2 pi / inv_freq rather than on the dimension:
    with t = original_max_seq_len / wavelength (the turns over the pre-training context), a
    frequency is divided by `factor` where t < low_freq_factor, kept where t > high_freq_factor,
    and blended with keep = (t - low) / (high - low) in between; equal factors make a step (Llama 4
    Scout: both 1). No attention temperature.
    """

    factor: float
    original_max_seq_len: int
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0

    def inverse_frequencies(self, dim: int, base: float) -> np.ndarray:
        """[h/2] float32 scaled frequencies (the class docstring), in float32 as transformers."""
        inv_freq = rotary_inverse_frequencies(dim, base)
        turns = np.float32(self.original_max_seq_len) / (np.float32(2 * math.pi) / inv_freq)
        low, high = self.low_freq_factor, self.high_freq_factor
        keep = np.clip((turns - low) / (high - low), 0, 1) if high > low else turns >= high
        return blend_frequencies(inv_freq, self.factor, np.asarray(keep, np.float32))

    @property
    def attention_factor(self) -> float:
        """Multiplier of the rotated queries and keys: 1 (Llama 3.1 keeps the temperature)."""
        return 1.0


RotaryScaling = Yarn | Llama3Scaling


def yarn_of(config: Any) -> Yarn | None:
    """The `Yarn` of a `ModelConfig` with rope_scaling='yarn', else None."""
    if config.rope_scaling != "yarn":
        return None
    return Yarn(config.yarn_factor, config.yarn_original_max_seq_len, config.yarn_beta_fast,
                config.yarn_beta_slow, config.yarn_mscale, config.yarn_mscale_all_dim,
                config.yarn_truncate)


def rotary_scaling_of(config: Any) -> RotaryScaling | None:
    """The rotary scaling of a `ModelConfig`: `Yarn` ('yarn'), `Llama3Scaling` ('llama3') or
    None ('none')."""
    if config.rope_scaling == "llama3":
        return Llama3Scaling(config.llama3_factor, config.llama3_original_max_seq_len,
                             config.llama3_low_freq_factor, config.llama3_high_freq_factor)
    return yarn_of(config)


def apply_rotary(x: Array, positions: Array, base: float, *,
                 scaling: RotaryScaling | None = None, interleaved: bool = False) -> Array:
    """Rotary position embedding (Su et al. 2021, RoFormer eq. 34).

    x: [B, L, N, h] queries or keys (h even); positions: [B, L] int, restarting at 0 in each
    packed segment so that q.k depends only on the distance within the segment. Half-split
    layout: dimension pairs (i, i + h/2) are rotated by the angle `position * base**(-2i/h)`.
    interleaved: pairs (2i, 2i + 1) instead (RoFormer's own layout; DeepSeek-V3's
    `rope_interleave`), returned de-interleaved (even dimensions, then odd ones) as
    transformers does; q.k is the same either way, since queries and keys are permuted alike.
    scaling: its frequencies (`Yarn`, `Llama3Scaling`), and the result times its
    `attention_factor`.
    Computed in float32 and returned in x's dtype.
    """
    dim = x.shape[-1]
    inv_freq = jnp.asarray(scaling.inverse_frequencies(dim, base) if scaling is not None
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
    if scaling is not None:
        rotated = rotated * scaling.attention_factor
    return rotated.astype(x.dtype)
