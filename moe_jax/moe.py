"""The MoE feed-forward layer as pure functions: `init_params` and `apply`.

    params = init_params(key, config, d_model)
    state = init_state(config)      # the router's state ({} for most routers), not parameters
    y, aux = apply(params, x, config, train=True, rng=key, state=state)
    y, aux, tokens = apply_with_routing(params, x, config, train=False)   # + per-token routing

Shape letters: N tokens in the call, G routing groups of T = N / G tokens, E experts, K choices,
C capacity, d model width, f expert width. One call reads top-down (`_layer`): router logits
(router dtype) -> `routing.route` (choices, slots, statistics) -> dispatch, experts and combine
(`dispatch.py`, `experts.py`) -> shared experts.

`Layout` is the layer's one seam to a mesh: the layer calls its five methods and never asks how
it is laid out; `moe_jax.parallel.expert_parallel.MoeSharding` implements them for expert
parallelism.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from moe_jax import dispatch, experts, routing
from moe_jax.config import MoeConfig

Array = jax.Array
Params = dict[str, dict[str, Array]]
# The layer on the tokens at hand: (params, router state, x, rng, token_mask) -> (y, routing).
LayerFn = Callable[[Params, routing.State, Array, Array | None, Array | None],
                   tuple[Array, routing.Routing]]


class Layout:
    """Where the layer's arrays live. This default runs the layer on the arrays as given (one
    device, or wherever XLA's sharding propagation puts them)."""

    def run(self, layer: LayerFn, params: Params, state: routing.State, x: Array,
            rng: Array | None, token_mask: Array | None, config: MoeConfig
            ) -> tuple[Array, dict[str, Array], routing.TokenRouting]:
        """Runs `layer` and returns (y, statistics, per-token routing) for all tokens."""
        y, routed = layer(params, state, x, rng, token_mask)
        return y, routed.statistics, routed.tokens

    def constrain_tokens(self, grouped: Array) -> Array:
        """Places the routing groups [G, T, d] before dispatch."""
        return grouped

    def expert_stage(self, expert_params: experts.Params, activation: str,
                     dropout: experts.Dropout | None = None) -> dispatch.ExpertStage:
        """The stage that runs every expert on its buffer [G, E, C, d] (with expert dropout,
        if given)."""
        return functools.partial(experts.expert_ffn, expert_params, activation=activation,
                                 expert_axis=1, dropout=dropout)

    def grouped_stage(self, expert_params: experts.Params, activation: str,
                      grouped_matmul: str, dropout: experts.Dropout | None = None
                      ) -> dispatch.GroupedStage:
        """The stage that runs the experts on rows sorted by expert [M, d] (dropless; with
        expert dropout, if given)."""
        return functools.partial(experts.grouped_ffn, expert_params, activation=activation,
                                 impl=grouped_matmul, dropout=dropout)

    def model_sum(self, y: Array) -> Array:
        """Sums partial results over a model-parallel axis (the shared experts' output)."""
        return y


LOCAL = Layout()


def expert_activation(config: MoeConfig) -> experts.Activation:
    """The activation the expert functions take: `MoeConfig.activation`, or for
    "clamped_swiglu" an `experts.ClampedSwiglu` holding swiglu_alpha and swiglu_limit."""
    if config.activation == "clamped_swiglu":
        return experts.ClampedSwiglu(config.swiglu_alpha, config.swiglu_limit)
    return config.activation


def init_router(key: Array, config: MoeConfig, d_model: int,
                dtype: jnp.dtype = jnp.float32) -> dict[str, Array]:
    """{"kernel": [d, E]} (Soft MoE: [d, E * slots_per_expert], the router's `num_logits`):
    truncated normal, fan-in scaled by `init_scale`; with `router_bias`, "bias" [E] zeros."""
    init = jax.nn.initializers.variance_scaling(config.init_scale, "fan_in", "truncated_normal")
    columns = routing.ROUTERS[config.router].num_logits(config)
    params = {"kernel": init(key, (d_model, columns), dtype)}
    if config.router_bias:
        params["bias"] = jnp.zeros((columns,), dtype)
    return params


def init_experts(key: Array, config: MoeConfig, d_model: int,
                 dtype: jnp.dtype = jnp.float32) -> experts.Params:
    """{"wi": [E, d, f], "wo": [E, f, d]} (+ "wi_gate" [E, d, f] for gated units; with
    `expert_bias`, zero biases "wi_bias", "wi_gate_bias" [E, f] and "wo_bias" [E, d])."""
    c = config
    return experts.init_ffn(key, d_model, c.d_ff, expert_activation(c), scale=c.init_scale,
                            batch=(c.num_experts,), dtype=dtype, bias=c.expert_bias)


