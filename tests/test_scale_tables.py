"""The scale experiment's tables (experiments/scale): recorded dry runs read back with the
communication bound, and the choice of expert-parallel form; hand-made records, no compiles."""

from __future__ import annotations

import pytest

from experiments.scale import expert_parallel, maxtext, run
from moe_jax.analysis import topology

# A v5p:2x2x1 dry run (4 chips, one device each) recorded before group sizes were read.
LEGACY = {
    "config": "c", "topology": "v5p:2x2x1", "chip": "v5p", "devices": 4,
    "mesh": {"data": 1, "fsdp": 2, "expert": 2, "model": 1}, "expert_parallel": "explicit",
    "scan_layers": True, "remat_policy": "full", "batch_size": 8, "seq_len": 32,
    "compiled": True, "bytes": {"peak": 1},
    "collectives": {"all-to-all": {"result_bytes_per_step": 600e9},
                    "all-gather": {"result_bytes_per_step": 800e9}},
    "estimate": {"step_seconds": 2.0, "compute_seconds": 1.0, "memory_seconds": 2.0,
                 "mfu": 0.25}}


def test_a_legacy_record_gets_assumed_groups_and_both_estimates():
    report = run.load_report(LEGACY)
    assert report.config == "c" + run.LEGACY_MARK
    # W = 600 GB/s per device; all-to-all over the expert axis (2): 600e9 * 2 / 4 bytes;
    # all-gather over all 4 devices: 800e9 * 3 / 4 bytes.
    assert report.communication_seconds == pytest.approx({"all-to-all": 0.5, "all-gather": 1.0})
    e = report.estimate
    assert e["communication_seconds"] == pytest.approx(1.5)
    assert e["overlap_step_seconds"] == 2.0 and e["serial_step_seconds"] == pytest.approx(4.5)
    useful = 0.25 * 2.0 * topology.CHIPS["v5p"].peak_bf16_flops  # MFU x step x peak
    assert e["useful_flops"] == pytest.approx(useful)
    assert e["overlap_mfu"] == pytest.approx(0.25)
    assert e["serial_mfu"] == pytest.approx(0.25 * 2 / 4.5)


def test_a_record_that_never_compiled_has_no_estimate():
    assert run.load_report({"config": "c", "topology": "v5p:2x2x1", "compiled": False}) is None
    failed = run.load_report({**LEGACY, "compiled": False, "estimate": {}})
    assert failed.estimate == {} and failed.config == "c"


@pytest.mark.parametrize(("seconds", "expected"), [
    ({"gspmd": 1.0, "explicit": 0.5}, "explicit"),
    ({"gspmd": 0.2, "explicit": 0.5}, "gspmd"),
    ({"gspmd": 1.0, "explicit": 0.96}, "either"),
])
def test_the_form_with_fewer_ici_seconds_is_chosen(seconds, expected):
    assert expert_parallel.choose(seconds) == expected


def test_every_maxtext_measurement_names_existing_cases():
    names = {c.name for c in run.maxtext_cases()}
    assert all(set(m.cases) <= names for m in maxtext.MEASUREMENTS)
    assert len(run.cases()) == len({run.key(c) for c in run.cases()})  # keys are unique
