"""Routing math on one group of tokens: who goes to which expert, with which weight.

Shape letters: T tokens in the group, E experts, K choices per token (top_k), C expert capacity.

Everything here is pure and works on router *probabilities* (or scores), so it can be tested
with hand-made numbers. Two result types:

- `TokenChoice` (`[T, K]`): each token's chosen experts and gates, before capacity.
- `Slots` (`[E, C]`): which token sits in each expert slot and its combine weight, after
  capacity. Both the gather and the einsum dispatch read this one table.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

Array = jax.Array


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


def route_top_k(probs: Array, k: int, *, renormalize: bool) -> TokenChoice:
    """Top-k token choice (Shazeer et al. 2017; Switch k=1; GShard/Mixtral k=2).

    probs: [T, E] router probabilities (softmax over experts).
    Gates are the chosen probabilities (Switch, ST-MoE) or, with `renormalize`, those divided by
    their sum over the k chosen (GShard Alg. 1, Mixtral eq. 1).
    """
    gate, expert_index = jax.lax.top_k(probs, k)
    if renormalize:
        gate = gate / jnp.sum(gate, axis=-1, keepdims=True)
    keep = jnp.ones(expert_index.shape, dtype=bool)
    return TokenChoice(expert_index.astype(jnp.int32), gate, keep)


def route_sigmoid_bias(scores: Array, bias: Array, k: int) -> TokenChoice:
    """DeepSeek-V3 routing (Liu et al. 2024, eqs. 13-16): top-k on `scores + bias`.

    scores: [T, E] sigmoid affinities; bias: [E] load-balancing bias (no gradient).
    The bias only decides which experts are chosen; the gates are the chosen *scores*
    normalised to sum to 1 over the k chosen. With k = 1 that normalisation would make every gate
    exactly 1 and cut the router off from the task gradient, so top-1 gates are the raw scores
    (as Switch's are the raw probabilities).
    """
    _, expert_index = jax.lax.top_k(scores + jax.lax.stop_gradient(bias), k)
    gate = jnp.take_along_axis(scores, expert_index, axis=-1)
    if k > 1:
        gate = gate / jnp.sum(gate, axis=-1, keepdims=True)
    keep = jnp.ones(expert_index.shape, dtype=bool)
    return TokenChoice(expert_index.astype(jnp.int32), gate, keep)


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
    return Slots(
        token=slot_token.reshape(num_experts, capacity),
        gate=slot_gate.reshape(num_experts, capacity),
        kept=kept,
    )


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
