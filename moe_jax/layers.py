"""Flax linen wrapper of the pure MoE layer: it only holds the parameters and calls `moe.apply`.

Parameters carry logical axis names (see `LOGICAL_AXES`) that `moe_jax.sharding` maps to a mesh.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax import experts, moe
from moe_jax.config import MoeConfig
from moe_jax.sharding import MoeSharding

Array = jax.Array

# Logical axis names of every MoE parameter, by (group, name).
LOGICAL_AXES: dict[tuple[str, str], tuple[str | None, ...]] = {
    ("router", "kernel"): ("embed", None),
    ("experts", "wi"): ("expert", "embed", "mlp"),
    ("experts", "wi_gate"): ("expert", "embed", "mlp"),
    ("experts", "wo"): ("expert", "mlp", "embed"),
    ("shared", "wi"): ("embed", "mlp"),
    ("shared", "wi_gate"): ("embed", "mlp"),
    ("shared", "wo"): ("mlp", "embed"),
}


def _boxed(group: str, init_fn: Any) -> Any:
    """Wraps an init function returning {name: array} so every leaf carries its logical axes."""

    def init(key: Array) -> dict[str, nn.LogicallyPartitioned]:
        return {name: nn.LogicallyPartitioned(value, LOGICAL_AXES[(group, name)])
                for name, value in init_fn(key).items()}

    return init


class MoeLayer(nn.Module):
    """MoE feed-forward block: x [batch, seq, d] -> (y [batch, seq, d], aux dict);
    `token_mask` [batch, seq] (e.g. segment_ids > 0) keeps padding out of routing.

    Attributes:
      config: the layer's MoeConfig.
      causal: whether the caller is autoregressive. Expert-choice and soft routing mix the tokens
        of a group (a token's output depends on later tokens) and are refused when causal=True
        unless `config.allow_non_causal` is set.
      dtype: activation dtype (e.g. bfloat16); the router always runs in `config.router_dtype`.
      param_dtype: parameter dtype.
      sharding: expert parallelism on a mesh (`moe_jax.sharding.MoeSharding`); None: no mesh.
    Randomness (jitter, GShard random second expert) comes from the "router" rng stream.
    The sigmoid_bias router's bias is the variable "score_bias" of collection "moe_state".
    """

    config: MoeConfig
    causal: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    sharding: MoeSharding | None = None

    @nn.compact
    def __call__(self, x: Array, *, train: bool, token_mask: Array | None = None
                 ) -> tuple[Array, dict[str, Array]]:
        c = self.config
        if self.causal and not c.is_causal_safe and not c.allow_non_causal:
            raise ValueError(
                f"MoeConfig.router={c.router!r} mixes tokens across the sequence, which leaks "
                "future tokens in a causal model; use a token-choice router ('top_k', "
                "'sigmoid_bias'), a bidirectional encoder (causal=False), or set "
                "allow_non_causal=True if you accept the leak."
            )
        d_model = x.shape[-1]
        router_params = self.param(
            "router", _boxed("router", lambda k: {"kernel": moe.init_router(
                k, c, d_model, self.param_dtype)["kernel"]}))
        params = {
            "router": dict(router_params),
            "experts": self.param("experts", _boxed("experts", lambda k: experts.init_ffn(
                k, d_model, c.d_ff, c.activation, scale=c.init_scale, batch=(c.num_experts,),
                dtype=self.param_dtype))),
        }
        if c.num_shared_experts:
            params["shared"] = self.param("shared", _boxed("shared", lambda k: experts.init_ffn(
                k, d_model, c.num_shared_experts * c.d_ff, c.activation, scale=c.init_scale,
                dtype=self.param_dtype)))
        if c.router == "sigmoid_bias":
            bias = self.variable("moe_state", "score_bias", jnp.zeros, (c.num_experts,),
                                 jnp.float32)
            params["router"]["score_bias"] = bias.value
        needs_rng = train and (c.jitter_eps > 0 or c.second_expert_policy == "random")
        rng = self.make_rng("router") if needs_rng else None
        return moe.apply(params, x.astype(self.dtype), c, train=train, rng=rng,
                         token_mask=token_mask, sharding=self.sharding)
