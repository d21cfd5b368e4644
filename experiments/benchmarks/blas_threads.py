"""The CPU BLAS grouped matmul under OpenBLAS thread settings, each setting in a fresh process.

    python -m experiments.benchmarks.blas_threads                      # 3 rounds, every variant
    python -m experiments.benchmarks.blas_threads --rounds=5 --variants=default,timeout4

The grouped matmul's custom call runs numpy's BLAS between XLA's ops. On its own threads,
OpenBLAS busy-waits for its workers during a call, and the workers spin for
2^OPENBLAS_THREAD_TIMEOUT cycles (default 2^28) after it before they sleep, on the cores XLA's
threads need. OpenBLAS reads the variable once, when numpy loads it, so each variant runs in
its own subprocess; rounds alternate the order of the variants so that a change of machine
load falls on all of them.

Variants (`grouped_matmul_cpu.gemm_threads` sets how the custom call runs its GEMMs):
  row_blocks           the default: GEMMs in row blocks on one thread per core, each block a
                       one-thread BLAS call (threadpoolctl), threads that sleep when idle
  blas_threads         gemm_threads=None: each GEMM one BLAS call on OpenBLAS's threads
  blas_threads_timeout4  the same with OPENBLAS_THREAD_TIMEOUT=4 in the environment (what
                       `import moe_jax` set before it stopped changing the environment)
  one_thread           gemm_threads=1: one thread, no row blocks
  blocked              grouped_matmul="blocked": the XLA loop, no BLAS (reference)

Each process times, fwd+bwd, the `dropless` suite's layer (top-2 E=8 swiglu, expert d_ff 2048,
8192 tokens) and the dense swiglu FFN on the same routed work (2 x 8192 tokens, XLA's dot),
and the tiny train steps of dense.py:tiny_swiglu and mixtral.py:e8: median wall-clock time and
median process CPU time (all threads) per run. Results go to results/blas-threads-<date>.json
and .md.
"""

from __future__ import annotations

import json
import os
import pathlib
import statistics
import subprocess
import sys
import time
from typing import Any

from absl import flags

from moe_jax.utils import cli

VARIANTS = ("row_blocks", "blas_threads", "blas_threads_timeout4", "one_thread", "blocked")
RESULTS = pathlib.Path(__file__).parent / "results"
METRICS = ("dense_layer", "dropless_layer", "dense_swiglu_step", "mixtral_step")


