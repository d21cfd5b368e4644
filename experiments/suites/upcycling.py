"""upcycling: sparse upcycling against dense continuation and an MoE trained from scratch, at
equal extra training compute (Komatsuzaki et al. 2022, "Sparse Upcycling").

The pipeline is a chain of members (`Member.init_from`: a member starts from the same seed's
run of an earlier member, its workdir passed as `init.checkpoint`; the runner trains members in
suite order):

  dense           dense.py:tiny_swiglu trained N steps (the "sunk" dense pretraining).
  dense_cont_xB   the dense model trained on for an extra budget of B x the dense pretraining
                  compute: init.checkpoint = dense, a fresh optimizer and learning-rate schedule.
  upcycled_xB     the dense model upcycled (init.upcycle) to 8 experts, top-2, every other
                  block (as in the paper), each expert a copy of the dense FFN (full width, so a
                  sparse block costs 2x a dense FFN), a fresh router, gates renormalised over
                  the two (so the model computes the dense function at step 0), dropless;
                  trained for the same extra compute as dense_cont_xB (fewer steps: it costs
                  more FLOPs per token), with the same fresh optimizer and schedule.
  moe_scratch_xB  the same sparse model from a random init for the whole budget, (1 + B) x the
                  dense pretraining compute, with the dense pretraining recipe.

Compute is `moe_jax.analysis.flops` training FLOPs per token x tokens (same batch and length for
all); step counts are rounded. B in {0.25, 0.5}.

Statistics (fixed before the runs): each claim compares final validation losses of two members
paired by seed (`checks.lower`: the mean of the per-seed differences and its standard error over
seeds; the pairs share the dense parent of their seed, so the paired difference removes the
parent's seed-to-seed spread), with the suites' 2-SE rule (`stats.py`).
"""

from __future__ import annotations

import functools

import numpy as np

from experiments.library import checks, plots
from experiments.library.base import Claim, Figure, Member, Suite, dense_variant
from experiments.library.results import Results, history_values
from moe_jax import schema
from moe_jax.analysis import flops

# Extra compute, as a multiple of the dense pretraining compute (the paper's abstract: upcycled
# models win "using only ~50% of the initial dense pretraining sunk cost").
BUDGETS = (0.25, 0.5)
DENSE = "dense"
# The upcycled sparse model: E=8, top-2, every other block, experts of the dense FFN's width.
SPARSE = {"model.moe_every": 2, "moe.num_experts": 8, "moe.top_k": 2,
          "moe.renormalize_gates": True, "moe.dispatch": "dropless", "moe.router": "top_k",
          "moe.load_balance_coef": 1e-2, "moe.z_loss_coef": 1e-3,
          # per-expert row blocks in XLA (the same function): on the heavily shared 2-core
          # machine of these runs it was much faster than the host-BLAS default
          "moe.grouped_matmul": "blocked"}
PRETRAIN_STEPS = {"tiny": 100, "small": 2000, "paper": 100_000}
PRETRAIN_WARMUP = {"tiny": 10, "small": 200, "paper": 10_000}
# Continued runs (dense continuation and upcycled): a fresh optimizer, a short warmup and a
# cosine schedule from a third of the pretraining peak learning rate, on another shuffle of the
# training documents than the pretraining's (a run's data order restarts from its seed, so
# without it both continued arms would re-read the batches the dense model was trained on).
CONTINUED_DATA_SEED = 1_000_003
CONTINUE = {"tiny": {"train.learning_rate": 1e-3, "train.warmup_steps": 5},
            "small": {"train.learning_rate": 3e-4, "train.warmup_steps": 50},
            "paper": {"train.learning_rate": 3e-3, "train.warmup_steps": 1000}}
CONTINUE = {scale: {**v, "data.shuffle_seed": CONTINUED_DATA_SEED} for scale, v in CONTINUE.items()}


def _name(arm: str, budget: float) -> str:
    return f"{arm}_x{budget:g}"


@functools.cache
def flop_ratio(scale: str) -> float:
    """Training FLOPs per token of the upcycled sparse model over the dense one's."""
    dense = schema.load_config(dense_variant(scale, "_swiglu"))
    sparse = schema.override(dense, SPARSE)
    return flops.count(sparse).training_flops_per_token / flops.count(
        dense).training_flops_per_token


def members(scale: str) -> tuple[Member, ...]:
    spec = dense_variant(scale, "_swiglu")
    steps, ratio = PRETRAIN_STEPS[scale], flop_ratio(scale)
    pretrain = {"train.num_train_steps": steps, "train.warmup_steps": PRETRAIN_WARMUP[scale]}
    out = [Member(DENSE, spec, pretrain, {"arm": "dense", "budget": 0.0})]
    for budget in BUDGETS:
        extra = budget * steps  # dense-step equivalents of extra compute
        out += [
            Member(_name("dense_cont", budget), spec,
                   {**CONTINUE[scale], "train.num_train_steps": round(extra)},
                   {"arm": "dense continuation", "budget": budget}, init_from=DENSE),
            Member(_name("upcycled", budget), spec,
                   {**SPARSE, **CONTINUE[scale], "init.upcycle": True,
                    "train.num_train_steps": round(extra / ratio)},
                   {"arm": "upcycled", "budget": budget}, init_from=DENSE),
            Member(_name("moe_scratch", budget), spec,
                   {**SPARSE, "train.warmup_steps": PRETRAIN_WARMUP[scale],
                    "train.num_train_steps": round((steps + extra) / ratio)},
                   {"arm": "MoE from scratch", "budget": budget}),
        ]
    return tuple(out)


ARMS = ("dense_cont", "upcycled", "moe_scratch")
LABELS = {"dense_cont": "dense continuation", "upcycled": "upcycled (E=8, top-2)",
          "moe_scratch": "MoE from scratch (whole budget)"}


