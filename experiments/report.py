"""Report a suite: results file -> Markdown tables, PNG figures and a verdict per paper claim.

    python -m experiments.report --suite=capacity                 # tiny results
    python -m experiments.report --suite=switch_scaling --scale=small
    python -m experiments.report --suite=granularity --flops_only # paper-scale accounting only
    python -m experiments.report --reproduction                   # claims of every results file
                                                                  # -> experiments/REPRODUCTION.md

Reads experiments/results/<suite>/<scale>.json (written by experiments.run), writes
<scale>.md and <scale>_<figure>.png next to it and prints the Markdown
(`experiments.analyses.report` says what the tables and verdicts hold).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from absl import flags

from experiments import suites
from experiments.analyses import report
from experiments.library.results import Results
from moe_jax.utils import cli


def define_flags(values: flags.FlagValues) -> None:
    flags.DEFINE_string("suite", None, f"one of {', '.join(suites.SUITES)}", flag_values=values)
    flags.DEFINE_string("scale", "tiny", "the scale whose results to report", flag_values=values)
    flags.DEFINE_string("results_dir", None, "default experiments/results/SUITE",
                        flag_values=values)
    flags.DEFINE_bool("flops_only", False, "print the FLOP/parameter tables (paper scale too) "
                      "and stop", flag_values=values)
    flags.DEFINE_bool("reproduction", False, "rewrite the claims table of "
                      "experiments/REPRODUCTION.md from every results file under "
                      "experiments/results and stop", flag_values=values)


def main(argv: Sequence[str] | None = None) -> None:
    args, _ = cli.parse_flags(define_flags, argv, __doc__)
    if args.reproduction:
        print(report.write_reproduction())
        print(f"wrote {report.REPRODUCTION_PATH}")
        return
    if not args.suite:
        cli.usage_error("--suite is required (or pass --reproduction)")
    suite = suites.get(args.suite)
    out_dir = args.results_dir or os.path.join(report.EXPERIMENTS_DIR, "results", suite.name)
    if args.flops_only:
        for scale in ("tiny", "small", "paper"):
            print(f"## {suite.name} at scale {scale}\n\n{report.flops_table(suite, scale)}\n")
        return
    results = Results.load(os.path.join(out_dir, f"{args.scale}.json"))
    if results.suite != suite.name:
        raise ValueError(f"{out_dir}/{args.scale}.json holds suite {results.suite!r}, not "
                         f"{suite.name!r}; pass the matching --suite or --results_dir.")
    text = report.build(suite, results, out_dir)
    path = os.path.join(out_dir, f"{args.scale}.md")
    with open(path, "w") as f:
        f.write(text)
    print(text)
    print(f"wrote {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
