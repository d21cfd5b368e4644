"""The communication lower bound (moe_jax.analysis.communication) and the step estimates of a
dry run (dryrun_report.step_estimates), on hand-made numbers."""

from __future__ import annotations

import pytest

from moe_jax.analysis import communication, dryrun_report, topology


@pytest.mark.parametrize(("kind", "result_bytes", "group", "expected"), [
    ("all-gather", 800, 8, 700),         # receive the 7 missing shards of 100 bytes
    ("reduce-scatter", 100, 8, 700),     # send 7 of the 8 shards of its 800-byte input
    ("all-reduce", 800, 8, 1400),        # reduce-scatter + all-gather
    ("all-to-all", 800, 8, 1600),        # 8 chunks of 100 bytes, 2 hops on average
    ("all-to-all", 800, 2, 400),         # a pair: half of it to the one neighbour
    ("collective-permute", 800, 1, 800),
    ("all-gather", 800, 1, 0),           # a group of one moves nothing
])
def test_link_bytes_of_each_collective(kind, result_bytes, group, expected):
    assert communication.link_bytes(kind, result_bytes, group) == pytest.approx(expected)


def test_bound_seconds_sums_the_groups_of_each_kind():
    collectives = {"all-gather": {"bytes_per_step_by_group": {"4": 400, "2": 200}},
                   "all-to-all": {"bytes_per_step_by_group": {8: 800}}}
    seconds = communication.bound_seconds(collectives, ici_bytes_per_second=100.0)
    assert seconds == pytest.approx({"all-gather": (300 + 100) / 100, "all-to-all": 1600 / 100})


def test_bound_seconds_refuses_records_without_groups_and_assume_groups_fills_them():
    legacy = {"all-to-all": {"result_bytes_per_step": 800}}
    with pytest.raises(ValueError, match=r"has no bytes_per_step_by_group.*assume_groups"):
        communication.bound_seconds(legacy, 100.0)
    filled = communication.assume_groups(legacy, {"all-to-all": 4})
    assert communication.bound_seconds(filled, 100.0) == pytest.approx({"all-to-all": 8.0})
    with pytest.raises(ValueError, match="'send' has no communication model"):
        communication.link_bytes("send", 1, 2)


def test_step_estimates_overlap_is_the_max_and_serial_the_sum():
    e = dryrun_report.step_estimates(2.0, 1.0, 3.0, useful_flops=120.0, peak_flops=10.0)
    assert e["overlap_step_seconds"] == 3.0 and e["serial_step_seconds"] == 6.0
    assert e["overlap_mfu"] == pytest.approx(120 / 30) and e["serial_mfu"] == pytest.approx(2.0)


def test_a_devices_ici_bandwidth_is_half_the_chips_bidirectional_figure_shared():
    v5p = topology.Topology("v5p:2x2x1", (), topology.CHIPS["v5p"])
    assert v5p.device_ici_bytes_per_second == 600e9
    v4 = topology.Topology("v4:2x2x1", (), topology.CHIPS["v4"], devices_per_chip=2)
    assert v4.device_ici_bytes_per_second == 540e9 / 4
