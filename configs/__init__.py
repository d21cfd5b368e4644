"""The experiment configs, installed as the package `moe_jax.configs` (see setup.cfg)."""
