"""balance: load-balancing loss coefficient {0, 1e-4, 1e-3, 1e-2, 1e-1} and DeepSeek-V3's
auxiliary-loss-free bias balancing (Switch Sec. 2.2; Wang et al. 2024; DeepSeek-V3 Sec. 2.1.2).

All members are top-2 (the gshard.py:e16 recipe with the second expert always kept: 16 experts of
half the dense width, every other block, gates renormalised over the two, capacity 2T/E in
training, 2.0 in evaluation), FLOP-matched to dense.py:tiny. `lb{c}` set the balance-loss
coefficient; `bias` is a sigmoid router with no balance loss whose per-expert bias moves by
+/-1e-3 toward uniform load after each step (DeepSeek-V3's rate); `bias_fast` the same at 1e-2
(a few hundred steps at 1e-3 move a bias by a few tenths at most; 1e-2 is not a paper setting).
Top-2 rather than Switch's top-1 because with one expert per token the bias router's gate (the
chosen score normalised over the k chosen) is always 1, so its router would get no gradient
(configs/aux_loss.py:lb0_bias has that problem). `v3` and `v3_scaled` are DeepSeek-V3's exact
routing (`V3_ROUTING`: groups, routed scaling, dropless, its sequence-wise balance loss at
1e-4) with the published rate 1e-3 and with the rate scaled to the run length (gamma x steps
as V3's, `V3_BIAS_TRAVEL`), fixed in experiments/README.md before their runs. Balance is
measured on the validation set before capacity drops: the expert-load coefficient of variation
(std/mean) and MaxVio = max load / mean load - 1 (Wang et al. 2024).
"""

from __future__ import annotations

from experiments.library import checks, plots
from experiments.library.base import Claim, Figure, Member, Suite, dense_variant, rematched
from experiments.library.results import Results

COEFFICIENTS = (0.0, 1e-4, 1e-3, 1e-2, 1e-1)
LB = tuple(f"lb{c:g}" for c in COEFFICIENTS)
POSITIVE = LB[1:]
RECIPE = "gshard.py:e16"
STEPS = {"tiny": 200, "small": 1000}
SEQUENCE = {"tiny": 128, "small": 512}  # tokens per row (`base.SCALES`)
# DeepSeek-V3's routing (Liu et al. 2024, Sec. 2.1.2, 4.2) moved onto the suite's 16 experts,
# top-2: sigmoid scores, the bias for selection only, half the expert groups per token (V3: 4
# of 8 groups of 32; here 2 of 4 groups of 4), gates normalised over the chosen and times 2.5,
# no token dropped, and the sequence-wise balance loss at alpha = 1e-4 (routing groups of one
# sequence: moe_jax's balance loss per group is V3's eq. 17-20).
V3_ROUTING = dict(router="sigmoid_bias", second_expert_policy="all", expert_groups=4,
                  top_expert_groups=2, routed_scaling_factor=2.5, dispatch="dropless",
                  load_balance_coef=1e-4)
# gamma x steps of DeepSeek-V3: 1e-3 per step over the ~232k steps of its first 14.3T tokens
# (batch ramped 3072 -> 15360 sequences of 4096 over 469B tokens, ~12.4k steps, then 62.9M
# tokens a step). `v3_scaled` keeps this total bias travel: gamma = 232 / steps.
V3_BIAS_TRAVEL = 232.0


def members(scale: str) -> tuple[Member, ...]:
    dense = dense_variant(scale)
    out = [rematched(f"lb{c:g}", RECIPE, dense=dense, second_expert_policy="all",
                     load_balance_coef=c, tags={"coef": c, "balancing": "aux loss"})
           for c in COEFFICIENTS]
    for name, rate in (("bias", 1e-3), ("bias_fast", 1e-2)):
        out.append(rematched(name, RECIPE, dense=dense, second_expert_policy="all",
                             router="sigmoid_bias", load_balance_coef=0.0, bias_update_rate=rate,
                             tags={"coef": 0.0, "bias_rate": rate}))
    if scale in STEPS:  # the scaled rate needs the run length
        for name, rate in (("v3", 1e-3), ("v3_scaled", V3_BIAS_TRAVEL / STEPS[scale])):
            out.append(rematched(name, RECIPE, dense=dense, bias_update_rate=rate,
                                 group_size=SEQUENCE[scale], **V3_ROUTING,
                                 tags={"coef": 1e-4, "bias_rate": rate,
                                       "routing": "deepseek_v3"}))
    return tuple(out)


def _balance_figure(results: Results, path: str) -> None:
    fig, axes = plots.figure(ncols=3, width=4.6)
    for ax, metric, ylabel in ((axes[0, 0], "load_cv", "expert-load CV (val, before drops)"),
                               (axes[0, 1], "dropped_train", "dropped assignments (train)"),
                               (axes[0, 2], "eval_loss", "validation loss (nats/token)")):
        plots.metric_vs_tag(results, ax, {"aux loss (coef > 0)": POSITIVE}, "coef", metric)
        plots.hline(ax, results.values("lb0", metric), "no balancing (coef 0)", plots.COLORS[1])
        plots.hline(ax, results.values("bias", metric), "bias balancing, rate 1e-3",
                    plots.COLORS[2])
        plots.hline(ax, results.values("bias_fast", metric), "bias balancing, rate 1e-2",
                    plots.COLORS[3])
        ax.set_xscale("log")
        plots.label_axes(ax, "load-balancing coefficient", ylabel)
    plots.annotate_missing(axes[0, 2], results, results.members())
    plots.save(fig, path, f"Load balancing: balance, drops and quality ({results.scale})")


