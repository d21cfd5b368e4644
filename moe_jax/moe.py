"""The MoE feed-forward layer as two pure functions: `init_params` and `apply`.

    params = init_params(key, config, d_model)
    y, aux = apply(params, x, config, train=True, rng=key)

Shape letters: N tokens in the call, G routing groups of T = N / G tokens, E experts, K choices,
C capacity, d model width, f expert width. The pipeline reads top-down:
router logits (routing dtype) -> probabilities -> routing (`routing.py`) -> dispatch, experts and
combine (`dispatch.py`, `experts.py`) -> auxiliary losses and statistics (`losses.py`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from moe_jax import dispatch, experts, losses, routing
from moe_jax import sharding as sharding_lib
from moe_jax.config import MoeConfig

Array = jax.Array
Params = dict[str, dict[str, Array]]


def router_outputs(config: MoeConfig) -> int:
    """Columns of the router kernel: E, or E * slots_per_expert for Soft MoE's slot logits."""
    if config.router == "soft":
        return config.num_experts * config.slots_per_expert
    return config.num_experts


def init_router(key: Array, config: MoeConfig, d_model: int,
                dtype: jnp.dtype = jnp.float32) -> dict[str, Array]:
    """{"kernel": [d, E]} (truncated normal, fan-in scaled by `init_scale`), plus the
    non-trainable `score_bias` [E] of the sigmoid_bias router."""
    init = jax.nn.initializers.variance_scaling(config.init_scale, "fan_in", "truncated_normal")
    router = {"kernel": init(key, (d_model, router_outputs(config)), dtype)}
    if config.router == "sigmoid_bias":
        router["score_bias"] = jnp.zeros((config.num_experts,), dtype)
    return router


def init_params(key: Array, config: MoeConfig, d_model: int,
                dtype: jnp.dtype = jnp.float32) -> Params:
    """Parameters of one MoE layer:

    {"router": {"kernel": [d, E]}, "experts": {"wi": [E, d, f], "wo": [E, f, d]}}, with
    "wi_gate" [E, d, f] for swiglu, "shared": {"wi": [d, S*f], "wo": [S*f, d]} for S shared
    experts, and router "score_bias" [E] for the sigmoid_bias router. `score_bias` is state,
    not a parameter: `apply` stops its gradient, and the training step must exclude it from the
    optimizer and update it with `routing.update_score_bias`.
    """
    k_router, k_experts, k_shared = jax.random.split(key, 3)
    c = config
    params: Params = {
        "router": init_router(k_router, c, d_model, dtype),
        "experts": experts.init_ffn(k_experts, d_model, c.d_ff, c.activation,
                                    scale=c.init_scale, batch=(c.num_experts,), dtype=dtype),
    }
    if c.num_shared_experts:
        params["shared"] = experts.init_ffn(k_shared, d_model, c.num_shared_experts * c.d_ff,
                                            c.activation, scale=c.init_scale, dtype=dtype)
    return params


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
    needs_rng = config.jitter_eps > 0 or config.second_expert_policy == "random"
    if train and needs_rng and rng is None:
        raise ValueError(
            "moe.apply(train=True) needs `rng` for router jitter (jitter_eps > 0) or GShard's "
            "random second expert; pass rng=jax.random.key(...) or set train=False."
        )
    return group


def router_logits(params: Params, x: Array, config: MoeConfig, *, train: bool,
                  rng: Array | None) -> Array:
    """[N, E] router logits in `router_dtype` (Switch Sec. 2.4 selective precision), with
    multiplicative input jitter U[1 - eps, 1 + eps] in training (Switch Sec. 2.2)."""
    dt = config.router_jnp_dtype
    x = x.astype(dt)
    if train and config.jitter_eps > 0:
        eps = config.jitter_eps
        x = x * jax.random.uniform(rng, x.shape, dt, 1.0 - eps, 1.0 + eps)
    return x @ params["router"]["kernel"].astype(dt)


