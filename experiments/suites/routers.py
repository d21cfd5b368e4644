"""routers: Switch top-1, GShard top-2, Mixtral top-2, expert choice and Soft MoE in the same
bidirectional encoder with the masked-LM objective, at equal compute.

Every member is dense.py:{scale}_encoder with every other block sparse, 16 experts, and expert
widths re-solved (`flops.match_flops`) so each has the dense encoder's useful FLOPs per token:
  switch        switch.py recipe: top-1, raw gates, capacity 1.25 (eval 2.0), balance 1e-2
  gshard        gshard.py recipe: top-2, renormalised, random second expert, capacity 2T/E
  mixtral       mixtral.py recipe: top-2, renormalised, dropless, balance 1e-2, z-loss 1e-3
  expert_choice expert_choice.py recipe: each expert takes its 2T/E best tokens (EC-CF2)
  soft          Soft MoE: one slot per token of a 128-token group (8 slots per expert), einsum
Expert choice and Soft MoE let a token's output depend on later tokens, so the comparison is
only fair without a causal mask; next-token prediction with a bidirectional encoder would see
its targets. The suite therefore trains the masked-LM objective (`train.objective="masked_lm"`:
`objective.mask_for_mlm`, 15% of the tokens; the validation loss is in nats per masked token,
on the same masks at every evaluation).

Claims comparing members are decided on seed-paired estimates (per seed, then mean ± SE
over seeds; the pooled figure beside it): the rule of experiments/library/stats.py, fixed
before this suite's runs at the scales run since.
"""

from __future__ import annotations

from experiments.library import checks, plots
from experiments.library.base import Claim, Figure, Member, Suite, dense_variant, rematched
from experiments.library.results import Results

OBJECTIVE = {"train.objective": "masked_lm"}
SPARSE = ("switch", "gshard", "mixtral", "expert_choice", "soft")
SOFT_GROUP = 128  # Soft MoE mixes the tokens of one sequence (Puigcerver et al.: one image)


def members(scale: str) -> tuple[Member, ...]:
    encoder = dense_variant(scale, "_encoder")
    experts = {"num_experts": 16}
    return (
        Member("dense", encoder, {}, {"router": "dense"}),
        rematched("switch", "switch.py:e16", dense=encoder, tags={"router": "top-1"}, **experts),
        rematched("gshard", "gshard.py:e16", dense=encoder, tags={"router": "top-2 random"},
                  **experts),
        rematched("mixtral", "mixtral.py:e8", dense=encoder, model={"moe_every": 2},
                  tags={"router": "top-2 renormalised"}, **experts),
        rematched("expert_choice", "expert_choice.py:e16", dense=encoder,
                  tags={"router": "expert choice"}, **experts),
        rematched("soft", "expert_choice.py:e16", dense=encoder, router="soft",
                  dispatch="einsum", group_size=SOFT_GROUP, slots_per_expert=SOFT_GROUP // 16,
                  tags={"router": "soft"}, **experts),
    )


def _figure(results: Results, path: str) -> None:
    fig, axes = plots.figure(ncols=2)
    names = ["dense", *SPARSE]
    plots.bars(axes[0, 0], names, [results.values(m, "eval_loss") for m in names])
    values = [v for m in names for v in results.values(m, "eval_loss")]
    if values:
        axes[0, 0].set_ylim(min(values) - 0.05, max(values) + 0.05)
    plots.label_axes(axes[0, 0], "", "masked-LM validation loss (nats/masked token)")
    plots.bars(axes[0, 1], names, [results.values(m, "tokens_per_second") for m in names])
    plots.label_axes(axes[0, 1], "", "training tokens/s")
    plots.annotate_missing(axes[0, 0], results, names)
    plots.save(fig, path, f"Routers at equal compute, masked LM ({results.scale})")


SUITE = Suite(
    name="routers",
    title="Token choice, expert choice and Soft MoE at equal compute (bidirectional encoder)",
    references=(
        "Fedus et al. Switch Transformers. JMLR 2022.",
        "Lepikhin et al. GShard. ICLR 2021, Algorithms 1-2.",
        "Jiang et al. Mixtral of Experts. arXiv:2401.04088 (2024), eq. 1.",
        "Zhou et al. Mixture-of-Experts with Expert Choice Routing. NeurIPS 2022.",
        "Puigcerver et al. From Sparse to Soft Mixtures of Experts. ICLR 2024 "
        "(arXiv:2308.00951).",
    ),
    members=members,
    train={
        "tiny": {"train.num_train_steps": 150, "train.warmup_steps": 15, **OBJECTIVE},
        "small": {"train.num_train_steps": 1000, "train.warmup_steps": 100, **OBJECTIVE},
    },
    claims=(
        Claim("expert_choice_beats_top2",
              "Expert choice (capacity 2) beats GShard top-2 at equal compute.",
              "Zhou et al. 2022, abstract and Sec. 4",
              "more than 2x faster training convergence than Switch top-1 and GShard top-2 "
              "(8B/64E)",
              lambda r: checks.lower(r, "expert_choice", "gshard")),
        Claim("expert_choice_beats_top1",
              "Expert choice (capacity 2) beats Switch top-1 at equal compute.",
              "Zhou et al. 2022, abstract and Sec. 4",
              "more than 2x faster training convergence than Switch top-1",
              lambda r: checks.lower(r, "expert_choice", "switch")),
        Claim("soft_beats_sparse",
              "Soft MoE beats token-choice and expert-choice routing at equal compute.",
              "Puigcerver et al. 2024, Sec. 3 (Fig. 3)",
              "Soft MoE dominates Experts Choice and Tokens Choice at every training budget "
              "(image classification, JFT; figures only)",
              lambda r: checks.lower(r, "soft", "expert_choice")),
        Claim("sparse_beats_dense",
              "Every sparse router beats the FLOP-matched dense encoder (pooled).",
              "Switch Fig. 4; Zhou et al. 2022; Puigcerver et al. 2024",
              "all sparse variants improve on their FLOP-matched dense baselines",
              lambda r: checks.lower(r, SPARSE, "dense")),
    ),
    figures=(Figure("routers", "Masked-LM validation loss (left) and throughput (right) per "
                    "router.", _figure),),
    columns=("eval_loss", "dropped_train", "load_cv", "tokens_per_second", "train_flops"),
    notes=(
        "Expert choice and Soft MoE were proposed for encoder and vision models; their "
        "advantages are reported at 100M-10B parameters. Soft MoE's slots mix one sequence, "
        "so its dispatch einsum adds ~4 x 128 x d FLOPs per token per sparse layer on top of "
        "the matched expert FLOPs (the report's FLOP table shows it)."),
)
