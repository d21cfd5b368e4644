"""moe_jax: pure-functional Mixture-of-Experts layers, models and experiments in JAX/Flax.

Reading order: config -> routing -> losses -> dispatch -> experts -> moe (the composed layer)
-> layers (Flax) -> models -> flops -> sharding -> train.
"""

from moe_jax import moe
from moe_jax.config import MoeConfig

__all__ = ["MoeConfig", "moe"]
__version__ = "0.1.0"
