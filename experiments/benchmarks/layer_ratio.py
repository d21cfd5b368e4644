"""The MoE layer against the dense FFN of equal FLOPs, measured in one process, interleaved.

    python -m experiments.benchmarks.layer_ratio                          # top-1, E = 8 and 64
    python -m experiments.benchmarks.layer_ratio --experts=8,64 --rounds=9
    LD_PRELOAD=libtcmalloc_minimal.so.4 python -m experiments.benchmarks.layer_ratio  # tcmalloc

The dense FFN (d_model 512, d_ff 2048, 8192 tokens, gelu) and each MoE layer (top-1 of E experts
of width d_ff, capacity factor 1.0, the default dispatch) are compiled first; then every round
runs each of them once, forward+backward as in the `layer` suite (`layer.vjp_loss`), the order
rotated by one each round. Per member and round: wall-clock time, process CPU time (user +
system, all threads), its system part (the kernel's work: mostly zeroing the fresh pages of the
buffers XLA allocates for each call) and minor page faults, from `getrusage`. A member's ratio to
dense is the median over rounds of its time divided by the dense FFN's time in the same round, so
load that drifts between rounds cancels. On a shared machine CPU time is the steadier figure:
wall-clock time also counts the time other processes held the cores.

Results go to `results/layer-ratio-<platform>-<date>.{json,md}` (or `--out`), with the machine,
date, commit, command, the malloc in use (glibc unless tcmalloc or jemalloc is preloaded), the
load average before and after, and GLIBC_TUNABLES as set. glibc hands every large buffer back to
the kernel when it is freed, so each call faults the pages of its large buffers in again (E=64's
expert gradients are 537 MB); tcmalloc (Debian's libtcmalloc-minimal4) keeps them.
"""

from __future__ import annotations

import json
import os
import pathlib
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
from absl import flags

from experiments.benchmarks.layer import LayerShape, _inputs, vjp_loss
from experiments.benchmarks.timing import command_line, machine_info, measured_line
from moe_jax import MoeConfig, experts, moe
from moe_jax.utils import cli

RESULTS = pathlib.Path(__file__).parent / "results"


def define_flags(values: flags.FlagValues) -> None:
    flags.DEFINE_list("experts", ["8", "64"], "numbers of experts", flag_values=values)
    flags.DEFINE_integer("top_k", 1, "experts per token (expert d_ff = d_ff // top_k)",
                         flag_values=values)
    flags.DEFINE_float("capacity_factor", 1.0, "MoeConfig.capacity_factor", flag_values=values)
    flags.DEFINE_string("dispatch", "gather", "MoeConfig.dispatch", flag_values=values)
    flags.DEFINE_integer("rounds", 7, "interleaved rounds", lower_bound=1, flag_values=values)
    flags.DEFINE_integer("tokens", 8192, "tokens per call", flag_values=values)
    flags.DEFINE_string("out", None, "results JSON path (default: results/layer-ratio-"
                        "<platform>-<date>.json; the .md beside it)", flag_values=values)


