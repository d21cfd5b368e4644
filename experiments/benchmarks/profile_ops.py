"""Where the time of one MoE layer (or the dense FFN) goes: per-op times of its compiled
forward+backward, from a `jax.profiler` trace.

    python -m experiments.benchmarks.profile_ops                           # top-1 E=8 gather
    python -m experiments.benchmarks.profile_ops --experts=64 --top_k=2
    python -m experiments.benchmarks.profile_ops --dispatch=dropless --activation=swiglu
    python -m experiments.benchmarks.profile_ops --dense --tokens=16384 --activation=swiglu

Each compiled op (fusion, dot, gather, scatter, loop) is listed with its mean time per step,
its output shape and the jax operation it came from (the HLO `op_name`). On CPU the trace has
per-op events only with `--xla_cpu_enable_xprof_traceme=true`, which this script adds to
XLA_FLAGS before jax starts. Read the times as a guide, not a sum: ops can run concurrently on
XLA:CPU's thread pool, and a dot handed to Eigen's thread pool is traced only while it is
launched. Shapes follow the `layer` suite (d_model 512, dense d_ff 2048, expert d_ff halved
for top-2).
"""

from __future__ import annotations

import os

from absl import flags

from moe_jax.utils import cli

if "--xla_cpu_enable_xprof_traceme" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_cpu_enable_xprof_traceme=true").strip()

import collections
import gzip
import json
import pathlib
import re
import tempfile

import jax

from experiments.benchmarks.layer import vjp_loss
from moe_jax import MoeConfig, experts, moe

_HLO_OP = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\S+?)(?:\{[^}]*\})? ")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def hlo_ops(hlo_text: str) -> dict[str, tuple[str, str]]:
    """Instruction name -> (output shape, jax op_name) of every instruction in the HLO text."""
    ops = {}
    for line in hlo_text.splitlines():
        match = _HLO_OP.match(line)
        if match:
            op_name = _OP_NAME.search(line)
            ops[match.group(1)] = (match.group(2), op_name.group(1) if op_name else "")
    return ops


def op_times(trace_dir: str, steps: int) -> collections.Counter:
    """Mean milliseconds per step of each traced event, from the trace under `trace_dir`."""
    files = list(pathlib.Path(trace_dir).rglob("*.trace.json.gz"))
    if not files:
        raise FileNotFoundError(f"no *.trace.json.gz under {trace_dir}: did jax.profiler run?")
    with gzip.open(files[0]) as f:
        events = json.load(f)["traceEvents"]
    totals: collections.Counter = collections.Counter()
    for event in events:
        if event.get("ph") == "X":
            totals[event["name"]] += event["dur"] / 1e3 / steps
    return totals


def profile(apply_fn, params, x, steps: int = 3, top: int = 30) -> list[tuple[float, str, str,
                                                                              str]]:
    """[(ms per step, op, output shape, jax op_name)] of fwd+bwd, largest first."""
    cotangent = jax.random.normal(jax.random.key(2), x.shape, x.dtype)
    step = jax.jit(vjp_loss(apply_fn))
    ops = hlo_ops(step.lower(params, x, cotangent).compile().as_text())
    jax.block_until_ready(step(params, x, cotangent))
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            for _ in range(steps):
                jax.block_until_ready(step(params, x, cotangent))
        totals = op_times(trace_dir, steps)
    rows = [(ms, name, *ops[name]) for name, ms in totals.most_common() if name in ops]
    return rows[:top]


def define_flags(values: flags.FlagValues) -> None:
    flags.DEFINE_bool("dense", False, "the dense FFN instead", flag_values=values)
    flags.DEFINE_integer("experts", 8, "experts", flag_values=values)
    flags.DEFINE_integer("top_k", 1, "experts per token", flag_values=values)
    flags.DEFINE_string("dispatch", "gather", "MoeConfig.dispatch", flag_values=values)
    flags.DEFINE_float("capacity_factor", 1.0, "MoeConfig.capacity_factor", flag_values=values)
    flags.DEFINE_string("activation", "gelu", "FFN activation", flag_values=values)
    flags.DEFINE_integer("tokens", 8192, "tokens per step", flag_values=values)
    flags.DEFINE_integer("d_ff", 2048, "dense width; experts get d_ff // top_k (dropless: d_ff)",
                         flag_values=values)
    flags.DEFINE_integer("steps", 3, "profiled steps", flag_values=values)
    flags.DEFINE_enum("dtype", "float32", ("float32", "bfloat16"), "activation dtype "
                      "(parameters stay float32 and are cast)", flag_values=values)


def main(argv: list[str] | None = None) -> None:
    args, _ = cli.parse_flags(define_flags, argv, __doc__)
    d_model = 512
    x = jax.random.normal(jax.random.key(1), (args.tokens, d_model)).astype(args.dtype)
    if args.dense:
        params = experts.init_ffn(jax.random.key(0), d_model, args.d_ff, args.activation)
        apply_fn = lambda p, x: experts.ffn(p, x, args.activation)
        title = f"dense FFN d_ff {args.d_ff}"
    else:
        d_ff = args.d_ff if args.dispatch == "dropless" else args.d_ff // args.top_k
        config = MoeConfig(num_experts=args.experts, top_k=args.top_k, d_ff=d_ff,
                           capacity_factor=args.capacity_factor, dispatch=args.dispatch,
                           activation=args.activation)
        params = moe.init_params(jax.random.key(0), config, d_model)
        apply_fn = lambda p, x: moe.apply(p, x, config, train=True)[0]
        title = f"MoE E={args.experts} top-{args.top_k} {args.dispatch} expert d_ff {d_ff}"
    print(f"{title}, {args.activation}, {args.tokens} tokens, {args.dtype}, fwd+bwd; ms per step "
          f"(mean of {args.steps}) on {jax.devices()[0].device_kind}")
    for ms, name, shape, op_name in profile(apply_fn, params, x, args.steps):
        print(f"{ms:8.1f}  {name:34} {shape:22} {op_name}")


if __name__ == "__main__":
    main()
