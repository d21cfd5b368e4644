"""Runs a suite on a SLURM cluster: the runs it plans go out as one job array, through submitit.

    python -m experiments.run --suite=capacity --scale=small --launcher=slurm \\
        --slurm.partition=gpu --slurm.gpus_per_node=1 --slurm.time=2:00:00
    python -m experiments.run --suite=capacity --scale=small --status

`SlurmLauncher` is the SLURM launcher of `experiments.runner.sweep` (`steps.Launcher`):
`submit_fresh` takes the runs `steps.plan` left to do (neither in the results file nor finished
in their run directory), leaves out those whose job is still pending or running, and submits the
rest as one array: one array task per run, each executing `steps.train_run` on its node
(`slurm_task.RunTask`). It writes `slurm_job.json` (job id, log paths) into each run directory
and returns at once (`wait=True` blocks until the array is done). The results file is written
on the submitting side only, by `--status`, `--wait` and the next invocation, which collect the
finished run directories (`collect`); tasks never write it.

A task resumes its run from the run's checkpoint whenever it starts again: submitit requeues it
when it is preempted or reaches its time limit (SLURM signals it 90 s before), and a training
process that fails is restarted within the task, `max_requeues` times in all. A run whose task
ended without a result (cancelled, out of memory, requeues used up) is reported `failed` and is
submitted again by the next invocation.

A run on several processes (`nodes` x `tasks_per_node`, by default one process per GPU): every
task starts `moe_jax.main` with JAX_NUM_PROCESSES and JAX_PROCESS_ID from SLURM's task count and
rank, and `jax.distributed.initialize` reads the coordinator (the first node of the step) and
the process's GPU (SLURM_LOCALID) from SLURM's environment. Task 0 writes the run's `run.log`,
the others `run.<rank>.log`.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from absl import flags

from experiments.library import results as results_lib
from experiments.library.base import RunSpec, Suite
from experiments.runner import run_dir, steps
from experiments.runner import slurm_status as status
from moe_jax.train.metrics import write_json
from moe_jax.utils import fields

EXECUTORS = ("slurm", "local")
_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")
# sbatch's refusals -> what to change (the message of SLURM is quoted before it)
_FIXES = (
    ("configuration source", "this machine is no SLURM client (no slurm.conf): run on the "
     "cluster's login node, or point SLURM_CONF at the cluster's slurm.conf"),
    ("unable to contact slurm controller", "the SLURM controller does not answer: check "
     "`sinfo`, or run on the cluster's login node"),
    ("invalid partition", "--slurm.partition names no partition of this cluster; `sinfo "
     "--summarize` lists them"),
    ("time limit", "--slurm.time exceeds the partition's limit; `sinfo -o '%P %l'` shows it"),
    ("account", "--slurm.account is not one you may charge on this partition; `sacctmgr show "
     "associations user=$USER` lists yours"),
    ("node configuration is not available", "no node of the partition has the CPUs, GPUs or "
     "memory asked for (--slurm.gpus_per_node, --slurm.cpus_per_task, --slurm.mem); `sinfo -o "
     "'%P %c %m %G'` shows what the nodes have"),
    ("gres", "the partition has no GPUs as SLURM generic resources; drop --slurm.gpus_per_node "
     "or choose a GPU partition"),
    ("memory", "--slurm.mem is more than a node of the partition has"),
    ("node count", "--slurm.nodes is more than the partition allows"),
    ("processors", "--slurm.cpus_per_task x tasks is more than the nodes have"),
)


class SlurmError(RuntimeError):
    """SLURM (or submitit) is missing, or refused a submission."""


def _option(default: Any, doc: str) -> Any:
    return dataclasses.field(default=default, metadata={"help": doc})


@dataclasses.dataclass(frozen=True)
class SlurmConfig:
    """Resources of each array task (one run) and how the array is submitted; each field's
    `help` (its --slurm.<field> flag) says what it sets. 0 and "" leave SLURM's defaults."""

    partition: str = _option("", "SLURM partition (default: the cluster's default)")
    time: str = _option("4:00:00", "time limit per run in SLURM's formats (minutes, H:MM:SS, "
                        "D-HH:MM:SS); reaching it requeues the run, which resumes")
    nodes: int = _option(1, "nodes per run")
    gpus_per_node: int = _option(0, "GPUs per node")
    tasks_per_node: int = _option(0, "processes per node (0: one per GPU, or one)")
    cpus_per_task: int = _option(0, "CPUs per process")
    mem: str = _option("", "memory per node, e.g. 64G")
    account: str = _option("", "account to charge")
    extra: tuple[str, ...] = _option((), "more sbatch options, NAME=VALUE or NAME "
                                     "(repeatable), e.g. qos=high, constraint=a100, exclusive")
    max_requeues: int = _option(3, "restarts of a run's task: preemption, time limit, a "
                                "failed training process")
    parallelism: int = _option(0, "array tasks running at once (0: all)")
    executor: str = _option("slurm", "slurm, or local: submitit's local executor runs the "
                            "array's tasks as processes on this machine (no cluster needed)")

    def __post_init__(self) -> None:
        for name in ("gpus_per_node", "tasks_per_node", "cpus_per_task", "max_requeues",
                     "parallelism"):
            fields.integer(self, name, minimum=0)
        fields.integer(self, "nodes", minimum=1)
        fields.one_of(self, "executor", EXECUTORS)
        if self.minutes() is None:
            fields.fail(self, "time", "is not a SLURM time limit",
                            "use minutes, H:MM:SS or D-HH:MM:SS, e.g. 4:00:00")
        if self.mem and not re.fullmatch(r"\d+[KMGT]?", self.mem):
            fields.fail(self, "mem", "is not a SLURM memory size", "use e.g. 64G or 500M")
        for option in self.extra:
            if not re.fullmatch(r"[a-z][a-z0-9_-]*(=.+)?", option):
                fields.fail(self, "extra", f"holds {option!r}, not an sbatch option",
                                "pass name=value without dashes, e.g. qos=high")

    def minutes(self) -> int | None:
        """The time limit in whole minutes (None if `time` does not parse)."""
        match = _TIME.match(self.time.strip())
        if not match:
            return None
        days, first, second, third = (int(g) if g else None for g in match.groups())
        if days is None:  # M, M:S or H:M:S
            h, m, s = ((0, first, second or 0) if third is None else (first, second, third))
        else:  # D-H, D-H:M, D-H:M:S
            h, m, s = first + 24 * days, second or 0, third or 0
        return max(1, h * 60 + m + (s + 59) // 60)

    @property
    def processes_per_node(self) -> int:
        return self.tasks_per_node or max(1, self.gpus_per_node)

    def executor_parameters(self, runs: int) -> dict[str, Any]:
        """The parameters of `submitit.AutoExecutor.update_parameters` for `runs` array tasks
        (slurm_* ones are ignored by the local executor)."""
        params: dict[str, Any] = {
            "timeout_min": self.minutes(), "nodes": self.nodes,
            "tasks_per_node": self.processes_per_node,
            "slurm_array_parallelism": self.parallelism or runs,
            "slurm_additional_parameters": {
                name: value if sep else True
                for name, sep, value in (o.partition("=") for o in self.extra)},
        }
        if self.gpus_per_node:
            params["gpus_per_node"] = self.gpus_per_node
        if self.cpus_per_task:
            params["cpus_per_task"] = self.cpus_per_task
        for name in ("partition", "mem", "account"):
            if getattr(self, name):
                params[f"slurm_{name}"] = getattr(self, name)
        return params


def define_flags(values: flags.FlagValues) -> None:
    """--slurm.<field> flags for every `SlurmConfig` field: resources of --launcher=slurm (one
    run per array task)."""
    define = {str: flags.DEFINE_string, int: flags.DEFINE_integer,
              tuple: flags.DEFINE_multi_string}
    for field in dataclasses.fields(SlurmConfig):
        default = list(field.default) if field.name == "extra" else field.default
        define[type(field.default)](f"slurm.{field.name}", default, field.metadata["help"],
                                    flag_values=values)


def config_from_flags(values: flags.FlagValues) -> SlurmConfig:
    """The SlurmConfig of parsed --slurm.* flags (SlurmError names a bad flag)."""
    settings = {f.name: values[f"slurm.{f.name}"].value for f in dataclasses.fields(SlurmConfig)}
    try:
        return SlurmConfig(**{**settings, "extra": tuple(settings["extra"])})
    except fields.ConfigError as err:
        raise SlurmError(str(err).replace("SlurmConfig.", "--slurm.")) from err


def import_submitit() -> Any:
    try:
        import submitit
    except ImportError as err:
        raise SlurmError("--launcher=slurm needs submitit: pip install -e '.[slurm]' (or pip "
                         "install 'submitit>=1.5,<1.6').") from err
    return submitit


def _check_commands(*names: str) -> None:
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        raise SlurmError(f"no `{missing[0]}` on the PATH: --launcher=slurm submits with SLURM's "
                         "commands, so run it where they are (the cluster's login node), or use "
                         "--launcher=local (or --slurm.executor=local to try the array on this "
                         "machine). Nothing was submitted.")


def explain_refusal(message: str) -> str:
    """sbatch's error, quoted, with what to change."""
    quoted = "\n".join(line for line in message.strip().splitlines() if line.strip()) \
        or "(no message)"
    fix = next((fix for key, fix in _FIXES if key in message.lower()),
               "check the --slurm.* options (they become sbatch options)")
    return (f"SLURM refused the job array:\n{quoted}\nWhat to change: {fix}. Nothing was "
            "submitted; the results file and the run directories are unchanged.")


def job_folder(root: str, scale: str) -> str:
    """Where submitit keeps the array's pickles and logs: <root>/<scale>/slurm/<job id>/."""
    return os.path.join(root, scale, "slurm")


def submit(suite: Suite, specs: Sequence[RunSpec], root: str, config: SlurmConfig, *,
           retry_diverged: bool = False, python: str = sys.executable) -> list[dict[str, Any]]:
    """Submits `specs` as one job array; writes each run directory's `slurm_job.json` and
    returns those records. Raises SlurmError (quoting SLURM) if the array is refused."""
    submitit = import_submitit()
    from experiments.runner import slurm_task

    if config.executor == "slurm":
        _check_commands("sbatch", "srun", "squeue")
    scale = specs[0].scale
    executor = submitit.AutoExecutor(
        folder=os.path.join(job_folder(root, scale), "%j"), cluster=config.executor,
        slurm_max_num_timeout=config.max_requeues, local_max_num_timeout=config.max_requeues)
    executor.update_parameters(name=f"{suite.name}-{scale}",
                               **config.executor_parameters(len(specs)))
    task = slurm_task.RunTask(suite, root, retry_diverged=retry_diverged, python=python,
                              max_requeues=config.max_requeues)
    path = os.pathsep.join(p for p in (run_dir.REPO_ROOT, os.environ.get("PYTHONPATH")) if p)
    try:  # the tasks import experiments/ from this checkout, whatever their directory
        with submitit.helpers.environment_variables(PYTHONPATH=path):
            jobs = executor.map_array(task, specs)
    except submitit.core.utils.FailedJobError as err:
        raise SlurmError(explain_refusal(str(err))) from err
    submitted = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    records = []
    for spec, job in zip(specs, jobs, strict=True):
        record = {"job_id": str(job.job_id), "executor": config.executor,
                  "submitted": submitted, "stdout": str(job.paths.stdout),
                  "stderr": str(job.paths.stderr), "resources": dataclasses.asdict(config)}
        workdir = run_dir.workdir_of(spec, root)
        os.makedirs(workdir, exist_ok=True)
        write_json(os.path.join(workdir, status.JOB_FILE), record)
        records.append(record)
    return records


def submit_fresh(suite: Suite, todo: Sequence[RunSpec], root: str, config: SlurmConfig, *,
                 retry_diverged: bool, python: str, log: Callable[[str], None]
                 ) -> list[RunSpec]:
    """Submits the runs of `todo` that no pending or running job trains yet, as one array;
    returns them."""
    fresh = []
    for spec, state, detail in status.member_states(todo, {"runs": [], "other_runs": []}, root):
        if state in status.ACTIVE:
            log(f"{spec.workdir_name}: {state}, {detail}; not submitted again")
        else:
            fresh.append(spec)
    if not fresh:
        log("nothing to submit")
        return []
    records = submit(suite, fresh, root, config, retry_diverged=retry_diverged, python=python)
    ids = ", ".join(f"{s.workdir_name}={r['job_id']}" for s, r in zip(fresh, records,
                                                                       strict=True))
    runs = f"{len(fresh)} run{'s' if len(fresh) > 1 else ''}"
    if config.executor == "local":
        log(f"submitted {runs} to submitit's local executor (processes on this machine): {ids}")
        folder = os.path.join(job_folder(root, fresh[0].scale), "<job>")
    elif len(fresh) == 1:  # submitit submits a single run as a plain job, not an array
        log(f"submitted {runs} as job {records[0]['job_id']}: {ids}")
        folder = os.path.dirname(records[0]["stdout"])
    else:
        array = records[0]["job_id"].split("_")[0]
        log(f"submitted {runs} as job array {array}: {ids}")
        folder = os.path.join(job_folder(root, fresh[0].scale), f"{array}_<task>")
    log(f"logs: {folder}/ (submitit's, per task) and <run directory>/{run_dir.LOG_FILE} (the "
        "training's); follow with --status (same flags). Finished runs are collected into the "
        "results file by --status, --wait or the next run.")
    return fresh


def wait(specs: Sequence[RunSpec], root: str, *, poll_seconds: float = 30.0,
         log: Callable[[str], None]) -> None:
    """Blocks until no run of `specs` has a pending or running job."""
    last = ""
    while True:
        states = status.member_states(specs, {"runs": [], "other_runs": []}, root)
        active = [s for s in states if s[1] in (status.PENDING, status.RUNNING)]
        summary = f"{len(active)} of {len(specs)} runs pending or running"
        if summary != last:
            log(f"{time.strftime('%H:%M:%S')} {summary}")
            last = summary
        if not active:
            return
        time.sleep(poll_seconds)


def collect(suite: Suite, sweep: steps.Sweep, *, python: str,
            log: Callable[[str], None]) -> int:
    """Records into the results file what the local path records for all runs of `sweep`:
    finished and diverged run directories (`steps.plan`'s collection) and runs whose training
    failed and whose job has ended (`run_dir.collect_run`, with the end of the log). Writes the
    file only if that changed it, so collecting again changes nothing. Returns how many runs
    were recorded."""
    data = sweep.data
    before = json.dumps([data["runs"], data["other_runs"]], sort_keys=True, default=str)
    lines: list[str] = []
    steps.plan(suite, sweep.all_runs, data, sweep.root, replace=False, retry_diverged=False,
               analyse=True, python=python, env=run_dir.environment(), log=lines.append)
    recorded = [line for line in lines if line.startswith("collected ")]
    for spec, state, _ in status.member_states(sweep.all_runs, data, sweep.root):
        workdir = run_dir.workdir_of(spec, sweep.root)
        if state == results_lib.FAILED and status.failed_here(spec, workdir):
            entry = run_dir.collect_run(spec, workdir)
            held = results_lib.recorded(data, entry)
            if held is None or (held["status"], held["error"]) != (entry["status"],
                                                                   entry["error"]):
                results_lib.record(data, entry)
                recorded.append(f"collected {spec.workdir_name}: failed in {workdir}")
    for line in recorded:
        log(line)
    if json.dumps([data["runs"], data["other_runs"]], sort_keys=True, default=str) != before:
        steps.save(sweep, log)
    return len(recorded)


class SlurmLauncher:
    """Submits the runs to do as one job array (`submit_fresh`) and returns; with `wait`, blocks
    until the array is done (polling every `poll_seconds`), then collects the results."""

    def __init__(self, config: SlurmConfig, *, wait: bool = False, poll_seconds: float = 30.0):
        self.config = config
        self.wait = wait
        self.poll_seconds = poll_seconds

    def launch(self, suite: Suite, sweep: steps.Sweep, todo: Sequence[RunSpec], *,
               retry_diverged: bool, python: str, env: Mapping[str, str],
               log: steps.Log) -> None:
        if sweep.changed():  # finished run directories were collected
            steps.save(sweep, log)
        submit_fresh(suite, todo, sweep.root, self.config, retry_diverged=retry_diverged,
                     python=python, log=log)
        if self.wait and todo:
            wait(todo, sweep.root, poll_seconds=self.poll_seconds, log=log)
            collect(suite, sweep, python=python, log=log)
            log(status.format_states(status.member_states(sweep.selected, sweep.data,
                                                          sweep.root)))
