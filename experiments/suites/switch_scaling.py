"""switch_scaling: dense vs Switch top-1 at matched FLOPs, E = 2..64, plus dense models with
2x and 4x the FLOPs (Switch Transformer, Fedus et al. 2022, Sec. 3, Figs. 4-6).

Members: `dense` (dense.py at the scale), `switch_e{E}` (switch.py members: top-1, capacity
factor 1.25, balance loss 1e-2, every other block sparse, experts FLOP-matched to the dense
model; E=2 is switch.py:e4 re-matched with 2 experts), `dense_2x` (twice the layers) and
`dense_4x` (twice the layers, sqrt(2) times the width: ~4x the FLOPs; the paper's T5-Large has
3.5x T5-Base's). Quality is the validation loss after equal steps; speed-ups use the smoothed
training cross-entropy (no run sees a token twice, so it is a held-out estimate) against steps
and against training seconds (the loop's tokens/s, compilation and evaluation excluded).

Claims comparing members are decided on seed-paired estimates (per seed, then mean ± SE
over seeds; the pooled figure beside it): the rule of experiments/library/stats.py, fixed
before this suite's runs at the scales run since.
"""

from __future__ import annotations

import math

import numpy as np

from experiments.library import checks, plots, stats
from experiments.library.base import (
    MODEL_SIZE,
    Claim,
    Figure,
    Member,
    Suite,
    Table,
    dense_variant,
    family,
    rematched,
)
from experiments.library.results import METRICS, Results
from moe_jax.utils import cli

EXPERTS = (2, 4, 8, 16, 32, 64)
SPARSE = tuple(f"switch_e{e}" for e in EXPERTS)
LARGEST = SPARSE[-1]
# Bigger dense baselines, by model size (`MODEL_SIZE`): layers x2 (2x FLOPs); layers x2 and
# width x sqrt(2) (4x FLOPs; mini: d 32 -> 44, the nearest width with an even head dimension,
# 3.8x).
BIGGER_DENSE = {
    "mini": {"model.d_model": 44, "model.d_ff": 176, "moe.d_ff": 176},
    "tiny": {"model.d_model": 272, "model.d_ff": 1088, "moe.d_ff": 1088},
    "small": {"model.d_model": 896, "model.num_heads": 14, "model.d_ff": 3584,
              "moe.d_ff": 3584},
    "base": {"model.d_model": 1088, "model.num_heads": 17, "model.d_ff": 4352,
              "moe.d_ff": 4352},
}
LAYERS = {"mini": 4, "tiny": 4, "small": 12, "base": 24}
# The cpu scale trains fewer members for longer: the dense baselines, and E = 4, 16, 64 for the
# trend (its power reasoning is in experiments/README.md, "The cpu scale").
CPU_MEMBERS = ("dense", "switch_e4", "switch_e16", "switch_e64", "dense_4x")
# The mini scale: the whole dense ladder, E = 4, 16, 64 as published (capacity factor 1.25), and
# two controls for the small-routing-group confound: E=64 dropless (nothing dropped whatever
# the group) and top-2 at E=16 (twice the assignments per expert and group, FLOP-matched).
# Post hoc (experiments/README.md, "Follow-up"): dropless E=64 at Switch's 0.1x initialisation,
# and dropless E=16; compared with dense_4x, not claims.
MINI_MEMBERS = ("dense", "dense_2x", "dense_4x", "switch_e4", "switch_e16", "switch_e64",
                "switch_e64_dropless", "switch_top2_e16", "switch_e64_dropless_init01",
                "switch_e16_dropless")
SCALE_MEMBERS = {"cpu": CPU_MEMBERS, "mini": MINI_MEMBERS}


