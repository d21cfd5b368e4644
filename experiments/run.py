"""Run a paper-reproduction suite: every member x seed as its own training process, resumable.

    python -m experiments.run --suite=capacity                     # tiny scale, seeds 0, 1, 2
    python -m experiments.run --suite=switch_scaling --scale=small
    python -m experiments.run --suite=balance --members=lb0,lb1e-2 --seeds=1 --dry_run
    python -m experiments.run --suite=capacity --collect_only       # only rebuild the results
    python -m experiments.run --suite=capacity --set=train.num_train_steps=50 --workdir_root=/tmp/x
    python -m experiments.run --suite=capacity --scale=small --launcher=slurm --slurm.partition=gpu
    python -m experiments.run --suite=capacity --scale=small --status

Each run is `python -m moe_jax.main --config=... --config.<key>=<value> --workdir=DIR` in its own
process, so a crash or a diverged run never stops the sweep. DIR is
<workdir_root>/<scale>/<member>_s<seed> (default workdir_root: experiments/results/<suite>/runs,
git-ignored). A run is skipped when DIR holds a finished summary.json for the same request
(config + overrides, kept in DIR/request.json) or a diverged.json (the training loop's NaN guard
fired: a result, not a runner failure; --retry_diverged reruns those). A killed run resumes from
its last checkpoint. Every invocation ends by collecting all runs of the suite (members x seeds)
into experiments/results/<suite>/<scale>.json and .csv (see experiments/suites/results.py).

--launcher=slurm submits the runs to do as one SLURM job array instead and returns (`--wait`
blocks); --status collects finished runs and shows every run's state (experiments/slurm.py).
"""

from __future__ import annotations

import argparse
import ast
import datetime
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from experiments import run_dir, suites
from experiments.suites import results as results_lib
from experiments.suites import stats
from experiments.suites.base import RunSpec, Suite
from moe_jax import storage

if TYPE_CHECKING:  # experiments.slurm imports this module
    from experiments.slurm import SlurmConfig

RESULTS_ROOT = os.path.join(run_dir.REPO_ROOT, "experiments", "results")
LAUNCHERS = ("local", "slurm")


def results_path(suite: str, scale: str, results_dir: str | None = None) -> str:
    return os.path.join(results_dir or os.path.join(RESULTS_ROOT, suite), f"{scale}.json")


def default_workdir_root(suite: str) -> str:
    return os.path.join(RESULTS_ROOT, suite, "runs")


