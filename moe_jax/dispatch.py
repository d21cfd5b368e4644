"""Dispatch tokens to expert buffers and combine expert outputs back: same function, different cost.

Shape letters: T tokens in a group, E experts, C capacity, K choices, S soft slots, d model width.

Capacity strategies read the `[E, C]` slot table of `routing.Slots` (token index T = empty):
- "einsum": one-hot dispatch and combine tensors `[E, C, T]` contracted with the tokens
  (GShard / Switch / flaxformer). Costs O(T * E * C * d): quadratic in T at fixed capacity factor.
- "gather": gather the slot tokens' rows (dispatch) and scatter-add the weighted outputs back
  (combine). Costs O(E * C * d); no `[T, E, C]` tensor. The default.
The dropless strategy sorts the T*K assignments by expert and runs grouped matmuls over exactly
the routed rows (MegaBlocks, Gale et al. 2022): no capacity, nothing dropped.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from moe_jax.routing import Slots, TokenChoice, map_groups

Array = jax.Array


def _slot_one_hot(slots: Slots, num_tokens: int, dtype: jnp.dtype) -> Array:
    """[E, C, T] one-hot of each slot's token (all-zero for empty slots)."""
    return jax.nn.one_hot(slots.token, num_tokens, dtype=dtype)


def dispatch_einsum(x: Array, slots: Slots) -> Array:
    """x: [T, d] -> expert buffers [E, C, d] through the one-hot dispatch tensor."""
    return jnp.einsum("ect,td->ecd", _slot_one_hot(slots, x.shape[0], x.dtype), x)


def combine_einsum(expert_out: Array, slots: Slots, num_tokens: int) -> Array:
    """expert_out: [E, C, d] -> [T, d] through the combine tensor (one-hot times gate)."""
    dt = expert_out.dtype
    combine = _slot_one_hot(slots, num_tokens, dt) * slots.gate.astype(dt)[..., None]
    return jnp.einsum("ect,ecd->td", combine, expert_out)


def dispatch_gather(x: Array, slots: Slots) -> Array:
    """x: [T, d] -> expert buffers [E, C, d] by gathering rows; empty slots (token index T,
    out of bounds) get zeros."""
    return x.at[slots.token].get(mode="fill", fill_value=0)


def combine_gather(expert_out: Array, slots: Slots, num_tokens: int) -> Array:
    """expert_out: [E, C, d] -> [T, d] by scatter-adding gate-weighted slot outputs (empty
    slots' out-of-bounds writes are dropped)."""
    d = expert_out.shape[-1]
    weighted = expert_out * slots.gate.astype(expert_out.dtype)[..., None]
    y = jnp.zeros((num_tokens, d), expert_out.dtype)
    return y.at[slots.token.reshape(-1)].add(weighted.reshape(-1, d), mode="drop")


# Capacity strategies: name -> (dispatch, combine). Both work on one group; `map_groups` maps
# them over G.
CAPACITY_STRATEGIES: dict[str, tuple[Callable[..., Array], Callable[..., Array]]] = {
    "einsum": (dispatch_einsum, combine_einsum),
    "gather": (dispatch_gather, combine_gather),
}


# Runs the experts on buffers [G, E, C, d] -> [G, E, C, d] (`moe.Layout.expert_stage`: on a
# mesh, with the expert exchange).
ExpertStage = Callable[[Array], Array]


def capacity_moe(x: Array, slots: Slots, expert_stage: ExpertStage, strategy: str,
                 gate_inputs: bool = False) -> Array:
    """Dispatch, run every expert on its buffer, combine.

    x: [G, T, d] tokens in G routing groups; slots: Slots with [G, E, C] tables.
    gate_inputs: each slot's gate scales its token before the expert and the output is
    combined with weight 1 (Llama 4), instead of scaling the output.
    Returns [G, T, d].
    """
    dispatch, combine = CAPACITY_STRATEGIES[strategy]
    buffers = map_groups(dispatch, x, slots)  # [G, E, C, d]
    if gate_inputs:
        buffers = buffers * slots.gate.astype(buffers.dtype)[..., None]
        slots = dataclasses.replace(slots, gate=(slots.token < x.shape[1]).astype(
            slots.gate.dtype))
    return map_groups(functools.partial(combine, num_tokens=x.shape[1]), expert_stage(buffers),
                      slots)


# Runs the experts on rows sorted by expert [M, d] with group_sizes [E] -> [M, d]
# (`moe.Layout.grouped_stage`: on a mesh, with the ragged exchange of the rows).
GroupedStage = Callable[[Array, Array], Array]


def dropless_moe(x: Array, choice: TokenChoice, grouped_stage: GroupedStage,
                 num_experts: int, gate_inputs: bool = False) -> Array:
    """Every kept assignment computed, none padded (MegaBlocks dropless).

    x: [T, d]; choice: TokenChoice with [T, K] fields (no capacity; `keep` False choices are
    skipped). Sorts the T*K assignments by expert, runs the experts on them with
    `grouped_stage`, scatters back. gate_inputs: the gate scales each row before its expert
    (Llama 4) instead of the expert's output.
    """
    k = choice.expert_index.shape[1]
    # Discarded choices get expert id E: sorted last and outside every group.
    expert = jnp.where(choice.keep, choice.expert_index, num_experts).reshape(-1)  # [T*K]
    order = jnp.argsort(expert, stable=True)
    token = order // k
    group_sizes = jnp.sum(jax.nn.one_hot(expert, num_experts, dtype=jnp.int32), axis=0)
    gate = jnp.where(choice.keep, choice.gate, 0).reshape(-1)[order]
    rows = x[token]
    if gate_inputs:
        rows = rows * gate.astype(rows.dtype)[:, None]
        gate = jnp.where(choice.keep, 1, 0).reshape(-1)[order]
    out = grouped_stage(rows, group_sizes)  # [T*K, d]
    weighted = out * gate.astype(out.dtype)[:, None]
    return jnp.zeros_like(x).at[token].add(weighted)


def soft_moe(x: Array, dispatch_weights: Array, combine_weights: Array,
             expert_stage: ExpertStage, num_experts: int) -> Array:
    """Soft MoE (Puigcerver et al. 2023, eqs. 1-3) over G groups.

    x: [G, T, d]; dispatch_weights, combine_weights: [G, T, S] with S = E * slots_per_expert
    (slot s belongs to expert s // slots_per_expert). Returns [G, T, d].
    """
    num_groups, _, d = x.shape
    dt = x.dtype
    slot_in = jnp.einsum("gts,gtd->gsd", dispatch_weights.astype(dt), x)  # [G, S, d]
    slot_out = expert_stage(slot_in.reshape(num_groups, num_experts, -1, d))  # [G, E, S/E, d]
    return jnp.einsum("gts,gsd->gtd", combine_weights.astype(dt),
                      slot_out.reshape(num_groups, -1, d))
