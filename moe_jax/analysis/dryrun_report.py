"""The report of a dry run: what the compiler made of a train step, against the chip's HBM.

`moe_jax.dryrun` compiles the real train step for a topology; `analyse` reads the compiled
executable into a `Report`: bytes per device of parameters, optimizer state, batch and
temporaries against the chip's HBM (fits, or over by how much and which knob helps); the
collectives in the compiled HLO; XLA's FLOPs and bytes; an estimate of the step time and MFU
from the chip's published figures. `out_of_memory` reads a compiler's refusal instead.

The estimate has three lower bounds per device and step: compute (the step's FLOPs at the
chip's peak bf16 rate), HBM (XLA's bytes accessed at the HBM bandwidth) and communication (each
collective's bytes through the device's ICI links, `communication.bound_seconds`). From them two
step estimates: `overlap`, the largest of the three (everything overlaps perfectly: the best
case), and `serial`, their sum (nothing overlaps). MFU is the model's useful FLOPs (3 x the
forward's, no remat recompute, no capacity padding) over each step time at peak. XLA's cost
analysis counts a loop body once, so for programs with loops (scanned layers, gradient
accumulation) the compute bound uses the larger of XLA's FLOPs and the model's (`flops.count`
at training, 3 x forward, 4 x with full remat) and scales XLA's bytes by the same factor.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Sequence
from typing import Any

import jax

from moe_jax.analysis import communication, compiled_hlo, flops
from moe_jax.analysis import topology as topology_lib
from moe_jax.analysis.topology import GIB
from moe_jax.parallel import sharding
from moe_jax.utils import cli

# XLA:TPU's refusals of a program over the HBM: "... Used 20.50G of 15.48G hbm. ..." (all
# buffers), or "... required for HLO temporaries (54.18G) exceeds available HBM (15.75G)."
_OUT_OF_HBM = (re.compile(r"Used ([\d.]+)([KMGT]?) of ([\d.]+)([KMGT]?) hbm"),
               re.compile(r"HLO temporaries \(([\d.]+)([KMGT]?)\) exceeds available HBM "
                          r"\(([\d.]+)([KMGT]?)\)"))
# Forward passes per training step: forward + backward (2x) + the recomputed forward of full
# remat. "save_dots" keeps the matmul outputs, so recomputes (almost) no matmul FLOPs.
PASSES = {"none": 3, "full": 4, "save_dots": 3}


@dataclasses.dataclass
class Report:
    """One dry run; bytes, FLOPs and seconds are per device and per train step."""

    config: str
    topology: str
    chip: str | None
    devices: int
    mesh: dict[str, int]
    expert_parallel: str
    scan_layers: bool
    remat_policy: str
    batch_size: int
    seq_len: int
    compiled: bool = False
    error: str | None = None
    compile_seconds: float | None = None
    bytes: dict[str, int] = dataclasses.field(default_factory=dict)
    hbm_bytes: int | None = None
    fits: bool | None = None
    advice: list[str] = dataclasses.field(default_factory=list)
    collectives: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    loops_with_unknown_trip_count: int = 0
    xla_flops: float | None = None
    xla_bytes_accessed: float | None = None
    model_flops: float | None = None
    # Seconds per step of each collective kind at least (communication.bound_seconds).
    communication_seconds: dict[str, float] = dataclasses.field(default_factory=dict)
    # compute_seconds, memory_seconds, communication_seconds (all kinds), useful_flops (per
    # device and step), overlap_step_seconds and overlap_mfu (max of the three bounds),
    # serial_step_seconds and serial_mfu (their sum): see `step_estimates`.
    estimate: dict[str, float] = dataclasses.field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)


def device_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of sharded `ShapeDtypeStruct`s (its shard of each)."""
    return sum(math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
               for leaf in jax.tree.leaves(tree))


def _advice(report: Report, experiment: Any) -> list[str]:
    """Which knobs would bring the peak under the device's HBM, with the numbers."""
    b, hbm = report.bytes, report.hbm_bytes
    over = b["peak"] - hbm
    state = b["parameters"] + b["optimizer"]
    temporaries = b.get("temporaries", b["peak"] - state - b["batch"])
    micro_rows = experiment.train.micro_batch_size // math.prod(
        report.mesh[a] for a in sharding.mesh_axes("batch", experiment.mesh.logical_rules()))
    tips = [(state / 2, f"fsdp: parameters + optimizer state take {state / GIB:.2f} GiB per "
                        f"device; doubling --config.mesh.fsdp (now {report.mesh['fsdp']}) halves "
                        "them")]
    if experiment.model.remat_policy == "none":
        tips.append((temporaries / 2, f"remat: temporaries take {temporaries / GIB:.2f} GiB; "
                     "--config.model.remat_policy=full (or save_dots) recomputes activations "
                     "in the backward pass instead of keeping them"))
    tips.append((temporaries / 2, f"smaller batch: each device holds {micro_rows} rows of "
                 f"{report.seq_len} tokens per micro-batch; doubling "
                 "--config.train.grad_accum_steps halves the activations"))
    tips.sort(key=lambda tip: -tip[0])
    return [f"over by {over / GIB:.2f} GiB", *(text for _, text in tips)]