def _loss_vs_budget(results: Results, path: str) -> None:
    fig, axes = plots.figure(ncols=2, width=5.6)
    ax = axes[0, 0]
    for i, arm in enumerate(ARMS):
        names = [_name(arm, b) for b in BUDGETS]
        plots.series(ax, list(BUDGETS), [results.values(n, "eval_loss") for n in names],
                     LABELS[arm], plots.COLORS[i])
    plots.hline(ax, results.values(DENSE, "eval_loss"), "dense after pretraining",
                plots.COLORS[3])
    plots.annotate_missing(ax, results, results.members())
    plots.label_axes(ax, "extra training compute (x dense pretraining)",
                     "validation loss (nats/token)")
    ax = axes[0, 1]
    steps = PRETRAIN_STEPS.get(results.scale, 0)
    ratio = flop_ratio(results.scale) if results.scale in PRETRAIN_STEPS else 1.0
    budget = BUDGETS[-1]
    for i, arm in enumerate(ARMS):
        scale_x = ratio if arm != "dense_cont" else 1.0
        offset = 0 if arm == "moe_scratch" else steps
        plots.curves(ax, results.runs_of(_name(arm, budget)),
                     lambda r, s=scale_x, o=offset: (history_values(r, checks.CURVE_KEY)[0] * s
                                                     + o) / max(steps, 1),
                     lambda r: checks.smoothed(history_values(r, checks.CURVE_KEY)[1]),
                     LABELS[arm], plots.COLORS[i])
    plots.curves(ax, results.runs_of(DENSE),
                 lambda r: history_values(r, checks.CURVE_KEY)[0] / max(steps, 1),
                 lambda r: checks.smoothed(history_values(r, checks.CURVE_KEY)[1]),
                 "dense pretraining", plots.COLORS[3])
    ax.set_ylim(top=float(np.nanmin([3.0] + [v for m in results.members()
                                             for v in results.values(m, "eval_loss")])) + 0.8)
    plots.label_axes(ax, "total training compute (x dense pretraining)",
                     f"train cross-entropy (smoothed), budget x{budget:g}")
    plots.save(fig, path, f"Sparse upcycling at equal extra compute ({results.scale})")


def _claims() -> tuple[Claim, ...]:
    small, half = (_name("upcycled", b) for b in BUDGETS)
    return (
        Claim("upcycled_beats_dense_quarter",
              f"At an extra budget of {BUDGETS[0]:g} x the dense pretraining compute, the "
              "upcycled model reaches a lower validation loss than the continued dense model.",
              "Komatsuzaki et al. 2022, abstract and Sec. 4 (vs dense continuation)",
              "upcycled T5 Base/Large/XL 'significantly outperform their dense counterparts ... "
              "using only ~50% of the initial dense pretraining sunk cost' (abstract)",
              lambda r: checks.lower(r, small, _name("dense_cont", BUDGETS[0]))),
        Claim("upcycled_beats_dense_half",
              f"The same at an extra budget of {BUDGETS[1]:g} x.",
              "Komatsuzaki et al. 2022, abstract and Sec. 4 (vs dense continuation)",
              "as above: upcycled models beat their dense counterparts with ~50% of the dense "
              "pretraining compute as extra budget",
              lambda r: checks.lower(r, half, _name("dense_cont", BUDGETS[1]))),
        Claim("upcycled_beats_scratch_quarter",
              f"At an extra budget of {BUDGETS[0]:g} x, upcycling beats an MoE trained from "
              "scratch on the whole budget (dense pretraining + extra).",
              "Komatsuzaki et al. 2022, abstract and Sec. 4 (vs MoE from scratch)",
              "upcycled models 'outperform sparse models trained from scratch on 100% of the "
              "initial dense pretraining computation budget' (abstract)",
              lambda r: checks.lower(r, small, _name("moe_scratch", BUDGETS[0]))),
    )


SUITE = Suite(
    name="upcycling",
    title="Sparse upcycling vs dense continuation and MoE from scratch",
    references=(
        "Komatsuzaki, Puigcerver, Lee-Thorp, Ruiz, Mustafa, Ainslie, Tay, Dehghani, Houlsby. "
        "Sparse Upcycling: Training Mixture-of-Experts from Dense Checkpoints. ICLR 2023 "
        "(arXiv:2212.05055).",
        "Nakamura et al. Drop-Upcycling: Training Sparse Mixture of Experts with Partial "
        "Re-initialization. ICLR 2025 (implemented as init.reinit_fraction; not run here).",
    ),
    members=members,
    train={},
    claims=_claims(),
    figures=(
        Figure("upcycling", "Left: final validation loss against the extra compute (x dense "
               "pretraining; mean ± SD over seeds, seeds as dots); dashed: the dense model "
               "after pretraining. Right: training curves of the largest budget against total "
               "compute (x dense pretraining), the dense pretraining included for the "
               "continued arms.",
               _loss_vs_budget),
    ),
    columns=("eval_loss", "train_ce", "params_total", "params_active", "train_flops",
             "tokens_per_second"),
    notes=(
        "The paper upcycles T5 Base/Large/XL and ViT models after their full pretraining and "
        "continues for a fraction of that compute; here a 4-block byte-level model pretrained "
        "for 100 steps. Continued runs read the training documents in another shuffle "
        "(data.shuffle_seed) than the pretraining, so most of their batches are new to the "
        "dense model (the same batches for both continued arms; the scratch MoE reads its "
        "seed's order from the start); validation batches are never trained on. The upcycled "
        "model starts at the dense model's function (tested in tests/test_upcycle.py), but its "
        "fresh optimizer and warmup move it away first, as they move the continued dense "
        "model."),
)
