"""The switch_scaling report's derived numbers on hand-made results: the share of dense_4x's gain
a sparse member captures, its dense-FLOPs equivalent, tokens per expert per routing group, and
the time basis taken from a throughput benchmark."""

import numpy as np
import pytest

from experiments.library import checks
from experiments.library.results import (
    BENCHMARK_KEY,
    TIME_BASIS_KEY,
    Results,
    tokens_per_expert_group,
)
from experiments.suites import switch_scaling

FLOPS_PER_TOKEN = {"dense": 1e6, "dense_2x": 2e6, "dense_4x": 4e6, "switch_e16": 1e6}


def _run(member: str, seed: int, loss: float) -> dict:
    steps = np.arange(0, 101, 10)
    return {"member": member, "seed": seed, "status": "finished", "tags": {"experts": 16},
            "summary": {"eval_loss": loss, "training_flops_per_token": FLOPS_PER_TOKEN[member],
                        "train_tokens": 1000, "steps": 100},
            "history": [{"step": int(s), "train/cross_entropy": 3.0 - s / 100,
                         "train/tokens_per_second": 5.0} for s in steps]}


def _results(losses: dict[str, list[float]]) -> Results:
    return Results({"suite": "switch_scaling", "scale": "mini", "statistics": "seed_paired",
                    "runs": [_run(m, seed, v) for m, values in losses.items()
                             for seed, v in enumerate(values)]})


LOSSES = {"dense": [2.0, 2.1], "dense_2x": [1.9, 2.0], "dense_4x": [1.8, 1.9],
          "switch_e16": [1.95, 1.95]}


def test_share_of_the_4x_gain_is_seed_paired():
    # seed 0: (2.0 - 1.95) / (2.0 - 1.8) = 0.25; seed 1: (2.1 - 1.95) / (2.1 - 1.9) = 0.75
    assert switch_scaling.gain_captured(_results(LOSSES)) == {
        "switch_e16": pytest.approx([0.25, 0.75])}


def test_dense_equivalent_interpolates_log2_flops_in_loss():
    # mean ladder: 1x 2.05, 2x 1.95, 4x 1.85 (FLOPs 1e9, 2e9, 4e9); the member's mean 1.95 sits
    # on the 2x rung exactly.
    assert switch_scaling.dense_equivalent(_results(LOSSES), "switch_e16") == (
        pytest.approx(2.0), False)
    # halfway between 1x (2.05) and 2x (1.95) in loss: 2 ** 0.5
    halfway = {**LOSSES, "switch_e16": [2.0, 2.0]}
    assert switch_scaling.dense_equivalent(_results(halfway), "switch_e16")[0] == pytest.approx(
        2 ** 0.5)
    # worse than dense: extrapolated below 1x along the first segment (0.1 nats per doubling)
    worse = {**LOSSES, "switch_e16": [2.15, 2.15]}
    assert switch_scaling.dense_equivalent(_results(worse), "switch_e16") == (
        pytest.approx(0.5), True)


def test_time_basis_comes_from_the_benchmark_when_there_is_one():
    results = _results(LOSSES)
    run = results.runs_of("switch_e16")[0]
    steps = np.array([10.0, 100.0])
    # the logged rate: 5 tokens/s, 10 tokens per step -> 2 s per step
    np.testing.assert_allclose(checks.training_seconds(run, steps), [20.0, 200.0])
    results.set_throughput({"rows": [{"member": "switch_e16", "tokens_per_s": 20.0}]})
    assert run[BENCHMARK_KEY] == 20.0
    np.testing.assert_allclose(checks.training_seconds(run, steps), [5.0, 50.0])
    assert BENCHMARK_KEY not in results.runs_of("dense")[0]


def test_tokens_per_expert_group_is_t_k_over_e():
    overrides = {"train.batch_size": 16}
    # 16 x 128 tokens in one routing group, top-1 over 64 experts: 32 each
    assert tokens_per_expert_group({"config": "switch.py:e64", "overrides": overrides}) == 32
    # top-2 over 16 experts: 16 * 128 * 2 / 16 = 256
    assert tokens_per_expert_group({"config": "switch.py:e16", "overrides": {
        **overrides, "moe.top_k": 2}}) == 256
    assert tokens_per_expert_group({"config": "dense.py:tiny", "overrides": overrides}) is None


def test_a_file_pre_registered_on_the_benchmark_waits_for_it():
    fast = {**LOSSES, "switch_e16": [1.95, 1.95]}
    results = _results(fast)
    loop_basis = checks.speedup(results, "switch_e16", "dense", "time")
    results.data[TIME_BASIS_KEY] = "benchmark"
    waiting = checks.speedup(results, "switch_e16", "dense", "time")
    assert waiting.verdict == "inconclusive" and "awaiting the throughput benchmark" in \
        waiting.measured and loop_basis.measured in waiting.measured
    results.set_throughput({"rows": [{"member": m, "tokens_per_s": 5.0} for m in fast]})
    assert checks.speedup(results, "switch_e16", "dense", "time").measured == loop_basis.measured
