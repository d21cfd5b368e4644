"""The routing_drift suite's claims and figures on hand-made fine-tuning analyses (the numbers
its analysis stage, experiments/analyses/drift_finetune.py, writes per pretraining seed)."""

from __future__ import annotations

from experiments import suites
from experiments.analyses import report
from experiments.library import stats
from experiments.library.results import Results
from experiments.suites import routing_drift


def analysis(seed: int) -> dict:
    """One seed: expert dropout 0.05 nats better on math (+/- 0.01 by seed); the frozen router
    drifts less; no balance loss ends less balanced; the temperature moves the entropy."""
    jitter = 0.01 * (seed - 1)

    def routing(vio: float, entropy: float = 1.5) -> dict:
        return {str(layer): {"max_violation": vio, "entropy": entropy, "dropped": 0.01}
                for layer in (1, 3)}

    def variant(math_loss: float, drift: float, vio: float) -> dict:
        loss = {"code": 1.9, "prose": 2.0, "math": math_loss}
        return {"loss": loss, "loss_change": {"code": 0.2, "prose": 0.1, "math": math_loss - 1.5},
                "drift": {str(layer): {"worst": drift, "js": drift / 2} for layer in (1, 3)},
                "routing": routing(vio), "alarms": {}, "alarm_messages": []}

    return {
        "layers": [1, 3], "domains": ["code", "prose", "math"], "num_experts": 8,
        "pretrain": {"step": 300, "loss": {"code": 1.7, "prose": 1.9, "math": 1.5},
                     "routing": routing(0.4)},
        "variants": {"plain": variant(1.2, 0.1 + jitter, 0.5),
                     "expert_dropout": variant(1.15 + jitter, 0.12, 0.5),
                     "frozen_router": variant(1.25, 0.02, 0.6),
                     "no_balance": variant(1.2, 0.2, 1.5 + jitter)},
        "temperatures": [{"temperature": t, "loss": 1.2 + 0.01 * t,
                          "loss_by_domain": {"code": 1.9, "prose": 2.0, "math": 1.2},
                          "routing": routing(0.5, 1.0 + 0.1 * t)}
                         for t in routing_drift.TEMPERATURES],
    }


def results() -> Results:
    runs = [{"member": "pretrain", "seed": s, "status": "finished", "tags": {},
             "overrides": {"train.num_train_steps": 300}, "config": "switch.py:e8",
             "summary": {"eval_loss": 1.8, "steps": 300, "eval": {}}, "history": [],
             "analysis": analysis(s)} for s in range(3)]
    return Results({"suite": "routing_drift", "scale": "tiny", "runs": runs})


def test_claims_on_hand_made_analyses():
    outcomes = {c.id: c.check(results()) for c in routing_drift.SUITE.claims}
    assert outcomes["expert_dropout_finetunes_better"].verdict == stats.AGREES
    assert "-0.0500 ± 0.0058" in outcomes["expert_dropout_finetunes_better"].measured
    assert outcomes["finetuning_gains_target"].verdict == stats.AGREES
    assert outcomes["finetuning_forgets"].verdict == stats.AGREES
    assert outcomes["frozen_router_drifts_less"].verdict == stats.AGREES
    assert outcomes["no_balance_less_balanced"].verdict == stats.AGREES
    assert outcomes["temperature_sweep"].verdict == "descriptive"
    assert "T=0.5: loss 1.2050" in outcomes["temperature_sweep"].measured
    empty = Results({"suite": "routing_drift", "scale": "tiny", "runs": []})
    assert all(c.check(empty).verdict == stats.INCONCLUSIVE
               for c in routing_drift.SUITE.claims if c.id != "temperature_sweep")


def test_report_draws_the_figures(tmp_path):
    suite = suites.get("routing_drift")
    markdown = report.build(suite, results(), str(tmp_path))
    for figure in suite.figures:
        assert (tmp_path / f"tiny_{figure.name}.png").read_bytes()[:4] == b"\x89PNG"
        assert f"tiny_{figure.name}.png" in markdown
    assert suite.analysis == "experiments.analyses.drift_finetune"
    member = suite.member_list("tiny")[0]
    assert member.overrides["data.train_domains"] == "code,prose"
