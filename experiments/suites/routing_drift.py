"""routing_drift: what fine-tuning on a new domain does to a pretrained router, and the fixes
practitioners name: expert dropout (Switch Sec. 2.4, Table 4), a frozen router, and the
balance loss; then an evaluation-time router temperature sweep.

One member, `pretrain`: switch.py:e8 (top-1 of 8 experts in blocks 1 and 3) trained on the code
and prose documents of the embedded corpus only (`data.train_domains`). After each pretraining
run the runner calls `experiments.analyses.drift_finetune`, which fine-tunes the run on math in
four variants (`VARIANTS`: plain, expert dropout 0.4, frozen router, balance loss off; all
with dropout 0.1 elsewhere) from its weights (`init.checkpoint`), evaluates each
on the whole validation split (code, prose, math), and sweeps the evaluation router
temperature of the plain fine-tuned model. The numbers live in each run's `analysis`.

The verdict rule was fixed before the runs (`stats.py`): each claim is the sign of a mean of
seed-paired differences (3 seeds), resolved when more than 2 standard errors from zero.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from experiments.library import plots, stats
from experiments.library.base import Claim, Figure, Member, Suite, family
from experiments.library.results import Results

MEMBER = "pretrain"
DOMAINS = ("code", "prose", "math")
PRETRAIN_DOMAINS = "code,prose"
# The fine-tuning stage (`drift_finetune`). Variants: settings on top of `FINETUNE`; Switch
# Table 4 fine-tunes with dropout 0.1 outside the experts, and 0.4 inside them for expert
# dropout.
VARIANTS: dict[str, dict[str, Any]] = {
    "plain": {},
    "expert_dropout": {"moe.expert_dropout": 0.4},
    "frozen_router": {"train.freeze_router": True},
    "no_balance": {"moe.load_balance_coef": 0.0},
}
# Every variant: math documents of the tiny corpus (~30k byte tokens, repeated), dropout 0.1,
# a constant learning rate, one evaluation at the end; the routers are trained already, so the
# monitor's alarms count from the first step.
FINETUNE: dict[str, Any] = {
    "data.name": "embedded_tiny", "data.train_domains": "math", "model.dropout_rate": 0.1,
    "train.learning_rate": 1e-3, "train.schedule": "constant", "train.eval_every": 0,
    "train.checkpoint_every": 0, "train.max_to_keep": 1, "train.progress_bar": False,
    "monitor.grace_steps": 0,
}
FINETUNE_FRACTION = 0.5  # fine-tuning steps per pretraining step
EVALUATION: dict[str, Any] = {"data.name": "embedded"}  # the pretraining's validation split
TEMPERATURES = (0.5, 1.0, 2.0, 4.0)  # evaluation router temperatures of the sweep


def members(scale: str) -> tuple[Member, ...]:
    return (Member(MEMBER, family("switch.py", scale, "e8"),
                   {"data.train_domains": PRETRAIN_DOMAINS, "train.checkpoint_every": 0},
                   {"experts": 8, "top_k": 1}),)


def _analyses(results: Results) -> list[dict]:
    return [r["analysis"] for r in results.runs_of(MEMBER) if r.get("analysis")]


def _no_analysis() -> stats.Outcome:
    return stats.Outcome(stats.INCONCLUSIVE, "n/a: no fine-tuning analysis in the results", "-")


def _paired(results: Results, value: Callable[[dict], float], expect: str, what: str,
            unit: str = "nats", digits: int = 3) -> stats.Outcome:
    """The 2-SE verdict of a per-seed quantity (one value per pretraining seed)."""
    analyses = _analyses(results)
    if not analyses:
        return _no_analysis()
    per_seed = [value(a) for a in analyses]
    mean, se = stats.mean_se(per_seed)
    out = stats.outcome(mean, se, expect, what, unit, digits)
    return stats.Outcome(out.verdict, f"{out.measured}; per seed "
                         f"[{', '.join(f'{v:+.{digits}f}' for v in per_seed)}]", out.rule)


def _loss(a: dict, variant: str, domain: str) -> float:
    return a["variants"][variant]["loss"][domain]


def _worst_drift(a: dict, variant: str) -> float:
    return max(d["worst"] for d in a["variants"][variant]["drift"].values())


def _max_violation(a: dict, variant: str) -> float:
    return max(r["max_violation"] for r in a["variants"][variant]["routing"].values())


def _temperature_note(results: Results) -> stats.Outcome:
    analyses = _analyses(results)
    if not analyses:
        return _no_analysis()
    parts = []
    for i, t in enumerate(TEMPERATURES):
        loss = np.mean([a["temperatures"][i]["loss"] for a in analyses])
        vio = np.mean([max(r["max_violation"] for r in a["temperatures"][i]["routing"].values())
                       for a in analyses])
        entropy = np.mean([np.mean([r["entropy"] for r in a["temperatures"][i]["routing"]
                                    .values()]) for a in analyses])
        parts.append(f"T={t:g}: loss {loss:.4f}, MaxVio {vio:.3f}, entropy {entropy:.3f}")
    return stats.Outcome("descriptive", "; ".join(parts), "no paper claim; plotted")


def _drift_figure(results: Results, path: str) -> None:
    analyses = _analyses(results)
    if not analyses:
        return
    names = list(VARIANTS)
    layers = [str(x) for x in analyses[0]["layers"]]
    fig, axes = plots.figure(ncols=3, width=4.8)
    for i, layer in enumerate(layers):
        plots.series(axes[0, 0], range(len(names)),
                     [[a["variants"][v]["drift"][layer]["worst"] for a in analyses]
                      for v in names], f"layer {layer}", plots.COLORS[i])
    axes[0, 0].set_xticks(range(len(names)), names, rotation=30, ha="right")
    plots.label_axes(axes[0, 0], "", "routing drift: JS divergence (bits, worst domain)")
    width = 0.8 / len(DOMAINS)
    for j, domain in enumerate(DOMAINS):
        samples = [[a["variants"][v]["loss_change"][domain] for a in analyses] for v in names]
        means = [np.mean(s) for s in samples]
        xs = np.arange(len(names)) + (j - 1) * width
        axes[0, 1].bar(xs, means, width, label=domain, color=plots.COLORS[j], alpha=0.8)
        for x, s in zip(xs, samples, strict=True):
            axes[0, 1].scatter([x] * len(s), s, s=8, color="k", alpha=0.5, zorder=3)
    axes[0, 1].axhline(0, color="k", linewidth=0.8)
    axes[0, 1].set_xticks(range(len(names)), names, rotation=30, ha="right")
    plots.label_axes(axes[0, 1], "", "held-out loss change after fine-tuning (nats)")
    plots.bars(axes[0, 2], ["pretrained", *names],
               [[max(r["max_violation"] for r in a["pretrain"]["routing"].values())
                 for a in analyses]] + [[_max_violation(a, v) for a in analyses] for v in names])
    plots.label_axes(axes[0, 2], "", "MaxVio after fine-tuning (worst layer)")
    plots.save(fig, path, f"Fine-tuning on math after code+prose pretraining ({results.scale}, "
                          f"{len(analyses)} seeds)")


def _temperature_figure(results: Results, path: str) -> None:
    analyses = _analyses(results)
    if not analyses:
        return
    fig, axes = plots.figure(ncols=3, width=4.4)
    x = list(TEMPERATURES)
    for j, domain in enumerate(DOMAINS):
        plots.series(axes[0, 0], x, [[a["temperatures"][i]["loss_by_domain"][domain]
                                      for a in analyses] for i in range(len(x))], domain,
                     plots.COLORS[j])
    plots.label_axes(axes[0, 0], "evaluation router temperature", "held-out loss (nats)")
    layers = [str(layer) for layer in analyses[0]["layers"]]
    for k, (key, label) in enumerate((("max_violation", "MaxVio"),
                                      ("entropy", "router entropy (nats)"))):
        for i, layer in enumerate(layers):
            plots.series(axes[0, k + 1], x, [[a["temperatures"][t]["routing"][layer][key]
                                              for a in analyses] for t in range(len(x))],
                         f"layer {layer}", plots.COLORS[i])
        plots.label_axes(axes[0, k + 1], "evaluation router temperature", label)
    for ax in axes[0]:
        ax.set_xscale("log", base=2)
    plots.save(fig, path, f"Evaluation-time router temperature of the plain fine-tuned model "
                          f"({results.scale}, {len(analyses)} seeds)")


SUITE = Suite(
    name="routing_drift",
    title="Routing drift under a domain shift: expert dropout, frozen router, balance loss, "
          "router temperature",
    references=(
        "Fedus et al. Switch Transformers. JMLR 2022, Sec. 2.4, Table 4.",
        "Guo et al. On Calibration of Modern Neural Networks. ICML 2017, Sec. 4.2 "
        "(temperature scaling).",
        "Wang et al. Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts. "
        "arXiv:2408.15664 (2024), eq. 7 (MaxVio).",
    ),
    members=members,
    train={
        "tiny": {"train.num_train_steps": 300, "train.warmup_steps": 30},
        "small": {"train.num_train_steps": 2000, "train.warmup_steps": 200},
    },
    claims=(
        Claim("expert_dropout_finetunes_better",
              "Fine-tuning with expert dropout 0.4 (0.1 elsewhere) reaches a lower held-out loss "
              "on the fine-tuning domain than dropout 0.1 everywhere.",
              "Switch Table 4",
              "Switch-Base d=0.1, ed=0.4 vs d=0.1: GLUE 85.2 vs 84.7, CNNDM 19.6 vs 19.1, SQuAD "
              "83.7 vs 83.7, SuperGLUE 73.0 vs 73.0 (higher is better)",
              lambda r: _paired(r, lambda a: _loss(a, "expert_dropout", "math")
                                - _loss(a, "plain", "math"), "negative",
                                "math loss(expert_dropout) - math loss(plain)", digits=4)),
        Claim("finetuning_gains_target",
              "Plain fine-tuning on math lowers the math held-out loss.",
              "(this suite's premise)", "no paper number",
              lambda r: _paired(r, lambda a: a["variants"]["plain"]["loss_change"]["math"],
                                "negative", "math loss after - before (plain)")),
        Claim("finetuning_forgets",
              "Plain fine-tuning on math raises the held-out loss on code and prose "
              "(forgetting).",
              "(this suite's premise)", "no paper number",
              lambda r: _paired(r, lambda a: np.mean(
                  [a["variants"]["plain"]["loss_change"][d] for d in ("code", "prose")]),
                  "positive", "mean code/prose loss after - before (plain)")),
        Claim("frozen_router_drifts_less",
              "A frozen router drifts less than a fine-tuned one (JS of the expert shares "
              "before vs after, worst layer and domain).",
              "(this suite's prediction)", "no paper number",
              lambda r: _paired(r, lambda a: _worst_drift(a, "frozen_router")
                                - _worst_drift(a, "plain"), "negative",
                                "drift(frozen_router) - drift(plain)", "bits", 4)),
        Claim("no_balance_less_balanced",
              "Fine-tuning without the balance loss ends less balanced (MaxVio, worst layer).",
              "(this suite's prediction; cf. Switch Sec. 2.2)", "no paper number",
              lambda r: _paired(r, lambda a: _max_violation(a, "no_balance")
                                - _max_violation(a, "plain"), "positive",
                                "MaxVio(no_balance) - MaxVio(plain)", "")),
        Claim("temperature_sweep", "Held-out loss, MaxVio and router entropy against the "
              "evaluation router temperature (plain fine-tuned model).", "(descriptive)",
              "no paper number", _temperature_note),
    ),
    figures=(
        Figure("finetune", "Routing drift per variant and layer (left), held-out loss change "
               "per domain (middle), MaxVio after fine-tuning (right); dots: seeds.",
               _drift_figure),
        Figure("temperature", "The plain fine-tuned model evaluated at router temperatures "
               "0.5-4: loss per domain, MaxVio and router entropy per layer.",
               _temperature_figure),
    ),
    columns=("eval_loss", "bits_per_byte", "max_violation", "router_entropy",
             "tokens_per_second"),
    analysis="experiments.analyses.drift_finetune",
    notes=(
        "Switch fine-tunes T5-size models pre-trained on 34B tokens on GLUE-size tasks; ours "
        "are 6M-parameter byte models pre-trained on ~0.6M tokens of code and prose and "
        "fine-tuned on ~30k tokens of arithmetic text, repeated. The table's row is the "
        "pretraining run; the fine-tuning variants are in each run's analysis. A top-k "
        "router's choices for given inputs do not change with the temperature (the softmax "
        "is monotone): the first MoE layer's load is the same at every temperature, and "
        "deeper layers move only because the gates, and so their inputs, change."),
)