def step_estimates(compute_seconds: float, memory_seconds: float,
                   communication_seconds: float, useful_flops: float, peak_flops: float
                   ) -> dict[str, float]:
    """The two step estimates from the three lower bounds (seconds per device and step):
    `overlap` = max(compute, memory, communication), `serial` = their sum; the MFU of each is
    `useful_flops` (per device and step) over step time x `peak_flops` (per device)."""
    bounds = (compute_seconds, memory_seconds, communication_seconds)
    out = {"compute_seconds": compute_seconds, "memory_seconds": memory_seconds,
           "communication_seconds": communication_seconds, "useful_flops": useful_flops}
    for name, step in (("overlap", max(bounds)), ("serial", sum(bounds))):
        out[f"{name}_step_seconds"] = step
        out[f"{name}_mfu"] = useful_flops / (step * peak_flops) if step else 0.0
    return out


def add_communication(report: Report, topology: topology_lib.Topology) -> None:
    """Fills `report.communication_seconds` from its collectives and the estimate's
    communication bound and step estimates from its compute and memory bounds (which
    `analyse` computed; also for reports read back from JSON)."""
    report.communication_seconds = communication.bound_seconds(
        report.collectives, topology.device_ici_bytes_per_second)
    e = report.estimate
    report.estimate = step_estimates(e["compute_seconds"], e["memory_seconds"],
                                     sum(report.communication_seconds.values()),
                                     e["useful_flops"], topology.device_peak_flops)


def _estimate(report: Report, topology: topology_lib.Topology, useful_flops: float,
              has_loops: bool) -> None:
    """The compute and memory bounds (see the module docstring), then `add_communication`."""
    computed = max(report.xla_flops, report.model_flops) if has_loops else report.xla_flops
    scale = computed / report.xla_flops if report.xla_flops else 1.0
    report.estimate = {
        "compute_seconds": computed / topology.device_peak_flops,
        "memory_seconds": report.xla_bytes_accessed * scale / topology.device_hbm_bytes_per_second,
        "useful_flops": useful_flops}
    add_communication(report, topology)


def state_bytes(fns: dict[str, Any]) -> dict[str, int]:
    """Per-device bytes of the train state's parts and the batch, from their shardings."""
    state = fns["abstract_state"]
    return {"parameters": device_bytes(state.params),
            "optimizer": device_bytes(state.opt_state),
            "other_state": device_bytes((state.model_state, state.step, state.rng)),
            "batch": device_bytes(fns["abstract_batch"])}


def out_of_memory(report: Report, experiment: Any) -> None:
    """A compiler error that the program exceeds the HBM: its figures, and the knobs."""
    scale = {u: 1024 ** i for i, u in enumerate("KMGT", start=1)} | {"": 1}
    for kind, pattern in zip(("peak", "temporaries"), _OUT_OF_HBM):
        if match := pattern.search(report.error or ""):
            used, used_unit, capacity, capacity_unit = match.groups()
            report.bytes[kind] = int(float(used) * scale[used_unit])
            if kind == "temporaries":  # lower bound: the arguments come on top
                report.bytes["peak"] = report.bytes["temporaries"] + sum(
                    report.bytes[k] for k in ("parameters", "optimizer", "other_state", "batch"))
            report.hbm_bytes = int(float(capacity) * scale[capacity_unit])  # what XLA can use
            report.fits = False
            report.advice = _advice(report, experiment)
            return


def analyse(report: Report, executable: Any, experiment: Any,
            topology: topology_lib.Topology) -> None:
    """Fills `report` from the compiled `executable` of `experiment`'s train step: memory,
    collectives, XLA's cost, the model's FLOPs and, for a chip, the fit and the estimate."""
    memory = compiled_hlo.memory_bytes(executable)
    report.bytes |= {"temporaries": memory["temp"], "generated_code": memory["generated_code"],
                     "peak": memory["peak"]}
    text = executable.as_text()
    found, report.loops_with_unknown_trip_count = compiled_hlo.collective_counts(text)
    report.collectives = {k: dataclasses.asdict(v) for k, v in found.items()}
    report.xla_flops, report.xla_bytes_accessed = compiled_hlo.xla_cost(executable)
    tokens = experiment.train.batch_size * report.seq_len
    count = flops.count_model(experiment.model, experiment.moe, seq_len=report.seq_len,
                              tokens_per_group=experiment.train.micro_batch_size * report.seq_len)
    passes = PASSES[experiment.model.remat_policy]
    report.model_flops = passes / 3 * count.training_flops_per_token * tokens / report.devices
    if topology.chip is not None:
        report.hbm_bytes = topology.device_hbm_bytes
        report.fits = report.bytes["peak"] <= report.hbm_bytes
        report.advice = [] if report.fits else _advice(report, experiment)
        has_loops = any(n != 1 for n in compiled_hlo.loop_trip_counts(text))
        useful = 3 * count.useful_forward_flops_per_token * tokens / report.devices
        _estimate(report, topology, useful, has_loops)


