"""The steps of running a suite that every launcher shares: which runs an invocation selects and
where they go (`prepare`), which of them are still to train (`plan`, which collects the finished
run directories), training one run and its analysis (`train_run`), and writing the results file
(`save`).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from experiments.library import results as results_lib
from experiments.library import stats
from experiments.library.base import RunSpec, Suite
from experiments.runner import run_dir

RESULTS_ROOT = os.path.join(run_dir.REPO_ROOT, "experiments", "results")
Log = Callable[[str], None]


def results_path(suite: str, scale: str, results_dir: str | None = None) -> str:
    return os.path.join(results_dir or os.path.join(RESULTS_ROOT, suite), f"{scale}.json")


def default_workdir_root(suite: str) -> str:
    return os.path.join(RESULTS_ROOT, suite, "runs")


@dataclasses.dataclass
class Sweep:
    """One invocation over a suite at a scale.

    all_runs: every member x seed; selected: those the invocation may run (`members`);
    root: the run directories' root; path: the results file; data: its contents (updated as
    runs are recorded); expected: the placeholders of all runs (`results.arrange`); recorded:
    `data` as read, to tell whether collecting changed it.
    """

    all_runs: list[RunSpec]
    selected: list[RunSpec]
    root: str
    path: str
    data: dict[str, Any]
    expected: list[dict[str, Any]]
    recorded: str

    def changed(self) -> bool:
        return _dump(self.data) != self.recorded


def _dump(data: dict[str, Any]) -> str:
    return json.dumps(data, sort_keys=True, default=str)


def prepare(suite: Suite, scale: str, seeds: int, members: Sequence[str],
            workdir_root: str | None, results_dir: str | None,
            extra: Mapping[str, Any] | None) -> Sweep:
    """The runs of an invocation, their directories' root and the results file, read."""
    all_runs = suite.expand(scale, seeds, extra=extra)
    selected = suite.expand(scale, seeds, members, extra=extra)
    for spec in all_runs:  # fail fast: a bad override names the key before any training
        spec.build_config()
    root = os.path.abspath(workdir_root or default_workdir_root(suite.name))
    path = results_path(suite.name, scale, results_dir)
    data = results_lib.load_or_new(path, suite.name, scale, stats.SEED_PAIRED)
    expected = [run_dir.placeholder(spec, run_dir.workdir_of(spec, root)) for spec in all_runs]
    return Sweep(all_runs, selected, root, path, data, expected, _dump(data))


def save(sweep: Sweep, log: Log = print) -> None:
    """Writes the results file (JSON + CSV) laid out for all runs (`results.arrange`)."""
    moved = results_lib.arrange(sweep.data, sweep.expected)
    if moved:
        log(f"note: {len(moved)} recorded runs have other settings than this invocation's; "
            f"they are kept under other_runs in {sweep.path}.")
    sweep.data["created"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    sweep.data["machine"] = run_dir.machine_info()
    results_lib.write(sweep.data, sweep.path)


def plan(suite: Suite, selected: Sequence[RunSpec], data: dict[str, Any], root: str, *,
          replace: bool, retry_diverged: bool, analyse: bool, python: str,
          env: Mapping[str, str], log: Log) -> list[RunSpec]:
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
                analyse_run(suite, workdir, python=python, env=env, log=log)
            if analyse:
                results_lib.record(data, run_dir.collect_run(spec, workdir))
            log(f"collected {spec.workdir_name}: {status} in {workdir}")
            continue
        todo.append(spec)
    return todo


def analyse_run(suite: Suite, workdir: str, *, python: str, env: Mapping[str, str],
                log: Log) -> None:
    """Runs the suite's analysis of a finished run once (if it has one)."""
    if suite.analysis and not os.path.exists(os.path.join(workdir, run_dir.ANALYSIS_FILE)):
        log(f"analysing {os.path.basename(workdir)}")
        if not run_dir.run_analysis(suite.analysis, workdir, python=python, env=env):
            log(f"  analysis failed: see {workdir}/analysis.log")


def train_run(suite: Suite, spec: RunSpec, workdir: str, *, retry_diverged: bool, python: str,
              env: Mapping[str, str], log: Log) -> str:
    """Trains one run (resuming its checkpoint if the directory has one) and analyses it."""
    if retry_diverged and os.path.exists(os.path.join(workdir, run_dir.DIVERGED_FILE)):
        os.remove(os.path.join(workdir, run_dir.DIVERGED_FILE))
    status = run_dir.launch(spec, workdir, python=python, env=env)
    if status == results_lib.FINISHED:
        analyse_run(suite, workdir, python=python, env=env, log=log)
    return status


class Launcher(Protocol):
    """How the runs an invocation left to do get trained: here, one after another
    (`local.LocalLauncher`), or as one SLURM job array (`slurm.SlurmLauncher`). Either records
    what it can in the results file of `sweep`."""

    def launch(self, suite: Suite, sweep: Sweep, todo: Sequence[RunSpec], *,
               retry_diverged: bool, python: str, env: Mapping[str, str], log: Log) -> None:
        ...
