"""Multi-head attention with grouped-query heads, segment-aware masks, rotary positions (with
optional YaRN scaling), an optional QK-norm, sliding windows and attention sinks.

Shape letters: B batch, L query length, S key length (= L, or the cache's slots when decoding),
d model width, H query heads, K key/value heads (H = K * G), G query heads per key/value head,
h head dimension.

Decoding (`moe_jax.models.decode`): when the caller makes the `CACHE` collection mutable, each
attention block keeps a key/value cache of S slots there, writes the call's keys and values into
it, and attends to the cached ones (`cached_keys_values`, `cache_mask`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax.models.norms import Norm, rms_norm
from moe_jax.models.positions import RotaryScaling, apply_rotary

Array = jax.Array

# The variable collection of the decoding key/value cache.
CACHE = "cache"


def same_chunk(query_positions: Array, key_positions: Array, chunk: int | None) -> Array:
    """[B, L, S] bool: the query and the key lie in the same chunk of `chunk` positions
    (position // chunk equal; Llama 4's chunked attention); all True when chunk is None.

    query_positions: [B, L]; key_positions: [B, S] int.
    """
    if chunk is None:
        return jnp.ones((*query_positions.shape, key_positions.shape[1]), bool)
    return query_positions[:, :, None] // chunk == key_positions[:, None, :] // chunk


def attention_mask(segment_ids: Array, *, causal: bool, positions: Array | None = None,
                   chunk: int | None = None, window: int | None = None) -> Array:
    """[B, L, L] bool: query i may attend to key j.

    segment_ids: [B, L] int; packed rows hold several sequences, and a token attends only inside
    its own segment (padding, segment 0, attends only to padding, so no row is empty).
    causal: additionally j <= i. chunk: additionally i and j in the same chunk of `positions`
    ([B, L]; `same_chunk`). window: additionally i - j < window, the query and the window - 1
    tokens before it (sliding-window attention: Mistral 7B, Jiang et al. 2023, Sec. 2; the
    gpt-oss model card, OpenAI 2025, Sec. 2).
    """
    mask = segment_ids[:, :, None] == segment_ids[:, None, :]
    length = segment_ids.shape[1]
    if causal:
        mask = mask & jnp.tril(jnp.ones((length, length), bool))[None]
    if chunk is not None:
        mask = mask & same_chunk(positions, positions, chunk)
    if window is not None:
        distance = jnp.arange(length)[:, None] - jnp.arange(length)[None, :]
        mask = mask & (distance < window)[None]
    return mask


def temperature_scale(positions: Array, floor_scale: float, scale: float) -> Array:
    """[B, L] float32 multiplier of the queries of a NoPE block at `positions` [B, L]:
    log(floor((p + 1) / floor_scale) + 1) * scale + 1 (Llama 4's attention temperature tuning,
    after Nakanishi 2025, "Scalable-Softmax Is Superior for Attention": logits that grow with
    the log of the context length; 1 for p + 1 < floor_scale)."""
    p = positions.astype(jnp.float32)
    return jnp.log1p(jnp.floor((p + 1.0) / floor_scale)) * scale + 1.0


def cached_keys_values(cache: dict[str, Array], k: Array, v: Array, positions: Array,
                       segment_ids: Array) -> dict[str, Array]:
    """The cache with this call's keys and values written: the token at position p goes to slot
    p mod S (a rolling buffer of the last S positions, Mistral 7B's rolling buffer cache, Jiang
    et al. 2023, Sec. 2); padding (segment 0) is not written.

    cache: key, value [B, S, K, h], positions [B, S] int32, filled [B, S] bool (all zeros: empty).
    k, v: [B, L, K, h] (rotated); positions, segment_ids: [B, L]. L <= S, and L > 1 only while
    no slot is overwritten (the prefill), so every query still finds its keys.
    """
    slots = cache["key"].shape[1]
    slot = jnp.where(segment_ids > 0, positions % slots, slots)  # slot S is out of range: dropped
    rows = jnp.arange(k.shape[0])[:, None]

    def write(buffer: Array, values: Array) -> Array:
        return buffer.at[rows, slot].set(values.astype(buffer.dtype), mode="drop")

    return {"key": write(cache["key"], k), "value": write(cache["value"], v),
            "positions": write(cache["positions"], positions),
            "filled": write(cache["filled"], jnp.ones_like(segment_ids, bool))}


def cache_mask(query_positions: Array, cache: dict[str, Array], chunk: int | None = None,
               window: int | None = None) -> Array:
    """[B, L, S] bool: the query at position p sees the filled slots holding positions q with
    p - S < q <= p (causal, within the window of the cache's S slots), with `chunk` only
    those of its own chunk (`same_chunk`), with `window` only those with p - q < window (as
    `attention_mask`).

    query_positions: [B, L]; cache: as `cached_keys_values` returns it.
    """
    p = query_positions[:, :, None]
    q = cache["positions"][:, None, :]
    mask = cache["filled"][:, None, :] & (q <= p) & (p - q < cache["positions"].shape[1])
    mask = mask & same_chunk(query_positions, cache["positions"], chunk)
    return mask if window is None else mask & (p - q < window)


def softmax_with_sink(logits: Array, sink: Array) -> Array:
    """[..., S] attention probabilities with a sink: softmax over the S logits and one more
    logit `sink` [...], whose column is then dropped, so a query may give part of its mass to
    no key (exp(l_s) / (sum_s' exp(l_s') + exp(sink)); rows sum to less than 1). Learned
    per-head sinks, a learned term in the softmax's denominator: gpt-oss model card (OpenAI
    2025), Sec. 2; Xiao et al. 2023 (StreamingLLM) for sinks as the softmax's outlet.
    """
    sink = sink[..., None]
    top = jax.lax.stop_gradient(jnp.maximum(jnp.max(logits, axis=-1, keepdims=True), sink))
    exp = jnp.exp(logits - top)
    return exp / (jnp.sum(exp, axis=-1, keepdims=True) + jnp.exp(sink - top))


def dot_product_attention(q: Array, k: Array, v: Array, mask: Array,
                          sinks: Array | None = None) -> Array:
    """softmax(q k^T / sqrt(h) + mask) v, with H = K * G query heads sharing K key/value heads.

    q: [B, L, H, h]; k, v: [B, S, K, h]; mask: [B, L, S] bool; sinks: [H] logits of each
    head's attention sink (`softmax_with_sink`), or None. Returns [B, L, H, h].
    Logits and softmax in float32. The full [L, S] score matrix is computed (masked entries
    included); `flops.count` counts it that way.
    """
    batch, length, num_heads, head_dim = q.shape
    num_kv = k.shape[2]
    q = q.reshape(batch, length, num_kv, num_heads // num_kv, head_dim)
    logits = jnp.einsum("blkgh,bskh->bkgls", q, k, preferred_element_type=jnp.float32)
    logits = logits * head_dim**-0.5
    logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)
    if sinks is None:
        probs = jax.nn.softmax(logits, axis=-1)
    else:
        sink = jnp.broadcast_to(sinks.astype(jnp.float32).reshape(num_kv, -1)[:, :, None],
                                logits.shape[1:-1])
        probs = softmax_with_sink(logits, sink)
    out = jnp.einsum("bkgls,bskh->blkgh", probs.astype(v.dtype), v)
    return out.reshape(batch, length, num_heads, head_dim)


class Attention(nn.Module):
    """Attention block: x [B, L, d] -> [B, L, d].

    Params (logical axes): query [d, H, h] ("embed", "heads", "kv"), key and value [d, K, h]
    ("embed", "kv_heads", "kv"), out [H, h, d] ("heads", "kv", "embed"); with `qkv_bias`, biases
    [H, h] / [K, h]. Kernels: truncated normal with variance 1/fan_in.
    `qk_norm` (`ModelConfig.qk_norm`) normalises q and k after the projections, before the
    rotary positions: "per_head" over each head's h dims (query_norm/key_norm scale [h], shared
    by the heads), "projection" over the whole projection (scale [H*h] and [K*h]),
    "weightless" over each head's h dims without a scale (Llama 4 normalises after the
    rotation; a rotation keeps the RMS, so the order does not matter).
    `rope_interleave` rotates pairs (2i, 2i + 1) and `rope_scaling` scales the frequencies
    (`positions.apply_rotary`); `chunk` limits attention to the query's chunk of positions
    (`same_chunk`); `temperature` (floor_scale, scale) multiplies the queries by
    `temperature_scale` (Llama 4's NoPE blocks).
    GPT-OSS options: `window` (sliding-window attention, `attention_mask`), `sinks` (a learned
    sink logit per head, param "sinks" [H] ("heads",), zeros at init; `softmax_with_sink`),
    `out_bias` (param "out_bias" [d] ("embed",)).
    With the `CACHE` collection mutable (decoding, causal only), the keys and values go through
    the cache `CACHE`/{key, value, positions, filled} (see `cached_keys_values`); a call that
    finds no cache creates an empty one of S = L slots (how `decode.init_cache` sizes it).
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    causal: bool
    use_rotary: bool
    rope_base: float = 10000.0
    qkv_bias: bool = False
    qk_norm: str = "none"
    norm: str = "rmsnorm"
    norm_eps: float = 1e-6
    rope_interleave: bool = False
    rope_scaling: RotaryScaling | None = None
    chunk: int | None = None
    temperature: tuple[float, float] | None = None
    window: int | None = None
    sinks: bool = False
    out_bias: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, segment_ids: Array, positions: Array) -> Array:
        d_model = x.shape[-1]
        x = x.astype(self.dtype)

        def project(name: str, heads: int, head_axis: str) -> Array:
            init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                                    in_axis=0, out_axis=(1, 2))
            kernel = self.param(name, nn.with_logical_partitioning(
                init, ("embed", head_axis, "kv")), (d_model, heads, self.head_dim),
                self.param_dtype)
            y = jnp.einsum("bld,dnh->blnh", x, kernel.astype(self.dtype))
            if self.qkv_bias:
                bias = self.param(f"{name}_bias", nn.with_logical_partitioning(
                    nn.initializers.zeros, (head_axis, "kv")), (heads, self.head_dim),
                    self.param_dtype)
                y = y + bias.astype(self.dtype)
            return y

        q = project("query", self.num_heads, "heads")
        k = project("key", self.num_kv_heads, "kv_heads")
        v = project("value", self.num_kv_heads, "kv_heads")
        if self.qk_norm != "none":
            q, k = self.normalize(q, "query_norm"), self.normalize(k, "key_norm")
        if self.use_rotary:
            q, k = (apply_rotary(y, positions, self.rope_base, scaling=self.rope_scaling,
                                 interleaved=self.rope_interleave) for y in (q, k))
        if self.temperature is not None:
            scale = temperature_scale(positions, *self.temperature)[:, :, None, None]
            q = (q.astype(jnp.float32) * scale).astype(q.dtype)
        if self.is_mutable_collection(CACHE) and not self.is_initializing():
            empty = {"key": k, "value": v, "positions": positions, "filled": segment_ids > 0}
            cache = {name: self.variable(CACHE, name, jnp.zeros_like, value)
                     for name, value in empty.items()}
            updated = cached_keys_values({n: c.value for n, c in cache.items()}, k, v, positions,
                                         segment_ids)
            for name, value in updated.items():
                cache[name].value = value
            k, v = updated["key"], updated["value"]
            mask = cache_mask(positions, updated, self.chunk, self.window)
        else:
            mask = attention_mask(segment_ids, causal=self.causal, positions=positions,
                                  chunk=self.chunk, window=self.window)
        sinks = self.param("sinks", nn.with_logical_partitioning(
            nn.initializers.zeros, ("heads",)), (self.num_heads,),
            self.param_dtype) if self.sinks else None
        out = dot_product_attention(q, k, v, mask, sinks)
        out_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal",
                                                    in_axis=(0, 1), out_axis=2)
        out_kernel = self.param("out", nn.with_logical_partitioning(
            out_init, ("heads", "kv", "embed")), (self.num_heads, self.head_dim, d_model),
            self.param_dtype)
        y = jnp.einsum("blnh,nhd->bld", out, out_kernel.astype(self.dtype))
        if self.out_bias:
            y = y + self.param("out_bias", nn.with_logical_partitioning(
                nn.initializers.zeros, ("embed",)), (d_model,), self.param_dtype).astype(self.dtype)
        return y

    def normalize(self, x: Array, name: str) -> Array:
        """QK-norm of projected queries or keys [B, L, N, h] (see the class docstring)."""
        if self.qk_norm == "weightless":
            return rms_norm(x, jnp.ones((), jnp.float32), self.norm_eps)
        norm = Norm(self.norm, self.norm_eps, self.param_dtype, axis=None, name=name)
        if self.qk_norm == "per_head":
            return norm(x)
        return norm(x.reshape(*x.shape[:2], -1)).reshape(x.shape)