# --- output --------------------------------------------------------------------------------------

TABLE_COLUMNS = ("config", "topology", "mesh (data, fsdp, expert, model)", "form", "scan/remat",
                 "compiled", "GiB/device: params+opt, temp, peak / HBM", "fits",
                 "collectives per step", "bounds s: compute, HBM, ICI",
                 "est. step: overlap / serial", "est. MFU: overlap / serial", "compile")


def _gib(value: float) -> str:
    return f"{value / GIB:.3g}"


def _collectives(report: Report) -> str:
    return ", ".join(f"{kind} {c['per_step']}" for kind, c in report.collectives.items()) or "-"


def table_row(report: Report) -> tuple[str, ...]:
    """One report as a row of `TABLE_COLUMNS`."""
    b = report.bytes
    memory = bounds = steps = mfu = "-"
    if b:
        memory = ", ".join([_gib(b["parameters"] + b["optimizer"]),
                            *(_gib(b[k]) if k in b else "?" for k in ("temporaries", "peak"))])
        memory += f" / {_gib(report.hbm_bytes)}" if report.hbm_bytes else ""
    fits = "-" if report.fits is None else ("yes" if report.fits else "**no**")
    if e := report.estimate:
        bounds = ", ".join(f"{e[k]:.3g}" for k in ("compute_seconds", "memory_seconds",
                                                   "communication_seconds"))
        steps = f"{e['overlap_step_seconds']:.3g} / {e['serial_step_seconds']:.3g} s"
        mfu = f"{100 * e['overlap_mfu']:.0f}% / {100 * e['serial_mfu']:.0f}%"
    compile_time = f"{report.compile_seconds:.0f} s" if report.compile_seconds else "-"
    return (report.config, report.topology, "x".join(str(v) for v in report.mesh.values()),
            report.expert_parallel, f"{'scan' if report.scan_layers else 'unrolled'}/"
            f"{report.remat_policy}", "yes" if report.compiled else "**no**", memory, fits,
            _collectives(report) if report.compiled else "-", bounds, steps, mfu, compile_time)


def table(reports: Sequence[Report]) -> str:
    """The reports as a Markdown table, one row each (`table_row`)."""
    return cli.markdown_table(TABLE_COLUMNS, [table_row(r) for r in reports])


def markdown(report: Report) -> str:
    """The report as Markdown: the table row plus the details."""
    lines = [f"# Dry run: {report.config or 'config'} on {report.topology}", "",
             table([report]), ""]
    if report.error:
        lines += ["Compiler error:", "", "```", report.error, "```"]
    if report.bytes:
        lines += ["Per device: " + ", ".join(f"{k} {_gib(v)} GiB" for k, v in report.bytes.items())
                  + (f"; HBM {_gib(report.hbm_bytes)} GiB" if report.hbm_bytes else "") + "."]
        lines += [f"- {tip}" for tip in report.advice]
    if report.compiled:
        ici = report.communication_seconds
        lines += ["", cli.markdown_table(
            ("collective", "instructions", "per step", "result GiB per step",
             "devices per group", "ICI bound s"),
            [(k, c["instructions"], c["per_step"], _gib(c["result_bytes_per_step"]),
              ", ".join(str(g) for g in sorted(c.get("bytes_per_step_by_group", {}), key=int)),
              f"{ici[k]:.3g}" if k in ici else "-")
             for k, c in report.collectives.items()])]
        lines += ["", f"XLA cost analysis per device: {report.xla_flops:.3g} FLOPs, "
                  f"{report.xla_bytes_accessed:.3g} bytes accessed (loop bodies counted once); "
                  f"model FLOPs per device and step (flops.count): {report.model_flops:.3g}."]
    if e := report.estimate:
        lines += ["", f"Estimate (lower bounds from the {report.chip}'s published peak bf16 "
                  "FLOP/s, HBM and ICI bandwidth, moe_jax.analysis.topology.CHIPS; not a "
                  f"measurement): compute {e['compute_seconds']:.3g} s, HBM "
                  f"{e['memory_seconds']:.3g} s, ICI {e['communication_seconds']:.3g} s per "
                  f"step. Step >= {e['overlap_step_seconds']:.3g} s if all three overlap "
                  f"(MFU <= {100 * e['overlap_mfu']:.1f}%), "
                  f"{e['serial_step_seconds']:.3g} s if none does "
                  f"(MFU {100 * e['serial_mfu']:.1f}%)."]
    return "\n".join(lines) + "\n"


def write(report: Report, path_stem: str) -> tuple[str, str]:
    """Writes `path_stem`.json and .md; returns their paths."""
    os.makedirs(os.path.dirname(os.path.abspath(path_stem)), exist_ok=True)
    paths = (path_stem + ".json", path_stem + ".md")
    with open(paths[0], "w") as f:
        f.write(report.to_json() + "\n")
    with open(paths[1], "w") as f:
        f.write(markdown(report))
    return paths