def apply(params: Params, x: Array, config: MoeConfig, *, train: bool = True,
          rng: Array | None = None, token_mask: Array | None = None,
          sharding: sharding_lib.MoeSharding | None = None) -> tuple[Array, dict[str, Array]]:
    """MoE feed-forward: x [batch, seq, d] or [tokens, d] -> (y of x's shape, aux).

    token_mask: bool of x's shape without d (e.g. `segment_ids > 0`); masked tokens (padding)
    take no expert slot, get y = 0 and are left out of every loss and statistic.
    aux (float32, means over the unmasked tokens; the balance loss per routing group, then
    averaged over groups weighted by their unmasked tokens):
      load_balancing_loss  Switch eq. 4 generalised to K (0 for expert_choice and soft)
      router_z_loss        ST-MoE eq. 5
      dropped_fraction     dropped assignments / (N*K); expert choice: tokens no expert chose
      expert_load [E]      kept assignments of each expert / (N*K)
      assignment_fraction [E]  share of assignments before drops (load for bias balancing)
      router_entropy       mean entropy (nats) of the routing distribution
      max_router_logit     largest router logit (no gradient)
    Drops contribute nothing: the token passes only through the caller's residual.
    `sharding` lays the layer out on a mesh with expert parallelism (see `moe_jax.sharding`).
    """
    _check_input(params, x, config, rng, train)
    if token_mask is not None and token_mask.shape != x.shape[:-1]:
        raise ValueError(f"token_mask.shape={token_mask.shape} must be x.shape[:-1]="
                         f"{x.shape[:-1]} (one flag per token).")
    if sharding is not None and sharding.form == "explicit":
        if config.dispatch == "dropless":
            raise ValueError(
                "dispatch='dropless' cannot use the explicit expert-parallel form: it needs a "
                "ragged all-to-all (unimplemented on XLA:CPU); use dispatch='gather' or "
                "'einsum' with fixed capacity, or the 'gspmd' form.")
        return sharding_lib.explicit_expert_parallel(
            _apply_local, params, x, config, train=train, rng=rng, token_mask=token_mask,
            sharding=sharding)

    def expert_stage_fn(expert_params: experts.Params) -> dispatch.ExpertStage:
        def stage(buffers: Array) -> Array:  # [G, E, C, d]
            if sharding is not None:
                buffers = sharding.constrain(buffers, sharding.buffer_spec)
            out = experts.expert_ffn(expert_params, buffers, config.activation, expert_axis=1)
            return sharding.constrain(out, sharding.buffer_spec) if sharding else out
        return stage

    constrain_tokens = (lambda a: sharding.constrain(a, sharding.token_spec)) if sharding else None
    y, aux, _ = _apply_local(params, x, config, train=train, rng=rng, token_mask=token_mask,
                             expert_stage_fn=expert_stage_fn, model_sum=lambda a: a,
                             constrain_tokens=constrain_tokens)
    return y, aux