def init_shared(key: Array, config: MoeConfig, d_model: int,
                dtype: jnp.dtype = jnp.float32) -> experts.Params:
    """The S shared experts as one FFN: {"wi": [d, S*f], "wo": [S*f, d]} (+ "wi_gate"), and with
    `shared_expert_gate` their "output_gate" [d, 1] (truncated normal, fan-in scaled)."""
    c = config
    if not c.shared_expert_gate:
        return experts.init_ffn(key, d_model, c.num_shared_experts * c.d_ff,
                                expert_activation(c), scale=c.init_scale, dtype=dtype)
    ffn_key, gate_key = jax.random.split(key)
    init = jax.nn.initializers.variance_scaling(c.init_scale, "fan_in", "truncated_normal")
    return {**experts.init_ffn(ffn_key, d_model, c.num_shared_experts * c.d_ff,
                               expert_activation(c),
                               scale=c.init_scale, dtype=dtype),
            "output_gate": init(gate_key, (d_model, 1), dtype)}


# Parameter group -> its initialiser (key, config, d_model, dtype) -> {name: array}.
PARAM_INITS: dict[str, Callable[..., dict[str, Array]]] = {
    "router": init_router, "experts": init_experts, "shared": init_shared}


def param_groups(config: MoeConfig) -> tuple[str, ...]:
    """The parameter groups of a layer: router and experts, plus shared experts if any."""
    return ("router", "experts") + (("shared",) if config.num_shared_experts else ())


def init_params(key: Array, config: MoeConfig, d_model: int,
                dtype: jnp.dtype = jnp.float32) -> Params:
    """Parameters of one MoE layer, one entry per `param_groups` group (see `PARAM_INITS`)."""
    keys = dict(zip(PARAM_INITS, jax.random.split(key, len(PARAM_INITS)), strict=True))
    return {group: PARAM_INITS[group](keys[group], config, d_model, dtype)
            for group in param_groups(config)}


def init_state(config: MoeConfig) -> routing.State:
    """The router's initial state (`routing.Router.init_state`; {} for a stateless router), e.g.
    the sigmoid_bias router's `score_bias` [E]. It is not a parameter: the optimizer never sees
    it; the train step moves it (`Router.update_state`)."""
    init = routing.ROUTERS[config.router].init_state
    return {} if init is None else init(config)


def _check_input(params: Params, x: Array, config: MoeConfig, rng: Array | None,
                 train: bool) -> int:
    """Validates shapes; returns the routing group size T."""
    d_params = params["router"]["kernel"].shape[0]
    if x.ndim not in (2, 3) or x.shape[-1] != d_params:
        raise ValueError(
            f"moe.apply expects x of shape [batch, seq, d_model] or [tokens, d_model] with "
            f"d_model={d_params} (params['router']['kernel'] has shape "
            f"{params['router']['kernel'].shape}); got x.shape={x.shape}."
        )
    num_tokens = x.size // x.shape[-1]
    group = config.group_size or num_tokens
    if num_tokens % group:
        raise ValueError(
            f"MoeConfig.group_size={config.group_size} does not divide the {num_tokens} tokens of "
            f"x.shape={x.shape}; choose a group_size that divides batch*seq (or None)."
        )
    if config.uses_rng(train) and rng is None:
        raise ValueError(
            "moe.apply(train=True) needs `rng` for router jitter (jitter_eps > 0), GShard's "
            "random second expert or expert dropout; pass rng=jax.random.key(...) or set "
            "train=False."
        )
    return group


def router_logits(params: Params, x: Array, config: MoeConfig, *, train: bool,
                  rng: Array | None) -> Array:
    """[N, E] router logits in `router_dtype` (Switch Sec. 2.4 selective precision), with
    multiplicative input jitter U[1 - eps, 1 + eps] in training (Switch Sec. 2.2), plus the
    router's bias where it has one (GPT-OSS)."""
    dt = config.router_jnp_dtype
    x = x.astype(dt)
    if train and config.jitter_eps > 0:
        eps = config.jitter_eps
        x = x * jax.random.uniform(rng, x.shape, dt, 1.0 - eps, 1.0 + eps)
    logits = x @ params["router"]["kernel"].astype(dt)
    if "bias" in params["router"]:
        logits = logits + params["router"]["bias"].astype(dt)
    return logits


def apply_with_routing(params: Params, x: Array, config: MoeConfig, *, train: bool = True,
                       rng: Array | None = None, token_mask: Array | None = None,
                       sharding: Layout | None = None, state: routing.State | None = None
                       ) -> tuple[Array, dict[str, Array], routing.TokenRouting]:
    """`apply`, plus each token's routing (`routing.TokenRouting`, [N, ...] with N = the tokens
    of x in order): the routing distribution, the chosen experts, gates and kept flags."""
    _check_input(params, x, config, rng, train)
    if token_mask is not None and token_mask.shape != x.shape[:-1]:
        raise ValueError(f"token_mask.shape={token_mask.shape} must be x.shape[:-1]="
                         f"{x.shape[:-1]} (one flag per token).")
    layout = sharding or LOCAL
    layer = functools.partial(_layer, config=config, train=train, layout=layout)
    return layout.run(layer, params, state or {}, x, rng, token_mask, config)


