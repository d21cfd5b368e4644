"""Multi-head latent attention (MLA; DeepSeek-V2, Liu et al. 2024, Sec. 2.1; DeepSeek-V3,
Liu et al. 2024, Sec. 2.1.1) and its compressed decoding cache.

Shape letters: B batch, L query length, S key length (= L, or the cache's slots when decoding),
d model width, H heads, c `kv_lora_rank` (the key/value latent), r `qk_rope_head_dim`,
n `qk_nope_head_dim`, v `v_head_dim`, q `q_lora_rank`.

Per token (DeepSeek-V3 eqs. 1-11): the key/value latent c_KV = RMSNorm(x W_DKV) [c] and one
rotary key k_R = RoPE(x W_KR) [r] shared by the heads; each head's key is [c_KV W_UK ; k_R]
(n + r dims) and its value c_KV W_UV (v dims); queries go through their own latent
c_Q = RMSNorm(x W_DQ) [q] (or a full-rank projection), q = [c_Q W_UQ ; RoPE(c_Q W_QR)].
Decoding caches only c_KV and k_R: c + r numbers per token and layer, against 2 H h for
multi-head attention (`cache_numbers_per_token`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax.models.attention import CACHE, attention_mask, cache_mask, cached_keys_values
from moe_jax.models.norms import Norm
from moe_jax.models.positions import Yarn, apply_rotary, yarn_of

Array = jax.Array


def cache_numbers_per_token(kv_lora_rank: int, qk_rope_head_dim: int) -> int:
    """Numbers MLA caches per token and layer: the latent c_KV and the shared rotary key k_R."""
    return kv_lora_rank + qk_rope_head_dim


def softmax_scale(qk_nope_head_dim: int, qk_rope_head_dim: int, yarn: Yarn | None) -> float:
    """1 / sqrt(n + r), times YaRN's `softmax_scale` (DeepSeek-V3 eq. 10 with transformers'
    mscale_all_dim correction)."""
    scale = (qk_nope_head_dim + qk_rope_head_dim) ** -0.5
    return scale * (yarn.softmax_scale if yarn is not None else 1.0)


def latent_attention(q_nope: Array, q_rope: Array, latent: Array, rope_key: Array,
                     kv_up: Array, mask: Array, scale: float) -> Array:
    """Attention of queries over keys and values expanded from the latents.

    q_nope: [B, L, H, n]; q_rope: [B, L, H, r] (rotated); latent: [B, S, c] (normalised c_KV);
    rope_key: [B, S, r] (rotated k_R, shared by the heads); kv_up: [c, H, n + v] (W_UK and W_UV
    side by side); mask: [B, L, S] bool. Returns [B, L, H, v]: softmax(scale * (q_nope . k_nope
    + q_rope . k_R)) v, logits and softmax in float32.
    """
    n = q_nope.shape[-1]
    keys = jnp.einsum("bsc,chn->bshn", latent, kv_up[..., :n])
    values = jnp.einsum("bsc,chv->bshv", latent, kv_up[..., n:])
    logits = (jnp.einsum("blhn,bshn->bhls", q_nope, keys, preferred_element_type=jnp.float32)
              + jnp.einsum("blhr,bsr->bhls", q_rope, rope_key,
                           preferred_element_type=jnp.float32)) * scale
    logits = jnp.where(mask[:, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(values.dtype)
    return jnp.einsum("bhls,bshv->blhv", probs, values)


class LatentAttention(nn.Module):
    """MLA block: x [B, L, d] -> [B, L, d].

    Params (logical axes): query_down [d, q] ("embed", None), query_norm scale [q], query_up
    [q, H, n + r] ("latent", "heads", "kv") — or query [d, H, n + r] without q_lora_rank; kv_down
    [d, c + r] ("embed", None), kv_norm scale [c], kv_up [c, H, n + v] ("latent", "heads", "kv"),
    out [H, v, d] ("heads", "kv", "embed"). Kernels truncated normal with variance 1/fan_in.
    With the `CACHE` collection mutable (decoding), the latents and rotary keys go through the
    cache `CACHE`/{latent [B, S, c], rope_key [B, S, r], positions, filled}
    (`attention.cached_keys_values`).
    """

    num_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    causal: bool
    rope_base: float = 10000.0
    yarn: Yarn | None = None
    rope_interleave: bool = False
    norm_eps: float = 1e-6
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def kernel(self, name: str, shape: tuple[int, ...], axes: tuple[str | None, ...],
               fan_in_axes: tuple[int, ...] = (0,)) -> Array:
        out_axes = tuple(i for i in range(len(shape)) if i not in fan_in_axes)
        init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                                in_axis=fan_in_axes, out_axis=out_axes)
        return self.param(name, nn.with_logical_partitioning(init, axes), shape,
                          self.param_dtype).astype(self.dtype)

    def queries(self, x: Array) -> Array:
        """[B, L, H, n + r] queries (before positions)."""
        d, width = x.shape[-1], self.qk_nope_head_dim + self.qk_rope_head_dim
        if self.q_lora_rank is None:
            return jnp.einsum("bld,dhk->blhk", x, self.kernel(
                "query", (d, self.num_heads, width), ("embed", "heads", "kv")))
        latent = x @ self.kernel("query_down", (d, self.q_lora_rank), ("embed", None))
        latent = Norm("rmsnorm", self.norm_eps, self.param_dtype, axis=None,
                      name="query_norm")(latent)
        return jnp.einsum("blq,qhk->blhk", latent, self.kernel(
            "query_up", (self.q_lora_rank, self.num_heads, width), ("latent", "heads", "kv")))

    @nn.compact
    def __call__(self, x: Array, segment_ids: Array, positions: Array) -> Array:
        d, c, n = x.shape[-1], self.kv_lora_rank, self.qk_nope_head_dim
        x = x.astype(self.dtype)
        q = self.queries(x)
        q_nope, q_rope = q[..., :n], self.rotate(q[..., n:], positions)
        kv = x @ self.kernel("kv_down", (d, c + self.qk_rope_head_dim), ("embed", None))
        latent = Norm("rmsnorm", self.norm_eps, self.param_dtype, axis=None,
                      name="kv_norm")(kv[..., :c])
        rope_key = self.rotate(kv[..., None, c:], positions)[:, :, 0]
        if self.is_mutable_collection(CACHE) and not self.is_initializing():
            latent, rope_key, mask = self.cached(latent, rope_key, segment_ids, positions)
        else:
            mask = attention_mask(segment_ids, causal=self.causal)
        kv_up = self.kernel("kv_up", (c, self.num_heads, n + self.v_head_dim),
                            ("latent", "heads", "kv"))
        out = latent_attention(q_nope, q_rope, latent, rope_key, kv_up, mask,
                               softmax_scale(n, self.qk_rope_head_dim, self.yarn))
        out_kernel = self.kernel("out", (self.num_heads, self.v_head_dim, d),
                                 ("heads", "kv", "embed"), fan_in_axes=(0, 1))
        return jnp.einsum("blhv,hvd->bld", out, out_kernel)

    def rotate(self, x: Array, positions: Array) -> Array:
        """Rotary positions (with YaRN, interleaved or not) of [B, L, N, r] queries or keys."""
        return apply_rotary(x, positions, self.rope_base, scaling=self.yarn,
                            interleaved=self.rope_interleave)

    def cached(self, latent: Array, rope_key: Array, segment_ids: Array, positions: Array
               ) -> tuple[Array, Array, Array]:
        """Writes this call's latents and rotary keys into the cache (creating an empty one of
        S = L slots on the first call); returns the cached (latent, rope_key, mask)."""
        empty = {"latent": latent, "rope_key": rope_key, "positions": positions,
                 "filled": segment_ids > 0}
        cache = {name: self.variable(CACHE, name, jnp.zeros_like, value)
                 for name, value in empty.items()}
        updated = cached_keys_values(
            {"key": cache["latent"].value, "value": cache["rope_key"].value,
             "positions": cache["positions"].value, "filled": cache["filled"].value},
            latent, rope_key, positions, segment_ids)
        updated["latent"], updated["rope_key"] = updated.pop("key"), updated.pop("value")
        for name, value in updated.items():
            cache[name].value = value
        return updated["latent"], updated["rope_key"], cache_mask(positions, updated)


def from_config(config: Any, name: str) -> LatentAttention:
    """The `LatentAttention` of a `ModelConfig` with kv_lora_rank set."""
    c = config
    return LatentAttention(
        num_heads=c.num_heads, q_lora_rank=c.q_lora_rank, kv_lora_rank=c.kv_lora_rank,
        qk_nope_head_dim=c.qk_nope_head_dim, qk_rope_head_dim=c.qk_rope_head_dim,
        v_head_dim=c.v_head_dim, causal=c.causal, rope_base=c.rope_base, yarn=yarn_of(c),
        rope_interleave=c.rope_interleave, norm_eps=c.latent_norm_eps, dtype=c.jnp_dtype,
        param_dtype=c.jnp_param_dtype, name=name)


def projection_params(config: Any) -> int:
    """Parameters of one MLA block's projection matrices (`ModelConfig` with kv_lora_rank)."""
    d, heads, q, c = config.d_model, config.num_heads, config.q_lora_rank, config.kv_lora_rank
    n, r, v = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
    query = d * heads * (n + r) if q is None else d * q + q * heads * (n + r)
    return query + d * (c + r) + c * heads * (n + v) + heads * v * d


def norm_params(config: Any) -> int:
    """Parameters of one MLA block's latent RMSNorms."""
    return (config.q_lora_rank or 0) + config.kv_lora_rank


def score_flops_per_token(config: Any, seq_len: int) -> float:
    """Forward FLOPs per token of q.k (n + r dims) and probs.v (v dims) over seq_len keys."""
    width = config.qk_nope_head_dim + config.qk_rope_head_dim + config.v_head_dim
    return 2.0 * seq_len * config.num_heads * width
