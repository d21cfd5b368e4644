"""Training throughput of a suite's members, measured together: the time basis of its speed-ups.

    python -m experiments.benchmarks.suite_throughput --suite=switch_scaling --scale=mini

Each member's real train step (its exact run settings at seed 0: `RunSpec.build_config`, the
jitted step of `train.jitted.setup`, donating its state) is compiled once, then all members are
timed in one process, interleaved: `--rounds` rounds, each timing `--steps` consecutive steps of
every member, the member order rotated by one each round so that no member always follows the
same one. A member's tokens/s is the median over rounds of batch tokens / mean step time; the
rounds' spread is reported beside it. The steps run on a synthetic batch (random tokens, one
document per row, `train.synthetic_batch`) from a fresh initialisation, so input-pipeline time is
excluded, and the routing is that of an untrained router (it changes what a dropless step
computes, not what a capacity step computes).

The file goes beside the suite's results as `<scale>_throughput.json` (+ `.md`), where
`experiments.library.results.Results.load` reads it: the report's time-basis claims then take
each run's training seconds as steps x tokens/step / this rate, rather than the rates the runs
logged while the machine did other work. Close every other job first: the header records the
load average before and after.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Sequence
from typing import Any

import jax
from absl import flags

from experiments import suites
from experiments.benchmarks.timing import command_line, machine_info, measured_line
from experiments.benchmarks.train import synthetic_batch
from experiments.library import base
from experiments.library.results import THROUGHPUT_SUFFIX
from experiments.runner.steps import results_path
from moe_jax import schema
from moe_jax.analysis import flops
from moe_jax.train import jitted, placement
from moe_jax.utils import cli


def define_flags(values: flags.FlagValues) -> None:
    flags.DEFINE_string("suite", "switch_scaling", "the suite whose members are timed",
                        flag_values=values)
    flags.DEFINE_string("scale", "mini", "the scale (its training settings)", flag_values=values)
    flags.DEFINE_list("members", [], "members to time (default: all of the scale)",
                      flag_values=values)
    flags.DEFINE_integer("rounds", 7, "interleaved rounds", lower_bound=1, flag_values=values)
    flags.DEFINE_integer("steps", 20, "consecutive steps of a member per round", lower_bound=1,
                         flag_values=values)
    flags.DEFINE_integer("warmup", 3, "untimed steps after compiling", lower_bound=0,
                         flag_values=values)
    flags.DEFINE_string("out", None, "the JSON file to write (default: beside the suite's "
                        "results, <scale>_throughput.json)", flag_values=values)
    flags.DEFINE_bool("overwrite", False, "replace an existing file", flag_values=values)


class _Member:
    """One member's compiled train step, its state and batch."""

    def __init__(self, spec: base.RunSpec) -> None:
        self.name = spec.member.name
        self.config = spec.config
        experiment = schema.parse_config(spec.build_config())
        train = experiment.train
        seq_len = train.seq_len or experiment.model.max_seq_len
        _, fns = jitted.setup(experiment, seq_len)
        self.step_fn = fns["train_step"]
        self.state = fns["init"](experiment.seed)
        self.batch = placement.global_batch(
            synthetic_batch(train.batch_size, seq_len, experiment.model.vocab_size),
            fns["batch_sharding"], train.batch_size)
        self.tokens_per_step = train.batch_size * seq_len
        count = flops.count_model(experiment.model, experiment.moe, seq_len=seq_len,
                                  tokens_per_group=train.micro_batch_size * seq_len)
        self.train_flops_per_token = count.training_flops_per_token
        self.params_total = count.total_params
        start = time.perf_counter()
        self.run(1)
        self.compile_s = time.perf_counter() - start
        self.rates: list[float] = []

    def run(self, steps: int) -> float:
        """Runs `steps` steps; returns their wall-clock seconds."""
        start = time.perf_counter()
        for _ in range(steps):
            self.state, _ = self.step_fn(self.state, self.batch)
        jax.block_until_ready(self.state)
        return time.perf_counter() - start


def measure(specs: Sequence[base.RunSpec], rounds: int, steps: int, warmup: int,
            log=print) -> list[dict[str, Any]]:
    """Compiles every member, then times them in `rounds` interleaved rounds; one row each."""
    members = []
    for spec in specs:
        members.append(_Member(spec))
        members[-1].run(warmup)
        log(f"  compiled {members[-1].name} in {members[-1].compile_s:.1f} s")
    for r in range(rounds):
        shift = r % len(members)
        for member in members[shift:] + members[:shift]:
            member.rates.append(member.tokens_per_step * steps / member.run(steps))
        log(f"  round {r + 1}/{rounds}: " + ", ".join(
            f"{m.name} {m.rates[-1]:.0f}" for m in members) + " tokens/s")
    return [{"member": m.name, "config": m.config, "tokens_per_s": statistics.median(m.rates),
             "min_tokens_per_s": min(m.rates), "max_tokens_per_s": max(m.rates),
             "rounds_tokens_per_s": m.rates, "tokens_per_step": m.tokens_per_step,
             "train_flops_per_token": m.train_flops_per_token, "params_total": m.params_total,
             "compile_s": m.compile_s} for m in members]


def table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown: each member's tokens/s (median, range over rounds) and relative to the first."""
    first = rows[0]["tokens_per_s"]
    return cli.markdown_table(
        ("member", "config", "tokens/s (median)", "range over rounds", f"vs {rows[0]['member']}",
         "train FLOPs/token", "params"),
        [(r["member"], r["config"], f"{r['tokens_per_s']:.0f}",
          f"{r['min_tokens_per_s']:.0f}-{r['max_tokens_per_s']:.0f}",
          f"{r['tokens_per_s'] / first:.2f}x", flops.human(r["train_flops_per_token"]),
          flops.human(r["params_total"])) for r in rows])


def main(argv: Sequence[str] | None = None) -> str:
    args, _ = cli.parse_flags(define_flags, argv, __doc__)
    suite = suites.get(args.suite)
    specs = [s for s in suite.expand(args.scale, 1, args.members) if s.seed == 0]
    out = args.out or results_path(suite.name, args.scale).removesuffix(".json") \
        + THROUGHPUT_SUFFIX
    if os.path.exists(out) and not args.overwrite:
        raise SystemExit(f"{out} exists; nothing was measured. Pass --overwrite to replace it or "
                         "--out=PATH to write elsewhere.")
    load_before = os.getloadavg()[0]
    print(f"timing {len(specs)} members of {suite.name} ({args.scale}): {args.rounds} rounds x "
          f"{args.steps} steps, load average {load_before:.2f}", flush=True)
    rows = measure(specs, args.rounds, args.steps, args.warmup)
    machine = machine_info()
    command = command_line("experiments.benchmarks.suite_throughput", argv)
    result = {"suite": suite.name, "scale": args.scale, "machine": machine, "command": command,
              "load_average_1m_before": load_before, "rounds": args.rounds, "steps": args.steps,
              "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    text = "\n".join([
        f"# Training throughput of {suite.name} ({args.scale}), members interleaved", "",
        measured_line(machine, command) + f" Load average {load_before:.2f} before.", "",
        table(rows), ""])
    with open(out.removesuffix(".json") + ".md", "w") as f:
        f.write(text)
    print(text)
    return out


if __name__ == "__main__":
    main()
