"""Test-wide setup: 8 simulated CPU devices, set before jax is imported anywhere."""

import json
import os
import shutil

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

HF_FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "hf")


@pytest.fixture
def hf_variant(tmp_path):
    """A function: (family, change=None) -> a copy of tests/fixtures/hf/<family> in tmp_path
    (replacing an earlier copy of the test), its config.json edited in place by `change(hf)`."""
    def variant(family: str, change=None) -> str:
        directory = str(tmp_path / family)
        shutil.rmtree(directory, ignore_errors=True)
        shutil.copytree(os.path.join(HF_FIXTURES, family), directory)
        if change is not None:
            path = os.path.join(directory, "config.json")
            with open(path) as f:
                hf = json.load(f)
            change(hf)
            with open(path, "w") as f:
                json.dump(hf, f)
        return directory

    return variant


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """The tiny embedded corpus, built once per test run (0.3 s) for every test that reads it."""
    from moe_jax.data import corpus

    path = str(tmp_path_factory.mktemp("tfds"))
    corpus.prepare_embedded_corpus(path, "tiny")
    return path


@pytest.fixture
def imported_run(tmp_path, data_dir):
    """A function: Hugging Face directory -> (its family, a run directory converted from it
    whose config reads the tiny embedded corpus, 1 validation batch of 2 x 32 tokens)."""
    from moe_jax.interop import conversion

    def convert(source: str) -> tuple[str, str]:
        out = str(tmp_path / "converted")
        family = conversion.import_hf(source, out)["family"]
        path = os.path.join(out, "config.json")
        with open(path) as f:
            config = json.load(f)
        config["data"].update(name="embedded_tiny", data_dir=data_dir, eval_batches=1)
        config["train"].update(batch_size=2, seq_len=32)
        with open(path, "w") as f:
            json.dump(config, f)
        return family, out

    return convert
