"""The Transformer: a pre-norm decoder-only LM (or bidirectional encoder) whose chosen blocks have
an MoE feed-forward layer.

Shape letters: B batch, L sequence length, d model width, V vocabulary (real, not padded),
M number of MoE blocks, E experts.

    model = Transformer(model_config, moe_config)
    variables = model.init({"params": key}, inputs, train=False)
    logits, aux = model.apply(variables, inputs, segment_ids=..., positions=..., train=True,
                              rngs={"dropout": k1, "router": k2})

Block i: h = x + Dropout(Attention(Norm(x))); out = h + Dropout(FFN(Norm(h))), where FFN is the
dense FFN or, for i in `config.sparse_layers`, the MoE layer. A final Norm precedes the logits.
Initialisation (a documented choice, not a paper's): token (and learned position) embeddings
~ N(0, embed_init_std^2), std 1 as in T5 (every block sees them through a norm, so their scale
only sets the residual stream's); the untied output kernel is truncated normal with variance
1/d, so a unit-RMS final h gives ~N(0, 1) logits and an initial loss near ln(V); tied logits
are h @ embedding.T * d**-0.5 (T5), which starts with a ~sqrt(d) logit on the input token
itself. Every other kernel is truncated normal with variance 1/fan_in, as the experts
(`experts.init_ffn`); norm scales 1, biases 0.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax import experts, routing
from moe_jax import moe as moe_lib
from moe_jax.config import MoeConfig
from moe_jax.layers import ROUTING, MoeLayer
from moe_jax.models import latent_attention, stack
from moe_jax.models.attention import Attention
from moe_jax.models.config import ModelConfig, check_compatible
from moe_jax.models.multi_token import MTP_LOGITS, MTP_NAME, MultiTokenPrediction
from moe_jax.models.norms import Norm
from moe_jax.models.positions import default_positions, rotary_scaling_of
from moe_jax.models.stack import MOE_NAME, block_name

Array = jax.Array

ACTIVATION_AXES = ("batch", "length", "embed")


def moe_layer_variables(collection: dict[str, Any], config: ModelConfig) -> list[Any]:
    """The variables of each sparse block's MoE layer in one collection (e.g. the "moe_state"
    or "routing" collection of `model.apply`), in block order (the order of the stacked aux);
    a scanned model's stacked variables are sliced per block."""
    unrolled = stack.convert_layout(collection, config, scanned=False)
    return [unrolled[block_name(i)][MOE_NAME] for i in config.sparse_layers]


def layer_routing(collections: dict[str, Any], config: ModelConfig) -> list[routing.TokenRouting]:
    """Each sparse block's per-token routing ([B * L, ...], block order) from the collections of
    `model.apply(..., mutable=[layers.ROUTING])` (what the MoE layers sowed); [] when dense."""
    if not config.sparse_layers:
        return []
    return [v[ROUTING][0] for v in moe_layer_variables(collections[ROUTING], config)]


def with_moe_layer_variables(collection: dict[str, Any], config: ModelConfig,
                             values: list[Any]) -> dict[str, Any]:
    """`collection` with each sparse block's MoE-layer variables replaced by `values` (block
    order), in the model's layout; the inverse of `moe_layer_variables`."""
    out = stack.convert_layout(collection, config, scanned=False)
    for layer, value in zip(config.sparse_layers, values, strict=True):
        out[block_name(layer)] = {**out[block_name(layer)], MOE_NAME: value}
    return stack.convert_layout(out, config, scanned=True) if config.scan_layers else out


class DenseFfn(nn.Module):
    """The dense FFN: `experts.ffn`, the same math as one expert. wi (and wi_gate for swiglu)
    [d, f] ("embed", "mlp"), wo [f, d] ("mlp", "embed"); no biases."""

    d_ff: int
    activation: str
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        d = x.shape[-1]
        init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")

        def kernel(name: str, shape: tuple[int, int], axes: tuple[str, str]) -> Array:
            return self.param(name, nn.with_logical_partitioning(init, axes), shape,
                              self.param_dtype)

        params = {"wi": kernel("wi", (d, self.d_ff), ("embed", "mlp")),
                  "wo": kernel("wo", (self.d_ff, d), ("mlp", "embed"))}
        if self.activation == "swiglu":
            params["wi_gate"] = kernel("wi_gate", (d, self.d_ff), ("embed", "mlp"))
        return experts.ffn(params, x.astype(self.dtype), self.activation)


