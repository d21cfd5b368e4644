"""granularity: fine-grained experts at fixed total and active parameters, with and without
shared experts (DeepSeekMoE, Dai et al. 2024; Krajewski et al. 2024).

Members are configs/fine_grained.py (SwiGLU, every block but the first sparse, dropless,
balance 1e-2, z-loss 1e-3), FLOP-matched to dense.py:tiny_swiglu: `e8k1s0` (8 experts, top-1:
granularity G = 1), `e16k2s0`, `e32k4s0`, `e64k8s0` (each expert split 2, 4, 8 ways: G = 2, 4, 8;
same total and active expert parameters), then `e63k7s1` / `e62k6s2` (1 or 2 of the 64 segments
made shared experts, as DeepSeekMoE Sec. 3.2), plus the dense baseline. At the small and paper
scales the same recipe is re-matched on dense.py:{small,base}_swiglu.

Claims comparing members are decided on seed-paired estimates (per seed, then mean ± SE
over seeds; the pooled figure beside it): the rule of experiments/library/stats.py, fixed
before this suite's runs at the scales run since.
"""

from __future__ import annotations

import re

from experiments.library import checks, plots
from experiments.library.base import Claim, Figure, Member, Suite, dense_variant, rematched
from experiments.library.results import Results
from moe_jax import schema

ROUTED = ("e8k1s0", "e16k2s0", "e32k4s0", "e64k8s0")
SHARED = ("e63k7s1", "e62k6s2")
ALL = ROUTED + SHARED


def _tags(member: str) -> dict[str, int]:
    e, k, s = (int(g) for g in re.fullmatch(r"e(\d+)k(\d+)s(\d+)", member).groups())
    return {"experts": e, "top_k": k, "shared": s, "granularity": (e + s) // 8}


def members(scale: str) -> tuple[Member, ...]:
    dense = dense_variant(scale, "_swiglu")
    out = [Member("dense", dense, {}, {"granularity": 0, "shared": 0})]
    for name in ALL:
        if scale == "tiny":
            out.append(Member(name, f"fine_grained.py:{name}", {}, _tags(name)))
        else:
            t = _tags(name)
            layers = schema.load_config(dense).model.num_layers
            out.append(rematched(name, f"fine_grained.py:{name}", dense=dense, tags=t,
                                 model={"moe_layers": tuple(range(1, layers))}))
    return tuple(out)


def _figure(results: Results, path: str) -> None:
    fig, axes = plots.figure(ncols=2)
    plots.metric_vs_tag(results, axes[0, 0], {"routed only": ROUTED}, "granularity",
                        "eval_loss")
    for i, name in enumerate(SHARED):
        plots.series(axes[0, 0], [8], [results.values(name, "eval_loss")],
                     f"{name} ({_tags(name)['shared']} shared)", plots.COLORS[i + 2], "s")
    plots.hline(axes[0, 0], results.values("dense", "eval_loss"), "dense (SwiGLU)",
                plots.COLORS[1])
    axes[0, 0].set_xscale("log", base=2)
    plots.label_axes(axes[0, 0], "granularity G (experts split G ways)",
                     "validation loss (nats/token)")
    names = ["dense", *ALL]
    plots.bars(axes[0, 1], names, [results.values(m, "tokens_per_second") for m in names])
    plots.label_axes(axes[0, 1], "", "training tokens/s")
    plots.annotate_missing(axes[0, 0], results, names)
    plots.save(fig, path, f"Expert granularity and shared experts ({results.scale}; cf. "
                          "DeepSeekMoE Fig. 3)")


SUITE = Suite(
    name="granularity",
    title="Fine-grained and shared experts at fixed total and active parameters",
    references=(
        "Dai et al. DeepSeekMoE: Towards Ultimate Expert Specialization in Mixture-of-Experts "
        "Language Models. arXiv:2401.06066 (2024), Sec. 3, 4.2-4.4, Table 1, Fig. 3.",
        "Krajewski et al. Scaling Laws for Fine-Grained Mixture of Experts. arXiv:2402.07871 "
        "(2024).",
    ),
    members=members,
    train={
        "tiny": {"train.num_train_steps": 120, "train.warmup_steps": 12},
        "small": {"train.num_train_steps": 1000, "train.warmup_steps": 100},
    },
    claims=(
        Claim("finer_is_better",
              "Splitting experts finer (same total and active parameters) lowers the loss.",
              "DeepSeekMoE Fig. 3 and Sec. 4.4; Krajewski et al. 2024",
              "DeepSeekMoE Fig. 3: 1 shared + 1/15 -> 3/31 -> 7/63 routed improves every "
              "benchmark (normalised scores; no losses given); Krajewski et al.: loss falls with "
              "granularity at fixed compute",
              lambda r: checks.trend(r, ROUTED, "granularity")),
        Claim("shared_expert_helps",
              "Isolating a shared expert (e63k7s1) beats the same number of routed experts "
              "(e64k8s0).",
              "DeepSeekMoE Sec. 4.4, Fig. 3",
              "a shared expert improves GShard (0+2/16 -> 1+1/15) on most benchmarks; 1, 2 or 4 "
              "shared of 64: Pile loss 1.808 / 1.806 / 1.811",
              lambda r: checks.lower(r, "e63k7s1", "e64k8s0")),
        Claim("moe_beats_dense",
              "Every fine-grained MoE beats the FLOP-matched dense model (pooled).",
              "DeepSeekMoE Table 1",
              "Pile loss: dense 2.060, Switch 1.881, GShard 1.867, DeepSeekMoE 1.808 (2B total, "
              "100B tokens)",
              lambda r: checks.lower(r, ALL, "dense")),
    ),
    figures=(Figure("granularity", "Validation loss against granularity (left; squares: shared "
                    "experts) and throughput (right).", _figure),),
    columns=("eval_loss", "load_cv", "router_entropy", "tokens_per_second", "params_total",
             "params_active", "train_flops"),
    notes=(
        "DeepSeekMoE's gains are measured at 2B total parameters after 100B tokens; Krajewski "
        "et al. find the best granularity grows with the training budget, so at a few hundred "
        "thousand tokens fine granularity may not pay yet. On CPU the dropless grouped matmul "
        "runs one block per expert, so 64 experts are slower per FLOP than 8."),
)
