"""Choosing the next token from logits: greedy, temperature, top-k and nucleus (top-p) sampling.

    token = sample(key, logits, SamplingConfig(temperature=0.8, top_k=40, top_p=0.95))

Shape letters: B batch, V vocabulary. Pure functions; the same key gives the same tokens.
The filters apply in the order temperature -> top-k -> top-p, then one categorical draw.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from moe_jax.utils import fields

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen.

    temperature: logits are divided by it; 0 = greedy (argmax; top_k and top_p then do nothing).
    top_k: keep the k most likely tokens (Fan et al. 2018); 0 = all.
    top_p: keep the smallest set of most likely tokens whose probability reaches top_p (nucleus
      sampling, Holtzman et al. 2020, Sec. 3.1); 1 = all.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        fields.number(self, "temperature", at_least=0)
        fields.integer(self, "top_k", minimum=0, fix="0 keeps every token")
        fields.number(self, "top_p", above=0, at_most=1, fix="1 keeps every token")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GREEDY = SamplingConfig(temperature=0.0)


def top_k_mask(logits: Array, k: int) -> Array:
    """[B, V] bool: the k largest logits of each row (ties at the k-th value all kept)."""
    kth = jax.lax.top_k(logits, k)[0][:, -1:]
    return logits >= kth


def top_p_mask(logits: Array, p: float) -> Array:
    """[B, V] bool: the nucleus, the most likely tokens whose probabilities, taken in decreasing
    order, first reach `p` (a token is kept if the mass before it is below p; the most likely
    token is always kept)."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    order = jnp.argsort(-probs, axis=-1)
    sorted_probs = jnp.take_along_axis(probs, order, axis=-1)
    keep_sorted = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs < p
    rows = jnp.arange(logits.shape[0])[:, None]
    return jnp.zeros_like(keep_sorted).at[rows, order].set(keep_sorted)


def filtered_logits(logits: Array, config: SamplingConfig) -> Array:
    """[B, V] float32 logits / temperature with the tokens outside top-k and top-p at -inf."""
    logits = logits.astype(jnp.float32) / config.temperature
    if config.top_k and config.top_k < logits.shape[-1]:
        logits = jnp.where(top_k_mask(logits, config.top_k), logits, -jnp.inf)
    if config.top_p < 1:
        logits = jnp.where(top_p_mask(logits, config.top_p), logits, -jnp.inf)
    return logits


def sample(key: Array, logits: Array, config: SamplingConfig) -> Array:
    """[B] int32 next tokens from [B, V] logits (greedy when config.temperature == 0)."""
    if config.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filtered_logits(logits, config), axis=-1).astype(jnp.int32)
