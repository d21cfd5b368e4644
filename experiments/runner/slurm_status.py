"""The state of a suite's runs on SLURM: each run directory's job record (`slurm_job.json`), what
squeue says about the job, and what that makes the run: finished / diverged, pending / running,
failed (with the log and its last error line) or missing. Used by `--status`, by
`experiments.runner.slurm.launch` (which never submits a run twice) and `wait`."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from typing import Any

from experiments.library import results as results_lib
from experiments.library.base import RunSpec
from experiments.runner import run_dir

JOB_FILE = "slurm_job.json"  # in a run directory: the job that trains it (git-ignored)
PENDING, RUNNING, SUBMITTED = "pending", "running", "submitted"
ACTIVE = (PENDING, RUNNING, SUBMITTED)  # states in which a run is not submitted again
# squeue states of a job that may still train its run
_QUEUED = {"PENDING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "RESV_DEL_HOLD", "SUSPENDED",
           "CONFIGURING", "RESIZING", "SIGNALING", "STAGE_OUT"}
_STARTED = {"RUNNING", "COMPLETING"}
# squeue reasons of a pending job that cannot start as submitted
_NEVER_STARTS = {"PartitionConfig", "PartitionNodeLimit", "PartitionTimeLimit",
                 "BadConstraints", "InvalidAccount", "InvalidQOS"}
_ERROR_LINE = re.compile(r"error|exception|cancelled|killed|time limit|oom|out of memory",
                         re.IGNORECASE)


def read_job(workdir: str) -> dict[str, Any] | None:
    return run_dir.read_json(os.path.join(workdir, JOB_FILE))


def queue_states(records: Iterable[dict[str, Any]]) -> dict[str, tuple[str, str]] | None:
    """{job id: (SLURM state, description)} of the jobs of `records` that SLURM still lists
    (squeue's %T, e.g. ("PENDING", "PENDING: Resources"), ("RUNNING", "RUNNING on gpu3"));
    local jobs are RUNNING while their process lives. None when squeue cannot be asked."""
    states: dict[str, tuple[str, str]] = {}
    arrays = set()
    for record in records:
        if record["executor"] == "local":
            state = "RUNNING" if _process_alive(record["job_id"]) else "ENDED"
            states[record["job_id"]] = (state, state)
        else:
            arrays.add(record["job_id"].split("_")[0])
    if not arrays:
        return states
    if shutil.which("squeue") is None:
        return None
    result = subprocess.run(["squeue", "--noheader", "--array", "--states=all",
                             "--format=%i|%T|%N|%r", f"--jobs={','.join(sorted(arrays))}"],
                            capture_output=True, text=True, check=False)
    if result.returncode != 0 and "invalid job id" not in result.stderr.lower():
        return None
    for line in result.stdout.splitlines():
        job, state, node, reason = [x.strip() for x in [*line.split("|"), "", "", ""][:4]]
        waits = state == "PENDING" and reason not in ("", "None")
        fix = (f"; it cannot start as submitted (the partition cannot give the CPUs, memory, "
               f"GPUs, nodes or time a task asks, or the account or QOS is refused): scancel "
               f"{job.split('_')[0]}, then submit again with other --slurm.* flags"
               if reason in _NEVER_STARTS else "")
        states[job] = (state, state + (f" on {node}" if node else "") + (
            f": {reason}" if waits else "") + fix)
    return states


def _process_alive(pid: str) -> bool:
    """Whether the local job's process runs (a zombie does not)."""
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError):
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{int(pid)}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def job_state(record: dict[str, Any], queue: dict[str, tuple[str, str]]) -> str | None:
    """pending / running while the job may still train its run; None once it has ended (or
    SLURM no longer lists it)."""
    state = queue.get(record["job_id"], ("", ""))[0]
    return PENDING if state in _QUEUED else RUNNING if state in _STARTED else None


