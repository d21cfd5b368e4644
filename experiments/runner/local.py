"""The local launcher: a suite's runs trained here, one after another, each in its own process."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence

from experiments.library import results as results_lib
from experiments.library.base import RunSpec, Suite
from experiments.runner import run_dir, steps


class LocalLauncher:
    """Trains the runs one after another (`steps.train_run`), recording each in the results
    file as soon as it finishes, with the time it took and an estimate of the time left."""

    def launch(self, suite: Suite, sweep: steps.Sweep, todo: Sequence[RunSpec], *,
               retry_diverged: bool, python: str, env: Mapping[str, str],
               log: steps.Log) -> None:
        steps.save(sweep, log)
        start = time.perf_counter()
        for i, spec in enumerate(todo):
            workdir = run_dir.workdir_of(spec, sweep.root)
            run_start = time.perf_counter()
            status = steps.train_run(suite, spec, workdir, retry_diverged=retry_diverged,
                                     python=python, env=env, log=log)
            results_lib.record(sweep.data, run_dir.collect_run(spec, workdir))
            steps.save(sweep, log)
            elapsed = time.perf_counter() - start
            eta = elapsed / (i + 1) * (len(todo) - i - 1)
            summary = run_dir.read_json(os.path.join(workdir, run_dir.SUMMARY_FILE)) or {}
            loss = summary.get("eval_loss") if status == results_lib.FINISHED else None
            log(f"[{i + 1}/{len(todo)}] {spec.workdir_name}: {status} in "
                f"{time.perf_counter() - run_start:.0f} s"
                + (f", val loss {loss:.4f}" if loss is not None else "")
                + (f" (log: {workdir}/{run_dir.LOG_FILE})" if status == results_lib.FAILED
                   else "")
                + f"; recorded in {os.path.relpath(sweep.path, run_dir.REPO_ROOT)}; ETA "
                f"{eta / 60:.1f} min")
        counts = {s: sum(r["status"] == s for r in sweep.data["runs"]) for s in (
            results_lib.FINISHED, results_lib.DIVERGED, results_lib.FAILED, results_lib.MISSING)}
        log(f"results: {sweep.path} ({', '.join(f'{n} {s}' for s, n in counts.items() if n)})")