def members(scale: str) -> tuple[Member, ...]:
    size = MODEL_SIZE[scale]
    dense = dense_variant(scale)
    deeper = {"model.num_layers": 2 * LAYERS[size]}
    out = [Member("dense", dense, {}, {"experts": 1, "flops_x": 1})]
    for e in EXPERTS:
        tags = {"experts": e, "flops_x": 1}
        if e == 2:
            out.append(rematched("switch_e2", family("switch.py", scale, "e4"), num_experts=2,
                                 tags=tags))
        else:
            out.append(Member(f"switch_e{e}", family("switch.py", scale, f"e{e}"), {}, tags))
    out.append(Member("dense_2x", dense, deeper, {"experts": 1, "flops_x": 2}))
    out.append(Member("dense_4x", dense, {**deeper, **BIGGER_DENSE[size]},
                      {"experts": 1, "flops_x": 4}))
    if scale in SCALE_MEMBERS:
        out.append(Member("switch_e64_dropless", family("switch.py", scale, "e64"),
                          {"moe.dispatch": "dropless"}, {"experts": 64, "flops_x": 1}))
        out.append(rematched("switch_top2_e16", family("switch.py", scale, "e16"), top_k=2,
                             tags={"experts": 16, "flops_x": 1}))
        out.append(Member("switch_e64_dropless_init01", family("switch.py", scale, "e64"),
                          {"moe.dispatch": "dropless", "moe.init_scale": 0.1},
                          {"experts": 64, "flops_x": 1}))
        out.append(Member("switch_e16_dropless", family("switch.py", scale, "e16"),
                          {"moe.dispatch": "dropless"}, {"experts": 16, "flops_x": 1}))
        order = SCALE_MEMBERS[scale]
        return tuple(sorted((m for m in out if m.name in order),
                            key=lambda m: order.index(m.name)))
    return tuple(out)


# Switch Fig. 4 left (the same points as Fig. 1 left): test loss of Switch-Base with E experts
# after the same compute (1e = T5-Base), read off the published figure by eye (± ~0.01; the
# paper gives no table). Units are the paper's; only the shape is compared.
PAPER_FIG4_LOSS = {1: 6.00, 2: 5.88, 4: 5.70, 8: 5.50, 16: 5.285, 32: 5.13, 64: 5.02,
                   128: 4.92, 256: 4.85}


def _seed_paired_gains(results: Results) -> dict[int, list[float]]:
    """{E: [loss(dense) - loss(switch_eE) per seed]} over the seeds both finished."""
    loss = METRICS["eval_loss"].fn
    dense = results.by_seed("dense", loss)
    gains: dict[int, list[float]] = {1: [0.0] * len(dense)}
    for member in SPARSE:
        runs = results.by_seed(member, loss)
        if runs and results.tags(member):
            gains[results.tags(member)["experts"]] = [dense[s] - v for s, v in runs.items()
                                                      if s in dense]
    return gains


def _train_ce_at_matched_time(results: Results) -> tuple[float, dict[int, list[float]]]:
    """(t, {E: smoothed train cross-entropy of each run at t training seconds}), t the shortest
    training time of the finished runs (every run has reached it); E = 1 is the dense model."""
    members = {1: "dense", **{results.tags(m)["experts"]: m for m in SPARSE
                              if results.runs_of(m) and results.tags(m)}}
    curves = {e: [checks.curve(r, "time") for r in results.runs_of(m)]
              for e, m in members.items()}
    ends = [x[-1] for runs in curves.values() for x, _ in runs if x.size]
    if not ends:
        return math.nan, {}
    t = float(min(ends))
    return t, {e: [float(np.interp(t, x, y)) for x, y in runs if x.size]
               for e, runs in curves.items()}


def _loss_vs_experts(results: Results, path: str) -> None:
    fig, axes = plots.figure(ncols=3, width=5.0)
    ax = axes[0, 0]
    plots.metric_vs_tag(results, ax, {"Switch top-1 (FLOP-matched)": SPARSE}, "experts",
                        "eval_loss")
    for i, (member, label) in enumerate((("dense", "dense (1x FLOPs)"),
                                         ("dense_2x", "dense, 2x FLOPs"),
                                         ("dense_4x", "dense, 4x FLOPs"))):
        plots.hline(ax, results.values(member, "eval_loss"), label, plots.COLORS[i + 1])
    ax.set_xscale("log", base=2)
    plots.annotate_missing(ax, results, results.members())
    plots.label_axes(ax, "experts per sparse layer (log2)", "validation loss (nats/token)")
    # The shapes side by side: loss gain over the dense model against E, each curve divided by
    # its own gain at E = 64 (ours per seed, paired; the paper's read off its Fig. 4).
    ax = axes[0, 1]
    gains = _seed_paired_gains(results)
    if 64 in gains and gains[64] and abs(float(np.mean(gains[64]))) > 0:
        scale = float(np.mean(gains[64]))
        experts = sorted(gains)
        plots.series(ax, experts, [[g / scale for g in gains[e]] for e in experts],
                     f"ours ({results.scale}; gain at E=64: {scale:+.3f} nats)")
    paper = sorted(PAPER_FIG4_LOSS)
    paper_scale = PAPER_FIG4_LOSS[1] - PAPER_FIG4_LOSS[64]
    ax.plot(paper, [(PAPER_FIG4_LOSS[1] - PAPER_FIG4_LOSS[e]) / paper_scale for e in paper],
            "s--", color="k", label="Switch Fig. 4 left (read off the figure)")
    ax.set_xscale("log", base=2)
    plots.label_axes(ax, "experts per sparse layer (log2; 1 = dense)",
                     "loss gain over dense / gain at E=64")
    # Matched wall-clock time instead of matched steps (cf. Switch Fig. 5): on this machine.
    ax = axes[0, 2]
    seconds, at_time = _train_ce_at_matched_time(results)
    if at_time:
        experts = sorted(at_time)
        plots.series(ax, experts, [at_time[e] for e in experts],
                     f"after {seconds:.0f} s of training ({results.scale})")
    ax.set_xscale("log", base=2)
    plots.label_axes(ax, "experts per sparse layer (log2; 1 = dense)",
                     "train cross-entropy at equal time (nats/token)")
    plots.save(fig, path, f"Validation loss vs experts at equal steps ({results.scale}; "
                          "cf. Switch Fig. 4 left)")