def save(data: dict[str, Any], path: str, expected: Sequence[dict[str, Any]],
         log: Callable[[str], None] = print) -> None:
    """Writes the results file (JSON + CSV) laid out for `expected` (`results.arrange`)."""
    moved = results_lib.arrange(data, expected)
    if moved:
        log(f"note: {len(moved)} recorded runs have other settings than this invocation's; "
            f"they are kept under other_runs in {path}.")
    data["created"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    data["machine"] = run_dir.machine_info()
    results_lib.write(data, path)


def _prepare(suite: Suite, scale: str, seeds: int, members: Sequence[str],
             workdir_root: str | None, results_dir: str | None,
             extra: Mapping[str, Any] | None) -> tuple[list[RunSpec], list[RunSpec], str, str,
                                                       dict[str, Any], list[dict[str, Any]]]:
    """(all runs, the selected runs, the run directories' root, the results file's path, its
    data, the placeholders of all runs) of an invocation."""
    all_runs = suite.expand(scale, seeds, extra=extra)
    selected = suite.expand(scale, seeds, members, extra=extra)
    for spec in all_runs:  # fail fast: a bad override names the key before any training
        spec.build_config()
    root = os.path.abspath(workdir_root or default_workdir_root(suite.name))
    path = results_path(suite.name, scale, results_dir)
    data = results_lib.load_or_new(path, suite.name, scale, stats.SEED_PAIRED)
    expected = [run_dir.placeholder(spec, run_dir.workdir_of(spec, root)) for spec in all_runs]
    return all_runs, selected, root, path, data, expected


def run_suite(suite: Suite, scale: str = "tiny", seeds: int = 3, members: Sequence[str] = (),
              *, workdir_root: str | None = None, results_dir: str | None = None,
              extra: Mapping[str, Any] | None = None, dry_run: bool = False,
              collect_only: bool = False, retry_diverged: bool = False, replace: bool = False,
              launcher: str = "local", slurm: SlurmConfig | None = None, wait: bool = False,
              poll_seconds: float = 30.0, python: str = sys.executable,
              log: Callable[[str], None] = print) -> str:
    """Runs (or, with dry_run, prints) the runs of `suite` its results file does not hold yet,
    recording each in the file as soon as it finishes; returns the file's path.

    members: restrict what is *run*. A run the results file already holds (same member, seed
    and settings) is skipped, unless `replace` (then it is run again, in a run directory that
    does not hold it yet, and its new entry replaces the recorded one) or `retry_diverged` (for
    diverged runs). A run directory that holds a finished run is collected, not rerun; one
    killed midway resumes from its checkpoint. collect_only: record what the run directories
    hold and run nothing.

    launcher: "local" trains the runs here, one after another; "slurm" submits them as one job
    array with the resources of `slurm` (an `experiments.slurm.SlurmConfig`) and returns at
    once, or, with `wait`, when the array is done (polling every `poll_seconds`), after
    collecting its results (see `experiments.slurm`).
    """
    if launcher not in LAUNCHERS:
        raise ValueError(f"launcher={launcher!r} is unknown; use one of {LAUNCHERS}.")
    if suite.precheck is not None and not collect_only:
        suite.precheck()
    all_runs, selected, root, path, data, expected = _prepare(
        suite, scale, seeds, members, workdir_root, results_dir, extra)
    env = run_dir.environment()
    recorded = json.dumps(data, sort_keys=True, default=str)
    todo = _plan(suite, selected, data, root, replace=replace, retry_diverged=retry_diverged,
                 analyse=not dry_run, python=python, env=env, log=log)
    if dry_run:
        for spec in todo:
            log(spec.command(run_dir.workdir_of(spec, root)))
        log(f"{len(todo)} of {len(selected)} runs to do (dry run: nothing was run or written).")
        return path
    if launcher == "slurm" and not collect_only:
        from experiments import slurm as slurm_lib
        from experiments import slurm_status

        if json.dumps(data, sort_keys=True, default=str) != recorded:  # collected runs
            save(data, path, expected, log)
        slurm_lib.launch(suite, todo, root, slurm or slurm_lib.SlurmConfig(),
                         retry_diverged=retry_diverged, python=python, log=log)
        if wait and todo:
            slurm_lib.wait(todo, root, poll_seconds=poll_seconds, log=log)
            slurm_lib.collect(suite, all_runs, data, root, path, expected, python=python,
                              log=log)
            log(slurm_status.format_states(slurm_status.member_states(selected, data, root)))
        return path
    save(data, path, expected, log)
    start = time.perf_counter()
    for i, spec in enumerate([] if collect_only else todo):
        workdir = run_dir.workdir_of(spec, root)
        run_start = time.perf_counter()
        status = _train(suite, spec, workdir, retry_diverged=retry_diverged, python=python,
                        env=env, log=log)
        results_lib.record(data, run_dir.collect_run(spec, workdir))
        save(data, path, expected, log)
        elapsed = time.perf_counter() - start
        eta = elapsed / (i + 1) * (len(todo) - i - 1)
        summary = run_dir.read_json(os.path.join(workdir, run_dir.SUMMARY_FILE)) or {}
        loss = summary.get("eval_loss") if status == results_lib.FINISHED else None
        log(f"[{i + 1}/{len(todo)}] {spec.workdir_name}: {status} in "
            f"{time.perf_counter() - run_start:.0f} s"
            + (f", val loss {loss:.4f}" if loss is not None else "")
            + (f" (log: {workdir}/{run_dir.LOG_FILE})" if status == results_lib.FAILED else "")
            + f"; recorded in {os.path.relpath(path, run_dir.REPO_ROOT)}; ETA {eta / 60:.1f} min")
    counts = {s: sum(r["status"] == s for r in data["runs"]) for s in (
        results_lib.FINISHED, results_lib.DIVERGED, results_lib.FAILED, results_lib.MISSING)}
    log(f"results: {path} ({', '.join(f'{n} {s}' for s, n in counts.items() if n)})")
    return path


def _plan(suite: Suite, selected: Sequence[RunSpec], data: dict[str, Any], root: str, *,
          replace: bool, retry_diverged: bool, analyse: bool, python: str,
          env: Mapping[str, str], log: Callable[[str], None]) -> list[RunSpec]:
    """The runs to train: `selected` minus those the results file holds and those whose run
    directory holds a result (recorded into `data` here, analysed first if the suite asks)."""
    todo = []
    for spec in selected:
        workdir = run_dir.workdir_of(spec, root)
        entry = {"member": spec.member.name, "seed": spec.seed, "config": spec.config,
                 "overrides": dict(spec.overrides)}
        held = results_lib.recorded(data, entry)
        keep = held is not None and not replace and not (
            retry_diverged and held["status"] == results_lib.DIVERGED)
        unanalysed = (keep and analyse and bool(suite.analysis)
                      and held["status"] == results_lib.FINISHED and not held.get("analysis"))
        if unanalysed:
            log(f"{spec.workdir_name}: recorded without the suite's analysis; analysing its run "
                "directory (or training it again where there is none)")
        elif keep and held["status"] in (results_lib.FINISHED, results_lib.DIVERGED):
            log(f"skip {spec.workdir_name}: {held['status']} in the results file (to check it, "
                "rerun it with --results_dir=DIR for a separate file, or with --replace and a "
                "new --workdir_root to replace the recorded result)")
            continue
        run_dir.check_request(spec, workdir)
        status = run_dir.run_status(spec, workdir)
        if status == results_lib.FINISHED or (status == results_lib.DIVERGED
                                              and not retry_diverged):
            if analyse and status == results_lib.FINISHED:
                _analyse(suite, workdir, python=python, env=env, log=log)
            if analyse:
                results_lib.record(data, run_dir.collect_run(spec, workdir))
            log(f"collected {spec.workdir_name}: {status} in {workdir}")
            continue
        todo.append(spec)
    return todo


def _analyse(suite: Suite, workdir: str, *, python: str, env: Mapping[str, str],
             log: Callable[[str], None]) -> None:
    """Runs the suite's analysis of a finished run once (if it has one)."""
    if suite.analysis and not os.path.exists(os.path.join(workdir, run_dir.ANALYSIS_FILE)):
        log(f"analysing {os.path.basename(workdir)}")
        if not run_dir.run_analysis(suite.analysis, workdir, python=python, env=env):
            log(f"  analysis failed: see {workdir}/analysis.log")


def _train(suite: Suite, spec: RunSpec, workdir: str, *, retry_diverged: bool, python: str,
           env: Mapping[str, str], log: Callable[[str], None]) -> str:
    """Trains one run (resuming its checkpoint if the directory has one) and analyses it."""
    if retry_diverged and os.path.exists(os.path.join(workdir, run_dir.DIVERGED_FILE)):
        os.remove(os.path.join(workdir, run_dir.DIVERGED_FILE))
    status = run_dir.launch(spec, workdir, python=python, env=env)
    if status == results_lib.FINISHED:
        _analyse(suite, workdir, python=python, env=env, log=log)
    return status


def suite_status(suite: Suite, scale: str = "tiny", seeds: int = 3,
                 members: Sequence[str] = (), *, workdir_root: str | None = None,
                 results_dir: str | None = None, extra: Mapping[str, Any] | None = None,
                 python: str = sys.executable, log: Callable[[str], None] = print
                 ) -> list[tuple[RunSpec, str, str]]:
    """Records the finished run directories the results file lacks (collecting again changes
    nothing), then reports every selected run: finished, diverged, pending or running (its
    job), failed (the log and its last error line) or missing. Returns (run, state, detail)."""
    from experiments import slurm as slurm_lib
    from experiments import slurm_status

    all_runs, selected, root, path, data, expected = _prepare(
        suite, scale, seeds, members, workdir_root, results_dir, extra)
    slurm_lib.collect(suite, all_runs, data, root, path, expected, python=python, log=log)
    states = slurm_status.member_states(selected, data, root)
    log(f"{suite.name} at scale {scale}: {len(states)} runs (results: {path}, run "
        f"directories: {os.path.join(root, scale)})")
    log(slurm_status.format_states(states))
    return states


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
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--suite", required=True, help=f"one of {', '.join(suites.SUITES)}")
    parser.add_argument("--scale", default="tiny", help="tiny (2 CPU cores), small (one GPU)")
    parser.add_argument("--seeds", type=int, default=3, help="runs seeds 0..seeds-1")
    parser.add_argument("--members", default="", help="comma-separated members to run")
    parser.add_argument("--workdir_root", default=None, help="where run directories go")
    parser.add_argument("--results_dir", default=None, help="default experiments/results/SUITE")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override for every run, e.g. --set=train.num_train_steps=50")
    parser.add_argument("--dry_run", action="store_true", help="print the commands only")
    parser.add_argument("--collect_only", action="store_true", help="only write the results")
    parser.add_argument("--retry_diverged", action="store_true", help="rerun diverged runs")
    parser.add_argument("--replace", action="store_true",
                        help="rerun runs the results file holds and replace their entries")
    parser.add_argument("--launcher", choices=LAUNCHERS, default="local",
                        help="local: train here, one run after another; slurm: submit the runs "
                        "as one SLURM job array (resources: --slurm.*) and return")
    parser.add_argument("--wait", action="store_true",
                        help="with --launcher=slurm: block until the array is done, then collect")
    parser.add_argument("--status", action="store_true",
                        help="collect finished runs into the results file and show every run's "
                        "state (finished, pending/running with its job, failed, missing)")
    from experiments import slurm as slurm_lib

    slurm_lib.add_flags(parser)
    args = parser.parse_args(argv)
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
            suite_status(*selection, **common)
            return
        run_suite(*selection, **common, dry_run=args.dry_run, collect_only=args.collect_only,
                  retry_diverged=args.retry_diverged, replace=args.replace,
                  launcher=args.launcher, slurm=slurm_lib.config_from_args(args),
                  wait=args.wait)
    except slurm_lib.SlurmError as err:
        raise SystemExit(f"experiments.run: {err}") from err


if __name__ == "__main__":
    main()
