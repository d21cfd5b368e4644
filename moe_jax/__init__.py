"""moe_jax: pure-functional Mixture-of-Experts layers, models and experiments in JAX/Flax.

Reading order: config -> routing -> losses -> dispatch -> experts -> moe (the composed layer)
-> layers (Flax) -> models -> flops -> sharding -> train.
"""

import os

# The CPU grouped matmul (moe_jax/grouped_matmul_cpu.py) calls numpy's BLAS between XLA ops.
# OpenBLAS's worker threads spin ~2^28 cycles after each call by default, taking a core from
# XLA's own threads (the tiny Mixtral train step: 1.46x -> 1.22x of dense with 2^4 cycles).
# Read when numpy first loads OpenBLAS, so it only takes effect if moe_jax is imported first;
# set the variable yourself to override it.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

from moe_jax import moe
from moe_jax.config import MoeConfig

__all__ = ["MoeConfig", "moe"]
__version__ = "0.1.0"