class Block(nn.Module):
    """One pre-norm Transformer block; `moe` set = sparse FFN. Returns (x, aux or None).
    `layer`: the block's index, for its attention (`ModelConfig.attention_kind`; in a scan, the
    index of the member in the first repeat, whose kind every repeat shares)."""

    config: ModelConfig
    moe: MoeConfig | None = None
    moe_sharding: moe_lib.Layout | None = None
    layer: int | None = None

    @nn.compact
    def __call__(self, x: Array, segment_ids: Array, positions: Array,
                 train: bool) -> tuple[Array, dict[str, Array] | None]:
        c = self.config
        dtype, param_dtype = c.jnp_dtype, c.jnp_param_dtype
        dropout = nn.Dropout(c.dropout_rate, deterministic=not train)
        if c.latent_attention:
            attention = latent_attention.from_config(c, "attention")
        else:
            kind = c.attention_kind(self.layer)
            attention = Attention(
                num_heads=c.num_heads, num_kv_heads=c.kv_heads, head_dim=c.head_size,
                causal=c.causal, use_rotary=kind.rotary, rope_base=c.rope_base,
                qkv_bias=c.qkv_bias, qk_norm=kind.qk_norm, norm=c.norm, norm_eps=c.norm_eps,
                rope_interleave=c.rope_interleave, rope_scaling=rotary_scaling_of(c),
                chunk=kind.chunk,
                temperature=(c.attn_temperature_floor, c.attn_temperature_scale)
                if kind.temperature else None, window=kind.window, sinks=c.attention_sinks,
                out_bias=c.out_bias, dtype=dtype, param_dtype=param_dtype,
                name="attention")
        h = Norm(c.norm, c.norm_eps, param_dtype, name="attention_norm")(x)
        x = x + dropout(attention(h, segment_ids, positions))

        h = Norm(c.norm, c.norm_eps, param_dtype, name="ffn_norm")(x)
        aux = None
        if self.moe is None:
            y = DenseFfn(c.d_ff, c.activation, dtype, param_dtype, name="ffn")(h)
        else:
            y, aux = MoeLayer(self.moe, causal=c.causal, dtype=dtype, param_dtype=param_dtype,
                              sharding=self.moe_sharding, name=MOE_NAME)(
                h, train=train, token_mask=segment_ids > 0)
        x = x + dropout(y.astype(x.dtype))
        return nn.with_logical_constraint(x, ACTIVATION_AXES), aux


class Transformer(nn.Module):
    """Token ids -> (logits, aux).

    __call__(inputs [B, L] int32, *, segment_ids=None, positions=None, train) returns
      logits: [B, L, V] float32 for the `vocab_size` real tokens (padded rows are sliced off);
      aux: the MoE layers' routing aux stacked over the M sparse blocks in block order, e.g.
        aux["load_balancing_loss"] [M], aux["expert_load"] [M, E]; {} for a dense model.
    segment_ids [B, L] (0 = padding) keeps attention inside each packed sequence; positions
    [B, L] restart per segment. Both default to one sequence per row. Randomness in training:
    rng streams "dropout" and "router" (router jitter, GShard's random second expert).
    `moe_sharding` lays every MoE layer out on a mesh (a `moe.Layout`, e.g.
    `moe_jax.parallel.expert_parallel.MoeSharding`).
    """

    config: ModelConfig
    moe: MoeConfig
    moe_sharding: moe_lib.Layout | None = None

    @nn.compact
    def __call__(self, inputs: Array, *, segment_ids: Array | None = None,
                 positions: Array | None = None, train: bool) -> tuple[Array, dict[str, Array]]:
        c = self.config
        check_compatible(c, self.moe)
        if inputs.ndim != 2:
            raise ValueError(
                f"Transformer expects inputs of shape [batch, seq]; got {inputs.shape}.")
        batch, length = inputs.shape
        if c.positions == "learned" and length > c.max_seq_len:
            raise ValueError(f"sequence length {length} exceeds ModelConfig.max_seq_len="
                             f"{c.max_seq_len} of the learned position table; raise max_seq_len.")
        if segment_ids is None:
            segment_ids = jnp.ones((batch, length), jnp.int32)
        if positions is None:
            positions = default_positions(batch, length)

        embed_init = nn.initializers.normal(c.embed_init_std)
        embedding = self.param("embedding", nn.with_logical_partitioning(
            embed_init, ("vocab", "embed")), (c.padded_vocab_size, c.d_model), c.jnp_param_dtype)
        x = jnp.take(embedding, inputs, axis=0).astype(c.jnp_dtype)
        if c.positions == "learned":
            table = self.param("position_embedding", nn.with_logical_partitioning(
                embed_init, (None, "embed")), (c.max_seq_len, c.d_model), c.jnp_param_dtype)
            x = x + jnp.take(table, positions, axis=0).astype(c.jnp_dtype)
        x = nn.Dropout(c.dropout_rate, deterministic=not train)(x)
        x = nn.with_logical_constraint(x, ACTIVATION_AXES)

        x, aux = stack.apply_blocks(Block, c, self.moe, self.moe_sharding, x, segment_ids,
                                    positions, train=train)

        hidden = x
        x = Norm(c.norm, c.norm_eps, c.jnp_param_dtype, name="final_norm")(x)
        if c.tie_embeddings:
            def head(y: Array) -> Array:
                return jnp.einsum("bld,vd->blv", y, embedding.astype(c.jnp_dtype),
                                  preferred_element_type=jnp.float32)[
                    ..., :c.vocab_size] * c.d_model**-0.5
        else:
            out_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
            kernel = self.param("output", nn.with_logical_partitioning(
                out_init, ("embed", "vocab")), (c.d_model, c.padded_vocab_size),
                c.jnp_param_dtype)

            def head(y: Array) -> Array:
                return jnp.einsum("bld,dv->blv", y, kernel.astype(c.jnp_dtype),
                                  preferred_element_type=jnp.float32)[..., :c.vocab_size]
        if c.mtp_depth:  # DeepSeek-V3's multi-token prediction: logits [D, B, L, V]
            aux = {**aux, MTP_LOGITS: MultiTokenPrediction(
                c, self.moe, self.moe_sharding, Block, name=MTP_NAME)(
                hidden, inputs, embedding, head, segment_ids, positions, train)}
        return head(x), aux

