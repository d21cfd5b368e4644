"""Dropless on TPU, compiled without a TPU: which kernels the train step runs, and its memory.

    JAX_PLATFORMS=cpu python -m experiments.benchmarks.dropless_tpu --topology=v5p:2x2x1

Compiles the real jitted train step (`jitted.setup`, as `moe_jax.train` runs it) of the tiny
Mixtral (configs/mixtral.py:e8: top-2 of 8 SwiGLU experts in every block) for a TPU topology,
on libtpu's compile-only devices (`jax.experimental.topologies`; needs `pip install
"jax[tpu]"`), in three variants on a mesh with every chip on the expert axis: dropless with
explicit expert parallelism (ragged all-to-all of the routed rows, megablox on each chip's
experts), dropless in the GSPMD form, and the capacity path ("gather", capacity factor 1.25,
explicit all-to-all of [G, E, C, d] buffers). For each: the Mosaic custom calls, ragged dots,
(ragged) all-to-alls and dots on expert-weight-shaped arrays (`moe_jax.analysis.kernels_hlo`),
and the per-chip bytes of XLA's memory analysis. Writes results/dropless_tpu.json (machine, date,
commit, command). Nothing here runs on a TPU: memory is what the compiler plans, not a
measurement.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import platform
import time
from typing import Any

import jax
import ml_collections
from absl import app, flags

from experiments.benchmarks.timing import command_line
from experiments.library.provenance import git_commit
from moe_jax import schema
from moe_jax.analysis import kernels_hlo
from moe_jax.data.pipeline import BATCH_FEATURES
from moe_jax.parallel import sharding
from moe_jax.train import jitted

VARIANTS: dict[str, dict[str, Any]] = {
    "dropless_explicit": {"moe.dispatch": "dropless", "mesh.expert_parallel": "explicit"},
    "dropless_gspmd": {"moe.dispatch": "dropless", "mesh.expert_parallel": "gspmd"},
    "capacity_gather_explicit": {"moe.dispatch": "gather", "moe.capacity_factor": 1.25,
                                 "mesh.expert_parallel": "explicit"},
}
RESULTS = pathlib.Path(__file__).parent / "results" / "dropless_tpu.json"


def tpu_devices(topology: str) -> list[Any]:
    """libtpu's compile-only devices of `topology` (e.g. "v5p:2x2x1"); ImportError naming the
    install command when libtpu is missing. One process at a time holds libtpu."""
    from jax.experimental import topologies

    if importlib.util.find_spec("libtpu") is None:
        raise ImportError('compiling for a TPU topology needs libtpu: pip install "jax[tpu]".')
    return list(topologies.get_topology_desc(topology, "tpu").devices)


def compile_train_step(config: ml_collections.ConfigDict, devices: list[Any]) -> Any:
    """The compiled train step of `config` on a mesh of `devices` (the config's mesh sizes)."""
    experiment = schema.parse_config(config)
    seq_len = experiment.train.seq_len or experiment.model.max_seq_len
    mesh = sharding.make_mesh(experiment.mesh, devices)
    _, fns = jitted.setup(experiment, seq_len, mesh)
    shape = (experiment.train.batch_size, seq_len)
    batch = {name: jax.ShapeDtypeStruct(shape, dtype, sharding=fns["batch_sharding"])
             for name, dtype in BATCH_FEATURES.items()}
    return fns["train_step"].lower(fns["abstract_state"], batch).compile()


def variant_report(config: ml_collections.ConfigDict, devices: list[Any]) -> dict[str, Any]:
    """Kernel facts and per-chip memory of `config`'s train step compiled for `devices`."""
    experiment = schema.parse_config(config)
    start = time.perf_counter()
    compiled = compile_train_step(config, devices)
    seconds = time.perf_counter() - start
    mesh = dict(zip(sharding.MESH_AXES, experiment.mesh.shape(len(devices)), strict=True))
    shapes = kernels_hlo.expert_weight_shapes(experiment.moe, experiment.model.d_model,
                                              expert_shards=mesh["expert"],
                                              model_shards=mesh["model"])
    facts = kernels_hlo.kernel_facts(compiled.as_text(), shapes)
    memory = compiled.memory_analysis()
    per_chip = {name: int(getattr(memory, f"{name}_size_in_bytes"))
                for name in ("argument", "output", "alias", "temp")}
    per_chip["peak_estimate"] = (per_chip["argument"] + per_chip["output"] - per_chip["alias"]
                                 + per_chip["temp"])
    return {"compile_seconds": round(seconds, 1), "mosaic_kernels": facts.mosaic_kernels,
            "megablox_calls": kernels_hlo.megablox_calls(facts),
            "ragged_dots": facts.ragged_dots, "ragged_all_to_alls": facts.ragged_all_to_alls,
            "all_to_alls": facts.all_to_alls,
            "dense_expert_dots": len(facts.dense_expert_dots),
            "bytes_per_chip": per_chip}


def base_config(num_chips: int, batch_size: int = 16, **settings: Any
                ) -> ml_collections.ConfigDict:
    """The tiny Mixtral in bfloat16 with every chip on the expert axis (plus `settings`,
    dotted keys)."""
    return schema.override(schema.load_config("mixtral.py:e8"), {
        "mesh.data": 1, "mesh.expert": num_chips, "mesh.model": 1,
        "train.batch_size": batch_size, "model.dtype": "bfloat16", **settings})


def run(topology: str, variants: dict[str, dict[str, Any]] = VARIANTS,
        batch_size: int = 16) -> dict[str, Any]:
    devices = tpu_devices(topology)
    base = base_config(len(devices), batch_size)
    rows = {name: variant_report(schema.override(base, settings), devices)
            for name, settings in variants.items()}
    return {"topology": topology, "device_kind": devices[0].device_kind,
            "config": "configs/mixtral.py:e8 (model.dtype bfloat16)", "batch_size": batch_size,
            "variants": {name: {"settings": variants[name], **row}
                         for name, row in rows.items()}}


def main(argv: list[str]) -> None:
    del argv
    result = run(flags.FLAGS.topology, batch_size=flags.FLAGS.batch_size)
    result |= {"machine": f"{platform.node()} ({platform.machine()}), jax {jax.__version__}",
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "commit": git_commit() or "unknown",
               "command": "JAX_PLATFORMS=cpu "
                          + command_line("experiments.benchmarks.dropless_tpu")}
    print(json.dumps(result, indent=1))
    if flags.FLAGS.write:
        RESULTS.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    flags.DEFINE_string("topology", "v5p:2x2x1", "TPU topology to compile for.")
    flags.DEFINE_integer("batch_size", 16, "Sequences per step (the tiny scale's default).")
    flags.DEFINE_bool("write", True, f"Write {RESULTS.name}.")
    app.run(main)
