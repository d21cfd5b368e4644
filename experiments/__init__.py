"""Experiments: benchmark suites and paper-reproduction sweeps built on moe_jax."""
