"""moe_jax: pure-functional Mixture-of-Experts layers, models and experiments in JAX/Flax.

The layer is flat at the top, read in this order: routing (the routers, with losses) -> config
-> experts (grouped matmuls in kernels/) -> dispatch -> moe (the composed layer) -> layers (Flax).
Around it, by concept: models/, parallel/ (meshes, expert parallelism), data/, analysis/
(FLOPs, memory, compiled programs), train/, interop/; the commands main, sample, convert, dryrun
and demo stay at the top.
"""

from moe_jax import moe
from moe_jax.config import MoeConfig

__all__ = ["MoeConfig", "moe"]
__version__ = "0.1.0"