SUITE = Suite(
    name="balance",
    title="Load-balancing coefficient and auxiliary-loss-free bias balancing",
    references=(
        "Fedus et al. Switch Transformers. JMLR 2022, Sec. 2.2 (eq. 4, alpha = 1e-2).",
        "Wang, Gao, Zhao, Sun, Dai. Auxiliary-Loss-Free Load Balancing Strategy for "
        "Mixture-of-Experts. arXiv:2408.15664 (2024).",
        "DeepSeek-AI. DeepSeek-V3 Technical Report. arXiv:2412.19437 (2024), Sec. 2.1.2.",
    ),
    members=members,
    train={
        "tiny": {"train.num_train_steps": STEPS["tiny"], "train.warmup_steps": 20},
        "small": {"train.num_train_steps": STEPS["small"], "train.warmup_steps": 100},
    },
    claims=(
        Claim("balance_loss_balances",
              "With the balance loss (1e-2) expert load is more even than without it.",
              "Switch Sec. 2.2 (eq. 4)",
              "alpha = 1e-2 'balanced load quickly'; swept 1e-1 to 1e-5 (no table)",
              lambda r: checks.lower(r, "lb0.01", "lb0", "load_cv")),
        Claim("cv_falls_with_coefficient",
              "Expert-load imbalance (CV) falls as the coefficient grows from 1e-4 to 1e-1.",
              "Switch Sec. 2.2",
              "the loss is minimised by uniform routing; larger alpha, stronger pressure",
              lambda r: checks.trend(r, POSITIVE, "coef", "load_cv")),
        Claim("balance_loss_fewer_drops",
              "The balance loss reduces dropped tokens at a fixed capacity.",
              "Switch Sec. 2.2",
              "with the auxiliary loss, dropped tokens typically < 1% (CF 1.25)",
              lambda r: checks.lower(r, "lb0.01", "lb0", "dropped_train")),
        Claim("large_coefficient_hurts",
              "A coefficient of 1e-1 costs quality compared with 1e-2.",
              "Switch Sec. 2.2",
              "1e-2 is 'small enough to not overwhelm the primary cross-entropy objective' "
              "(stated, no number)",
              lambda r: checks.lower(r, "lb0.01", "lb0.1")),
        Claim("bias_balances_better",
              "Bias balancing reaches a lower MaxVio than the 1e-2 balance loss.",
              "Wang et al. 2024, Table 2; DeepSeek-V3 Sec. 2.1.2",
              "Loss-Free Balancing has a much lower global MaxVio than auxiliary-loss control "
              "at 1B and 3B parameters (numbers not re-checked offline; see README)",
              lambda r: checks.lower(r, "bias", "lb0.01", "max_violation")),
        Claim("bias_better_quality",
              "Bias balancing reaches a lower validation loss than the 1e-2 balance loss.",
              "Wang et al. 2024, Table 2; DeepSeek-V3 Table 5 (ablation)",
              "lower validation perplexity than auxiliary-loss control at 1B and 3B; better on "
              "most benchmarks in DeepSeek-V3's ablation",
              lambda r: checks.lower(r, "bias", "lb0.01")),
        Claim("v3_balances_better",
              "DeepSeek-V3's exact routing, its bias rate scaled to the run length, reaches a "
              "lower MaxVio than the 1e-2 balance loss.",
              "DeepSeek-V3 Sec. 2.1.2 and 4.5.2; Wang et al. 2024, Table 2",
              "auxiliary-loss-free balancing keeps the load balanced without the loss's "
              "interference (figures not re-checked offline)",
              lambda r: checks.lower(r, "v3_scaled", "lb0.01", "max_violation")),
        Claim("v3_better_quality",
              "DeepSeek-V3's exact routing, its bias rate scaled to the run length, reaches a "
              "lower validation loss than the 1e-2 balance loss.",
              "DeepSeek-V3 Table 5 (ablation); Wang et al. 2024, Table 2",
              "better on most benchmarks than the auxiliary-loss baselines at 16B and 230B",
              lambda r: checks.lower(r, "v3_scaled", "lb0.01")),
    ),
    figures=(
        Figure("balance", "Load CV (left), training drops (middle) and validation loss (right) "
               "against the balance-loss coefficient; dashed: no balancing and bias balancing.",
               _balance_figure),
    ),
    columns=("eval_loss", "load_cv", "max_violation", "dropped_train", "dropped_eval",
             "router_entropy"),
    notes=(
        "Wang et al. and DeepSeek-V3 train 1B-671B models with many fine-grained experts "
        "(top-6/top-8) for many thousands of steps; here 16 experts, top-2, 200 steps. At "
        "DeepSeek-V3's rate of 1e-3 per step a bias moves by at most 0.2 in 200 steps, less "
        "than the spread of the sigmoid scores, so `bias` is expected to balance poorly here; "
        "`bias_fast` (1e-2) shows whether that is the reason. The claims use `bias`."),
)
