"""Will it fit? Compile the real train step for a TPU topology (or CPU devices) and report.

    python -m moe_jax.dryrun --config=configs/switch.py:base_e128 --topology=v5p:4x4x4 \
        --config.mesh.fsdp=16 --config.mesh.expert=4

builds exactly what training builds (`train.jitted.setup`: the same state and batch shardings
and the same jitted train step) on a mesh of the topology's devices, lowers and compiles it with
no TPU attached (libtpu: `pip install -e ".[tpu]"`), and prints, and writes as JSON and
Markdown, the `analysis.dryrun_report.Report`: whether it compiled (or the compiler's error);
bytes per device against the chip's HBM; the collectives in the compiled HLO; XLA's FLOPs and
bytes; lower bounds on the step time from compute, HBM traffic and communication (the
collectives' bytes at the chip's ICI bandwidth), two step estimates (all three overlap: their
max; none does: their sum) and the MFU of each (docs/performance.md); the compile time.
`dryrun(experiment, topology)` returns the same `Report` for use from Python;
`compile_train_step` also the compiled executable (its HLO text, for checks of what the
compiler made of a kernel).
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
from absl import app, flags

from moe_jax import schema
from moe_jax.analysis import dryrun_report
from moe_jax.analysis import topology as topology_lib
from moe_jax.parallel import sharding
from moe_jax.train import jitted


def make_mesh(experiment: Any, topology: topology_lib.Topology) -> jax.sharding.Mesh:
    """The experiment's mesh over all of the topology's devices (refuses a mesh that leaves
    devices idle: a dry run answers for the whole slice)."""
    shape = dict(zip(sharding.MESH_AXES, experiment.mesh.shape(len(topology.devices))))
    if math.prod(shape.values()) != len(topology.devices):
        raise ValueError(
            f"mesh {shape} uses {math.prod(shape.values())} of the {len(topology.devices)} "
            f"devices of topology {topology.name!r}; make the product of --config.mesh.data, "
            ".fsdp, .expert and .model equal to it (or set one of them to -1).")
    return sharding.make_mesh(experiment.mesh, topology.devices)


def compile_train_step(experiment: schema.Experiment | Any,
                       topology: str | topology_lib.Topology, *, name: str = ""
                       ) -> tuple[dryrun_report.Report, Any]:
    """Compiles `experiment`'s train step (an `Experiment`, or its ConfigDict) for `topology`
    (a name for `topology.get`, or a `Topology`): the `Report` and the compiled executable
    (`.as_text()` is its optimised HLO), or None for the executable when lowering or compiling
    failed (`report.error` says why). Bad topology names and meshes raise ValueError."""
    if not isinstance(experiment, schema.Experiment):
        experiment = schema.parse_config(experiment)
    topo = topology if isinstance(topology, topology_lib.Topology) else topology_lib.get(
        topology)
    mesh = make_mesh(experiment, topo)
    seq_len = experiment.train.seq_len or experiment.model.max_seq_len
    report = dryrun_report.Report(
        config=name, topology=topo.name, chip=topo.chip.generation if topo.chip else "cpu",
        devices=len(topo.devices), mesh=dict(mesh.shape),
        expert_parallel=experiment.mesh.expert_parallel,
        scan_layers=experiment.model.scan_layers, remat_policy=experiment.model.remat_policy,
        batch_size=experiment.train.batch_size, seq_len=seq_len)
    _, fns = jitted.setup(experiment, seq_len, mesh)
    report.bytes = dryrun_report.state_bytes(fns)
    start = time.perf_counter()
    try:
        executable = fns["train_step"].lower(fns["abstract_state"],
                                             fns["abstract_batch"]).compile()
    except Exception as err:  # the compiler's refusal (e.g. out of memory) is the answer
        report.error = f"{type(err).__name__}: {str(err)[:2000]}"
        report.compile_seconds = time.perf_counter() - start
        dryrun_report.out_of_memory(report, experiment)
        return report, None
    report.compile_seconds = time.perf_counter() - start
    report.compiled = True
    dryrun_report.analyse(report, executable, experiment, topo)
    return report, executable


def dryrun(experiment: schema.Experiment | Any, topology: str | topology_lib.Topology, *,
           name: str = "") -> dryrun_report.Report:
    """`compile_train_step`'s report alone."""
    return compile_train_step(experiment, topology, name=name)[0]


def define_flags() -> None:
    schema.define_config_flag("Experiment config file[:member] to compile.")
    flags.DEFINE_string("topology", None, f"What to compile for: {topology_lib.FORMS}.")
    flags.DEFINE_string("output", os.path.join("runs", "dryrun"), "Directory of the JSON and "
                        "Markdown reports (<config>_<topology>.json/.md).")


def _cpu_devices_from_argv(argv: Sequence[str]) -> None:
    """--topology=cpu:N: ask for N CPU devices before JAX starts its CPU backend."""
    for arg in argv:
        if arg.startswith("--topology=cpu:") and arg.split(":")[-1].isdigit():
            jax.config.update("jax_num_cpu_devices", int(arg.split(":")[-1]))


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {list(argv[1:])}.")
    if flags.FLAGS.config is None or flags.FLAGS.topology is None:
        raise app.UsageError("pass --config=FILE[:member] and --topology=NAME, e.g. "
                             "--config=configs/switch.py:base_e128 --topology=v5p:4x4x4 "
                             "--config.mesh.fsdp=16 --config.mesh.expert=4.")
    spec = flags.FLAGS["config"].config_filename
    experiment = schema.parse_config(flags.FLAGS.config)
    try:
        report = dryrun(experiment, flags.FLAGS.topology, name=spec)
    except (ValueError, RuntimeError) as err:
        raise SystemExit(f"moe_jax.dryrun: {err}") from err
    stem = f"{os.path.basename(spec).replace('.py', '').replace(':', '_')}_" + \
        report.topology.replace(":", "_")
    print(dryrun_report.markdown(report))
    print("wrote", *dryrun_report.write(report, os.path.join(flags.FLAGS.output, stem)))


if __name__ == "__main__":
    define_flags()
    _cpu_devices_from_argv(sys.argv)
    app.run(main)
