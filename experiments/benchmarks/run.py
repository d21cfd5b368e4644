"""Run the benchmark suites and write JSON + a Markdown table.

    python -m experiments.benchmarks.run                       # everything, full sizes
    python -m experiments.benchmarks.run --only=layer,dropless --quick
    python -m experiments.benchmarks.run --only=ceiling,train --train_small  # small LMs on CPU
    python -m experiments.benchmarks.run --only=ceiling,train --train_small --small_batch=8

Figures are wall-clock medians of repeated runs after a warm-up; compile time is reported apart.
Results go to experiments/benchmarks/results/<platform>-<date>.{json,md} unless --out is given.
Suites run in the order of SUITES whatever the order given (the train suite reads the ceiling's
GFLOP/s for its CPU MFU). Close other work first: on a shared 2-core machine, the load average
in the header says how quiet it was.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import time
from typing import Any

from absl import flags

from experiments.benchmarks import layer, train
from experiments.benchmarks.timing import command_line, machine_info, measured_line
from moe_jax.utils import cli

SUITES = ("ceiling", "layer", "dropless", "growth", "train", "expert_parallel")
RESULTS = pathlib.Path(__file__).parent / "results"


def _run_expert_parallel(quick: bool) -> list[dict[str, Any]]:
    """In a subprocess: simulated CPU devices must be requested before jax starts."""
    out = pathlib.Path(os.environ.get("TMPDIR", "/tmp")) / f"moe_jax_ep_{os.getpid()}.json"
    env = dict(os.environ)
    if "cpu" in (env.get("JAX_PLATFORMS") or "cpu"):
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                            " --xla_force_host_platform_device_count=8").strip()
    subprocess.run([sys.executable, "-m", "experiments.benchmarks.expert_parallel",
                    f"--out={out}"], env=env, check=True)
    result = json.loads(out.read_text())
    out.unlink()
    return result["rows"]


def run(suites: tuple[str, ...], quick: bool, train_small: bool | None = None,
        small_batch: int | None = None) -> dict[str, Any]:
    """Runs `suites` in SUITES order. train_small: time the small LMs in the train suite
    (None: only on a GPU/TPU backend); small_batch: their batch size (None: the scale's 32)."""
    suites = tuple(s for s in SUITES if s in suites)
    shape = layer.LayerShape(256, 512, 2048) if quick else layer.LayerShape()
    repeats = 2 if quick else 5
    rows: list[dict[str, Any]] = []
    for suite in suites:
        print(f"[{suite}]", flush=True)
        start = time.perf_counter()
        if suite == "ceiling":
            rows += layer.ceiling(1024 if quick else 4096, repeats)
            rows.append(layer.memory_bandwidth(64 if quick else 512, repeats))
        elif suite == "layer":
            rows += layer.layer_vs_dense(shape, repeats=repeats)
        elif suite == "dropless":
            rows += layer.dropless_target(shape, repeats=repeats)
        elif suite == "growth":
            sizes = (512, 1024, 2048) if quick else (1024, 2048, 4096, 8192, 16384, 32768)
            rows += layer.growth(shape, sizes, repeats=min(repeats, 3))
        elif suite == "train":
            rows += train.run(quick=quick, small=train_small, small_batch=small_batch,
                              steps=2 if quick else 10,
                              ceiling=[r for r in rows if r["benchmark"] == "ceiling"])
        elif suite == "expert_parallel":
            rows += _run_expert_parallel(quick)
        print(f"[{suite}] {time.perf_counter() - start:.0f} s", flush=True)
    return {"machine": machine_info(), "quick": quick,
            "command": command_line("experiments.benchmarks.run"),
            "rows": rows}


def _ms(row: dict[str, Any]) -> str:
    return f"{row['timing']['median_s'] * 1e3:.1f}"


def _train_table(rows: list[dict[str, Any]]) -> list[str]:
    """The train suite's table (model FLOPs in MFLOP per token; ratios to the dense baseline),
    then the peak each MFU is measured against."""
    if not rows:
        return []
    header = ("train step", "config", "batch x seq", "ms", "tokens/s", "model MFLOP/tok",
              "computed MFLOP/tok", "XLA MFLOP/tok", "MFU", "x dense time",
              "x dense model FLOPs", "peak MB", "compile s")
    cells, sources = [], {}
    for r in rows:
        if "skipped" in r:
            cells.append((f"{r['scale']} {r.get('model', '')}", f"skipped: {r['skipped']}",
                          *[""] * (len(header) - 2)))
            continue
        t, mfu, xla = r["timing"], r.get("mfu"), r.get("xla_flops_per_token")
        ratios = ((f"{r['ratio_step_time']:.2f}", f"{r['ratio_model_flops']:.3f}")
                  if "ratio_step_time" in r else ("", ""))
        cells.append((
            f"{r['scale']} {r['model']}", r["config"], f"{r['batch_size']} x {r['seq_len']}",
            _ms(r), f"{r['tokens_per_s']:.0f}", f"{r['model_flops_per_token'] / 1e6:.2f}",
            f"{r['computed_flops_per_token'] / 1e6:.2f}", f"{xla / 1e6:.2f}" if xla else "",
            f"{mfu:.1%}" if mfu else "", *ratios, f"{(t['peak_bytes'] or 0) / 2**20:.0f}",
            f"{t['compile_s']:.1f}"))
        sources[r["peak_source"]] = r["peak_flops_per_s"]
    lines = [cli.markdown_table(header, cells), ""]
    lines += [f"MFU against {source}" + (f": {peak / 1e9:.0f} GFLOP/s." if peak else ".")
              for source, peak in sources.items()]
    return [*lines, ""]


def to_markdown(result: dict[str, Any]) -> str:
    lines = [measured_line(result["machine"], result["command"]), ""]
    rows = result["rows"]
    ceiling = [r for r in rows if r["benchmark"] == "ceiling"]
    if ceiling:
        lines += [cli.markdown_table(("matmul ceiling", "size", "ms", "GFLOP/s"), [
            (r["dtype"], r["size"], _ms(r), f"{r['gflops_per_s']:.0f}") for r in ceiling]), ""]
    lines += [f"Memory bandwidth: y = 2x over {r['bytes'] / 2**20:.0f} MB of float32, {_ms(r)} ms: "
              f"{r['gbytes_per_s']:.1f} GB/s read + write.\n"
              for r in rows if r["benchmark"] == "bandwidth"]
    table = [r for r in rows if r["benchmark"] == "layer"]
    if table:
        lines += [cli.markdown_table(
            ("pass", "model", "E", "k", "capacity", "dispatch", "ms", "x dense",
             "useful GFLOP/s", "padded GFLOP/s", "peak MB", "compile s"),
            [("fwd+bwd" if r["backward"] else "fwd", r["model"], r.get("num_experts", ""),
              r.get("top_k", ""), r.get("capacity_factor") or "", r.get("dispatch", ""), _ms(r),
              f"{r.get('ratio_to_dense', 1.0):.2f}", f"{r['useful_gflops_per_s']:.0f}",
              f"{r.get('padded_gflops_per_s', r['useful_gflops_per_s']):.0f}",
              f"{(r['timing']['peak_bytes'] or 0) / 2**20:.0f}",
              f"{r['timing']['compile_s']:.1f}") for r in table]), ""]
    for name, title in (("dropless", "dropless vs dense on the routed work (fwd+bwd)"),
                        ("growth", "cost growth with the routing group (fwd+bwd)")):
        part = [r for r in rows if r["benchmark"] == name]
        if not part:
            continue
        cells = []
        for r in part:
            label = r.get("model") or r.get("dispatch")
            if "skipped" in r:
                cells.append((label, r.get("tokens", ""), f"skipped: {r['skipped']}", "", ""))
                continue
            cells.append((label, r.get("tokens", ""), _ms(r),
                          f"{r.get('ratio_to_dense', 1.0):.2f}",
                          f"{(r['timing']['peak_bytes'] or 0) / 2**20:.0f}"))
        lines += [cli.markdown_table((title, "tokens", "ms", "x dense", "peak MB"), cells), ""]
    lines += _train_table([r for r in rows if r["benchmark"] == "train"])
    other = [r for r in rows if r["benchmark"] == "expert_parallel"]
    if other:
        lines.append(cli.markdown_table(
            ("benchmark", "setting", "ms per step", "tokens/s", "MFU"),
            [(r["benchmark"], r.get("model") or f"mesh {r.get('mesh')} {r.get('form')}", _ms(r),
              f"{r['tokens_per_s']:.0f}" if r.get("tokens_per_s") else "",
              f"{r['mfu']:.1%}" if r.get("mfu") else "") for r in other]))
    return "\n".join(lines) + "\n"


def define_flags(values: flags.FlagValues) -> None:
    flags.DEFINE_string("only", ",".join(SUITES), f"comma-separated suites from {SUITES}",
                        flag_values=values)
    flags.DEFINE_bool("quick", False, "small shapes: checks the harness", flag_values=values)
    flags.DEFINE_string("out", None, "output path without extension", flag_values=values)
    flags.DEFINE_bool("train_small", None, "train suite: also time the small LMs on CPU "
                      "(default: only on a GPU/TPU backend)", flag_values=values)
    flags.DEFINE_integer("small_batch", None, "train suite: batch size of the small LMs "
                         "(default: the small scale's 32 rows; at 32 x 512 a step needs 22-26 "
                         "GiB of temporaries on CPU)", flag_values=values)


def main(argv: list[str] | None = None) -> None:
    args, _ = cli.parse_flags(define_flags, argv, __doc__)
    if args.small_batch is not None and args.small_batch < 1:
        cli.usage_error(f"--small_batch={args.small_batch}: give a positive number of rows")
    suites = tuple(s for s in args.only.split(",") if s)
    unknown = set(suites) - set(SUITES)
    if unknown:
        cli.usage_error(f"unknown suites {sorted(unknown)}; choose from {SUITES}")
    result = run(suites, args.quick, args.train_small, args.small_batch)
    if args.out:
        out = pathlib.Path(args.out)
    else:
        stamp = time.strftime("%Y-%m-%d")
        out = RESULTS / f"{result['machine']['platform']}-{stamp}{'-quick' if args.quick else ''}"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    markdown = to_markdown(result)
    out.with_suffix(".md").write_text(markdown)
    print(markdown)
    print(f"wrote {out}.json and {out}.md")


if __name__ == "__main__":
    main()
