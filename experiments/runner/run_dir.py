"""One run of a suite in its own directory: what it was made for (request.json), its state, the
training process that fills it, and its entry in the suite's results file.

A run directory holds request.json (config + overrides), the training run's files
(`moe_jax.main`: config.json, checkpoints, metrics.jsonl, summary.json), run.log (the process's
output), run_info.json (exit status and wall time as the runner saw them), diverged.json (when the
non-finite-loss guard stopped it) and analysis.json (a suite's analysis of the finished run).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Mapping
from typing import Any

from experiments.library import results as results_lib
from experiments.library.base import RunSpec
from experiments.library.provenance import REPO_ROOT as REPO_PATH
from experiments.library.provenance import command_output, cpu_model, git_commit
from moe_jax.train.metrics import write_json

REPO_ROOT = str(REPO_PATH)
REQUEST_FILE, SUMMARY_FILE, DIVERGED_FILE = "request.json", "summary.json", "diverged.json"
RUN_INFO_FILE, LOG_FILE, ANALYSIS_FILE = "run_info.json", "run.log", "analysis.json"
_DIVERGED = re.compile(r"NonFiniteLossError: training loss is (\S+) at step (\d+)")
LOG_TAIL_LINES = 25


class WorkdirConflictError(ValueError):
    """A run directory holds a run of a different config or overrides."""



def request(spec: RunSpec) -> dict[str, Any]:
    """What a run directory was created for, normalised through JSON (tuples -> lists)."""
    return json.loads(json.dumps({"config": spec.config, "overrides": dict(spec.overrides)}))


def read_json(path: str) -> Any:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def tail(path: str, lines: int = LOG_TAIL_LINES) -> str:
    if not os.path.exists(path):
        return ""
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-lines:])


def check_request(spec: RunSpec, workdir: str) -> None:
    """Raises WorkdirConflictError if `workdir` was made for another request."""
    previous = read_json(os.path.join(workdir, REQUEST_FILE))
    if previous is not None and previous != request(spec):
        changed = sorted(k for k in set(previous["overrides"]) | set(spec.overrides)
                         if previous["overrides"].get(k) != request(spec)["overrides"].get(k))
        raise WorkdirConflictError(
            f"{workdir} holds a run of a different request (config {previous['config']!r} vs "
            f"{spec.config!r}; overrides differ in {changed or 'none'}). Delete that directory to "
            "rerun it, or pass --workdir_root=<new dir> to keep both.")


def run_status(spec: RunSpec, workdir: str) -> str:
    """finished / diverged / missing from the files in `workdir` (failed runs count as missing:
    they are retried)."""
    if read_json(os.path.join(workdir, REQUEST_FILE)) != request(spec):
        return results_lib.MISSING
    if os.path.exists(os.path.join(workdir, DIVERGED_FILE)):
        return results_lib.DIVERGED
    summary = read_json(os.path.join(workdir, SUMMARY_FILE))
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
    write_json(os.path.join(workdir, REQUEST_FILE), request(spec))
    start = time.perf_counter()
    returncode = train_process(spec, workdir, os.path.join(workdir, LOG_FILE), python=python,
                               env=env)
    seconds = time.perf_counter() - start
    log_tail = tail(os.path.join(workdir, LOG_FILE))
    status, step = classify(returncode, log_tail, read_json(os.path.join(workdir, SUMMARY_FILE)),
                            spec.num_train_steps)
    if status == results_lib.DIVERGED:
        write_json(os.path.join(workdir, DIVERGED_FILE), {"step": step, "log_tail": log_tail})
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


def history(workdir: str) -> list[dict[str, Any]]:
    """metrics.jsonl as a step-sorted list of {step, time, scalar metrics} (lists dropped)."""
    if not os.path.exists(os.path.join(workdir, "metrics.jsonl")):
        return []
    from moe_jax.train.metrics import read_metrics

    return [{k: v for k, v in record.items() if not isinstance(v, list)}
            for _, record in sorted(read_metrics(workdir).items())]


def collect_run(spec: RunSpec, workdir: str) -> dict[str, Any]:
    """One run's entry of the results file, from the files in its workdir."""
    status = run_status(spec, workdir)
    info = read_json(os.path.join(workdir, RUN_INFO_FILE)) or {}
    if status == results_lib.MISSING and info.get("status") == results_lib.FAILED \
            and read_json(os.path.join(workdir, REQUEST_FILE)) == request(spec):
        status = results_lib.FAILED
    diverged = read_json(os.path.join(workdir, DIVERGED_FILE)) or {}
    present = status != results_lib.MISSING
    return {
        "member": spec.member.name, "seed": spec.seed, "config": spec.config,
        "overrides": dict(spec.overrides), "tags": dict(spec.member.tags), "status": status,
        "workdir": os.path.relpath(workdir, REPO_ROOT), "command": spec.command(workdir),
        "summary": (read_json(os.path.join(workdir, SUMMARY_FILE))
                    if status == results_lib.FINISHED else None),
        "history": history(workdir) if present else [],
        "diverged_step": diverged.get("step") if status == results_lib.DIVERGED else None,
        "error": tail(os.path.join(workdir, LOG_FILE)) if status == results_lib.FAILED else None,
        "runner_seconds": info.get("runner_seconds") if present else None,
        "analysis": (read_json(os.path.join(workdir, ANALYSIS_FILE))
                     if status == results_lib.FINISHED else None),
        "machine": machine_info() if present else None,
    }


def machine_info() -> dict[str, Any]:
    """Where and when (no JAX backend is started: the runner must leave the GPU to its runs)."""
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "commit": git_commit(),
            "cpu": cpu_model(), "cpu_count": os.cpu_count(),
            "gpu": command_output("nvidia-smi", "--query-gpu=name", "--format=csv,noheader"),
            "python": platform.python_version(), "load_average_1m": os.getloadavg()[0]}


def placeholder(spec: RunSpec, workdir: str) -> dict[str, Any]:
    """The results-file entry of a run not done yet."""
    return {"member": spec.member.name, "seed": spec.seed, "config": spec.config,
            "overrides": dict(spec.overrides), "tags": dict(spec.member.tags),
            "status": results_lib.MISSING, "workdir": os.path.relpath(workdir, REPO_ROOT),
            "command": spec.command(workdir), "summary": None, "history": [],
            "diverged_step": None, "error": None, "runner_seconds": None, "analysis": None,
            "machine": None}



def workdir_of(spec: RunSpec, workdir_root: str) -> str:
    return os.path.join(workdir_root, spec.scale, spec.workdir_name)


def environment() -> dict[str, str]:
    """The runs' environment: a persistent compilation cache shared by all runs (seeds of a
    member compile the same programs), unless the caller set one."""
    env = dict(os.environ)
    env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(REPO_ROOT, ".jax_cache"))
    return env
