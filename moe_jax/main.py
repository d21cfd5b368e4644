"""The main job: train and evaluate a config, or, with no arguments, dense vs Switch on CPU.

    python -m moe_jax.main                                   # the main job (see MAIN_JOB)
    python -m moe_jax.main --config=configs/switch.py:e16 --workdir=runs/e16 \
        --config.moe.num_experts=32 --config.train.num_train_steps=2000

`--config` takes `file.py[:member]` (relative paths are also looked up in configs/) and any
`--config.<section>.<field>=value` override; `--workdir` (default runs/<config name>; a local
path or gs://bucket/path, `moe_jax.utils.storage`) holds the checkpoints, metrics and summary.json,
and a rerun with the same workdir resumes.

On a mesh: `--config.mesh.data=-1` (all devices, data parallel), `--config.mesh.expert=8
--config.mesh.expert_parallel=explicit`, ... (see `moe_jax.parallel.sharding.MeshConfig`). Several
processes (hosts): start one per host with `--distributed` (or JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID in the environment; auto-detected on Cloud TPU and SLURM);
only process 0 prints and writes metrics.

With no `--config`, the main job trains `dense.py:tiny` and its FLOP-matched Switch model
`switch.py:e8` on the embedded corpus (built on first use) with `MAIN_JOB_SETTINGS`, in
<workdir>/dense and <workdir>/switch (default workdir runs/main_job), and prints a side-by-side
table. It is the same as running both configs with those settings as overrides.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from absl import app, flags, logging

from moe_jax import schema
from moe_jax.analysis import flops
from moe_jax.parallel import distributed
from moe_jax.utils import cli, storage

DEFAULT_RUNS_DIR = "runs"
MAIN_JOB = (("dense", "dense.py:tiny"), ("switch", "switch.py:e8"))
# Sized for 2 CPU cores: both models together in a few minutes (the README gives the time).
MAIN_JOB_SETTINGS: dict[str, Any] = {
    "data.name": "embedded",
    "data.eval_batches": 16,
    "train.num_train_steps": 200,
    "train.batch_size": 16,
    "train.learning_rate": 3e-3,
    "train.warmup_steps": 20,
    "train.eval_every": 100,
    "train.checkpoint_every": 100,
    "train.log_every": 10,
}

COLUMNS = ("model", "config", "steps", "val loss", "bits/byte", "params total", "params active",
           "fwd FLOPs/token", "tokens/s", "wall time")


def define_flags(flag_values: flags.FlagValues = flags.FLAGS,
                 sys_argv: Sequence[str] | None = None) -> None:
    schema.define_config_flag(
        "Experiment config file[:member]; omit for the dense-vs-Switch main job.",
        flag_values=flag_values, sys_argv=sys_argv)
    flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, summary.json); "
                        f"default {DEFAULT_RUNS_DIR}/<config name>.", flag_values=flag_values)
    flags.DEFINE_bool("distributed", False, "Join a multi-process run (jax.distributed) before "
                      "anything else; also implied by JAX_COORDINATOR_ADDRESS / "
                      "JAX_NUM_PROCESSES / JAX_PROCESS_ID in the environment.",
                      flag_values=flag_values)
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for --distributed "
                        "(default: $JAX_COORDINATOR_ADDRESS or auto-detected).",
                        flag_values=flag_values)
    flags.DEFINE_integer("num_processes", None, "Processes in the run for --distributed "
                         "(default: $JAX_NUM_PROCESSES or auto-detected).", flag_values=flag_values)
    flags.DEFINE_integer("process_id", None, "This process's index for --distributed (default: "
                         "$JAX_PROCESS_ID or auto-detected).", flag_values=flag_values)


def default_workdir(config_spec: str) -> str:
    """runs/<file stem>[_<member>], e.g. configs/switch.py:e16 -> runs/switch_e16."""
    path, _, member = config_spec.partition(":")
    stem = os.path.splitext(os.path.basename(path))[0]
    return os.path.join(DEFAULT_RUNS_DIR, f"{stem}_{member}" if member else stem)


def _number(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def comparison_table(rows: Sequence[tuple[str, str, Mapping[str, Any]]]) -> str:
    """Markdown table of (name, config spec, summary) rows, one per run."""
    cells = [(name, spec, str(s["steps"]), _number(s["eval_loss"]),
              _number(s["eval_bits_per_byte"]), flops.human(s["params_total"]),
              flops.human(s["params_active"]), flops.human(s["forward_flops_per_token"]),
              flops.human(s["tokens_per_second"]), f"{s['wall_time_seconds']:.0f} s")
             for name, spec, s in rows]
    return cli.markdown_table(COLUMNS, cells, aligned=True)


def run_main_job(workdir: str, settings: Mapping[str, Any] = MAIN_JOB_SETTINGS
                 ) -> list[tuple[str, str, dict[str, Any]]]:
    """Trains every `MAIN_JOB` member with `settings` in workdir/<name>; prints the table."""
    from moe_jax.train.loop import train_and_evaluate

    start = time.perf_counter()
    rows = []
    for name, spec in MAIN_JOB:
        _print(f"== {name}: {spec} -> {os.path.join(workdir, name)}")
        config = schema.override(schema.load_config(spec), settings)
        rows.append((name, spec, train_and_evaluate(config, os.path.join(workdir, name))))
    _print()
    _print(comparison_table(rows))
    _print(f"\nmain job: {time.perf_counter() - start:.0f} s in this process; results in "
           f"{storage.absolute(workdir)}/<model>/summary.json")
    return rows


def _print(*args: Any) -> None:
    """print, on process 0 only."""
    if jax.process_index() == 0:
        print(*args, flush=True)


def run(flag_values: flags.FlagValues) -> list[tuple[str, str, dict[str, Any]]]:
    """Runs what the parsed flags ask for; returns (name, config spec, summary) rows.
    Joins a multi-process run first when the flags or the environment ask for it."""
    distributed.initialize_distributed(
        force=flag_values.distributed, coordinator_address=flag_values.coordinator_address,
        num_processes=flag_values.num_processes, process_id=flag_values.process_id)
    if jax.process_index() != 0:
        logging.set_verbosity(logging.ERROR)
    from moe_jax.train.loop import train_and_evaluate

    config = flag_values.config
    if config is None:
        return run_main_job(flag_values.workdir or os.path.join(DEFAULT_RUNS_DIR, "main_job"))
    spec = flag_values["config"].config_filename
    workdir = flag_values.workdir or default_workdir(spec)
    summary = train_and_evaluate(config, workdir)
    rows = [(os.path.basename(storage.absolute(workdir)), spec, summary)]
    _print(comparison_table(rows))
    _print(f"results in {storage.absolute(workdir)}")
    return rows


def run_from_argv(argv: Sequence[str]) -> list[tuple[str, str, dict[str, Any]]]:
    """Parses `argv` (argv[0] is the program name) into fresh flags and runs: the in-process
    equivalent of `python -m moe_jax.main ...`, for tests and notebooks."""
    flag_values = flags.FlagValues()
    define_flags(flag_values, sys_argv=argv)
    flag_values(list(argv))
    return run(flag_values)


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {list(argv[1:])}; settings are flags such as "
                             "--config.train.num_train_steps=100.")
    from moe_jax.train.checkpoint import CheckpointError
    from moe_jax.train.lock import WorkdirLockedError
    from moe_jax.train.loop import AnotherRunError, NonFiniteLossError
    from moe_jax.train.monitor import RoutingAlarmError

    if not flags.FLAGS["verbosity"].present:  # orbax and tfds log every save at INFO
        logging.set_verbosity(logging.WARNING)
    try:
        run(flags.FLAGS)
    except (NonFiniteLossError, CheckpointError, RoutingAlarmError, WorkdirLockedError,
            AnotherRunError, storage.StorageError) as err:
        raise SystemExit(f"moe_jax.main: {type(err).__name__}: {err}") from err


if __name__ == "__main__":
    define_flags()
    app.run(main)
