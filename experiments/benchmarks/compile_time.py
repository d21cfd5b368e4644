"""Compile time of the 24-layer base train steps, blocks unrolled vs scanned (`model.scan_layers`).

    python -m experiments.benchmarks.compile_time      # -> results/compile-<platform>-<date>.*

Lowers and compiles (no step runs) the real jitted train step (`train.jitted.setup`) of
`dense.py:base` and `switch.py:base_e128` on one device of the default backend, for a batch of
8 sequences of 512 tokens, unrolled and scanned: the traced program holds 24 blocks or one
repeating unit (a dense block; a dense and a sparse block), so compile time stops growing with
depth. Wall-clock seconds on a shared machine: the header gives the load.
"""

from __future__ import annotations

import json
import pathlib
import time
from typing import Any

from absl import flags

from experiments.benchmarks.timing import command_line, machine_info, measured_line
from moe_jax.utils import cli

CONFIGS = ("configs/dense.py:base", "configs/switch.py:base_e128")
SETTINGS = {"train.batch_size": 8, "model.dtype": "bfloat16"}
RESULTS = pathlib.Path(__file__).parent / "results"


def compile_seconds(spec: str, scan: bool) -> dict[str, Any]:
    from moe_jax import schema
    from moe_jax.train import jitted

    experiment = schema.parse_config(schema.override(schema.load_config(spec), {
        **SETTINGS, "model.scan_layers": scan}))
    seq_len = experiment.model.max_seq_len
    _, fns = jitted.setup(experiment, seq_len)
    start = time.perf_counter()
    lowered = fns["train_step"].lower(fns["abstract_state"], fns["abstract_batch"])
    lowered_at = time.perf_counter()
    lowered.compile()
    done = time.perf_counter()
    return {"config": spec, "scan_layers": scan, "lower_s": lowered_at - start,
            "compile_s": done - lowered_at, "total_s": done - start}


def define_flags(values: flags.FlagValues) -> None:
    flags.DEFINE_string("out", None, "results path stem", flag_values=values)


def main(argv: list[str] | None = None) -> None:
    args, _ = cli.parse_flags(define_flags, argv, __doc__)
    rows = []
    for spec in CONFIGS:
        for scan in (False, True):
            rows.append(compile_seconds(spec, scan))
            print(rows[-1], flush=True)
    machine = machine_info()
    command = command_line("experiments.benchmarks.compile_time")
    stem = pathlib.Path(args.out) if args.out else RESULTS / (
        f"compile-{machine['platform']}-{machine['date'][:10]}")
    lines = [measured_line(machine, command), "", cli.markdown_table(
        ("config", "blocks", "lower s", "compile s", "total s"),
        [(r["config"], "scanned" if r["scan_layers"] else "unrolled", f"{r['lower_s']:.1f}",
          f"{r['compile_s']:.1f}", f"{r['total_s']:.1f}") for r in rows])]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    stem.with_suffix(".json").write_text(json.dumps({"machine": machine, "command": command,
                                                     "rows": rows}, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
