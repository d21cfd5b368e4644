"""Flax linen wrapper of the pure MoE layer: it only holds the parameters and calls `moe.apply`.

Parameters carry logical axis names (see `LOGICAL_AXES`) that `moe_jax.parallel.sharding` maps
to a mesh.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax import moe
from moe_jax.config import MoeConfig

Array = jax.Array

# The variable collection of the router's state (`moe.init_state`, e.g. the sigmoid_bias router's
# "score_bias"): moved by the train step (`routing.Router.update_state`), never by the optimizer.
STATE = "moe_state"
# The collection (and name) of the per-token routing each call sows.
ROUTING = "routing"

# Logical axis names of every MoE parameter, by (group, name).
LOGICAL_AXES: dict[tuple[str, str], tuple[str | None, ...]] = {
    ("router", "kernel"): ("embed", None),
    ("router", "bias"): (None,),
    ("experts", "wi_bias"): ("expert", "mlp"),
    ("experts", "wi_gate_bias"): ("expert", "mlp"),
    ("experts", "wo_bias"): ("expert", "embed"),
    ("experts", "wi"): ("expert", "embed", "mlp"),
    ("experts", "wi_gate"): ("expert", "embed", "mlp"),
    ("experts", "wo"): ("expert", "mlp", "embed"),
    ("shared", "wi"): ("embed", "mlp"),
    ("shared", "wi_gate"): ("embed", "mlp"),
    ("shared", "wo"): ("mlp", "embed"),
    ("shared", "output_gate"): ("embed", None),
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
      causal: whether the caller is autoregressive (`MoeConfig.check_causal`).
      dtype: activation dtype (e.g. bfloat16); the router always runs in `config.router_dtype`.
      param_dtype: parameter dtype.
      sharding: the layer's `moe.Layout` on a mesh
        (`moe_jax.parallel.expert_parallel.MoeSharding`); None: no mesh.
    Randomness (jitter, GShard random second expert, expert dropout) comes from the "router"
    rng stream.
    The router's state (`moe.init_state`) is the variables of collection `STATE`. Each
    call sows its per-token routing (`routing.TokenRouting`) as `ROUTING` in the collection
    `ROUTING` (kept only when the caller makes that collection mutable).
    """

    config: MoeConfig
    causal: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    sharding: moe.Layout | None = None

    @nn.compact
    def __call__(self, x: Array, *, train: bool, token_mask: Array | None = None
                 ) -> tuple[Array, dict[str, Array]]:
        c = self.config
        c.check_causal(self.causal)
        d_model = x.shape[-1]
        params = {group: dict(self.param(group, _boxed(
            group, functools.partial(moe.PARAM_INITS[group], config=c, d_model=d_model,
                                     dtype=self.param_dtype))))
            for group in moe.param_groups(c)}
        state = {name: self.variable(STATE, name, lambda value=value: value).value
                 for name, value in moe.init_state(c).items()}
        rng = self.make_rng("router") if c.uses_rng(train) else None
        y, aux, tokens = moe.apply_with_routing(params, x.astype(self.dtype), c, train=train,
                                                rng=rng, token_mask=token_mask,
                                                sharding=self.sharding, state=state)
        if self.is_mutable_collection(ROUTING) and not self.is_initializing():
            self.sow(ROUTING, ROUTING, tokens)
        return y, aux
