"""Auxiliary router losses and routing statistics (pure functions of one group).

Shape letters: T tokens, E experts, K choices per token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def load_balancing_loss(probs: Array, expert_index: Array) -> Array:
    """Switch Transformer eq. 4, generalised to top-k: `E * sum_e f_e * P_e`.

    probs: [T, E] router probabilities; expert_index: [T, K] chosen experts.
    f_e is the share of the T*K assignments that chose e (before any drop) and P_e the mean
    router probability of e. Equals 1.0 under perfectly uniform routing, for any K.
    """
    num_experts = probs.shape[-1]
    f = assignment_fraction(expert_index, num_experts)
    p = jnp.mean(probs.astype(jnp.float32), axis=0)
    return num_experts * jnp.sum(f * p)


def assignment_fraction(expert_index: Array, num_experts: int) -> Array:
    """[E] share of the T*K assignments `expert_index` ([T, K]) that chose each expert."""
    counts = jnp.sum(jax.nn.one_hot(expert_index, num_experts, dtype=jnp.float32), axis=(0, 1))
    return counts / expert_index.size


def router_z_loss(logits: Array) -> Array:
    """ST-MoE eq. 5: mean over tokens of logsumexp(logits)^2. logits: [T, E]."""
    z = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
    return jnp.mean(jnp.square(z))


def router_entropy(probs: Array) -> Array:
    """Mean over tokens of the entropy (nats) of the routing distribution. probs: [T, E].

    ln E for uniform routing, 0 for one-hot routing.
    """
    p = probs.astype(jnp.float32)
    return jnp.mean(-jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), -1))
