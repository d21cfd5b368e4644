"""The dropless train step compiled for a TPU topology without a TPU (libtpu's compile-only
devices; skipped where libtpu is not installed): the explicit form runs megablox's Mosaic
kernels and ragged all-to-alls and no dense product over experts; the capacity path compiled
the same way does compute dense expert products (so the check can fail)."""

import importlib.util

import pytest

pytestmark = [
    pytest.mark.slow,  # two TPU compilations, ~1 minute of CPU
    pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                       reason='libtpu is not installed (pip install "jax[tpu]")'),
]


def test_dropless_train_step_for_tpu_runs_megablox_and_ragged_all_to_all():
    from experiments.benchmarks import dropless_tpu
    from moe_jax import schema

    try:
        devices = dropless_tpu.tpu_devices("v5p:2x2x1")
    except Exception as err:  # one process at a time may hold libtpu (/tmp/libtpu_lockfile)
        if "lockfile" not in str(err):
            raise
        pytest.skip(f"libtpu is held by another process: {err}")
    base = dropless_tpu.base_config(len(devices), batch_size=4, **{"model.num_layers": 1})
    variants = dropless_tpu.VARIANTS
    dropless = dropless_tpu.variant_report(
        schema.override(base, variants["dropless_explicit"]), devices)
    capacity = dropless_tpu.variant_report(
        schema.override(base, variants["capacity_gather_explicit"]), devices)
    # one block: forward gmm for wi, wi_gate, wo; backward gmm (input gradients) and tgmm
    assert dropless["mosaic_kernels"] == {"gmm": 6, "tgmm": 3}
    assert dropless["ragged_all_to_alls"] >= 2  # there and back (and their transposes)
    assert dropless["dense_expert_dots"] == 0 and dropless["ragged_dots"] == 0
    assert capacity["dense_expert_dots"] > 0 and capacity["megablox_calls"] == 0
    assert capacity["ragged_all_to_alls"] == 0 and capacity["all_to_alls"] > 0
    for report in (dropless, capacity):
        assert report["bytes_per_chip"]["peak_estimate"] > 0