def _variant_env(variant: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENBLAS_", "GOTO_"))}
    if variant == "blas_threads_timeout4":
        env["OPENBLAS_THREAD_TIMEOUT"] = "4"
    return env


def child(variant: str) -> dict[str, Any]:
    """Times the four functions in this process (`variant` set up by the parent's environment
    and here)."""
    import jax

    from experiments.benchmarks import layer, train
    from moe_jax import MoeConfig, schema
    from moe_jax.kernels import grouped_matmul_cpu

    if variant.startswith("blas_threads"):
        grouped_matmul_cpu.gemm_threads = None
    elif variant == "one_thread":
        grouped_matmul_cpu.gemm_threads = 1
    impl = "blocked" if variant == "blocked" else "blas"
    shape = layer.LayerShape()
    out: dict[str, Any] = {"variant": variant, "load_before": os.getloadavg()[0],
                           "OPENBLAS_THREAD_TIMEOUT": os.environ.get("OPENBLAS_THREAD_TIMEOUT"),
                           "gemm_threads": grouped_matmul_cpu.gemm_threads}
    dense = layer.time_dense(shape, "swiglu", backward=True, tokens=2 * shape.tokens)
    config = MoeConfig(num_experts=8, top_k=2, d_ff=shape.d_ff, dispatch="dropless",
                       activation="swiglu", grouped_matmul=impl)
    moe = layer.time_moe(shape, config, backward=True)
    steps = {}
    for name, spec, settings in (("dense_swiglu_step", "dense.py:tiny_swiglu", {}),
                                 ("mixtral_step", "mixtral.py:e8",
                                  {"moe.grouped_matmul": impl})):
        config = schema.override(train.scale_config(spec, "tiny"), settings)
        steps[name] = train.time_train_step(config, steps=10, warmup=2)
    for name, result in (("dense_layer", dense), ("dropless_layer", moe), *steps.items()):
        t = result["timing"]
        out[name] = {"ms": t["median_s"] * 1e3, "cpu_ms": t["cpu_median_s"] * 1e3,
                     "min_ms": t["min_s"] * 1e3}
    out["load_after"] = os.getloadavg()[0]
    out["jax"] = jax.__version__
    return out


def run(rounds: int, variants: tuple[str, ...]) -> dict[str, Any]:
    from experiments.benchmarks.timing import command_line, machine_info

    rows = []
    out = pathlib.Path(os.environ.get("TMPDIR", "/tmp")) / f"blas_threads_{os.getpid()}.json"
    for r in range(rounds):
        order = variants if r % 2 == 0 else variants[::-1]
        for variant in order:
            subprocess.run([sys.executable, "-m", "experiments.benchmarks.blas_threads",
                            f"--child={variant}", f"--out={out}"], env=_variant_env(variant),
                           check=True)
            row = json.loads(out.read_text())
            out.unlink()
            row["round"] = r
            rows.append(row)
            print(f"  round {r} {variant:21} " + " ".join(
                f"{m} {row[m]['ms']:.0f} ms" for m in METRICS)
                + f" (load {row['load_before']:.1f} -> {row['load_after']:.1f})", flush=True)
    return {"machine": machine_info(), "rounds": rounds,
            "command": command_line("experiments.benchmarks.blas_threads"),
            "rows": rows}


def summary(rows: list[dict[str, Any]], variants: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """Per variant: the median over rounds of each metric (wall and CPU ms), and of the
    per-process ratios dropless/dense layer and mixtral/dense_swiglu step; the fastest run of
    each metric over all rounds (`_min`), and the ratios of those."""
    table = {}
    for variant in variants:
        mine = [r for r in rows if r["variant"] == variant]
        if not mine:
            continue
        entry = {}
        for m in METRICS:
            entry[m] = statistics.median(r[m]["ms"] for r in mine)
            entry[m + "_cpu"] = statistics.median(r[m]["cpu_ms"] for r in mine)
            entry[m + "_min"] = min(r[m]["min_ms"] for r in mine)
        entry["layer_ratio"] = statistics.median(
            r["dropless_layer"]["ms"] / r["dense_layer"]["ms"] for r in mine)
        entry["step_ratio"] = statistics.median(
            r["mixtral_step"]["ms"] / r["dense_swiglu_step"]["ms"] for r in mine)
        entry["layer_ratio_min"] = entry["dropless_layer_min"] / entry["dense_layer_min"]
        entry["step_ratio_min"] = entry["mixtral_step_min"] / entry["dense_swiglu_step_min"]
        entry["load"] = statistics.median(r["load_before"] for r in mine)
        table[variant] = entry
    return table


def to_markdown(result: dict[str, Any], variants: tuple[str, ...]) -> str:
    from experiments.benchmarks.timing import measured_line

    rows = result["rows"]
    loads = [r[k] for r in rows for k in ("load_before", "load_after")]
    lines = [measured_line(result["machine"], result["command"]),
             f"Load average (1 min) during the runs: {min(loads):.2f}-{max(loads):.2f}.", "",
             "Medians over rounds of each process's median (wall ms, and CPU ms of all the "
             "process's threads); ratios are taken within each process, then the median.", ""]
    table = summary(rows, variants)
    lines.append(cli.markdown_table(
        ("variant", "dense layer ms", "dropless layer ms (CPU)", "x dense",
         "dense swiglu step ms", "mixtral step ms (CPU)", "x dense", "load"),
        [(variant, f"{e['dense_layer']:.0f}",
          f"{e['dropless_layer']:.0f} ({e['dropless_layer_cpu']:.0f})", f"{e['layer_ratio']:.2f}",
          f"{e['dense_swiglu_step']:.1f}",
          f"{e['mixtral_step']:.1f} ({e['mixtral_step_cpu']:.0f})", f"{e['step_ratio']:.2f}",
          f"{e['load']:.1f}") for variant, e in table.items()]))
    lines += ["", "Fastest single run over all rounds (least disturbed by other work):", "",
              cli.markdown_table(
                  ("variant", "dense layer ms", "dropless layer ms", "x dense",
                   "dense swiglu step ms", "mixtral step ms", "x dense"),
                  [(variant, f"{e['dense_layer_min']:.0f}", f"{e['dropless_layer_min']:.0f}",
                    f"{e['layer_ratio_min']:.2f}", f"{e['dense_swiglu_step_min']:.1f}",
                    f"{e['mixtral_step_min']:.1f}", f"{e['step_ratio_min']:.2f}")
                   for variant, e in table.items()])]
    lines += ["", "Every process, in the order run:", "", cli.markdown_table(
        ("round", "variant", "dense layer", "dropless layer", "dense swiglu step",
         "mixtral step", "load before -> after"),
        [(r["round"], r["variant"], *(f"{r[m]['ms']:.0f} ({r[m]['cpu_ms']:.0f} CPU)"
                                      for m in METRICS),
          f"{r['load_before']:.2f} -> {r['load_after']:.2f}") for r in rows])]
    return "\n".join(lines) + "\n"


def define_flags(values: flags.FlagValues) -> None:
    flags.DEFINE_integer("rounds", 3, "rounds over all variants", flag_values=values)
    flags.DEFINE_string("variants", ",".join(VARIANTS), f"comma-separated, from {VARIANTS}",
                        flag_values=values)
    flags.DEFINE_string("out", None, "output path without extension", flag_values=values)
    flags.DEFINE_string("child", None, "(internal) measure this variant in this process",
                        flag_values=values)


def main(argv: list[str] | None = None) -> None:
    args, _ = cli.parse_flags(define_flags, argv, __doc__)
    if args.child:
        pathlib.Path(args.out).write_text(json.dumps(child(args.child)))
        return
    variants = tuple(v for v in args.variants.split(",") if v)
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        cli.usage_error(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}")
    result = run(args.rounds, variants)
    out = pathlib.Path(args.out) if args.out else (
        RESULTS / f"blas-threads-{result['machine']['platform']}-{time.strftime('%Y-%m-%d')}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    markdown = to_markdown(result, variants)
    out.with_suffix(".md").write_text(markdown)
    print(markdown)
    print(f"wrote {out}.json and {out}.md")


if __name__ == "__main__":
    main()