DENSE_LADDER = ("dense", "dense_2x", "dense_4x")


def _training_flops(run: dict) -> float | None:
    """Total training FLOPs of a run: training FLOPs per token x the tokens it trained on."""
    summary = run.get("summary") or {}
    if not summary.get("training_flops_per_token") or not summary.get("train_tokens"):
        return None
    return float(summary["training_flops_per_token"]) * float(summary["train_tokens"])


def _sparse_members(results: Results) -> list[str]:
    return [m for m in results.members() if m not in DENSE_LADDER and results.runs_of(m)]


def _ladder_multiplier(ladder: list[tuple[float, float]], loss: float) -> float:
    """The dense FLOPs multiple (vs the first rung) that reaches `loss` on the dense ladder
    [(FLOPs multiple, loss)], interpolating log2(FLOPs) linearly in loss between rungs and
    extrapolating past the ends with the nearest segment's slope."""
    x = np.log2([f for f, _ in ladder])
    y = np.array([v for _, v in ladder])
    i = int(np.clip(np.searchsorted(-y, -loss), 1, len(y) - 1))  # losses fall along the ladder
    x0, x1, y0, y1 = x[i - 1], x[i], y[i - 1], y[i]
    return float(2 ** (x0 + (x1 - x0) * (loss - y0) / (y1 - y0)))


def gain_captured(results: Results) -> dict[str, list[float]]:
    """Per sparse member, the share of dense_4x's loss gain over dense that it captures,
    (L_dense - L) / (L_dense - L_4x), per seed (seed-paired: seeds where the member, dense and
    dense_4x all finished)."""
    loss = METRICS["eval_loss"].fn
    dense, best = results.by_seed("dense", loss), results.by_seed("dense_4x", loss)
    return {member: [(dense[s] - v) / (dense[s] - best[s])
                     for s, v in results.by_seed(member, loss).items()
                     if s in dense and s in best]
            for member in _sparse_members(results)}


def dense_equivalent(results: Results, member: str) -> tuple[float, bool] | None:
    """(the dense FLOPs multiple that reaches `member`'s mean validation loss on the dense
    ladder of mean losses, whether that is extrapolated past the ladder's ends); None without
    two rungs."""
    rungs = [(float(np.mean([f for r in results.runs_of(m) if (f := _training_flops(r))])),
              float(np.mean(results.values(m, "eval_loss"))))
             for m in DENSE_LADDER if results.runs_of(m)]
    values = results.values(member, "eval_loss")
    if len(rungs) < 2 or not values:
        return None
    loss = float(np.mean(values))
    base = rungs[0][0]
    multiple = _ladder_multiplier([(f / base, v) for f, v in rungs], loss)
    return multiple, not rungs[-1][1] <= loss <= rungs[0][1]


def _gain_table(results: Results) -> str:
    rows = []
    for member, fractions in gain_captured(results).items():
        if not fractions:
            continue
        mean, se = stats.mean_se(fractions)
        equivalent = dense_equivalent(results, member)
        rows.append((member, results.tags(member).get("experts", ""), f"{mean:+.2f} ± {se:.2f}",
                     ", ".join(f"{v:+.2f}" for v in fractions),
                     "-" if equivalent is None else
                     f"{equivalent[0]:.2f}x{' (extrapolated)' if equivalent[1] else ''}",
                     str(len(fractions))))
    if not rows:
        return "No sparse member has finished beside dense and dense_4x of the same seed yet."
    return cli.markdown_table(("member", "experts", "share of dense_4x's gain (mean ± SE)",
                               "per seed", "dense FLOPs reaching its mean loss", "seeds"), rows)