def _usage() -> tuple[float, float, int]:
    """(process CPU seconds, of which system, minor page faults) so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime, usage.ru_stime, usage.ru_minflt


class _Member:
    """One compiled fwd+bwd and its per-round figures."""

    def __init__(self, name: str, apply_fn: Callable, params: Any, x: jax.Array,
                 cotangent: jax.Array) -> None:
        self.name, self.args = name, (params, x, cotangent)
        start = time.perf_counter()
        self.compiled = jax.jit(vjp_loss(apply_fn)).lower(*self.args).compile()
        self.compile_s = time.perf_counter() - start
        memory = self.compiled.memory_analysis()
        self.temp_bytes = memory.temp_size_in_bytes if memory else None
        self.output_bytes = memory.output_size_in_bytes if memory else None
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.system: list[float] = []
        self.faults: list[int] = []
        for _ in range(2):  # warm-up
            jax.block_until_ready(self.compiled(*self.args))

    def run(self) -> None:
        cpu, system, faults = _usage()
        start = time.perf_counter()
        out = jax.block_until_ready(self.compiled(*self.args))
        self.wall.append(time.perf_counter() - start)
        cpu_end, system_end, faults_end = _usage()
        self.cpu.append(cpu_end - cpu)
        self.system.append(system_end - system)
        self.faults.append(faults_end - faults)
        del out


def members(shape: LayerShape, num_experts: Sequence[int], top_k: int, capacity_factor: float,
            dispatch: str) -> list[_Member]:
    """The dense FFN, then one MoE layer per E, compiled and warmed up."""
    x, cotangent = _inputs(shape)
    dense = experts.init_ffn(jax.random.key(0), shape.d_model, shape.d_ff, "gelu")
    out = [_Member("dense FFN", lambda p, x: experts.ffn(p, x, "gelu"), dense, x, cotangent)]
    for e in num_experts:
        config = MoeConfig(num_experts=e, top_k=top_k, d_ff=shape.d_ff // top_k,
                           capacity_factor=capacity_factor, dispatch=dispatch,
                           activation="gelu")
        params = moe.init_params(jax.random.key(0), config, shape.d_model)
        out.append(_Member(f"E={e} top-{top_k} {dispatch} cf {capacity_factor}",
                           lambda p, x, c=config: moe.apply(p, x, c, train=True)[0],
                           params, x, cotangent))
    return out


def interleave(group: list[_Member], rounds: int, log=print) -> None:
    """`rounds` rounds, each running every member once, the order rotated by one per round."""
    for r in range(rounds):
        shift = r % len(group)
        for member in group[shift:] + group[:shift]:
            member.run()
        log(f"  round {r + 1}/{rounds}: " + ", ".join(
            f"{m.name} {m.wall[-1] * 1e3:.0f} ms (cpu {m.cpu[-1] * 1e3:.0f})" for m in group))


def rows(group: list[_Member]) -> list[dict[str, Any]]:
    """Per member: medians over rounds and the per-round ratios to the first (dense) member."""
    base = group[0]
    median = statistics.median
    return [{"member": m.name, "wall_ms": median(m.wall) * 1e3, "cpu_ms": median(m.cpu) * 1e3,
             "system_ms": median(m.system) * 1e3,
             "minor_faults": median(m.faults),
             "wall_ratio": median(a / b for a, b in zip(m.wall, base.wall, strict=True)),
             "cpu_ratio": median(a / b for a, b in zip(m.cpu, base.cpu, strict=True)),
             "wall_ratio_range": [min(a / b for a, b in zip(m.wall, base.wall, strict=True)),
                                  max(a / b for a, b in zip(m.wall, base.wall, strict=True))],
             "rounds_wall_s": m.wall, "rounds_cpu_s": m.cpu,
             "rounds_system_s": m.system, "compile_s": m.compile_s,
             "temp_bytes": m.temp_bytes, "output_bytes": m.output_bytes} for m in group]


def table(result_rows: Sequence[dict[str, Any]]) -> str:
    return cli.markdown_table(
        ("fwd+bwd", "wall ms", "x dense (wall)", "range over rounds", "CPU ms", "x dense (CPU)",
         "of which system ms", "minor page faults", "temp + output MB"),
        [(r["member"], f"{r['wall_ms']:.0f}", f"{r['wall_ratio']:.2f}",
          f"{r['wall_ratio_range'][0]:.2f}-{r['wall_ratio_range'][1]:.2f}", f"{r['cpu_ms']:.0f}",
          f"{r['cpu_ratio']:.2f}", f"{r['system_ms']:.0f}", f"{r['minor_faults']:.0f}",
          f"{(r['temp_bytes'] or 0) / 1e6:.0f} + {(r['output_bytes'] or 0) / 1e6:.0f}")
         for r in result_rows])


def main(argv: Sequence[str] | None = None) -> str:
    args, _ = cli.parse_flags(define_flags, argv, __doc__)
    load_before = os.getloadavg()[0]
    shape = LayerShape(tokens=args.tokens)
    group = members(shape, [int(e) for e in args.experts], args.top_k, args.capacity_factor,
                    args.dispatch)
    interleave(group, args.rounds)
    machine = machine_info()
    command = command_line("experiments.benchmarks.layer_ratio", argv)
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    out = args.out or str(RESULTS / f"layer-ratio-{machine['platform']}-"
                                    f"{time.strftime('%Y-%m-%d')}.json")
    result = {"machine": machine, "command": command, "glibc_tunables": tunables,
              "load_average_1m_before": load_before, "rounds": args.rounds,
              "shape": vars(shape), "rows": rows(group)}
    pathlib.Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    text = "\n".join([
        "# MoE layer vs the dense FFN of equal FLOPs, fwd+bwd, interleaved", "",
        measured_line(machine, command) + f" Load average {load_before:.2f} before; "
        f"GLIBC_TUNABLES={tunables or '(unset)'}; {args.rounds} rounds.", "",
        table(result["rows"]), ""])
    with open(out.removesuffix(".json") + ".md", "w") as f:
        f.write(text)
    print(text)
    return out


if __name__ == "__main__":
    main()
