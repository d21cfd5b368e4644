"""Auxiliary router losses and routing statistics (pure functions of one group).

Shape letters: T tokens, E experts, K choices per token. `weights` ([T], optional) marks the
tokens that count (1) and padding (0); every statistic is a mean over the counted tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def token_mean(values: Array, weights: Array | None) -> Array:
    """Mean over the leading token axis of `values` ([T, ...]), counting only weighted tokens."""
    values = values.astype(jnp.float32)
    if weights is None:
        return jnp.mean(values, axis=0)
    w = weights.astype(jnp.float32).reshape((-1,) + (1,) * (values.ndim - 1))
    return jnp.sum(values * w, axis=0) / jnp.maximum(jnp.sum(w), 1.0)


def load_balancing_loss(probs: Array, expert_index: Array, weights: Array | None = None) -> Array:
    """Switch Transformer eq. 4, generalised to top-k: `E * sum_e f_e * P_e`.

    probs: [T, E] router probabilities; expert_index: [T, K] chosen experts.
    f_e is the share of the T*K assignments that chose e (before any drop) and P_e the mean
    router probability of e. Equals 1.0 under perfectly uniform routing, for any K.
    """
    num_experts = probs.shape[-1]
    f = assignment_fraction(expert_index, num_experts, weights)
    return num_experts * jnp.sum(f * token_mean(probs, weights))


def assignment_fraction(expert_index: Array, num_experts: int,
                        weights: Array | None = None) -> Array:
    """[E] share of the T*K assignments `expert_index` ([T, K]) that chose each expert."""
    one_hot = jax.nn.one_hot(expert_index, num_experts, dtype=jnp.float32)  # [T, K, E]
    return token_mean(jnp.mean(one_hot, axis=1), weights)


def router_z_loss(logits: Array, weights: Array | None = None) -> Array:
    """ST-MoE eq. 5: mean over tokens of logsumexp(logits)^2. logits: [T, E]."""
    z = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
    return token_mean(jnp.square(z), weights)


def token_entropy(probs: Array) -> Array:
    """[T] entropy (nats) of each token's routing distribution probs [T, E] (0 log 0 = 0): ln E
    for uniform routing, 0 for one-hot routing."""
    p = probs.astype(jnp.float32)
    return -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), -1)


def router_entropy(probs: Array, weights: Array | None = None) -> Array:
    """Mean over tokens of `token_entropy`. probs: [T, E]."""
    return token_mean(token_entropy(probs), weights)
