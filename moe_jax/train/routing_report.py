"""Routing report of a run: where each MoE layer sends each domain of the evaluation data, how
different the domains' routing is, and how far the routing drifted between two checkpoints or
two runs, with a verdict per layer.

    python -m moe_jax.train.routing_report --workdir=runs/main_job/switch
    python -m moe_jax.train.routing_report --workdir=runs/finetuned --compare=runs/pretrained
    python -m moe_jax.train.routing_report --workdir=runs/e8 --steps=100,200 --eval_data=docs.jsonl

Profiles (`moe_jax.train.profiles`) are read from workdir/routing_profiles/<step>.json, which
every evaluation of a training run writes, or computed from the run's checkpoints
(`reevaluate.evaluate_checkpoint`) when a step has no saved profile, with --recompute, or with
--eval_data (your documents: JSON lines {"text": "...", "domain": "..."}). What is compared:

  --compare=B      B's latest profile (the reference, "before") with the workdir's latest
  --steps=s1,s2    the workdir's profiles of steps s1 ("before") and s2
  neither          the workdir's earliest and latest saved profiles (one profile: no drift)

It prints, per MoE layer, the domain-by-expert assignment shares, entropy, drops and mean top-1
gate (from the gate histogram), the Jensen-Shannon divergence between domains, and for a pair
the drift (JS divergence of the shares, overall and per domain), the experts whose share moved
most and a verdict against --drift_thresholds (bits; default `profiles.DRIFT_THRESHOLDS`); it
writes the heatmaps to <out>/routing_report.png and the numbers to <out>/routing_report.json
(default out: <workdir>/routing_report).
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import flags

from moe_jax.train import profiles
from moe_jax.train.checkpoint import CheckpointError
from moe_jax.train.metrics import write_json
from moe_jax.utils import cli, storage

Profile = profiles.Profile


def get_profile(workdir: str, step: int | None = None, *, eval_data: str | None = None,
                recompute: bool = False) -> Profile:
    """The routing profile of `workdir` at `step` (default the latest): the saved one, or one
    computed from the checkpoint (always with `eval_data` or `recompute`)."""
    saved = profiles.steps(workdir)
    if eval_data is None and not recompute:
        if step is None and saved:
            return profiles.load(workdir, saved[-1])
        if step in saved:
            return profiles.load(workdir, step)
    from moe_jax.train import reevaluate

    try:
        _, profile = reevaluate.evaluate_checkpoint(workdir, step=step, eval_data=eval_data)
    except CheckpointError as err:
        raise CheckpointError(f"{workdir}: no saved routing profile of step "
                              f"{'latest' if step is None else step} (saved: {saved or 'none'}) "
                              f"and no checkpoint to compute it from: {err}") from err
    return profile


def choose_profiles(workdir: str, *, compare: str | None = None,
                    steps: Sequence[int] = (), eval_data: str | None = None,
                    recompute: bool = False) -> list[tuple[str, Profile]]:
    """The (label, profile) pairs the report shows: one, or (before, after) for a drift."""
    if compare and steps:
        raise ValueError("give either --compare=B or --steps=s1,s2, not both.")
    if steps and len(steps) != 2:
        raise ValueError(f"--steps={','.join(map(str, steps))} must name two steps, s1,s2.")

    def profile(where: str, step: int | None) -> Profile:
        return get_profile(where, step, eval_data=eval_data, recompute=recompute)

    if compare:
        chosen = [(compare, profile(compare, None)), (workdir, profile(workdir, None))]
    elif steps:
        chosen = [(f"step {s}", profile(workdir, s)) for s in steps]
    else:
        saved = [] if eval_data is not None or recompute else profiles.steps(workdir)
        picked = [profile(workdir, s) for s in (sorted({saved[0], saved[-1]}) if saved
                                                else [None])]
        chosen = [(f"step {p['step']}", p) for p in picked]
    for label, p in chosen:
        if not p["layers"]:
            raise ValueError(f"{label}: the model has no MoE layer, so there is no routing to "
                             "report (a dense run?).")
    return chosen


def report(chosen: Sequence[tuple[str, Profile]], *, thresholds: Sequence[float],
           top: int = 3) -> dict[str, Any]:
    """The numbers the report prints: per profile and layer the domain divergences, and for a
    pair the drift (`profiles.drift`)."""
    out: dict[str, Any] = {"profiles": [], "thresholds": list(thresholds)}
    for label, p in chosen:
        layers = {}
        for layer in p["layers"]:
            names, matrix = profiles.domain_divergence(p, layer)
            layers[str(layer)] = {"domains": names, "domain_js": matrix.tolist()}
        out["profiles"].append({"label": label, "step": p["step"], "layers": layers,
                                "profile": p})
    if len(chosen) == 2:
        out["drift"] = profiles.drift(chosen[0][1], chosen[1][1], top=top,
                                      thresholds=thresholds)
    return out


def _number(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def mean_gate(histogram: Sequence[float] | None) -> float | None:
    """The mean top-1 gate from its histogram over [0, 1] (bin centres)."""
    if histogram is None:
        return None
    counts = np.asarray(histogram, np.float64)
    centres = (np.arange(counts.size) + 0.5) / counts.size
    return float(counts @ centres / max(counts.sum(), 1e-300))


def format_report(result: dict[str, Any]) -> str:
    """The report as text: one block per profile and layer, then the drift lines."""
    lines = []
    for entry in result["profiles"]:
        p = entry["profile"]
        e = p["num_experts"]
        label = entry["label"] + ("" if entry["label"] == f"step {p['step']}"
                                  else f" (step {p['step']})")
        lines.append(f"== {label}: {e} experts, top-{p['top_k']} "
                     f"{p['router']} router, MoE layers {', '.join(map(str, p['layers']))}; "
                     f"domains {', '.join(p['domains'])}")
        for layer in p["layers"]:
            per_domain = p["per_layer"][str(layer)]
            lines.append(f"layer {layer}: assignment share per expert (uniform {1 / e:.3f})")
            lines.append("  " + "domain".ljust(10) + "".join(f"e{i}".rjust(7) for i in range(e))
                         + "  entropy  dropped  top-1 gate  tokens")
            for name in p["domains"]:
                d = per_domain.get(name)
                if d is None:
                    continue
                lines.append("  " + name[:10].ljust(10)
                             + "".join(f"{s:7.3f}" for s in d["share"])
                             + f"  {_number(d['entropy']):>7}  {_number(d['dropped']):>7}"
                             + f"  {_number(mean_gate(d['top1_gate'])):>10}"
                             + f"  {d['tokens']:>6.0f}")
            divergence = entry["layers"][str(layer)]
            names, matrix = divergence["domains"], np.asarray(divergence["domain_js"])
            pairs = [f"{a}-{b} {matrix[i, j]:.4f}" for i, a in enumerate(names)
                     for j, b in enumerate(names) if j > i]
            if pairs:
                lines.append(f"  JS divergence between domains (bits): {', '.join(pairs)}")
    if "drift" in result:
        before, after = (entry["label"] for entry in result["profiles"])
        warn, shift = result["thresholds"]
        lines.append(f"== drift from {before} to {after} (JS divergence in bits; stable < "
                     f"{warn:g} <= drifting < {shift:g} <= shifted)")
        for layer, d in result["drift"].items():
            domains = ", ".join(f"{k} {v:.4f}" for k, v in d["js_by_domain"].items())
            movers = ", ".join(f"e{x} {a:.3f}->{b:.3f}" for x, a, b in d["movers"])
            lines.append(f"layer {layer}: {d['verdict']} (largest JS {d['worst']:.4f}; overall "
                         f"{d['js']:.4f}" + (f"; by domain {domains}" if domains else "")
                         + f"); moved most: {movers}; entropy change "
                         f"{_number(d['entropy_change'], 4)}, dropped change "
                         f"{_number(d['dropped_change'], 4)}")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: str) -> None:
    """Domain-by-expert share heatmaps: one row per profile (and the difference of a pair), one
    column per MoE layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = result["profiles"]
    layers = entries[0]["profile"]["layers"]
    rows = len(entries) + (1 if "drift" in result else 0)
    e = entries[0]["profile"]["num_experts"]
    fig, axes = plt.subplots(rows, len(layers), figsize=(max(4.0, 0.45 * e + 2.5) * len(layers),
                                                        2.6 * rows), squeeze=False)
    matrices = []
    for entry in entries:
        p = entry["profile"]
        matrices.append([(p["domains"], np.array([p["per_layer"][str(layer)][d]["share"]
                                                   for d in p["domains"]])) for layer in layers])
    top = max(float(m.max()) for row in matrices for _, m in row)
    for r, (entry, row) in enumerate(zip(entries, matrices, strict=True)):
        for c, (layer, (names, m)) in enumerate(zip(layers, row, strict=True)):
            _heatmap(fig, axes[r, c], m, names, "viridis", 0.0, top)
            axes[r, c].set_title(f"{entry['label']}: layer {layer}", fontsize=9)
    if "drift" in result:
        for c, layer in enumerate(layers):
            (names_a, a), (names_b, b) = matrices[0][c], matrices[1][c]
            names = [n for n in names_a if n in names_b]
            diff = (b[[names_b.index(n) for n in names]] - a[[names_a.index(n) for n in names]])
            bound = max(float(np.abs(diff).max()), 1e-6)
            _heatmap(fig, axes[-1, c], diff, names, "RdBu_r", -bound, bound)
            d = result["drift"][str(layer)]
            axes[-1, c].set_title(f"change, layer {layer}: JS {d['worst']:.3f} bits, "
                                  f"{d['verdict']}", fontsize=9)
    for ax in axes[-1]:
        ax.set_xlabel("expert")
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    storage.write_bytes(path, png.getvalue())


