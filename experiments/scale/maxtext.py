"""moe_jax's dry-run estimates beside MaxText's published MFU on TPU v5p.

    python -m experiments.scale.run --only=MaxText    # compile moe_jax's equivalents
    python -m experiments.scale.maxtext               # writes maxtext_comparison.md

`MEASUREMENTS` holds what MaxText publishes (model, slice, batch, sequence length, settings, MFU,
and the file and commit it comes from); `run.maxtext_cases` the moe_jax configurations closest
to each. The table puts the measured MFU next to both of moe_jax's estimates (all bounds
overlapping, and none), read from results.jsonl. The estimator is the dry run's, unchanged.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

from experiments.scale import run
from moe_jax.utils import cli

HERE = pathlib.Path(__file__).parent
TABLE = HERE / "maxtext_comparison.md"
MAXTEXT = "github.com/AI-Hypercomputer/maxtext"
MAXTEXT_COMMIT = "e591f30cbbf217ed67ef71263ec0538239f9c3b8"  # 2026-08-22
RECIPES = "github.com/AI-Hypercomputer/tpu-recipes"
RECIPES_COMMIT = "c8cfe2f689081d36701a101cd73a70965d80926b"  # 2026-08-07


@dataclasses.dataclass(frozen=True)
class Measurement:
    """One published MaxText training measurement and the moe_jax cases that mirror it."""

    model: str
    slice: str
    per_device_batch: float
    seq_len: int
    mfu: float
    settings: str
    source: str
    cases: tuple[str, ...]


MEASUREMENTS = (
    Measurement(
        "Mixtral-8x7B", "v5p-128 (64 chips)", 36, 4096, 0.5489,
        "bf16 weights and activations, megablox dropless (sparse_matmul, capacity_factor -1: "
        "base.yml defaults), FSDP over all chips (ici_fsdp_parallelism -1), full remat, flash "
        "attention, scanned layers, synthetic data",
        f"MFU and TFLOP/s/chip (251.94): {MAXTEXT} tests/end_to_end/tpu/mixtral/Run_Mixtral.md "
        f"@ {MAXTEXT_COMMIT[:7]}; settings: {RECIPES} training/v5p/Mixtral-8X7B-Maxtext/"
        f"scripts/run_mixtral-8x7b.sh @ {RECIPES_COMMIT[:7]} (TPU_TYPE v5p-128 in its README)",
        ("MaxText Mixtral-8x7B dropless", "MaxText Mixtral-8x7B dropless 1 seq",
         "MaxText Mixtral-8x7B cf1.0", "MaxText Mixtral-8x7B dropless 1 pass")),
    Measurement(
        "Llama2-70B (dense)", "v5p-128 (64 chips)", 2, 4096, 0.65,
        "float32 weights (default weight_dtype), bf16 activations, FSDP over all chips, remat "
        "save_dot_except_mlpwi, data-parallel overlap and all-gather fusion XLA flags",
        f"MFU: {MAXTEXT} docs/reference/architecture/architecture_overview.md (\"Llama2-70B "
        f"achieving 65% MFU on a v5p-128 pod\") @ {MAXTEXT_COMMIT[:7]}; settings: "
        f"benchmarks/maxtext_v5p_model_configs.py `llama2_70b_v5p_128` @ {MAXTEXT_COMMIT[:7]}",
        ("MaxText Llama2-70B",)),
)
COLUMNS = ("MaxText run", "their MFU (measured)", "moe_jax case", "differs from theirs in",
           "fits", "bounds s: compute, HBM, ICI", "est. step: overlap / serial",
           "est. MFU: overlap / serial")


def _differences(case: run.Case) -> str:
    s = case.settings
    out = []
    if s.get("moe.dispatch") == "gather":
        out.append(f"capacity factor {s['moe.capacity_factor']} instead of dropless")
    if s.get("train.grad_accum_steps", 1) > 1:
        per_chip = s["train.batch_size"] // s["mesh.fsdp"] // s["train.grad_accum_steps"]
        out.append(f"{s['train.grad_accum_steps']} micro-batches of {per_chip} sequence(s) "
                   "per chip")
    if "Llama" in case.name:
        out.append("full remat")
    return "; ".join(out) or "-"


def rows(results: dict[str, dict[str, Any]]) -> list[tuple[str, ...]]:
    by_name = {c.name: c for c in run.maxtext_cases()}
    out = []
    for m in MEASUREMENTS:
        for name in m.cases:
            case = by_name[name]
            row = results.get(run.key(case))
            report = run.load_report(row["report"]) if row else None
            fits = bounds = steps = mfu = "-"
            if report is None:
                fits = "not compiled yet"
            elif not report.compiled:
                over = report.advice[0] if report.advice else (report.error or "?")[:80]
                fits = f"**no**: {over}"
            elif e := report.estimate:
                fits = "yes" if report.fits else "**no**"
                bounds = ", ".join(f"{e[k]:.3g}" for k in ("compute_seconds", "memory_seconds",
                                                           "communication_seconds"))
                steps = f"{e['overlap_step_seconds']:.3g} / {e['serial_step_seconds']:.3g} s"
                mfu = f"{100 * e['overlap_mfu']:.0f}% / {100 * e['serial_mfu']:.0f}%"
            out.append((f"{m.model}, {m.slice}, {m.per_device_batch:g} x {m.seq_len} tokens "
                        "per chip", f"{100 * m.mfu:.1f}%", name.removeprefix("MaxText "),
                        _differences(case), fits, bounds, steps, mfu))
    return out


def _provenance(results: dict[str, dict[str, Any]]) -> str:
    keys = [run.key(c) for c in run.maxtext_cases() if run.key(c) in results]
    machines = {f"{r['machine']['cpu_count']}-core {r['machine']['cpu']}, jax "
                f"{r['machine']['jax']}" for r in (results[k] for k in keys)}
    commits = sorted({results[k]["machine"]["commit"] for k in keys})
    dates = sorted({results[k]["machine"]["date"][:10] for k in keys})
    return (f"Compiled on {'; '.join(sorted(machines)) or '-'}, {', '.join(dates) or '-'}, at "
            f"commit(s) {', '.join(commits) or '-'} (`python -m experiments.scale.run "
            "--only=MaxText`, then `python -m experiments.scale.maxtext`).")


def write() -> str:
    results = run.read_results()
    sources = [f"- {m.model}: {m.source}. Their settings: {m.settings}." for m in MEASUREMENTS]
    text = "\n".join([
        "# moe_jax's dry-run estimates beside MaxText's measured MFU (TPU v5p)", "",
        cli.markdown_table(COLUMNS, rows(results)), "", _provenance(results), "",
        "The two step estimates come from lower bounds at peak rates (overlap: the largest "
        "bound, a lower bound on the step; serial: their sum, nothing overlapping); they are "
        "not predictions of moe_jax's MFU, and a measurement of the same program usually "
        "falls between them. What the gaps can and "
        "cannot mean: docs/performance.md, \"Beside MaxText's measurements\".", "",
        "Sources of the measurements:", "", *sources, ""])
    TABLE.write_text(text)
    return text


if __name__ == "__main__":
    print(write())
