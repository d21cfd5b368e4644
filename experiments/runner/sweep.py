"""Running a paper-reproduction suite: every member x seed as its own training process,
resumable (`run_suite`), and the state of every run (`suite_status`). `python -m
experiments.run` is the command line of both.

Each run is `python -m moe_jax.main --config=... --config.<key>=<value> --workdir=DIR` in its own
process, so a crash or a diverged run never stops the sweep. DIR is
<workdir_root>/<scale>/<member>_s<seed> (default workdir_root: experiments/results/<suite>/runs,
git-ignored). A run is skipped when DIR holds a finished summary.json for the same request
(config + overrides, kept in DIR/request.json) or a diverged.json (the training loop's NaN guard
fired: a result, not a runner failure; retry_diverged reruns those). A killed run resumes from
its last checkpoint. Every invocation ends by collecting all runs of the suite (members x seeds)
into experiments/results/<suite>/<scale>.json and .csv (see experiments/library/results.py).
The runs to do are trained by a launcher (`steps.Launcher`): here, one after another, or as one
SLURM job array (`experiments.runner.slurm`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from experiments.library.base import RunSpec, Suite
from experiments.runner import local, run_dir, slurm_status, steps
from experiments.runner import slurm as slurm_lib

LAUNCHERS = ("local", "slurm")


def run_suite(suite: Suite, scale: str = "tiny", seeds: int = 3, members: Sequence[str] = (),
              *, workdir_root: str | None = None, results_dir: str | None = None,
              extra: Mapping[str, Any] | None = None, dry_run: bool = False,
              collect_only: bool = False, retry_diverged: bool = False, replace: bool = False,
              launcher: str = "local", slurm: slurm_lib.SlurmConfig | None = None,
              wait: bool = False, poll_seconds: float = 30.0, python: str = sys.executable,
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
    array with the resources of `slurm` (an `experiments.runner.slurm.SlurmConfig`) and returns
    at once, or, with `wait`, when the array is done (polling every `poll_seconds`), after
    collecting its results (see `experiments.runner.slurm`).
    """
    if launcher not in LAUNCHERS:
        raise ValueError(f"launcher={launcher!r} is unknown; use one of {LAUNCHERS}.")
    if suite.precheck is not None and not collect_only:
        suite.precheck()
    sweep = steps.prepare(suite, scale, seeds, members, workdir_root, results_dir, extra)
    env = run_dir.environment()
    todo = steps.plan(suite, sweep.selected, sweep.data, sweep.root, replace=replace,
                      retry_diverged=retry_diverged, analyse=not dry_run, python=python,
                      env=env, log=log)
    if dry_run:
        for spec in todo:
            log(spec.command(run_dir.workdir_of(spec, sweep.root)))
        log(f"{len(todo)} of {len(sweep.selected)} runs to do (dry run: nothing was run or "
            "written).")
        return sweep.path
    chosen: steps.Launcher = local.LocalLauncher()
    if launcher == "slurm" and not collect_only:
        chosen = slurm_lib.SlurmLauncher(slurm or slurm_lib.SlurmConfig(), wait=wait,
                                         poll_seconds=poll_seconds)
    chosen.launch(suite, sweep, [] if collect_only else todo, retry_diverged=retry_diverged,
                  python=python, env=env, log=log)
    return sweep.path


def suite_status(suite: Suite, scale: str = "tiny", seeds: int = 3,
                 members: Sequence[str] = (), *, workdir_root: str | None = None,
                 results_dir: str | None = None, extra: Mapping[str, Any] | None = None,
                 python: str = sys.executable, log: Callable[[str], None] = print
                 ) -> list[tuple[RunSpec, str, str]]:
    """Records the finished run directories the results file lacks (collecting again changes
    nothing), then reports every selected run: finished, diverged, pending or running (its
    job), failed (the log and its last error line) or missing. Returns (run, state, detail)."""
    sweep = steps.prepare(suite, scale, seeds, members, workdir_root, results_dir, extra)
    slurm_lib.collect(suite, sweep, python=python, log=log)
    states = slurm_status.member_states(sweep.selected, sweep.data, sweep.root)
    log(f"{suite.name} at scale {scale}: {len(states)} runs (results: {sweep.path}, run "
        f"directories: {os.path.join(sweep.root, scale)})")
    log(slurm_status.format_states(states))
    return states
