"""Routing profiles and drift (moe_jax/train/profiles.py) on hand-made numbers: the
Jensen-Shannon divergence, profiles from evaluation sums, drift with movers and verdicts, and
the report's text (moe_jax/train/routing_report.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from moe_jax.config import MoeConfig
from moe_jax.models.config import ModelConfig
from moe_jax.train import evaluate, profiles, routing_report


def test_jensen_shannon_divergence_in_bits():
    assert profiles.js_divergence([0.5, 0.5], [0.5, 0.5]) == 0.0
    assert profiles.js_divergence([1, 0], [0, 1]) == pytest.approx(1.0)  # disjoint: 1 bit
    # p = (1, 0), q = (1/2, 1/2): m = (3/4, 1/4); JS = (log2(4/3) + (log2(2/3) + log2(2)) / 2) / 2
    expected = (math.log2(4 / 3) + 0.5 * math.log2(2 / 3) + 0.5 * math.log2(2)) / 2
    assert profiles.js_divergence([1, 0], [0.5, 0.5]) == pytest.approx(expected)
    assert profiles.js_divergence([2, 2], [1, 1]) == 0.0  # normalised first
    p, q = [0.7, 0.2, 0.1], [0.1, 0.3, 0.6]
    assert profiles.js_divergence(p, q) == pytest.approx(profiles.js_divergence(q, p))


def profile(step: int, shares: dict[str, list[float]], tokens: float = 100.0) -> dict:
    return {"step": step, "num_experts": len(next(iter(shares.values()))), "top_k": 1,
            "router": "top_k", "layers": [1], "domains": list(shares), "gate_bins": 2,
            "per_layer": {"1": {d: {"tokens": tokens, "share": s, "load": s, "dropped": 0.0,
                                    "entropy": 1.0, "top1_gate": [0.5, 0.5]}
                                for d, s in shares.items()}}}


def test_drift_names_the_layer_the_movers_and_the_verdict():
    before = profile(100, {"code": [0.5, 0.5, 0.0, 0.0], "math": [0.0, 0.0, 0.5, 0.5]})
    after = profile(200, {"code": [0.5, 0.5, 0.0, 0.0], "math": [0.5, 0.5, 0.0, 0.0]})
    d = profiles.drift(before, after, top=2)["1"]
    assert d["js_by_domain"] == {"code": 0.0, "math": pytest.approx(1.0)}
    # overall shares (equal tokens): (0.25, 0.25, 0.25, 0.25) -> (0.5, 0.5, 0, 0)
    assert d["js"] == pytest.approx(profiles.js_divergence([1, 1, 1, 1], [1, 1, 0, 0]))
    assert d["worst"] == pytest.approx(1.0) and d["verdict"] == "shifted"
    assert d["movers"] == [[0, 0.25, 0.5], [1, 0.25, 0.5]]
    assert d["entropy_change"] == 0.0
    assert profiles.drift(before, before)["1"]["verdict"] == "stable"
    assert [profiles.verdict(x, (0.01, 0.05)) for x in (0.0, 0.01, 0.049, 0.05, math.nan)] == [
        "stable", "drifting", "drifting", "shifted", "unknown"]
    names, matrix = profiles.domain_divergence(before, 1)
    assert names == ["code", "math"] and matrix[0, 1] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="over 4 experts with routing over 2"):
        profiles.drift(before, profile(1, {"code": [0.5, 0.5]}))


def test_profile_from_evaluation_sums():
    # 1 sparse layer (block 1), 2 domains, 2 experts, 4 gate bins: hand-made routed-token sums.
    model = ModelConfig(num_layers=2, moe_every=2)
    moe = MoeConfig(num_experts=2)
    totals = {"domain/routed_tokens": np.array([10.0, 0.0]),
              "domain/expert_share": np.array([[[6.0, 4.0], [0.0, 0.0]]]),
              "domain/expert_load": np.array([[[5.0, 4.0], [0.0, 0.0]]]),
              "domain/router_entropy": np.array([[3.0, 0.0]]),
              "domain/top1_gate": np.array([[[0.0, 2.0, 8.0, 0.0], [0.0] * 4]])}
    p = profiles.from_totals(totals, model, moe, ("code", "math"), step=7)
    assert p["layers"] == [1] and p["domains"] == ["code"]  # math has no tokens
    code = p["per_layer"]["1"]["code"]
    assert code["share"] == [0.6, 0.4] and code["load"] == [0.5, 0.4]
    assert code["dropped"] == pytest.approx(0.1) and code["entropy"] == pytest.approx(0.3)
    assert code["top1_gate"] == [0.0, 0.2, 0.8, 0.0] and code["tokens"] == 10.0


def test_gate_bins_cover_zero_to_one():
    import jax.numpy as jnp

    from moe_jax import routing

    gates = jnp.array([[0.0], [0.049], [0.5], [1.0]])
    choice = routing.TokenChoice(jnp.zeros((4, 1), jnp.int32), gates, jnp.ones((4, 1), bool))
    tokens = routing.TokenRouting(jnp.zeros((4, 2)), jnp.full((4, 2), 0.5), choice, 2)
    bins = np.asarray(evaluate._gate_bins(tokens)).argmax(-1)
    assert bins.tolist() == [0, 0, evaluate.GATE_BINS // 2, evaluate.GATE_BINS - 1]


def test_report_text_has_the_shares_the_domain_divergence_and_the_verdict():
    before = profile(100, {"code": [0.5, 0.5, 0.0, 0.0], "math": [0.0, 0.0, 0.5, 0.5]})
    after = profile(200, {"code": [0.5, 0.5, 0.0, 0.0], "math": [0.25, 0.25, 0.25, 0.25]})
    result = routing_report.report([("step 100", before), ("step 200", after)],
                                   thresholds=(0.01, 0.05))
    text = routing_report.format_report(result)
    assert "code-math 1.0000" in text  # the domains' JS before
    assert "layer 1: shifted" in text and "by domain code 0.0000, math 0.3113" in text, text
    assert "moved most: e0 0.250->0.375" in text
    assert "top-1 gate" in text and routing_report.mean_gate([0.5, 0.5]) == 0.5
    assert routing_report.mean_gate([1.0, 0.0]) == 0.25 and routing_report.mean_gate(None) is None
