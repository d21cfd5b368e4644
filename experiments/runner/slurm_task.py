"""What one array task of `experiments.runner.slurm` does on its node: train one run of a suite.

`RunTask(spec)` executes `steps.train_run` (the local path's own training of one run: `moe_jax.main`
in a subprocess, resuming the run's checkpoint, then the suite's analysis) and returns the
run's status. It is a `submitit.helpers.Checkpointable`: when SLURM preempts the task or its
time limit nears, submitit calls `checkpoint`, which requeues the same task (the training
resumes from the run's last checkpoint) until `max_requeues` restarts are used. A training
process that exits with an error is restarted within the task from the same budget; one killed
by a signal (scancel, the OOM killer) is not: the run is reported failed.

With several tasks per run (nodes x tasks_per_node), every task trains as one process of the
run: JAX_NUM_PROCESSES / JAX_PROCESS_ID are set from the task count and rank, and
`jax.distributed.initialize` finds the rest in SLURM's environment.
"""

from __future__ import annotations

import os
import sys

import submitit

from experiments.library import results as results_lib
from experiments.library.base import RunSpec, Suite
from experiments.runner import run_dir, steps


class RunTask(submitit.helpers.Checkpointable):
    """Trains one run of `suite` in its run directory under `root`."""

    def __init__(self, suite: Suite, root: str, *, retry_diverged: bool = False,
                 python: str = sys.executable, max_requeues: int = 3, restarts: int = 0) -> None:
        self.suite = suite
        self.root = root
        self.retry_diverged = retry_diverged
        self.python = python
        self.max_requeues = max_requeues
        self.restarts = restarts

    def __call__(self, spec: RunSpec) -> str:
        job = submitit.JobEnvironment()
        workdir = run_dir.workdir_of(spec, self.root)
        env = run_dir.environment()
        if job.num_tasks > 1:
            env.update(JAX_NUM_PROCESSES=str(job.num_tasks), JAX_PROCESS_ID=str(job.global_rank))
            if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
                # Not the runner's persistent cache: JAX writes it from process 0 only, so
                # with a warm cache process 0 alone skips compiling and waits for the others
                # at the first collective (longer than gloo's 30 s rendezvous on a busy CPU).
                env.pop("JAX_COMPILATION_CACHE_DIR", None)
        if job.global_rank > 0:
            os.makedirs(workdir, exist_ok=True)
            log = os.path.join(workdir, f"run.{job.global_rank}.log")
            code = run_dir.train_process(spec, workdir, log, python=self.python, env=env)
            return f"process {job.global_rank} exited with {code}"
        print(f"{job}: {spec.workdir_name} in {workdir} (restart {self.restarts} of at most "
              f"{self.max_requeues})", flush=True)
        while True:
            status = steps.train_run(self.suite, spec, workdir,
                                retry_diverged=self.retry_diverged and self.restarts == 0,
                                python=self.python, env=env, log=print)
            print(f"{spec.workdir_name}: {status} (log: {workdir}/{run_dir.LOG_FILE})", flush=True)
            info = run_dir.read_json(os.path.join(workdir, run_dir.RUN_INFO_FILE)) or {}
            if (status != results_lib.FAILED or info.get("returncode", -1) < 0
                    or job.num_tasks > 1 or self.restarts >= self.max_requeues):
                return status
            self.restarts += 1
            print(f"restarting the training from its checkpoint ({self.restarts} of "
                  f"{self.max_requeues})", flush=True)

    def checkpoint(self, spec: RunSpec) -> submitit.helpers.DelayedSubmission | None:
        """Called by submitit on preemption or near the time limit: the same task again, which
        resumes the run from its checkpoint; None (not requeued) once the restarts are used."""
        if self.restarts >= self.max_requeues:
            print(f"{spec.workdir_name}: not requeued, {self.max_requeues} restarts used",
                  flush=True)
            return None
        again = RunTask(self.suite, self.root, retry_diverged=False, python=self.python,
                        max_requeues=self.max_requeues, restarts=self.restarts + 1)
        return submitit.helpers.DelayedSubmission(again, spec)