def apply(params: Params, x: Array, config: MoeConfig, *, train: bool = True,
          rng: Array | None = None, token_mask: Array | None = None,
          sharding: Layout | None = None, state: routing.State | None = None
          ) -> tuple[Array, dict[str, Array]]:
    """MoE feed-forward: x [batch, seq, d] or [tokens, d] -> (y of x's shape, aux).

    token_mask: bool of x's shape without d (e.g. `segment_ids > 0`); masked tokens (padding)
    take no expert slot, get y = 0 and are left out of every loss and statistic.
    aux: `routing.STATISTICS` (float32; means over the unmasked tokens, the balance loss per
    routing group, then averaged over groups weighted by their unmasked tokens).
    Drops contribute nothing: the token passes only through the caller's residual.
    state: the router's state (`init_state`; None: its initial value where it has one, e.g. a
    zero score bias). `sharding` lays the layer out on a mesh (a `Layout`, e.g.
    `moe_jax.parallel.expert_parallel.MoeSharding`).
    """
    y, aux, _ = apply_with_routing(params, x, config, train=train, rng=rng,
                                   token_mask=token_mask, sharding=sharding, state=state)
    return y, aux


def _layer(params: Params, state: routing.State, x: Array, rng: Array | None,
           token_mask: Array | None, *, config: MoeConfig, train: bool, layout: Layout
           ) -> tuple[Array, routing.Routing]:
    """The layer on the tokens at hand (all of them, or one device's): route, run the experts
    on the routed tokens, add the shared experts."""
    group = _check_input(params, x, config, rng, train)
    d = x.shape[-1]
    tokens = x.reshape(-1, d)
    n = tokens.shape[0]
    mask = None if token_mask is None else token_mask.reshape(n)
    # Three streams of the layer's rng: split(rng, 3)[:2] equals split(rng) (partitionable
    # threefry), so jitter and policy draw the same numbers with or without expert dropout.
    jitter_key, policy_key, dropout_key = (jax.random.split(rng, 3) if rng is not None
                                           else (None, None, None))
    logits = router_logits(params, tokens, config, train=train, rng=jitter_key)
    routed = routing.route(logits, config, num_groups=n // group, train=train, token_mask=mask,
                           state=state, rng=policy_key)
    dropout = (experts.Dropout(config.expert_dropout, dropout_key)
               if train and config.expert_dropout > 0 else None)
    y = _run_experts(params, tokens, routed, config, layout, n // group,
                     dropout).reshape(n, d)
    if "shared" in params:
        y = y + shared_experts(params["shared"], tokens, config, layout)
    if mask is not None:  # a select over [N, d]: skipped when every token is real
        y = jnp.where(mask[:, None], y, 0)
    return y.reshape(x.shape).astype(x.dtype), routed


def shared_experts(params: experts.Params, tokens: Array, config: MoeConfig,
                   layout: Layout = LOCAL) -> Array:
    """The always-active shared experts on tokens [N, d] -> [N, d] (DeepSeekMoE), scaled per
    token by sigmoid(x @ output_gate) with `shared_expert_gate` (Qwen2-MoE)."""
    y = layout.model_sum(experts.ffn(params, tokens, expert_activation(config)))
    if config.shared_expert_gate:
        y = y * jax.nn.sigmoid(tokens @ params["output_gate"].astype(tokens.dtype))
    return y


def _run_experts(params: Params, tokens: Array, routed: routing.Routing, config: MoeConfig,
                 layout: Layout, num_groups: int, dropout: experts.Dropout | None) -> Array:
    """Dispatch, experts (with expert dropout, if any) and combine: tokens [N, d] -> [N, d]
    (capacity and soft: [G, T, d])."""
    if config.dispatch == "dropless":
        stage = layout.grouped_stage(params["experts"], expert_activation(config),
                                     config.grouped_matmul, dropout)
        return dispatch.dropless_moe(tokens, routed.tokens.choice, stage, config.num_experts,
                                     config.gate_inputs)
    grouped = layout.constrain_tokens(tokens.reshape(num_groups, -1, tokens.shape[-1]))
    stage = layout.expert_stage(params["experts"], expert_activation(config), dropout)
    if routed.soft_weights is not None:
        return dispatch.soft_moe(grouped, *routed.soft_weights, stage, config.num_experts)
    return dispatch.capacity_moe(grouped, routed.slots, stage, config.dispatch,
                                 config.gate_inputs)
