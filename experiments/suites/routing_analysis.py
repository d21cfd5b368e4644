"""routing_analysis: what a trained E=8 top-2 model routes where (Mixtral, Jiang et al. 2024,
Sec. 5: Fig. 7, Table 5).

One member, `mixtral_e8` (configs/mixtral.py: every block sparse, top-2 of 8 SwiGLU experts,
renormalised gates, dropless), trained longer than the other suites' members. After each run the
runner calls `experiments.analyses.routing_stats`, which restores the checkpoint and routes the
validation batches: expert shares by domain (code / prose / math) and by byte class, the rate at
which consecutive tokens of a document share their first expert (chance 1/E) or any expert
(chance 1 - C(E-2,2)/C(E,2)), mutual information of the first expert with domain and byte class,
and per-layer router entropy against ln E.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from experiments.library import plots, stats
from experiments.library.base import Claim, Figure, Member, Suite, family, rematched
from experiments.library.results import Results

MEMBER = "mixtral_e8"


def members(scale: str) -> tuple[Member, ...]:
    if scale == "paper":
        return (rematched(MEMBER, "mixtral.py:e8", dense="dense.py:base_swiglu"),)
    return (Member(MEMBER, family("mixtral.py", scale, "e8"), {}, {"experts": 8, "top_k": 2}),)


def _analyses(results: Results) -> list[dict]:
    return [r["analysis"] for r in results.runs_of(MEMBER) if r.get("analysis")]


def _layers(analysis: dict) -> list[str]:
    return [str(layer) for layer in analysis["layers"]]


def _per_seed(results: Results, fn: Callable[[dict], float]) -> list[float]:
    return [fn(a) for a in _analyses(results)]


def _no_analysis() -> stats.Outcome:
    return stats.Outcome(stats.INCONCLUSIVE, "n/a: no routing analysis in the results", "-")


def _repeat_above_chance(results: Results) -> stats.Outcome:
    analyses = _analyses(results)
    if not analyses:
        return _no_analysis()
    last = _layers(analyses[0])[-1]
    excess = [a["per_layer"][last]["repeat_first"] - a["chance_repeat_first"] for a in analyses]
    mean, se = stats.mean_se(excess)
    out = stats.outcome(mean, se, "positive",
                        f"first-choice repetition - 1/E in the last layer ({last})")
    rates = ", ".join(f"{a['per_layer'][last]['repeat_first']:.1%}" for a in analyses)
    return stats.Outcome(out.verdict, f"[{rates}] vs chance "
                         f"{analyses[0]['chance_repeat_first']:.1%}; {out.measured}", out.rule)


def _deeper_repeats_more(results: Results) -> stats.Outcome:
    analyses = _analyses(results)
    if not analyses:
        return _no_analysis()
    layers = _layers(analyses[0])
    diff = [a["per_layer"][layers[-1]]["repeat_first"] - a["per_layer"][layers[0]]["repeat_first"]
            for a in analyses]
    mean, se = stats.mean_se(diff)
    return stats.outcome(mean, se, "positive",
                         f"repetition(layer {layers[-1]}) - repetition(layer {layers[0]})")


def _no_domain_specialisation(results: Results) -> stats.Outcome:
    analyses = _analyses(results)
    if not analyses:
        return _no_analysis()
    z = [max(a["per_layer"][layer]["domain_tv_z"] for layer in _layers(a)) for a in analyses]
    mean, se = stats.mean_se([v - 2.0 for v in z])
    out = stats.outcome(mean, se, "negative",
                        "max-layer z of domain TV vs shuffled documents - 2")
    return stats.Outcome(out.verdict, f"z per seed [{', '.join(f'{v:.1f}' for v in z)}]; "
                         f"{out.measured}", out.rule)


def _syntax_over_domain(results: Results) -> stats.Outcome:
    analyses = _analyses(results)
    if not analyses:
        return _no_analysis()
    diff = [np.mean([a["per_layer"][layer]["mi_class_bits"] - a["per_layer"][layer][
        "mi_domain_bits"] for layer in _layers(a)]) for a in analyses]
    mean, se = stats.mean_se([float(d) for d in diff])
    return stats.outcome(mean, se, "positive",
                         "I(expert; byte class) - I(expert; domain), mean over layers", "bits")


def _mean_matrix(results: Results, key: str, layer: str) -> np.ndarray:
    return np.mean([np.asarray(a["per_layer"][layer][key]) for a in _analyses(results)], axis=0)


def _shares_figure(key: str, labels_key: str, what: str) -> Callable[[Results, str], None]:
    def draw(results: Results, path: str) -> None:
        analyses = _analyses(results)
        if not analyses:
            return
        layers = _layers(analyses[0])
        e = analyses[0]["num_experts"]
        fig, axes = plots.figure(ncols=len(layers), width=4.2, height=3.4)
        for ax, layer in zip(axes[0], layers, strict=True):
            plots.heatmap(ax, _mean_matrix(results, key, layer), analyses[0][labels_key],
                          [str(i) for i in range(e)], "share of assignments", 0.0,
                          max(0.5, 2.5 / e))
            ax.set_title(f"layer {layer}")
            ax.set_xlabel("expert")
        plots.save(fig, path, f"Expert use by {what} ({results.scale}, mean over "
                              f"{len(analyses)} seeds; uniform = {1 / e:.3f})")
    return draw


def _repeats_entropy(results: Results, path: str) -> None:
    analyses = _analyses(results)
    if not analyses:
        return
    layers = _layers(analyses[0])
    a0 = analyses[0]
    fig, axes = plots.figure(ncols=2)
    x = [int(layer) for layer in layers]
    for i, (key, chance, label) in enumerate((
            ("repeat_first", a0["chance_repeat_first"], "same first choice"),
            ("repeat_any", a0["chance_repeat_any"], "same expert among the top-2"))):
        plots.series(axes[0, 0], x, [[a["per_layer"][layer][key] for a in analyses]
                                     for layer in layers], label, plots.COLORS[i])
        axes[0, 0].axhline(chance, linestyle=":", color=plots.COLORS[i],
                           label=f"chance ({chance:.1%})")
    plots.label_axes(axes[0, 0], "layer", "consecutive tokens sharing an expert")
    plots.series(axes[0, 1], x, [[a["per_layer"][layer]["entropy"] for a in analyses]
                                 for layer in layers], "mean per-token router entropy",
                 plots.COLORS[0])
    plots.series(axes[0, 1], x, [[a["per_layer"][layer]["marginal_entropy"] for a in analyses]
                                 for layer in layers], "entropy of the average load",
                 plots.COLORS[1], "s")
    axes[0, 1].axhline(a0["ln_experts"], linestyle="--", color="k",
                       label=f"ln E = {a0['ln_experts']:.2f} (uniform)")
    plots.label_axes(axes[0, 1], "layer", "entropy (nats)")
    for ax in axes[0]:
        ax.set_xticks(x)  # layers are integers
    plots.save(fig, path, f"Temporal locality and router entropy per layer ({results.scale}; "
                          "cf. Mixtral Table 5)")


def _entropy_note(results: Results) -> stats.Outcome:
    analyses = _analyses(results)
    if not analyses:
        return _no_analysis()
    text = "; ".join(
        f"layer {layer}: {np.mean([a['per_layer'][layer]['entropy'] for a in analyses]):.2f}"
        for layer in _layers(analyses[0]))
    return stats.Outcome("descriptive", f"mean router entropy (nats) {text}; ln E = "
                         f"{analyses[0]['ln_experts']:.2f}", "no paper claim; plotted")


SUITE = Suite(
    name="routing_analysis",
    title="Routing analysis of a trained E=8 top-2 model (Mixtral Sec. 5 style)",
    references=("Jiang et al. Mixtral of Experts. arXiv:2401.04088 (2024), Sec. 5, Fig. 7, "
                "Table 5.",),
    members=members,
    train={
        "tiny": {"train.num_train_steps": 600, "train.warmup_steps": 60},
        "small": {"train.num_train_steps": 3000, "train.warmup_steps": 300},
    },
    claims=(
        Claim("repetition_above_chance",
              "Consecutive tokens share their first-choice expert more often than chance (1/E) "
              "in the deepest layer.",
              "Mixtral Table 5",
              "first choice, layer 15 / 31: 23.6-28.4% / 19.7-26.3% across Pile domains vs 12.5% "
              "chance; first-or-second: 61.6-67.0% / 44.5-53.6% vs ~46%",
              _repeat_above_chance),
        Claim("repetition_grows_with_depth",
              "Repetition is near chance at the first layer and higher in deeper layers.",
              "Mixtral Table 5",
              "layer 0 first choice 13.6-14.9% (chance 12.5%) vs 23.6-28.4% at layer 15",
              _deeper_repeats_more),
        Claim("no_domain_specialisation",
              "Expert use does not depend on the domain beyond chance.",
              "Mixtral Sec. 5, Fig. 7",
              "'no obvious patterns in the assignment of experts based on the topic'; DM "
              "Mathematics marginally different (Pile subsets, token-level)",
              _no_domain_specialisation),
        Claim("syntax_over_domain",
              "Routing follows token type (syntax) more than domain.",
              "Mixtral Sec. 5, Fig. 8 (qualitative)",
              "'the router does exhibit some structured syntactic behavior' (e.g. 'self' in "
              "Python, indentation); no number",
              _syntax_over_domain),
        Claim("entropy", "Per-layer router entropy against ln E.", "(descriptive)",
              "no paper number", _entropy_note),
    ),
    figures=(
        Figure("by_domain", "Expert shares by domain per layer (mean over seeds).",
               _shares_figure("domain_share", "domains", "domain")),
        Figure("by_byte_class", "Expert shares by byte class of the routed token per layer.",
               _shares_figure("class_share", "byte_classes", "byte class")),
        Figure("repeats_entropy", "Consecutive-token expert repetition vs chance (left) and "
               "router entropy vs ln E (right) per layer.", _repeats_entropy),
    ),
    columns=("eval_loss", "bits_per_byte", "load_cv", "router_entropy", "tokens_per_second"),
    analysis="experiments.analyses.routing_stats",
    notes=(
        "Mixtral's domains are Pile subsets of mostly English text routed as ~32k-piece "
        "tokens; ours are code, prose and arithmetic as single bytes, where the byte "
        "statistics themselves differ by domain (digits in math), so domain-dependent routing "
        "is expected even without topical specialisation. The domain test is a permutation "
        "test over documents (z of the largest total-variation distance)."),
)

