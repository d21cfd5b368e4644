"""Multi-token prediction (MTP; DeepSeek-V3, Liu et al. 2024, Sec. 2.2): D sequential modules
after the main model, module k predicting the token k + 1 places after the next one.

Shape letters: B batch, L sequence length, d model width, V vocabulary, D `mtp_depth`.

Module k (1..D), for position i (eqs. 21-23): h'_i = W_k [RMSNorm(h^{k-1}_i);
RMSNorm(Emb(t_{i+k}))] with W_k [2d, d]; h^k = Block_k(h'); logits^k_i = OutHead(Norm_k(h^k_i)),
which predicts t_{i+k+1}. h^0 is the main model's last hidden state (before its final norm);
the embedding and the output head are the main model's (shared, as in the paper). The input
tokens t_{i+k} are the model's own inputs shifted k places (`shifted_tokens`); the loss
(`mtp_targets`, `train.objective`) weights only positions whose token i + k + 1 is in the same
packed sequence. Block_k has the FFN of the model's last block (an MoE layer for DeepSeek-V3);
its routing statistics are not in the model's aux, so its router is trained by the task
gradient only (no balance loss, no bias update).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax.config import MoeConfig
from moe_jax.models.config import ModelConfig
from moe_jax.models.norms import Norm

Array = jax.Array

# The key of the MTP logits [D, B, L, V] in the Transformer's aux (`objective.compute_loss`
# takes them out: they are not a routing statistic).
MTP_LOGITS = "mtp_logits"
# The Transformer's submodule holding the MTP modules (params and router state under it).
MTP_NAME = "mtp"


def shifted_tokens(tokens: Array, k: int, fill: int = 0) -> Array:
    """[B, L] tokens k places later (t_{i+k} at i); the last k positions hold `fill`."""
    return jnp.concatenate([tokens[:, k:], jnp.full((tokens.shape[0], k), fill,
                                                    tokens.dtype)], axis=1)


def mtp_targets(targets: Array, weights: Array, segment_ids: Array, k: int
                ) -> tuple[Array, Array]:
    """Targets and weights of MTP module k: targets k places later (t_{i+k+1} for the
    next-token targets t_{i+1}), weighted only where that target is in position i's packed
    sequence (and 0 on the last k positions). targets, weights, segment_ids: [B, L]."""
    same = shifted_tokens(segment_ids, k, fill=-1) == segment_ids
    return shifted_tokens(targets, k), shifted_tokens(weights, k) * same.astype(weights.dtype)


class MtpModule(nn.Module):
    """MTP module k: (h^{k-1} [B, L, d], Emb(t_{i+k}) [B, L, d]) -> h^k [B, L, d].

    Params: input_norm and embedding_norm scales [d], projection [2d, d] ("mlp", "embed"),
    block (a Transformer block built by `block(config, moe or None, moe_sharding, name=...)`).
    """

    config: ModelConfig
    moe: MoeConfig | None
    moe_sharding: Any
    block: Any

    @nn.compact
    def __call__(self, h: Array, emb: Array, segment_ids: Array, positions: Array,
                 train: bool) -> Array:
        c = self.config
        both = jnp.concatenate([
            Norm(c.norm, c.norm_eps, c.jnp_param_dtype, name="input_norm")(h),
            Norm(c.norm, c.norm_eps, c.jnp_param_dtype, name="embedding_norm")(emb)], axis=-1)
        init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
        kernel = self.param("projection", nn.with_logical_partitioning(init, ("mlp", "embed")),
                            (2 * c.d_model, c.d_model), c.jnp_param_dtype)
        h, _ = self.block(c, self.moe, self.moe_sharding, name="block")(
            both @ kernel.astype(c.jnp_dtype), segment_ids, positions, train)
        return h


class MultiTokenPrediction(nn.Module):
    """The D MTP modules: (h [B, L, d], inputs [B, L]) -> logits [D, B, L, V].

    Submodules module_1 .. module_D (`MtpModule`) and their output norms output_norm_k (scale
    [d]); `head` maps normalised hidden states to logits (the main model's output head).
    """

    config: ModelConfig
    moe: MoeConfig
    moe_sharding: Any
    block: Any

    @nn.compact
    def __call__(self, h: Array, inputs: Array, embedding: Array,
                 head: Callable[[Array], Array], segment_ids: Array, positions: Array,
                 train: bool) -> Array:
        c = self.config
        moe = self.moe if (c.num_layers - 1) in c.sparse_layers else None
        logits = []
        for k in range(1, c.mtp_depth + 1):
            emb = jnp.take(embedding, shifted_tokens(inputs, k), axis=0).astype(c.jnp_dtype)
            h = MtpModule(c, moe, self.moe_sharding, self.block, name=f"module_{k}")(
                h, emb, segment_ids, positions, train)
            logits.append(head(Norm(c.norm, c.norm_eps, c.jnp_param_dtype,
                                    name=f"output_norm_{k}")(h)))
        return jnp.stack(logits)
