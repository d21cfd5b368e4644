"""stability: router z-loss {0, 1e-3} x router precision {float32, bfloat16} x MoE init scale
{1.0, 0.1} (ST-MoE Sec. 3, Table 4; Switch Sec. 2.4, Tables 2-3).

Members `z{z}_{f32|bf16}_init{s}` are switch.py:e16 (top-1, 16 experts) with those three
settings; activations stay float32, so "bf16" puts only the router's logits and softmax in
bfloat16 (the opposite of Switch's selective precision). The init scale multiplies the variance
of the MoE layer's weights only (router and experts), not the whole model as in Switch. A higher
learning rate than the other suites (1e-2 at tiny scale) stresses training, since the
instabilities the papers report appear at scale. Divergence is the training loop's non-finite
loss guard (recorded by the runner as "diverged").

Claims comparing members are decided on seed-paired estimates (per seed, then mean ± SE
over seeds; the pooled figure beside it): the rule of experiments/library/stats.py, fixed
before this suite's runs at the scales run since.
"""

from __future__ import annotations

import itertools

from experiments.library import checks, plots
from experiments.library.base import Claim, Figure, Member, Suite, family
from experiments.library.results import DIVERGED, FINISHED, Results

Z_LOSS = (0.0, 1e-3)
PRECISIONS = {"f32": "float32", "bf16": "bfloat16"}
INIT_SCALES = (1.0, 0.1)


def _name(z: float, precision: str, init: float) -> str:
    return f"z{z:g}_{precision}_init{init:g}"


ALL = tuple(_name(z, p, s) for z, p, s in itertools.product(Z_LOSS, PRECISIONS, INIT_SCALES))


def group(z: float | None = None, precision: str | None = None,
          init: float | None = None) -> tuple[str, ...]:
    """Members with the given settings (None: any)."""
    return tuple(_name(a, b, c) for a, b, c in itertools.product(Z_LOSS, PRECISIONS, INIT_SCALES)
                 if z in (None, a) and precision in (None, b) and init in (None, c))


def members(scale: str) -> tuple[Member, ...]:
    spec = family("switch.py", scale, "e16")
    return tuple(
        Member(_name(z, p, s), spec, {"moe.z_loss_coef": z, "moe.router_dtype": PRECISIONS[p],
                                      "moe.init_scale": s},
               {"z_loss": z, "router_dtype": PRECISIONS[p], "init_scale": s})
        for z, p, s in itertools.product(Z_LOSS, PRECISIONS, INIT_SCALES))


def _stability_figure(results: Results, path: str) -> None:
    fig, axes = plots.figure(ncols=3, width=4.8)
    labels = list(ALL)
    done = [results.count(m, FINISHED) + results.count(m, DIVERGED) for m in labels]
    rate = [[results.count(m, DIVERGED) / n] if n else [] for m, n in zip(labels, done,
                                                                           strict=True)]
    plots.bars(axes[0, 0], labels, rate)
    plots.label_axes(axes[0, 0], "", "diverged share of runs")
    axes[0, 0].set_ylim(0, 1.05)
    plots.bars(axes[0, 1], labels, [results.values(m, "max_router_logit", (FINISHED, DIVERGED))
                                    for m in labels])
    plots.label_axes(axes[0, 1], "", "max router logit during training")
    plots.bars(axes[0, 2], labels, [results.values(m, "eval_loss") for m in labels])
    plots.label_axes(axes[0, 2], "", "validation loss (finished runs)")
    lows = [v for m in labels for v in results.values(m, "eval_loss")]
    if lows:
        axes[0, 2].set_ylim(min(lows) - 0.05, max(lows) + 0.05)
    plots.save(fig, path, f"Stability: divergence, router logits, quality ({results.scale}; "
                          "cf. ST-MoE Table 4, Switch Tables 2-3)")


SUITE = Suite(
    name="stability",
    title="Router z-loss, router precision and initialisation scale",
    references=(
        "Zoph et al. ST-MoE. arXiv:2202.08906 (2022), Sec. 3.3-3.4, Table 4.",
        "Fedus et al. Switch Transformers. JMLR 2022, Sec. 2.4, Tables 2-3.",
    ),
    members=members,
    train={
        "tiny": {"train.num_train_steps": 120, "train.warmup_steps": 12,
                 "train.learning_rate": 1e-2},
        "small": {"train.num_train_steps": 1000, "train.warmup_steps": 100,
                  "train.learning_rate": 3e-3},
    },
    claims=(
        Claim("z_loss_fewer_divergences",
              "The router z-loss lowers the share of diverging runs.",
              "ST-MoE Table 4",
              "baseline: 4/6 runs stable; router z-loss: 3/3 stable",
              lambda r: checks.rate_lower(r, group(z=1e-3), group(z=0.0))),
        Claim("z_loss_no_quality_cost",
              "The router z-loss does not hurt quality (ST-MoE saw a slight gain).",
              "ST-MoE Table 4",
              "quality -1.741 ± 0.02 (z-loss) vs -1.755 ± 0.02 (baseline) neg. log perp.",
              lambda r: checks.lower(r, group(z=1e-3), group(z=0.0))),
        Claim("z_loss_smaller_logits",
              "The router z-loss keeps router logits smaller.",
              "ST-MoE Sec. 3.3-3.4 (eq. 5, Fig. 2)",
              "z-loss 'encourages the absolute magnitude of numbers to be small' (no number)",
              lambda r: checks.lower(r, group(z=1e-3), group(z=0.0), "max_router_logit")),
        Claim("bf16_router_less_stable",
              "A bfloat16 router diverges more often than a float32 router.",
              "Switch Table 2",
              "Switch-Base bfloat16: -3.780, diverged; float32: -1.718; selective precision "
              "(float32 router): -1.716",
              lambda r: checks.rate_lower(r, group(precision="f32"), group(precision="bf16"))),
        Claim("bf16_router_worse",
              "A float32 router reaches a lower validation loss than a bfloat16 router.",
              "Switch Table 2",
              "-1.716 (selective precision) vs -3.780 (bfloat16, diverged)",
              lambda r: checks.lower(r, group(precision="f32"), group(precision="bf16"))),
        Claim("small_init_better",
              "A 0.1x initialisation scale gives better quality than 1.0x.",
              "Switch Table 3",
              "0.1x-init: -2.72 ± 0.01; 1.0x-init: -3.60 ± 0.68 neg. log perp. (32 experts, "
              "3.5k steps, 3 seeds)",
              lambda r: checks.lower(r, group(init=0.1), group(init=1.0))),
    ),
    figures=(
        Figure("stability", "Diverged share (left), max router logit in training (middle) and "
               "validation loss (right) per member; dots: seeds.", _stability_figure),
    ),
    columns=("eval_loss", "max_router_logit", "router_entropy", "dropped_train"),
    notes=(
        "The papers' instabilities appear in models of ~1B-270B parameters trained for "
        "thousands of steps; tiny models rarely diverge even at a raised learning rate, so "
        "the divergence claims are expected to be inconclusive (0 vs 0 diverged). The logit "
        "and quality claims still measure the mechanisms. Each group pools 12 runs (4 members "
        "x 3 seeds) over the other two factors."),
)
