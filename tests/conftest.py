"""Test-wide setup: 8 simulated CPU devices, set before jax is imported anywhere."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Compile time dominates small tests; a persistent cache lets subprocess-based tests (CLI,
# notebooks, multi-process) reuse compilations from the same run.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..",
                                                               ".jax_cache"))

import jax

jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """The tiny embedded corpus, built once per test run (0.3 s) for every test that reads it."""
    from moe_jax.data import corpus

    path = str(tmp_path_factory.mktemp("tfds"))
    corpus.prepare_embedded_corpus(path, "tiny")
    return path
