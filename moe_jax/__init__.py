"""moe_jax: pure-functional Mixture-of-Experts layers, models and experiments in JAX/Flax."""

from moe_jax.config import MoeConfig

__all__ = ["MoeConfig"]
__version__ = "0.1.0"
