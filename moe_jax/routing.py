"""Routing: which expert each token goes to, with which weight, and the router's statistics.

Shape letters: N tokens in a call, G routing groups of T tokens (N = G * T), E experts, K choices
per token (top_k), C expert capacity, S Soft MoE slots.

`route(logits, config, ...)` is the one entry point: the MoE layer, evaluation and the routing
analyses all call it (through the layer) and read its `Routing`:

- `TokenRouting` (`[N, ...]`): per token, the routing distribution and, for token-choice routers,
  the chosen experts, their gates and whether each choice was computed.
- `Slots` (`[G, E, C]`): which token sits in each expert slot, after capacity. The gather and
  einsum dispatches read this one table.
- `statistics`: the router's losses and load statistics (`STATISTICS` says how each combines over
  devices, micro-batches and evaluation batches).

`ROUTERS` is the table of routers by name (`MoeConfig.router`): a new router is one function
that decides the routing of a call (`Decision`) and one `Router` entry. Token-choice routers
return each token's choices; `route` then assigns capacity slots and computes the statistics.

The per-group functions below are pure and work on router *probabilities* (or scores), so they
can be tested with hand-made numbers.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp

from moe_jax import losses

if TYPE_CHECKING:  # annotations only: moe_jax.config, above this module, reads `ROUTERS`
    from moe_jax.config import MoeConfig

Array = jax.Array
State = dict[str, Array]  # a router's state, kept beside the parameters (e.g. "score_bias")

# The statistics of `route`, and how measurements on several parts (devices, micro-batches,
# logged steps, evaluation batches, layers) combine: "mean" (token-weighted) or "max".
STATISTICS: dict[str, str] = {
    "load_balancing_loss": "mean",  # Switch eq. 4 generalised to K (0 for expert_choice, soft)
    "router_z_loss": "mean",  # ST-MoE eq. 5
    "dropped_fraction": "mean",  # dropped assignments / (N*K); expert choice: unchosen tokens / N
    "expert_load": "mean",  # [E] kept assignments of each expert / (N*K)
    "assignment_fraction": "mean",  # [E] share of assignments before drops (bias balancing)
    "router_entropy": "mean",  # mean entropy (nats) of the routing distribution
    "max_router_logit": "max",  # largest router logit (no gradient)
}


def reduction(name: str) -> str:
    """How statistic `name` combines over parts: "max" or "mean". `name` may carry a prefix
    ("train/", "layer/"); names that are not routing statistics are means."""
    return STATISTICS.get(name.rsplit("/", 1)[-1], "mean")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TokenChoice:
    """Token-choice routing of one group, before capacity.

    expert_index: [T, K] int32, the k-th expert chosen by each token (k = 0 is the best).
    gate: [T, K] combine weight of each choice.
    keep: [T, K] bool, False for choices a routing policy discards before capacity (GShard's
      random second expert); such choices take no slot.
    """

    expert_index: Array
    gate: Array
    keep: Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Slots:
    """Expert buffers of one group after capacity.

    token: [E, C] int32, the token in each slot; T (one past the last token) marks an empty slot.
    gate: [E, C] combine weight of the slot's token (0 for empty slots).
    kept: [T, K] bool, whether each token-choice assignment found a slot (for expert choice:
      [T, 1], whether any expert chose the token).
    """

    token: Array
    gate: Array
    kept: Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TokenRouting:
    """The routing of each of N tokens by one router: what evaluation and analysis read.

    logits: [N, E] the router logits the routing was computed from, before the router
      temperature (soft: [N, S]); `route` on them with another config (capacity, temperature)
      routes the same tokens again.
    probs: [N, E] routing distribution (router dtype): softmax over experts (sigmoid_bias: the
      sigmoid scores normalised over experts); soft: [N, S] combine weights over the slots.
    choice: token-choice routers only (None for expert_choice and soft, where a token does not
      choose): [N, K] chosen experts and gates, with `keep` True where the assignment was
      computed (not discarded by a routing policy, dropped by capacity, or a masked token).
    num_experts: E (static).
    """

    logits: Array
    probs: Array
    choice: TokenChoice | None
    num_experts: int = dataclasses.field(metadata={"static": True})

    def expert_share(self, kept: bool = False) -> Array:
        """[N, E] how each token's routing splits over experts: 1/K for each of the K chosen
        experts, before capacity (rows sum to 1), or with `kept` for the kept choices only (rows
        sum to the token's kept fraction); where tokens do not choose (expert_choice, soft), the
        routing distribution summed per expert."""
        n = self.probs.shape[0]
        if self.choice is None:
            return self.probs.reshape(n, self.num_experts, -1).sum(-1)
        one_hot = jax.nn.one_hot(self.choice.expert_index, self.num_experts, dtype=jnp.float32)
        if kept:
            one_hot = one_hot * self.choice.keep[..., None]
        return jnp.sum(one_hot, axis=1) / one_hot.shape[1]

    def entropy(self) -> Array:
        """[N] entropy (nats) of each token's routing distribution; `router_entropy` is its
        mean over the unmasked tokens."""
        return losses.token_entropy(self.probs)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Routing:
    """Everything `route` decides for the N tokens of one call.

    tokens: per-token routing (`TokenRouting`).
    slots: [G, E, C] slot tables for the capacity dispatches and expert choice; None for
      dropless and soft.
    soft_weights: Soft MoE's (dispatch, combine) weights, each [G, T, S]; None otherwise.
    statistics: `STATISTICS` as float32 arrays, means over the unmasked tokens.
    num_tokens: float32 [], the unmasked tokens: the weight of `statistics` when parts combine.
    """

    tokens: TokenRouting
    slots: Slots | None
    soft_weights: tuple[Array, Array] | None
    statistics: dict[str, Array]
    num_tokens: Array


def route(logits: Array, config: MoeConfig, *, num_groups: int, train: bool,
          token_mask: Array | None = None, state: State | None = None,
          rng: Array | None = None) -> Routing:
    """Routes N tokens in `num_groups` groups of T = N / G consecutive tokens.

    logits: [N, E] router logits (Soft MoE: [N, S]), divided by `MoeConfig.temperature`;
    token_mask: [N] bool, False tokens (padding) take no slot and count in no statistic;
    state: the router's state (`Router.init_state`, e.g. sigmoid_bias's balancing bias);
    rng: GShard's random second expert (training only). Capacity (`MoeConfig.capacity`) and the
    balance loss are per group.
    """
    n = logits.shape[0]
    mask = jnp.ones((n,), bool) if token_mask is None else token_mask
    weights = mask.astype(jnp.float32)
    temperature = config.temperature(train=train)
    scaled = logits if temperature == 1.0 else logits / jnp.asarray(temperature, logits.dtype)
    max_logit = jnp.max(jnp.where(mask[:, None], scaled, -jnp.inf).astype(jnp.float32))
    statistics = {"router_z_loss": losses.router_z_loss(scaled, weights),
                  "max_router_logit": jax.lax.stop_gradient(max_logit)}
    decided = ROUTERS[config.router].decide(scaled, mask, config, num_groups=num_groups,
                                            train=train, state=state or {}, rng=rng)
    choice, slots = decided.choice, decided.slots
    if choice is not None:
        choice = dataclasses.replace(choice, keep=choice.keep & mask[:, None])
        if config.dispatch != "dropless":
            slots = _assign_capacity(choice, decided.probs, config, num_groups, train)
            choice = dataclasses.replace(choice, keep=slots.kept.reshape(n, config.top_k))
    tokens = TokenRouting(logits, decided.probs, choice, config.num_experts)
    if choice is not None:
        statistics |= _token_choice_statistics(tokens, weights, num_groups)
    else:
        statistics |= _mixing_statistics(tokens, slots, weights, config.top_k)
    return Routing(tokens, slots, decided.soft_weights, statistics, jnp.sum(weights))


def _assign_capacity(choice: TokenChoice, probs: Array, config: MoeConfig, num_groups: int,
                     train: bool) -> Slots:
    """[G, E, C] slots of the [N, K] token choices, group by group (`assign_slots`)."""
    groups = functools.partial(_per_group, num_groups=num_groups)
    capacity = config.capacity(probs.shape[0] // num_groups, train=train)
    return map_groups(
        lambda ch, p: assign_slots(ch, capacity, config.num_experts, config.drop_priority, p),
        jax.tree.map(groups, choice), groups(jnp.max(probs, axis=-1)))


def _per_group(a: Array, num_groups: int) -> Array:
    """[N, ...] -> [G, T, ...]."""
    return a.reshape(num_groups, -1, *a.shape[1:])


def map_groups(fn: Callable, *args: Any) -> Any:
    """fn vmapped over the leading group axis G of every array in `args` (pytrees).

    A single group is squeezed out instead of vmapped: XLA:CPU runs reductions over arrays with
    a size-1 axis far slower than the same reductions without it, and the combine's gate
    gradient is such a reduction (experiments/benchmarks/README.md)."""
    if jax.tree.leaves(args)[0].shape[0] == 1:
        return jax.tree.map(lambda a: a[None], fn(*jax.tree.map(lambda a: a[0], args)))
    return jax.vmap(fn)(*args)


def _token_choice_statistics(tokens: TokenRouting, weights: Array,
                             num_groups: int) -> dict[str, Array]:
    """Balance loss (per group, then averaged over groups weighted by their tokens), load, drops
    and entropy of token-choice routing. weights: [N], 0 for masked tokens."""
    probs, choice, num_experts = tokens.probs, tokens.choice, tokens.num_experts
    k = choice.expert_index.shape[1]
    kept_one_hot = jax.nn.one_hot(choice.expert_index, num_experts) * choice.keep[..., None]
    load = jnp.sum(kept_one_hot, axis=(0, 1)) / jnp.maximum(jnp.sum(weights) * k, 1.0)
    group_weights = _per_group(weights, num_groups)
    balance = map_groups(losses.load_balancing_loss, _per_group(probs, num_groups),
                         _per_group(choice.expert_index, num_groups), group_weights)
    group_tokens = jnp.sum(group_weights, axis=1)
    return {"load_balancing_loss": jnp.sum(balance * group_tokens)
            / jnp.maximum(jnp.sum(group_tokens), 1.0),
            "dropped_fraction": 1.0 - jnp.sum(load), "expert_load": load,
            "assignment_fraction": losses.assignment_fraction(choice.expert_index, num_experts,
                                                              weights),
            "router_entropy": losses.router_entropy(probs, weights)}


def _mixing_statistics(tokens: TokenRouting, slots: Slots | None, weights: Array,
                       top_k: int) -> dict[str, Array]:
    """Statistics of the routers that mix a group's tokens (expert choice with its `slots`, Soft
    MoE without): no balance loss; expert choice drops the tokens no expert chose, and its load
    counts N * top_k assignments (top_k: the average experts per token)."""
    zero = jnp.zeros((), jnp.float32)
    entropy = losses.router_entropy(tokens.probs, weights)
    if slots is None:  # soft: every token reaches every slot
        load = losses.token_mean(tokens.expert_share(), weights)
        return {"load_balancing_loss": zero, "dropped_fraction": zero, "expert_load": load,
                "assignment_fraction": load, "router_entropy": entropy}
    group = slots.kept.shape[1]
    filled = jnp.sum(slots.token < group, axis=(0, 2)).astype(jnp.float32)  # [E]
    num_valid = jnp.sum(weights)
    return {"load_balancing_loss": zero,
            "dropped_fraction": 1.0 - losses.token_mean(slots.kept.reshape(-1), weights),
            "expert_load": filled / jnp.maximum(num_valid * top_k, 1.0),
            "assignment_fraction": filled / jnp.maximum(jnp.sum(filled), 1.0),
            "router_entropy": entropy}


# --- per-group routing functions ----------------------------------------------------------------

def route_top_k(probs: Array, k: int, *, renormalize: bool) -> TokenChoice:
    """Top-k token choice (Shazeer et al. 2017; Switch k=1; GShard/Mixtral k=2).

    probs: [T, E] router probabilities (softmax over experts).
    Gates are the chosen probabilities (Switch, ST-MoE) or, with `renormalize`, those divided by
    their sum over the k chosen (GShard Alg. 1, Mixtral eq. 1).
    """
    gate, expert_index = jax.lax.top_k(probs, k)
    if renormalize:
        gate = gate / jnp.sum(gate, axis=-1, keepdims=True)
    return TokenChoice(expert_index.astype(jnp.int32), gate, jnp.ones(expert_index.shape, bool))


def route_sigmoid_bias(scores: Array, bias: Array, k: int, *, expert_groups: int = 1,
                       top_groups: int = 1, scale: float = 1.0) -> TokenChoice:
    """DeepSeek-V3 routing (Liu et al. 2024, eqs. 13-16): top-k on `scores + bias`.

    scores: [T, E] sigmoid affinities; bias: [E] load-balancing bias (no gradient).
    The bias only decides which experts are chosen; the gates are the chosen *scores*
    normalised to sum to 1 over the k chosen, times `scale` (the released models'
    `routed_scaling_factor`). With k = 1 that normalisation would make every gate exactly 1 and
    cut the router off from the task gradient, so top-1 gates are the raw scores (as Switch's
    are the raw probabilities), times `scale`.
    Group-limited routing (DeepSeek-V3's node-limited routing as released, `n_group` /
    `topk_group`): the E experts form `expert_groups` consecutive groups; a token picks its k
    experts among the `top_groups` groups of highest `group_scores` only.
    """
    biased = scores + jax.lax.stop_gradient(bias)
    if expert_groups > 1:
        allowed = jnp.repeat(top_group_mask(biased, expert_groups, top_groups),
                             scores.shape[-1] // expert_groups, axis=-1)
        biased = jnp.where(allowed, biased, -jnp.inf)
    _, expert_index = jax.lax.top_k(biased, k)
    gate = jnp.take_along_axis(scores, expert_index, axis=-1)
    if k > 1:
        gate = gate / jnp.sum(gate, axis=-1, keepdims=True)
    if scale != 1.0:
        gate = gate * scale
    return TokenChoice(expert_index.astype(jnp.int32), gate, jnp.ones(expert_index.shape, bool))


def route_sigmoid_top_k(logits: Array, k: int) -> TokenChoice:
    """Llama 4 routing (the released models' Llama4Router): top-k on the logits [T, E]; each
    chosen expert's gate is the sigmoid of its own logit, not normalised over experts or over
    the k chosen."""
    logit, expert_index = jax.lax.top_k(logits, k)
    return TokenChoice(expert_index.astype(jnp.int32), jax.nn.sigmoid(logit),
                       jnp.ones(expert_index.shape, bool))


def group_scores(biased: Array, expert_groups: int) -> Array:
    """[T, G_e] each expert group's score: the sum of its two highest biased scores
    (DeepSeek-V3 as released; one score for groups of one expert). biased: [T, E]."""
    grouped = biased.reshape(biased.shape[0], expert_groups, -1)
    return jnp.sum(jax.lax.top_k(grouped, min(2, grouped.shape[-1]))[0], axis=-1)


def top_group_mask(biased: Array, expert_groups: int, top_groups: int) -> Array:
    """[T, G_e] bool: the `top_groups` groups of highest `group_scores` of each token."""
    scores = group_scores(biased, expert_groups)
    _, chosen = jax.lax.top_k(scores, top_groups)
    return jnp.any(jax.nn.one_hot(chosen, expert_groups, dtype=bool), axis=-2)


def random_second_expert(choice: TokenChoice, uniform: Array) -> TokenChoice:
    """GShard's stochastic top-2 (Lepikhin et al. 2020, Alg. 2): keep the second choice only
    with probability min(1, 2 * g2 / (g1 + g2)).

    uniform: [T] samples of U[0, 1).
    """
    g = choice.gate
    g2 = g[:, 1] / jnp.sum(g, axis=-1)
    keep_second = 2.0 * g2 > uniform
    keep = choice.keep.at[:, 1].set(choice.keep[:, 1] & keep_second)
    return dataclasses.replace(choice, keep=keep)


def assignment_order(choice: TokenChoice, priority: str, top1_prob: Array | None) -> Array:
    """Order in which assignments claim slots: [K * T] indices into the (k, t)-flattened choices.

    "rank" (GShard): every first choice before any second choice; within a rank, earlier tokens
    first. "batch_priority" (Riquelme et al. 2021, V-MoE BPR): within a rank, tokens with a
    higher top-1 router probability `top1_prob` ([T]) first.
    """
    num_tokens, k = choice.expert_index.shape
    ranks = jnp.arange(k)[:, None] * num_tokens
    if priority == "rank":
        token_order = jnp.arange(num_tokens)
    elif priority == "batch_priority":
        if top1_prob is None:
            raise ValueError("drop_priority='batch_priority' needs top1_prob, the [T] top-1 "
                             "router probability of each token.")
        # Stable sort: ties keep token order, so equal priorities reduce to "rank".
        token_order = jnp.argsort(-top1_prob, stable=True)
    else:
        raise ValueError(f"unknown drop priority {priority!r}; use 'rank' or 'batch_priority'.")
    return (ranks + token_order[None, :]).reshape(-1)


def assign_slots(choice: TokenChoice, capacity: int, num_experts: int, priority: str,
                 top1_prob: Array | None = None) -> Slots:
    """Give each kept assignment a slot in its expert's buffer of `capacity`, in priority order
    (see `assignment_order`; `top1_prob` [T] is needed for "batch_priority").

    An assignment that finds its expert full is dropped: it contributes nothing (the token still
    passes through the caller's residual). Returns the [E, C] slot table.
    """
    num_tokens, k = choice.expert_index.shape
    order = assignment_order(choice, priority, top1_prob)  # [K*T], (k, t)-major positions
    expert = choice.expert_index.T.reshape(-1)[order]  # [K*T]
    wants = choice.keep.T.reshape(-1)[order]
    one_hot = jax.nn.one_hot(expert, num_experts, dtype=jnp.int32) * wants[:, None]
    # Slot = number of earlier assignments (in priority order) to the same expert.
    position = jnp.sum((jnp.cumsum(one_hot, axis=0) - 1) * one_hot, axis=-1)  # [K*T]
    kept_sorted = wants & (position < capacity)

    # Dropped assignments point one past the last slot; mode="drop" discards their writes (no
    # padded table to slice, and no pad of the gate cotangent in the backward pass).
    flat_slot = jnp.where(kept_sorted, expert * capacity + position, num_experts * capacity)
    token = (order % num_tokens).astype(jnp.int32)
    gate = choice.gate.T.reshape(-1)[order]
    slot_token = jnp.full(num_experts * capacity, num_tokens, jnp.int32)
    slot_token = slot_token.at[flat_slot].set(token, mode="drop")
    slot_gate = jnp.zeros(num_experts * capacity, gate.dtype).at[flat_slot].set(gate, mode="drop")

    kept = jnp.zeros(k * num_tokens, bool).at[order].set(kept_sorted).reshape(k, num_tokens).T
    return Slots(token=slot_token.reshape(num_experts, capacity),
                 gate=slot_gate.reshape(num_experts, capacity), kept=kept)


def route_expert_choice(probs: Array, capacity: int, token_mask: Array | None = None) -> Slots:
    """Expert choice (Zhou et al. 2022, eq. 1): each expert takes its C highest-probability tokens.

    probs: [T, E] softmax over experts; token_mask: [T] bool, False tokens are never chosen.
    The combine weight is the token's probability for the expert. A token may be chosen by
    several experts or none. Mixes tokens within the group: not causal.
    """
    num_tokens = probs.shape[0]
    capacity = min(capacity, num_tokens)
    scores = probs if token_mask is None else jnp.where(token_mask[:, None], probs, -1.0)
    gate, token = jax.lax.top_k(scores.T, capacity)  # [E, C]
    valid = gate >= 0
    token = jnp.where(valid, token, num_tokens).astype(jnp.int32)
    gate = jnp.where(valid, gate, 0)
    chosen = jnp.zeros(num_tokens + 1, bool).at[token.reshape(-1)].set(True)[:num_tokens]
    return Slots(token=token, gate=gate, kept=chosen[:, None])


def soft_weights(logits: Array, token_mask: Array | None = None) -> tuple[Array, Array]:
    """Soft MoE (Puigcerver et al. 2023, eqs. 1-2) dispatch and combine weights.

    logits: [T, S] token-slot logits (S = E * slots_per_expert); token_mask: [T] bool, False
    tokens (padding) get no dispatch weight (their logits are pushed to -1e30 over tokens).
    Returns dispatch [T, S] (softmax over tokens: each slot is a convex mix of tokens) and
    combine [T, S] (softmax over slots: each token a convex mix of slot outputs).
    """
    token_logits = logits if token_mask is None else jnp.where(token_mask[:, None], logits, -1e30)
    return jax.nn.softmax(token_logits, axis=0), jax.nn.softmax(logits, axis=1)


def update_score_bias(bias: Array, assignment_fraction: Array, rate: float) -> Array:
    """DeepSeek-V3 auxiliary-loss-free balancing (Sec. 2.1.2): after each step, raise the bias of
    under-loaded experts by `rate` and lower that of over-loaded ones by `rate`.

    bias: [E]; assignment_fraction: [E] share of assignments each expert received (before drops).
    """
    mean = jnp.mean(assignment_fraction)
    return bias + rate * jnp.sign(mean - assignment_fraction).astype(bias.dtype)


# --- the routers ---------------------------------------------------------------------------------

class Decision(NamedTuple):
    """What a router decides for the N tokens of a call (`Router.decide`).

    probs: [N, E] the routing distribution (soft: [N, S] combine weights over the slots).
    choice: [N, K] each token's choices before capacity (`route` assigns the slots); None where
      tokens do not choose.
    slots: [G, E, C] the slots of a router that fills them itself (expert choice), else None.
    soft_weights: Soft MoE's (dispatch, combine) weights, each [G, T, S]; None otherwise.
    """

    probs: Array
    choice: TokenChoice | None = None
    slots: Slots | None = None
    soft_weights: tuple[Array, Array] | None = None


def _top_k(logits: Array, mask: Array, config: MoeConfig, *, num_groups: int, train: bool,
           state: State, rng: Array | None) -> Decision:
    """Softmax top-k (`route_top_k`), with GShard's random second expert in training."""
    probs = jax.nn.softmax(logits, axis=-1)
    choice = route_top_k(probs, config.top_k, renormalize=config.renormalize_gates)
    if train and config.second_expert_policy == "random":
        choice = random_second_expert(choice, jax.random.uniform(rng, (logits.shape[0],)))
    return Decision(probs, choice)


def _sigmoid_bias(logits: Array, mask: Array, config: MoeConfig, *, num_groups: int,
                  train: bool, state: State, rng: Array | None) -> Decision:
    """DeepSeek-V3 (`route_sigmoid_bias`) with the bias `state["score_bias"]` (zero if absent);
    the distribution is the sigmoid scores normalised over experts."""
    scores = jax.nn.sigmoid(logits)
    bias = state["score_bias"] if "score_bias" in state else jnp.zeros((config.num_experts,),
                                                                       scores.dtype)
    choice = route_sigmoid_bias(scores, bias, config.top_k, expert_groups=config.expert_groups,
                                top_groups=config.top_expert_groups,
                                scale=config.routed_scaling_factor)
    return Decision(scores / jnp.sum(scores, axis=-1, keepdims=True), choice)


def _sigmoid_top_k(logits: Array, mask: Array, config: MoeConfig, *, num_groups: int,
                   train: bool, state: State, rng: Array | None) -> Decision:
    """Llama 4 (`route_sigmoid_top_k`); the distribution (balance loss, entropy) is the softmax
    of the logits."""
    return Decision(jax.nn.softmax(logits, axis=-1), route_sigmoid_top_k(logits, config.top_k))


def _expert_choice(logits: Array, mask: Array, config: MoeConfig, *, num_groups: int,
                   train: bool, state: State, rng: Array | None) -> Decision:
    """Expert choice (`route_expert_choice`) in each group, capacity at most the group."""
    probs = jax.nn.softmax(logits, axis=-1)
    group = logits.shape[0] // num_groups
    capacity = min(config.capacity(group, train=train), group)
    slots = map_groups(lambda p, m: route_expert_choice(p, capacity, m),
                       _per_group(probs, num_groups), _per_group(mask, num_groups))
    return Decision(probs, slots=slots)


def _soft(logits: Array, mask: Array, config: MoeConfig, *, num_groups: int, train: bool,
          state: State, rng: Array | None) -> Decision:
    """Soft MoE (`soft_weights`) in each group."""
    dispatch_w, combine_w = map_groups(soft_weights, _per_group(logits, num_groups),
                                       _per_group(mask, num_groups))
    return Decision(combine_w.reshape(logits.shape[0], -1), soft_weights=(dispatch_w, combine_w))


def _score_bias(config: MoeConfig) -> State:
    return {"score_bias": jnp.zeros((config.num_experts,), jnp.float32)}


def _move_score_bias(state: State, assignment_fraction: Array, config: MoeConfig) -> State:
    return {**state, "score_bias": update_score_bias(state["score_bias"], assignment_fraction,
                                                     config.bias_update_rate)}


def _num_experts(config: MoeConfig) -> int:
    return config.num_experts


@dataclasses.dataclass(frozen=True)
class Router:
    """An entry of `ROUTERS`: how a router routes, and what the layer, the config's checks and
    the train step need to know of it.

    decide: (logits, mask, config, *, num_groups, train, state, rng) -> `Decision`, from the
      logits divided by the router temperature ([N, E]; soft: [N, S]) and the [N] bool mask.
    token_choice: each token chooses its experts; False: the router mixes the tokens of a
      group, so a token's output depends on later tokens (not causal).
    dispatches: the `MoeConfig.dispatch` values it runs with (None: all); `why`: why not others.
    num_logits: router logits per token (columns of the router kernel) of a config.
    init_state: config -> the router's initial `State`, kept beside the parameters and never
      seen by the optimizer; None: stateless.
    update_state: (state, assignment_fraction [E], config) -> state, applied by the train step
      after each optimizer step; None: the state does not move.
    """

    decide: Callable[..., Decision]
    token_choice: bool = True
    dispatches: tuple[str, ...] | None = None
    why: str = ""
    num_logits: Callable[[MoeConfig], int] = _num_experts
    init_state: Callable[[MoeConfig], State] | None = None
    update_state: Callable[[State, Array, MoeConfig], State] | None = None


ROUTERS: dict[str, Router] = {
    "top_k": Router(_top_k),
    "expert_choice": Router(_expert_choice, token_choice=False, dispatches=("einsum", "gather"),
                            why="expert choice fills a fixed capacity by construction, and "
                            "dropless needs token-choice routing"),
    "soft": Router(_soft, token_choice=False, dispatches=("einsum",),
                   why="Soft MoE mixes all tokens into every slot, which is a dense einsum",
                   num_logits=lambda c: c.num_experts * c.slots_per_expert),
    "sigmoid_bias": Router(_sigmoid_bias, init_state=_score_bias,
                           update_state=_move_score_bias),
    "sigmoid_top_k": Router(_sigmoid_top_k),
}
