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
import math
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from experiments import suites
from experiments.suites import results as results_lib
from experiments.suites import stats
from experiments.suites.base import RunSpec, Suite
from moe_jax.train.metrics import write_json

if TYPE_CHECKING:  # experiments.slurm imports this module
    from experiments.slurm import SlurmConfig

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_ROOT = os.path.join(REPO_ROOT, "experiments", "results")
REQUEST_FILE, SUMMARY_FILE, DIVERGED_FILE = "request.json", "summary.json", "diverged.json"
RUN_INFO_FILE, LOG_FILE, ANALYSIS_FILE = "run_info.json", "run.log", "analysis.json"
LAUNCHERS = ("local", "slurm")
_DIVERGED = re.compile(r"NonFiniteLossError: training loss is (\S+) at step (\d+)")
LOG_TAIL_LINES = 25


class WorkdirConflictError(ValueError):
    """A run directory holds a run of a different config or overrides."""


def results_path(suite: str, scale: str, results_dir: str | None = None) -> str:
    return os.path.join(results_dir or os.path.join(RESULTS_ROOT, suite), f"{scale}.json")


def default_workdir_root(suite: str) -> str:
    return os.path.join(RESULTS_ROOT, suite, "runs")


def _request(spec: RunSpec) -> dict[str, Any]:
    """What a run directory was created for, normalised through JSON (tuples -> lists)."""
    return json.loads(json.dumps({"config": spec.config, "overrides": dict(spec.overrides)}))


def _read_json(path: str) -> Any:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _tail(path: str, lines: int = LOG_TAIL_LINES) -> str:
    if not os.path.exists(path):
        return ""
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:])


def check_request(spec: RunSpec, workdir: str) -> None:
    """Raises WorkdirConflictError if `workdir` was made for another request."""
    previous = _read_json(os.path.join(workdir, REQUEST_FILE))
    if previous is not None and previous != _request(spec):
        changed = sorted(k for k in set(previous["overrides"]) | set(spec.overrides)
                         if previous["overrides"].get(k) != _request(spec)["overrides"].get(k))
        raise WorkdirConflictError(
            f"{workdir} holds a run of a different request (config {previous['config']!r} vs "
            f"{spec.config!r}; overrides differ in {changed or 'none'}). Delete that directory to "
            "rerun it, or pass --workdir_root=<new dir> to keep both.")


def run_status(spec: RunSpec, workdir: str) -> str:
    """finished / diverged / missing from the files in `workdir` (failed runs count as missing:
    they are retried)."""
    if _read_json(os.path.join(workdir, REQUEST_FILE)) != _request(spec):
        return results_lib.MISSING
    if os.path.exists(os.path.join(workdir, DIVERGED_FILE)):
        return results_lib.DIVERGED
    summary = _read_json(os.path.join(workdir, SUMMARY_FILE))
    if summary is not None and summary.get("steps") == spec.num_train_steps:
        return results_lib.FINISHED
    return results_lib.MISSING


def classify(returncode: int, log_tail: str, summary: Mapping[str, Any] | None,
             steps: int) -> tuple[str, int | None]:
    """(status, diverged step) of a finished training process from its exit code, the end of
    its log and its summary.json. Diverged: the loop's non-finite-loss guard stopped it, or it
    finished with a non-finite validation loss (the guard checks training losses only)."""
    match = _DIVERGED.search(log_tail)
    if match or "NonFiniteLossError" in log_tail:
        return results_lib.DIVERGED, int(match.group(2)) if match else None
    if returncode == 0 and summary is not None and summary.get("steps") == steps:
        loss = summary.get("eval_loss")
        if loss is None or math.isfinite(loss):
            return results_lib.FINISHED, None
        return results_lib.DIVERGED, steps  # trained to the end, but the model is non-finite
    return results_lib.FAILED, None


def launch(spec: RunSpec, workdir: str, *, python: str = sys.executable,
           env: Mapping[str, str] | None = None) -> str:
    """Trains one run in a subprocess (output in workdir/run.log); returns its status and
    leaves request.json, run_info.json and, if it diverged, diverged.json in `workdir`."""
    os.makedirs(workdir, exist_ok=True)
    write_json(os.path.join(workdir, REQUEST_FILE), _request(spec))
    start = time.perf_counter()
    returncode = train_process(spec, workdir, os.path.join(workdir, LOG_FILE), python=python,
                               env=env)
    seconds = time.perf_counter() - start
    tail = _tail(os.path.join(workdir, LOG_FILE))
    status, step = classify(returncode, tail, _read_json(os.path.join(workdir, SUMMARY_FILE)),
                            spec.num_train_steps)
    if status == results_lib.DIVERGED:
        write_json(os.path.join(workdir, DIVERGED_FILE), {"step": step, "log_tail": tail})
    write_json(os.path.join(workdir, RUN_INFO_FILE),
                {"status": status, "returncode": returncode, "runner_seconds": seconds})
    return status


