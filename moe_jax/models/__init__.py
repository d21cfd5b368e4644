"""Transformer models built on the MoE layer: `ModelConfig` and the flax `Transformer`."""

from moe_jax.models.config import ModelConfig, check_compatible
from moe_jax.models.transformer import Transformer

__all__ = ["ModelConfig", "Transformer", "check_compatible"]