def last_error_line(path: str) -> str:
    """The last line of a log that reads like an error (else its last line)."""
    lines = [line.strip() for line in run_dir.tail(path, 200).splitlines() if line.strip()]
    errors = [line for line in lines if _ERROR_LINE.search(line)
              and not line.startswith("Traceback")]
    return (errors or lines or ["(empty log)"])[-1]


def failure(workdir: str, record: dict[str, Any] | None) -> tuple[str, str]:
    """(log path, its last error line) of a failed run: the training log when the training
    process raised, else the task's stderr (SLURM's CANCELLED, TIME LIMIT, OOM lines)."""
    training_log = os.path.join(workdir, run_dir.LOG_FILE)
    info = run_dir.read_json(os.path.join(workdir, run_dir.RUN_INFO_FILE)) or {}
    candidates = [training_log] if info.get("returncode", -1) > 0 or record is None else []
    if record is not None:
        candidates += [record["stderr"], training_log]
    for path in candidates:
        if os.path.exists(path) and _ERROR_LINE.search(run_dir.tail(path, 200)):
            return path, last_error_line(path)
    path = next((p for p in candidates if os.path.exists(p)), None)
    if path is None:  # cancelled while pending, or refused by the node before it started
        return candidates[0], "no log: the job ended before it started"
    return path, last_error_line(path)


def member_states(specs: Sequence[RunSpec], data: dict[str, Any], root: str
                  ) -> list[tuple[RunSpec, str, str]]:
    """(run, state, detail) for every run: finished / diverged (in the results file or its run
    directory), pending / running (its job), failed (with the log and its last error line),
    missing."""
    records = {spec.workdir_name: read_job(run_dir.workdir_of(spec, root)) for spec in specs}
    queue = queue_states(r for r in records.values() if r)
    out = []
    for spec in specs:
        workdir = run_dir.workdir_of(spec, root)
        record = records[spec.workdir_name]
        held = results_lib.recorded(data, run_dir.placeholder(spec, workdir))
        if held is not None and held["status"] in (results_lib.FINISHED, results_lib.DIVERGED):
            out.append((spec, held["status"], "in the results file"))
        elif (status := run_dir.run_status(spec, workdir)) != results_lib.MISSING:
            out.append((spec, status, f"in {workdir}"))
        elif record is not None and queue is None:
            out.append((spec, SUBMITTED, f"job {record['job_id']} (no squeue here to tell "
                                          "whether it still runs)"))
        elif record is not None and (state := job_state(record, queue)) is not None:
            out.append((spec, state, f"job {record['job_id']} ({queue[record['job_id']][1]})"))
        elif record is not None or failed_here(spec, workdir):
            log, line = failure(workdir, record)
            ended = "" if record is None else f"job {record['job_id']} ended" + (
                f" {queue[record['job_id']][0]}" if record["job_id"] in queue else "") + ": "
            where = f" (log: {log})" if os.path.exists(log) else ""
            out.append((spec, results_lib.FAILED, f"{ended}{line}{where}"))
        else:
            out.append((spec, results_lib.MISSING, ""))
    return out


def failed_here(spec: RunSpec, workdir: str) -> bool:
    """The run's last training process (of this request) failed."""
    info = run_dir.read_json(os.path.join(workdir, run_dir.RUN_INFO_FILE)) or {}
    return info.get("status") == results_lib.FAILED and run_dir.read_json(
        os.path.join(workdir, run_dir.REQUEST_FILE)) == run_dir.request(spec)


def format_states(states: Sequence[tuple[RunSpec, str, str]]) -> str:
    width = max((len(spec.workdir_name) for spec, _, _ in states), default=0)
    lines = [f"  {spec.workdir_name:<{width}}  {state:<9} {detail}".rstrip()
             for spec, state, detail in states]
    counts: dict[str, int] = {}
    for _, state, _ in states:
        counts[state] = counts.get(state, 0) + 1
    lines.append("  " + ", ".join(f"{n} {state}" for state, n in counts.items()))
    return "\n".join(lines)
