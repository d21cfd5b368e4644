"""Joining a multi-process run (several hosts, or several processes on one host) before
anything else touches JAX."""

from __future__ import annotations

import os

import jax

DISTRIBUTED_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def initialize_distributed(*, force: bool = False, coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
    """Joins a multi-process run with `jax.distributed.initialize`, when asked: `force` (the
    `--distributed` flag), an argument, or one of the environment variables
    JAX_COORDINATOR_ADDRESS ("host:port" of process 0), JAX_NUM_PROCESSES, JAX_PROCESS_ID.
    Arguments win over the environment; what neither gives JAX detects on Cloud TPU, SLURM,
    Open MPI and Kubernetes. Cross-process collectives on CPU use gloo. Call it before anything
    else uses JAX. Returns True if this call initialized the run."""
    env = {name: os.environ.get(name) or None for name in DISTRIBUTED_ENV}
    asked = force or any(v is not None for v in (coordinator_address, num_processes, process_id))
    if not (asked or any(env.values())) or jax.distributed.is_initialized():
        return False

    def env_int(name: str) -> int | None:
        value = env[name]
        if value is not None and not value.strip().isdigit():
            raise ValueError(f"environment variable {name}={value!r} must be a non-negative "
                             "integer.")
        return None if value is None else int(value)

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address or env["JAX_COORDINATOR_ADDRESS"],
        num_processes=num_processes if num_processes is not None
        else env_int("JAX_NUM_PROCESSES"),
        process_id=process_id if process_id is not None else env_int("JAX_PROCESS_ID"))
    return True