def train_process(spec: RunSpec, workdir: str, log_path: str, *, python: str = sys.executable,
                  env: Mapping[str, str] | None = None) -> int:
    """Runs `python -m moe_jax.main` for `spec` in `workdir`, appending its output to
    `log_path`; returns its exit code."""
    command = [python, "-m", "moe_jax.main", *spec.flags(workdir), f"--workdir={workdir}"]
    with open(log_path, "a") as log:
        log.write(f"\n$ {' '.join(command)}\n")
        log.flush()
        return subprocess.run(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                              env=dict(env or os.environ), check=False).returncode


def run_analysis(module: str, workdir: str, *, python: str = sys.executable,
                 env: Mapping[str, str] | None = None) -> bool:
    """Runs `python -m module --workdir=DIR` (writes DIR/analysis.json); True on success."""
    with open(os.path.join(workdir, "analysis.log"), "a") as log:
        returncode = subprocess.run([python, "-m", module, f"--workdir={workdir}"], cwd=REPO_ROOT,
                                    stdout=log, stderr=subprocess.STDOUT, check=False,
                                    env=dict(env or os.environ)).returncode
    return returncode == 0 and os.path.exists(os.path.join(workdir, ANALYSIS_FILE))


def _history(workdir: str) -> list[dict[str, Any]]:
    """metrics.jsonl as a step-sorted list of {step, time, scalar metrics} (lists dropped)."""
    if not os.path.exists(os.path.join(workdir, "metrics.jsonl")):
        return []
    from moe_jax.train.metrics import read_metrics

    return [{k: v for k, v in record.items() if not isinstance(v, list)}
            for _, record in sorted(read_metrics(workdir).items())]


def collect_run(spec: RunSpec, workdir: str) -> dict[str, Any]:
    """One run's entry of the results file, from the files in its workdir."""
    status = run_status(spec, workdir)
    info = _read_json(os.path.join(workdir, RUN_INFO_FILE)) or {}
    if status == results_lib.MISSING and info.get("status") == results_lib.FAILED \
            and _read_json(os.path.join(workdir, REQUEST_FILE)) == _request(spec):
        status = results_lib.FAILED
    diverged = _read_json(os.path.join(workdir, DIVERGED_FILE)) or {}
    present = status != results_lib.MISSING
    return {
        "member": spec.member.name, "seed": spec.seed, "config": spec.config,
        "overrides": dict(spec.overrides), "tags": dict(spec.member.tags), "status": status,
        "workdir": os.path.relpath(workdir, REPO_ROOT), "command": spec.command(workdir),
        "summary": (_read_json(os.path.join(workdir, SUMMARY_FILE))
                    if status == results_lib.FINISHED else None),
        "history": _history(workdir) if present else [],
        "diverged_step": diverged.get("step") if status == results_lib.DIVERGED else None,
        "error": _tail(os.path.join(workdir, LOG_FILE)) if status == results_lib.FAILED else None,
        "runner_seconds": info.get("runner_seconds") if present else None,
        "analysis": (_read_json(os.path.join(workdir, ANALYSIS_FILE))
                     if status == results_lib.FINISHED else None),
        "machine": machine_info() if present else None,
    }


def machine_info() -> dict[str, Any]:
    """Where and when (no JAX backend is started: the runner must leave the GPU to its runs)."""
    def output(*command: str) -> str:
        try:
            return subprocess.run(command, capture_output=True, text=True, check=False,
                                  cwd=REPO_ROOT).stdout.strip()
        except OSError:
            return ""

    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "commit": output("git", "rev-parse", "--short", "HEAD"),
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "gpu": output("nvidia-smi", "--query-gpu=name", "--format=csv,noheader"),
            "python": platform.python_version(), "load_average_1m": os.getloadavg()[0]}


