"""Timing of jitted functions: compile time apart, median of repeated runs after a warm-up."""

from __future__ import annotations

import dataclasses
import os
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax

from experiments.library.provenance import cpu_model, git_commit


@dataclasses.dataclass
class Timing:
    compile_s: float
    median_s: float
    min_s: float
    max_s: float
    repeats: int
    peak_bytes: int | None
    xla_flops: float | None
    cpu_median_s: float | None = None  # process CPU time (all threads) per run, median

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def available_host_memory() -> int | None:
    """Bytes of host memory available now (MemAvailable of /proc/meminfo), None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def measure(fn: Callable, *args: Any, repeats: int = 5, warmup: int = 1,
            carry: bool = False, memory_limit: int | None = None) -> Timing:
    """Compiles `jax.jit(fn)` for `args` (timed apart), then times `repeats` runs.

    fn: a function, or an already-jitted one (its shardings and donated arguments are kept).
    carry: each run's first output replaces the first argument of the next run, as a train
      step `(state, batch) -> (state, metrics)` needs when it donates its state.
    memory_limit: bytes; raises MemoryError before running if the compiled function's new
      allocations (temporaries and outputs not aliased to donated arguments, from
      `memory_analysis()`) need more: on a CPU host the kernel would otherwise kill the
      process, losing every figure measured before.
    """
    jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
    lowered = jitted.lower(*args)
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    memory = compiled.memory_analysis()
    if memory_limit is not None and memory is not None:
        needed = (memory.temp_size_in_bytes + memory.output_size_in_bytes
                  - memory.alias_size_in_bytes)
        if needed > memory_limit:
            raise MemoryError(f"the compiled function needs {needed / 2**30:.1f} GiB "
                              f"(temporaries {memory.temp_size_in_bytes / 2**30:.1f} GiB), "
                              f"{memory_limit / 2**30:.1f} GiB allowed")
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list | tuple) else cost

    def run(args: tuple[Any, ...]) -> tuple[Any, ...]:
        out = jax.block_until_ready(compiled(*args))
        return (out[0], *args[1:]) if carry else args

    for _ in range(warmup):
        args = run(args)
    times, cpu_times = [], []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        args = run(args)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    return Timing(compile_s, statistics.median(times), min(times), max(times), repeats,
                  getattr(memory, "peak_memory_in_bytes", None) if memory else None,
                  (cost or {}).get("flops"), statistics.median(cpu_times))


ALLOCATORS = {"tcmalloc": "libtcmalloc", "jemalloc": "libjemalloc"}


def memory_allocator() -> str:
    """The malloc this process runs on: "tcmalloc" or "jemalloc" when one is preloaded
    (`LD_PRELOAD=...`, seen in /proc/self/maps), else "glibc". It matters on CPU: glibc returns
    large freed buffers to the kernel, so every call of a step faults the pages of its large
    buffers in again; tcmalloc keeps them."""
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError:
        return "unknown"
    return next((name for name, lib in ALLOCATORS.items() if lib in maps), "glibc")


def machine_info() -> dict[str, Any]:
    """Where and when a figure was measured."""
    device = jax.devices()[0]
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "commit": git_commit(),
        "platform": device.platform,
        "device_kind": getattr(device, "device_kind", ""),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "load_average_1m": os.getloadavg()[0],
        "allocator": memory_allocator(),
    }


def command_line(module: str, argv: list[str] | None = None) -> str:
    """The shell command that ran `python -m module` with `argv` (default: this process's
    arguments), quoted so that it can be pasted back into a shell."""
    return shlex.join(["python", "-m", module, *(sys.argv[1:] if argv is None else argv)])


def measured_line(machine: dict[str, Any], command: str) -> str:
    """The first line of a results file: where, when and how its figures were measured."""
    m = machine
    kind = m["device_kind"] if m["platform"] != "cpu" else m["cpu"]
    return (f"Measured {m['date']} on {m['platform']} ({kind}, {m['cpu_count']} cores), "
            f"jax {m['jax']}, malloc {m.get('allocator', 'glibc')}, commit {m['commit']}, "
            f"load average {m['load_average_1m']:.2f} at the end; command `{command}`.")