def _apply_local(params: Params, x: Array, config: MoeConfig, *, train: bool,
                 rng: Array | None, token_mask: Array | None, expert_stage_fn, model_sum,
                 constrain_tokens=None) -> tuple[Array, dict[str, Array], Array]:
    """The layer on the tokens at hand (all of them, or one device's under explicit expert
    parallelism). `expert_stage_fn(expert_params)` gives the stage that runs the experts on
    [G, E, C, d] buffers; `model_sum` reduces partial sums over a model-parallel axis.
    Returns (y, aux, number of unmasked tokens) so that callers can combine devices' aux."""
    group = _check_input(params, x, config, rng, train)
    c = config
    d = x.shape[-1]
    tokens = x.reshape(-1, d)
    n = tokens.shape[0]
    num_groups = n // group
    k = c.top_k
    mask = (jnp.ones((n,), bool) if token_mask is None else token_mask.reshape(n))
    weights = mask.astype(jnp.float32)
    num_valid = jnp.sum(weights)
    per_group = lambda a: a.reshape(num_groups, group, *a.shape[1:])
    jitter_key, policy_key = jax.random.split(rng) if rng is not None else (None, None)

    logits = router_logits(params, tokens, c, train=train, rng=jitter_key)  # [N, E or S]
    max_logit = jnp.max(jnp.where(mask[:, None], logits, -jnp.inf).astype(jnp.float32))
    aux = {"router_z_loss": losses.router_z_loss(logits, weights),
           "max_router_logit": jax.lax.stop_gradient(max_logit)}
    grouped = per_group(tokens)
    if constrain_tokens is not None:
        grouped = constrain_tokens(grouped)
    stage = expert_stage_fn(params["experts"])

    if c.router == "soft":
        dispatch_w, combine_w = dispatch.map_groups(routing.soft_weights, per_group(logits),
                                                    per_group(mask))
        y = dispatch.soft_moe(grouped, dispatch_w, combine_w, stage, c.num_experts)
        combine_w = combine_w.reshape(n, -1)
        load = losses.token_mean(combine_w.reshape(n, c.num_experts, -1).sum(-1), weights)
        aux |= {"load_balancing_loss": jnp.zeros((), jnp.float32),
                "dropped_fraction": jnp.zeros((), jnp.float32), "expert_load": load,
                "assignment_fraction": load,
                "router_entropy": losses.router_entropy(combine_w, weights)}
    elif c.router == "expert_choice":
        probs = jax.nn.softmax(logits, axis=-1)
        capacity = min(c.capacity(group, train=train), group)
        slots = dispatch.map_groups(
            lambda p, m: routing.route_expert_choice(p, capacity, m), per_group(probs),
            per_group(mask))
        y = dispatch.capacity_moe(grouped, slots, stage, c.dispatch)
        filled = jnp.sum(slots.token < group, axis=(0, 2)).astype(jnp.float32)  # [E]
        aux |= {"load_balancing_loss": jnp.zeros((), jnp.float32),
                "dropped_fraction": 1.0 - losses.token_mean(slots.kept.reshape(n), weights),
                "expert_load": filled / jnp.maximum(num_valid * k, 1.0),
                "assignment_fraction": filled / jnp.maximum(jnp.sum(filled), 1.0),
                "router_entropy": losses.router_entropy(probs, weights)}
    else:
        if c.router == "sigmoid_bias":
            scores = jax.nn.sigmoid(logits)
            probs = scores / jnp.sum(scores, axis=-1, keepdims=True)
            choice = routing.route_sigmoid_bias(scores, params["router"]["score_bias"], k)
        else:
            probs = jax.nn.softmax(logits, axis=-1)
            choice = routing.route_top_k(probs, k, renormalize=c.renormalize_gates)
            if train and c.second_expert_policy == "random":
                choice = routing.random_second_expert(choice, jax.random.uniform(policy_key, (n,)))
        choice = dataclasses.replace(choice, keep=choice.keep & mask[:, None])
        if c.dispatch == "dropless":
            y = dispatch.dropless_moe(tokens, choice, params["experts"], c.activation,
                                      c.grouped_matmul)
            kept = choice.keep
        else:
            capacity = c.capacity(group, train=train)
            top1_prob = per_group(jnp.max(probs, axis=-1))
            slots = dispatch.map_groups(
                lambda ch, p: routing.assign_slots(ch, capacity, c.num_experts, c.drop_priority, p),
                jax.tree.map(per_group, choice), top1_prob)
            y = dispatch.capacity_moe(grouped, slots, stage, c.dispatch)
            kept = slots.kept.reshape(n, k)
        kept_one_hot = jax.nn.one_hot(choice.expert_index, c.num_experts) * kept[..., None]
        load = jnp.sum(kept_one_hot, axis=(0, 1)) / jnp.maximum(num_valid * k, 1.0)
        group_weights = per_group(weights)
        lb = dispatch.map_groups(losses.load_balancing_loss, per_group(probs),
                                 per_group(choice.expert_index), group_weights)
        group_tokens = jnp.sum(group_weights, axis=1)
        aux |= {"load_balancing_loss": jnp.sum(lb * group_tokens)
                / jnp.maximum(jnp.sum(group_tokens), 1.0),
                "dropped_fraction": 1.0 - jnp.sum(load), "expert_load": load,
                "assignment_fraction": losses.assignment_fraction(choice.expert_index,
                                                                  c.num_experts, weights),
                "router_entropy": losses.router_entropy(probs, weights)}

    y = y.reshape(n, d)
    if "shared" in params:
        y = y + model_sum(experts.ffn(params["shared"], tokens, c.activation))
    if token_mask is not None:  # a select over [N, d]: skipped when every token is real
        y = jnp.where(mask[:, None], y, 0)
    return y.reshape(x.shape).astype(x.dtype), aux, num_valid