def _loss_vs_flops(results: Results, path: str) -> None:
    fig, axes = plots.figure(ncols=2, width=5.6)
    ax = axes[0, 0]
    ladder = [(float(np.mean(results.values(m, "eval_loss"))),
               float(np.mean([f for r in results.runs_of(m) if (f := _training_flops(r))])))
              for m in DENSE_LADDER if results.runs_of(m)]
    if ladder:
        ax.plot([f for _, f in ladder], [v for v, _ in ladder], "o-", color="k",
                label="dense ladder (1x, 2x, 4x FLOPs)")
    for i, member in enumerate(_sparse_members(results)):
        runs = results.runs_of(member)
        x = [_training_flops(r) for r in runs]
        y = [METRICS["eval_loss"].fn(r) for r in runs]
        ax.plot(x, y, "o", alpha=0.35, color=plots.COLORS[i % len(plots.COLORS)])
        ax.errorbar(np.mean(x), np.mean(y), yerr=np.std(y, ddof=1) if len(y) > 1 else None,
                    fmt="s", color=plots.COLORS[i % len(plots.COLORS)], label=member, capsize=3)
    ax.set_xscale("log", base=2)
    plots.label_axes(ax, "training FLOPs (log2)", "validation loss (nats/token)")
    # Normalised: the share of dense_4x's gain over dense each member captures (seed-paired).
    ax = axes[0, 1]
    captured = {m: v for m, v in gain_captured(results).items() if v}
    if captured:
        plots.bars(ax, list(captured), list(captured.values()))
    ax.axhline(1.0, color="k", ls="--", lw=1)
    ax.axhline(0.0, color="gray", lw=0.8)
    ax.text(0.02, 0.97, "dashed: dense_4x. Switch Fig. 6: Switch-Base 64e stays below "
            "T5-Large\n(3.5x its FLOPs) at every step, i.e. above the dashed line",
            transform=ax.transAxes, va="top", fontsize=7)
    plots.label_axes(ax, "", "share of dense_4x's loss gain over dense")
    plots.save(fig, path, f"Validation loss against training FLOPs ({results.scale}; cf. Switch "
                          "Figs. 4 and 6)")


def _curves(axis: str) -> callable:
    def draw(results: Results, path: str) -> None:
        fig, axes = plots.figure(width=7.0)
        ax = axes[0, 0]
        for i, member in enumerate(("dense", "dense_2x", "dense_4x", "switch_e4", "switch_e16",
                                    LARGEST)):
            plots.curves(ax, results.runs_of(member), lambda r: checks.curve(r, axis)[0],
                         lambda r: checks.curve(r, axis)[1], member, plots.COLORS[i])
        xlabel = "training step" if axis == "step" else \
            "training time (s; compile and eval excluded)"
        plots.label_axes(ax, xlabel, "train cross-entropy, smoothed (nats/token)")
        ax.set_ylim(top=min(ax.get_ylim()[1], 3.5))
        fig_no = "Fig. 4 right / 6 left" if axis == "step" else "Figs. 5 / 6 right"
        plots.save(fig, path, f"Training curves vs {'steps' if axis == 'step' else 'time'} "
                              f"({results.scale}; cf. Switch {fig_no})")
    return draw


