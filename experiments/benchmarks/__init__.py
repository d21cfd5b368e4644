"""Benchmarks (not tests): they print measured figures and write them to files."""

import moe_jax  # noqa: F401  first, before numpy loads its BLAS (see moe_jax/__init__.py)
