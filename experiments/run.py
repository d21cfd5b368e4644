"""Run a paper-reproduction suite: every member x seed as its own training process, resumable.

    python -m experiments.run --suite=capacity                     # tiny scale, seeds 0, 1, 2
    python -m experiments.run --suite=switch_scaling --scale=small
    python -m experiments.run --suite=balance --members=lb0,lb1e-2 --seeds=1 --dry_run
    python -m experiments.run --suite=capacity --collect_only       # only rebuild the results
    python -m experiments.run --suite=capacity --set=train.num_train_steps=50 --workdir_root=/tmp/x
    python -m experiments.run --suite=capacity --scale=small --launcher=slurm --slurm.partition=gpu
    python -m experiments.run --suite=capacity --scale=small --status

Each run is `python -m moe_jax.main --config=... --config.<key>=<value> --workdir=DIR` in its own
process, so a crash or a diverged run never stops the sweep; the results go to
experiments/results/<suite>/<scale>.json and .csv (`experiments.runner.sweep` says how runs are
skipped, resumed and collected). --launcher=slurm submits the runs to do as one SLURM job array
instead and returns (`--wait` blocks); --status collects finished runs and shows every run's
state (`experiments.runner.slurm`).
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Sequence
from typing import Any

from absl import flags

from experiments import suites
from experiments.runner import slurm, sweep
from moe_jax.utils import cli, storage


def define_flags(values: flags.FlagValues) -> None:
    flags.DEFINE_string("suite", None, f"one of {', '.join(suites.SUITES)}", flag_values=values)
    flags.mark_flag_as_required("suite", flag_values=values)
    flags.DEFINE_string("scale", "tiny", "tiny (2 CPU cores), small (one GPU)",
                        flag_values=values)
    flags.DEFINE_integer("seeds", 3, "runs seeds 0..seeds-1", flag_values=values)
    flags.DEFINE_string("members", "", "comma-separated members to run", flag_values=values)
    flags.DEFINE_string("workdir_root", None, "where run directories go", flag_values=values)
    flags.DEFINE_string("results_dir", None, "default experiments/results/SUITE",
                        flag_values=values)
    flags.DEFINE_multi_string("set", [], "KEY=VALUE override for every run, e.g. "
                              "--set=train.num_train_steps=50", flag_values=values)
    flags.DEFINE_bool("dry_run", False, "print the commands only", flag_values=values)
    flags.DEFINE_bool("collect_only", False, "only write the results", flag_values=values)
    flags.DEFINE_bool("retry_diverged", False, "rerun diverged runs", flag_values=values)
    flags.DEFINE_bool("replace", False, "rerun runs the results file holds and replace their "
                      "entries", flag_values=values)
    flags.DEFINE_enum("launcher", "local", sweep.LAUNCHERS, "local: train here, one run after "
                      "another; slurm: submit the runs as one SLURM job array (resources: "
                      "--slurm.*) and return", flag_values=values)
    flags.DEFINE_bool("wait", False, "with --launcher=slurm: block until the array is done, "
                      "then collect", flag_values=values)
    flags.DEFINE_bool("status", False, "collect finished runs into the results file and show "
                      "every run's state (finished, pending/running with its job, failed, "
                      "missing)", flag_values=values)
    slurm.define_flags(values)


def parse_setting(text: str) -> tuple[str, Any]:
    """'train.num_train_steps=50' -> ('train.num_train_steps', 50); values are Python literals
    where they parse as one, else strings."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"--set={text!r} must look like section.key=value, e.g. "
                         "train.num_train_steps=50.")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def main(argv: Sequence[str] | None = None) -> None:
    args, _ = cli.parse_flags(define_flags, argv, __doc__)
    if args.workdir_root and storage.is_url(args.workdir_root):
        raise SystemExit(f"experiments.run: --workdir_root={args.workdir_root}: the suite runner "
                         "keeps its run directories (with run.log, the training's output) on a "
                         "file system; give a local or mounted directory. A single run trains in "
                         "gs:// with python -m moe_jax.main --workdir=gs://BUCKET/PATH.")
    if args.scale == "paper":
        raise SystemExit("the paper scale is not run here; `python -m experiments.report "
                         f"--suite={args.suite}` prints its FLOP/parameter table.")
    common = {"workdir_root": args.workdir_root, "results_dir": args.results_dir,
              "extra": dict(parse_setting(s) for s in args.set)}
    selection = (suites.get(args.suite), args.scale, args.seeds,
                 [m for m in args.members.split(",") if m])
    try:
        if args.status:
            sweep.suite_status(*selection, **common)
            return
        sweep.run_suite(*selection, **common, dry_run=args.dry_run,
                        collect_only=args.collect_only, retry_diverged=args.retry_diverged,
                        replace=args.replace, launcher=args.launcher,
                        slurm=slurm.config_from_flags(args), wait=args.wait)
    except slurm.SlurmError as err:
        raise SystemExit(f"experiments.run: {err}") from err


if __name__ == "__main__":
    main(sys.argv[1:])