def _heatmap(fig: Any, ax: Any, matrix: np.ndarray, rows: Sequence[str], cmap: str,
             low: float, high: float) -> None:
    image = ax.imshow(matrix, aspect="auto", cmap=cmap, vmin=low, vmax=high)
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xticks(range(matrix.shape[1]))
    fig.colorbar(image, ax=ax, fraction=0.04)


def _parse_thresholds(text: str) -> tuple[float, float]:
    try:
        warn, shift = (float(x) for x in text.split(","))
    except ValueError as err:
        raise ValueError(f"--drift_thresholds={text!r} must be two numbers, stable,shifted "
                         "(e.g. 0.01,0.05 bits).") from err
    if not 0 <= warn <= shift:
        raise ValueError(f"--drift_thresholds={text!r}: need 0 <= first <= second.")
    return warn, shift


def define_flags(values: flags.FlagValues) -> None:
    flags.DEFINE_string("workdir", None, "a run directory of moe_jax.main", flag_values=values)
    flags.mark_flag_as_required("workdir", flag_values=values)
    flags.DEFINE_string("compare", None, "another run: the reference (before)",
                        flag_values=values)
    flags.DEFINE_string("steps", "", "two steps of the workdir: s1,s2", flag_values=values)
    flags.DEFINE_string("eval_data", None, 'JSON lines {"text": ..., "domain": ...} to route '
                        "instead", flag_values=values)
    flags.DEFINE_bool("recompute", False, "compute the profiles from checkpoints even where "
                      "saved", flag_values=values)
    flags.DEFINE_string("drift_thresholds", ",".join(
        f"{t:g}" for t in profiles.DRIFT_THRESHOLDS), "stable,shifted bounds in bits",
        flag_values=values)
    flags.DEFINE_integer("top", 3, "experts listed as moved most", flag_values=values)
    flags.DEFINE_string("out", None, "default <workdir>/routing_report", flag_values=values)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args, _ = cli.parse_flags(define_flags, argv, __doc__)
    try:
        steps = [int(s) for s in args.steps.split(",") if s.strip()]
    except ValueError as err:
        raise SystemExit(f"--steps={args.steps!r} must be two integers, s1,s2.") from err
    for where in (args.workdir, args.compare):
        if where and not storage.isdir(where):
            raise SystemExit(f"{where} is not a directory; give the --workdir of a run.")
    try:
        chosen = choose_profiles(args.workdir, compare=args.compare, steps=steps,
                                 eval_data=args.eval_data, recompute=args.recompute)
        result = report(chosen, thresholds=_parse_thresholds(args.drift_thresholds),
                        top=args.top)
    except (ValueError, FileNotFoundError, CheckpointError) as err:
        raise SystemExit(f"routing_report: {err}") from err
    out = args.out or storage.join(args.workdir, "routing_report")
    storage.makedirs(out)
    print(format_report(result))
    plot(result, storage.join(out, "routing_report.png"))
    write_json(storage.join(out, "routing_report.json"), json.loads(json.dumps(result)))
    print(f"wrote {out}/routing_report.png and routing_report.json")
    return result


if __name__ == "__main__":
    main()