def placeholder(spec: RunSpec, workdir: str) -> dict[str, Any]:
    """The results-file entry of a run not done yet."""
    return {"member": spec.member.name, "seed": spec.seed, "config": spec.config,
            "overrides": dict(spec.overrides), "tags": dict(spec.member.tags),
            "status": results_lib.MISSING, "workdir": os.path.relpath(workdir, REPO_ROOT),
            "command": spec.command(workdir), "summary": None, "history": [],
            "diverged_step": None, "error": None, "runner_seconds": None, "analysis": None,
            "machine": None}


def save(data: dict[str, Any], path: str, expected: Sequence[dict[str, Any]],
         log: Callable[[str], None] = print) -> None:
    """Writes the results file (JSON + CSV) laid out for `expected` (`results.arrange`)."""
    moved = results_lib.arrange(data, expected)
    if moved:
        log(f"note: {len(moved)} recorded runs have other settings than this invocation's; "
            f"they are kept under other_runs in {path}.")
    data["created"] = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    data["machine"] = machine_info()
    results_lib.write(data, path)


def workdir_of(spec: RunSpec, workdir_root: str) -> str:
    return os.path.join(workdir_root, spec.scale, spec.workdir_name)


def _environment() -> dict[str, str]:
    """The runs' environment: a persistent compilation cache shared by all runs (seeds of a
    member compile the same programs), unless the caller set one."""
    env = dict(os.environ)
    env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(REPO_ROOT, ".jax_cache"))
    return env


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
    expected = [placeholder(spec, workdir_of(spec, root)) for spec in all_runs]
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
    env = _environment()
    recorded = json.dumps(data, sort_keys=True, default=str)
    todo = _plan(suite, selected, data, root, replace=replace, retry_diverged=retry_diverged,
                 analyse=not dry_run, python=python, env=env, log=log)
    if dry_run:
        for spec in todo:
            log(spec.command(workdir_of(spec, root)))
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
        workdir = workdir_of(spec, root)
        run_start = time.perf_counter()
        status = _train(suite, spec, workdir, retry_diverged=retry_diverged, python=python,
                        env=env, log=log)
        results_lib.record(data, collect_run(spec, workdir))
        save(data, path, expected, log)
        elapsed = time.perf_counter() - start
        eta = elapsed / (i + 1) * (len(todo) - i - 1)
        summary = _read_json(os.path.join(workdir, SUMMARY_FILE)) or {}
        loss = summary.get("eval_loss") if status == results_lib.FINISHED else None
        log(f"[{i + 1}/{len(todo)}] {spec.workdir_name}: {status} in "
            f"{time.perf_counter() - run_start:.0f} s"
            + (f", val loss {loss:.4f}" if loss is not None else "")
            + (f" (log: {workdir}/{LOG_FILE})" if status == results_lib.FAILED else "")
            + f"; recorded in {os.path.relpath(path, REPO_ROOT)}; ETA {eta / 60:.1f} min")
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
        workdir = workdir_of(spec, root)
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
        check_request(spec, workdir)
        status = run_status(spec, workdir)
        if status == results_lib.FINISHED or (status == results_lib.DIVERGED
                                              and not retry_diverged):
            if analyse and status == results_lib.FINISHED:
                _analyse(suite, workdir, python=python, env=env, log=log)
            if analyse:
                results_lib.record(data, collect_run(spec, workdir))
            log(f"collected {spec.workdir_name}: {status} in {workdir}")
            continue
        todo.append(spec)
    return todo


def _analyse(suite: Suite, workdir: str, *, python: str, env: Mapping[str, str],
             log: Callable[[str], None]) -> None:
    """Runs the suite's analysis of a finished run once (if it has one)."""
    if suite.analysis and not os.path.exists(os.path.join(workdir, ANALYSIS_FILE)):
        log(f"analysing {os.path.basename(workdir)}")
        if not run_analysis(suite.analysis, workdir, python=python, env=env):
            log(f"  analysis failed: see {workdir}/analysis.log")


def _train(suite: Suite, spec: RunSpec, workdir: str, *, retry_diverged: bool, python: str,
           env: Mapping[str, str], log: Callable[[str], None]) -> str:
    """Trains one run (resuming its checkpoint if the directory has one) and analyses it."""
    if retry_diverged and os.path.exists(os.path.join(workdir, DIVERGED_FILE)):
        os.remove(os.path.join(workdir, DIVERGED_FILE))
    status = launch(spec, workdir, python=python, env=env)
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