SUITE = Suite(
    name="switch_scaling",
    title="Dense vs Switch top-1 at matched FLOPs (Switch Transformer, Sec. 3)",
    references=(
        "Fedus, Zoph, Shazeer. Switch Transformers: Scaling to Trillion Parameter Models with "
        "Simple and Efficient Sparsity. JMLR 23 (2022). arXiv:2101.03961. Sec. 3, Figs. 4-6.",),
    members=members,
    train={
        "tiny": {"train.num_train_steps": 100, "train.warmup_steps": 10},
        "cpu": {"train.num_train_steps": 600, "train.warmup_steps": 60},
        "mini": {"train.num_train_steps": 6000, "train.warmup_steps": 300},
        "small": {"train.num_train_steps": 1000, "train.warmup_steps": 100},
    },
    claims=(
        Claim("more_experts_lower_loss",
              "At fixed FLOPs per token, validation loss falls as the number of experts grows.",
              "Switch Fig. 4 (left), Sec. 3.1",
              "test loss falls steadily from 1 expert (T5-Base, 223M) through 2, 4, ... to 256 "
              "experts (14.7B params), all at T5-Base FLOPs (read from the plot; no table)",
              lambda r: checks.trend(r, SPARSE, "experts")),
        Claim("sparse_beats_dense_per_step",
              f"{LARGEST} reaches a lower validation loss than the FLOP-matched dense model "
              "after the same number of steps.",
              "Switch Fig. 4 (right), Sec. 3.1",
              "every Switch-Base (16e-128e) is above T5-Base in neg. log perplexity at every "
              "step (Fig. 4 right)",
              lambda r: checks.lower(r, LARGEST, "dense")),
        Claim("step_speedup",
              f"{LARGEST} reaches the dense model's quality in fewer steps.",
              "Switch Sec. 3.1 (Fig. 4 right)",
              "Switch-Base 64e reaches at step 60k the quality T5-Base reaches at step 450k: "
              "7.5x speed-up in steps",
              lambda r: checks.speedup(r, LARGEST, "dense", "step")),
        Claim("time_speedup",
              f"{LARGEST} reaches the dense model's quality in less training time.",
              "Switch Sec. 3.2, Fig. 5",
              "Switch-Base 64e reaches T5-Base's quality in one-seventh of the time (7x, "
              "32 TPUv3 cores)",
              lambda r: checks.speedup(r, LARGEST, "dense", "time")),
        Claim("sparse_beats_bigger_dense_per_step",
              f"{LARGEST} is more sample-efficient than a dense model with ~4x its FLOPs.",
              "Switch Sec. 3.3, Fig. 6 (left)",
              "Switch-Base 64e is below T5-Large (3.5x the FLOPs per token) in loss at every "
              "step",
              lambda r: checks.lower(r, LARGEST, "dense_4x")),
        Claim("time_speedup_over_bigger_dense",
              f"{LARGEST} reaches the 4x-FLOPs dense model's quality in less training time.",
              "Switch Sec. 3.3, Fig. 6 (right)",
              "2.5x speed-up of Switch-Base 64e over T5-Large in wall-clock time",
              lambda r: checks.speedup(r, LARGEST, "dense_4x", "time")),
    ),
    tables=(
        Table("Gain captured", "For each sparse member, seed-paired with dense and dense_4x of "
              "the same seed: the share of dense_4x's validation-loss gain over dense that it "
              "captures, (L_dense - L) / (L_dense - L_dense_4x) (1 = as good as ~4x the dense "
              "FLOPs; Switch Fig. 6 puts Switch-Base 64e above 1); and, from the mean losses, "
              "the multiple of the dense model's training FLOPs at which the dense ladder "
              "reaches the member's loss (log2 FLOPs linear in loss between rungs).",
              _gain_table),
    ),
    figures=(
        Figure("loss_vs_flops", "Left: validation loss against total training FLOPs, the dense "
               "ladder (means) and each sparse member (squares: mean ± SD; dots: seeds). "
               "Right: each sparse member's share of dense_4x's gain over dense (bars: mean ± "
               "SD over seeds, seed-paired); the paper's Switch-Base 64e is above 1 (Fig. 6).",
               _loss_vs_flops),
        Figure("loss_vs_experts", "Left: validation loss against the number of experts at equal "
               "steps; dashed: dense baselines at 1x, 2x and 4x FLOPs (band: ± SD over seeds). "
               "Middle: the loss gain over dense, each curve divided by its gain at E=64, beside "
               "Switch Fig. 4 left (read off the published figure). Right: smoothed training "
               "cross-entropy at equal training time (the shortest run's; this machine, "
               "not TPUs).", _loss_vs_experts),
        Figure("curves_steps", "Smoothed training cross-entropy against steps (faint: seeds).",
               _curves("step")),
        Figure("curves_time", "Smoothed training cross-entropy against training seconds.",
               _curves("time")),
    ),
    columns=("eval_loss", "bits_per_byte", "train_ce", "tokens_per_expert_group",
             "dropped_train", "load_cv", "tokens_per_second", "benchmark_tokens_per_second",
             "params_total", "train_flops"),
    notes=(
        "The paper trains for 100k-500k steps at 2^20 tokens per batch; tiny runs see 0.2M "
        "tokens and cpu runs 1.2M. Its speed-ups are measured at a far lower loss, where more "
        "experts have had time to pay off. On CPU a sparse step costs more wall-clock than a "
        "dense one with the same FLOPs (routing, gather/scatter, small expert matmuls), and the"
        " machine is shared, so the time-basis claims measure this implementation on this "
        "machine, not TPUs."),
)
