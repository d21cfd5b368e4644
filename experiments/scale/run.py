"""Will it fit? The train steps of `dense.py:base`, `switch.py:base_e128`, the published MoE
models (`PUBLISHED`) and moe_jax's versions of MaxText's published runs (`maxtext_cases`)
compiled for TPU slices by `moe_jax.dryrun`, gathered into one table.

    python -m experiments.scale.run                   # every case not yet in results.jsonl
    python -m experiments.scale.run --only=mixtral    # cases whose name contains "mixtral"
    python -m experiments.scale.run --table           # rewrite results.md from results.jsonl

Each case compiles in its own process with a time limit: a crash or a timeout is recorded as
such, and every finished case is appended to `results.jsonl` at once (a rerun skips the cases
already there; `--rerun` compiles them again), then `results.md` is rewritten. Needs libtpu
(`pip install -e ".[tpu]"`). Compiling a 47B-parameter model for 128 chips takes minutes of a
CPU core; the table says how long each took, on which machine and at which commit. `--table`
recomputes the communication bound and the step estimates of every record from its collectives
(`load_report`), so a change of the estimator needs no recompilation.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import subprocess
import sys
import tempfile
import time
from typing import Any

from absl import flags

from moe_jax.utils import cli

HERE = pathlib.Path(__file__).parent
RESULTS = HERE / "results.jsonl"
TABLE = HERE / "results.md"
# Realistic training settings: bfloat16 activations (float32 parameters and AdamW moments),
# one routing group per sequence (what the explicit form needs, and a size where capacity
# padding is small), scanned blocks (compile time independent of depth).
COMMON = {"model.dtype": "bfloat16", "model.scan_layers": True}
# Fixed capacity instead of the published models' dropless dispatch: what the explicit form
# needs, and (under gspmd) a dispatch that the compiler partitions by routing group.
CAPACITY = {"moe.dispatch": "gather", "moe.capacity_factor": 1.25}


# The published MoE models, each compiled as published (gspmd, dropless) and in both
# expert-parallel forms with capacity (`_published`), at sequence length 4096 and global batch
# 256, on each topology with its (fsdp, expert) mesh. Adding a model is one line here;
# experiments/scale/expert_parallel.py compares the forms of every model listed.
PUBLISHED = {
    "Mixtral-8x7B": ("configs/published/mixtral_8x7b.py",
                     {"v5p:4x4x8": (16, 8), "v5e:16x16": (32, 8)}),
    "DeepSeekMoE-16B": ("configs/published/deepseek_moe_16b.py",
                        {"v5p:4x4x4": (16, 4), "v5e:16x16": (32, 8)}),
    "OLMoE-1B-7B": ("configs/published/olmoe_1b_7b.py",
                    {"v5p:4x4x4": (16, 4), "v5e:16x16": (32, 8)}),
    "Qwen1.5-MoE-A2.7B": ("configs/published/qwen1_5_moe_a2_7b.py",
                          {"v5p:4x4x4": (16, 4), "v5e:16x16": (64, 4)}),
    "Qwen3-235B-A22B": ("configs/published/qwen3_235b_a22b.py", {"v5p:4x4x8": (16, 8)}),
    # 671B parameters: float32 parameters, gradients and AdamW moments are 16 B each, 10.7 TB;
    # v5p's 95 GB chips need 113 for that alone. On 256 chips (v5p:8x8x4, fsdp 32 x expert 8)
    # the state is 37 GB per chip and the capacity forms compile, but need 82 GB of
    # temporaries: one 4096-token sequence per chip and 128 MLA heads make each float32 copy
    # of the attention scores [128, 4096, 4096] 8.6 GB, and the backward pass holds several.
    # Scores per chip scale with tokens per chip x heads per chip, which only more chips
    # lower at global batch 256: v5p:8x16x4 (512 chips) with 4-way tensor parallelism (heads,
    # expert FFN width, vocabulary) halves them (2 sequences x 32 heads per chip) and the
    # state. (A model axis of 2 does not lay out on 8x8x4, nor on 8x8x8 beside fsdp 32.)
    "DeepSeek-V3": ("configs/published/deepseek_v3.py", {"v5p:8x16x4": (16, 8, 4)}),
    # Llama 4: 16 B per parameter of training state (Scout's 109B: 1.7 TB; Maverick's 400B:
    # 6.4 TB). Sized by the state alone, Scout on v5p:4x4x4 and Maverick on v5p:4x4x8 compile
    # but do not fit (110 and 111 GB per chip: 4 and 2 sequences of 4096 tokens per chip need
    # 86 and 68 GB of temporaries). At global batch 256 only more chips lower both: Scout on
    # 128 chips (v5p:4x4x8, 2 sequences per chip), Maverick on 256 (v5p:8x8x4, fsdp 32, one
    # sequence per chip); expert axis 8 divides their 16 and 128 experts.
    "Llama-4-Scout": ("configs/published/llama4_scout.py", {"v5p:4x4x8": (16, 8)}),
    "Llama-4-Maverick": ("configs/published/llama4_maverick.py", {"v5p:8x8x4": (32, 8)}),
    # 116.8B parameters x 16 B (float32 parameters, gradients, AdamW moments) = 1.87 TB: 20 of
    # v5p's 95 GB chips at least; on 128 (v5p:4x4x8) `moe_jax.analysis.memory` puts 16.5 GB of
    # state per chip, leaving ~78 GB for two 4096-token sequences (remat full; their
    # 201088-entry logits are 6.6 GB in float32).
    "GPT-OSS-120B": ("configs/published/gpt_oss_120b.py", {"v5p:4x4x8": (16, 8)}),
    # 20.9B x 16 B = 0.33 TB: 6.6 GB of state per v5p chip on 64, 2.1 GB per v5e chip (16 GB
    # HBM) on 256 (one sequence each), by `moe_jax.analysis.memory`.
    "GPT-OSS-20B": ("configs/published/gpt_oss_20b.py",
                    {"v5p:4x4x4": (16, 4), "v5e:16x16": (32, 8)}),
}


@dataclasses.dataclass(frozen=True)
class Case:
    """One dry run: `config` with `settings` (dotted overrides) compiled for `topology`."""

    name: str
    config: str
    topology: str
    settings: dict[str, Any]


def _published(name: str, config: str, seq: int, meshes: dict[str, tuple[int, ...]],
               remat: str = "full") -> list[Case]:
    """On each topology (mesh: fsdp, expert[, model]): gspmd as published (dropless), gspmd and
    explicit with capacity."""
    cases = []
    for topology, (fsdp, expert, *model) in meshes.items():
        base = {**COMMON, "train.seq_len": seq, "train.batch_size": 256, "moe.group_size": seq,
                "model.remat_policy": remat, "mesh.fsdp": fsdp, "mesh.expert": expert,
                **({"mesh.model": model[0]} if model else {})}
        cases.append(Case(f"{name} gspmd", config, topology, base))
        cases.append(Case(f"{name} gspmd cf1.25", config, topology, {**base, **CAPACITY}))
        cases.append(Case(f"{name} explicit", config, topology,
                          {**base, **CAPACITY, "mesh.expert_parallel": "explicit"}))
    return cases


def cases() -> list[Case]:
    dense = {**COMMON, "train.seq_len": 1024, "train.batch_size": 256}
    switch = {**dense, "moe.group_size": 1024}
    out = [Case("dense base", "configs/dense.py:base", "v5e:4x4", {**dense, "mesh.data": 16}),
           Case("dense base remat=full", "configs/dense.py:base", "v5e:4x4",
                {**dense, "mesh.data": 16, "model.remat_policy": "full"}),
           Case("dense base", "configs/dense.py:base", "v5p:2x2x4",
                {**dense, "mesh.data": 16})]
    for topology, (fsdp, expert) in {"v5p:4x4x4": (16, 4), "v5e:16x16": (32, 8)}.items():
        mesh = {"mesh.fsdp": fsdp, "mesh.expert": expert}
        out += [Case("switch base_e128 gspmd", "configs/switch.py:base_e128", topology,
                     {**switch, **mesh}),
                Case("switch base_e128 explicit", "configs/switch.py:base_e128", topology,
                     {**switch, **mesh, "mesh.expert_parallel": "explicit"})]
    for policy in ("full", "save_dots"):  # remat vs none (above) on the same compilation
        out.append(Case(f"switch base_e128 gspmd remat={policy}", "configs/switch.py:base_e128",
                        "v5p:4x4x4", {**switch, "mesh.fsdp": 16, "mesh.expert": 4,
                                      "model.remat_policy": policy}))
    for name, (config, meshes) in PUBLISHED.items():
        out += _published(name, config, 4096, meshes)
    return out + maxtext_cases()


def maxtext_cases() -> list[Case]:
    """MaxText's published v5p runs (experiments/scale/maxtext.py) in moe_jax's closest form: the
    same model shape, slice (v5p-128), global batch and sequence length; their weight dtype
    (Mixtral's recipe: bfloat16; Llama's: the float32 default) and bfloat16 activations; FSDP
    over every chip; full remat (Mixtral's default; Llama's save_dot_except_mlpwi has no
    moe_jax counterpart); micro-batches where their per-chip batch in one pass does not fit
    moe_jax's activations."""
    common = {**COMMON, "model.remat_policy": "full", "train.seq_len": 4096, "mesh.fsdp": 64}
    mixtral = {**common, "model.param_dtype": "bfloat16", "train.batch_size": 36 * 64,
               "moe.group_size": 4096}
    spec = "configs/published/mixtral_8x7b.py"
    return [Case("MaxText Mixtral-8x7B dropless 1 pass", spec, "v5p:4x4x4", mixtral),
            Case("MaxText Mixtral-8x7B dropless", spec, "v5p:4x4x4",
                 {**mixtral, "train.grad_accum_steps": 18}),
            Case("MaxText Llama2-70B", "configs/published/llama2_70b.py", "v5p:4x4x4",
                 {**common, "train.batch_size": 2 * 64}),
            Case("MaxText Mixtral-8x7B dropless 1 seq", spec, "v5p:4x4x4",
                 {**mixtral, "train.grad_accum_steps": 36}),
            Case("MaxText Mixtral-8x7B cf1.0", spec, "v5p:4x4x4",
                 {**mixtral, "train.grad_accum_steps": 18, **CAPACITY,
                  "moe.capacity_factor": 1.0})]


def key(case: Case) -> str:
    return f"{case.name} @ {case.topology}"


def run_case(case: Case, out: str) -> None:
    """The worker: one dry run, its report written to `out` as JSON."""
    from moe_jax import dryrun, schema

    experiment = schema.parse_config(schema.override(schema.load_config(case.config),
                                                    case.settings))
    report = dryrun.dryrun(experiment, case.topology, name=case.name)
    pathlib.Path(out).write_text(report.to_json())


def _machine() -> dict[str, Any]:
    from experiments.benchmarks.timing import machine_info

    return machine_info()


def compile_case(case: Case, timeout: float) -> dict[str, Any]:
    """Runs the worker for `case` in a subprocess; the report, or a record of the failure."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        command = [sys.executable, "-m", "experiments.scale.run", f"--case={key(case)}",
                   f"--out={out.name}"]
        start = time.perf_counter()
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
            report = json.loads(pathlib.Path(out.name).read_text() or "{}")
            error = None if report else (done.stderr.strip().splitlines() or ["?"])[-1]
        except subprocess.TimeoutExpired:
            report, error = {}, (f"not finished: still compiling after {timeout / 60:.0f} min "
                                 "on this machine's 2 shared CPU cores")
    wall = time.perf_counter() - start
    if not report:
        report = {"config": case.name, "topology": case.topology, "compiled": False,
                  "error": error}
    return {"case": key(case), "settings": case.settings, "spec": case.config,
            "wall_seconds": wall, "machine": _machine(), "report": report}


def read_results() -> dict[str, dict[str, Any]]:
    if not RESULTS.exists():
        return {}
    rows = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
    return {row["case"]: row for row in rows}  # the last line of a case wins


# Records written before the HLO reader split collective bytes by group size: the group each
# kind is taken to run over (the all-to-alls of expert parallelism over the expert axis; the
# others in the large-group limit, over all devices; a permute sends to one peer).
LEGACY_GROUPS = {"all-to-all": "expert", "ragged-all-to-all": "expert"}
LEGACY_MARK = " †"


def _legacy_groups(report: dict[str, Any]) -> dict[str, int]:
    return {kind: report["mesh"][LEGACY_GROUPS[kind]] if kind in LEGACY_GROUPS else
            report["devices"] for kind in report["collectives"]}


def load_report(report: dict[str, Any]):
    """A recorded report as a `dryrun_report.Report` with the communication bound and both step
    estimates (recomputed from its collectives and its compute and memory bounds, with
    `LEGACY_GROUPS` and a mark on the name where the record has no group sizes); None for a
    record of a case that never reached the compiler."""
    from moe_jax.analysis import communication, dryrun_report, topology

    if "mesh" not in report:
        return None
    fields = {f.name for f in dataclasses.fields(dryrun_report.Report)}
    result = dryrun_report.Report(**{k: v for k, v in report.items() if k in fields})
    if not (result.compiled and result.estimate and result.chip in topology.CHIPS):
        return result
    chips = math.prod(int(n) for n in result.topology.split(":")[1].split("x"))
    topo = topology.Topology(result.topology, (), topology.CHIPS[result.chip],
                             devices_per_chip=result.devices // chips)
    if any(not c.get("bytes_per_step_by_group") for c in result.collectives.values()):
        result.collectives = communication.assume_groups(result.collectives,
                                                         _legacy_groups(report))
        result.config += LEGACY_MARK
    if "useful_flops" not in result.estimate:  # older records: useful = MFU x step x peak
        e = result.estimate
        e["useful_flops"] = e["mfu"] * e["step_seconds"] * topo.device_peak_flops
    dryrun_report.add_communication(result, topo)
    return result


def write_table(results: dict[str, dict[str, Any]]) -> str:
    from moe_jax.analysis import dryrun_report

    order = [key(c) for c in cases()]
    rows = [results[k] for k in order if k in results]
    reports = [load_report(row["report"]) for row in rows]
    lines = [dryrun_report.table([r for r in reports if r is not None])]
    if any(r is not None and r.config.endswith(LEGACY_MARK) for r in reports):
        lines += ["", f"{LEGACY_MARK.strip()} Compiled before the dry run read the collectives' "
                  "group sizes: the communication bound takes each all-to-all over the expert "
                  "axis and the other collectives over all devices (`LEGACY_GROUPS`); an "
                  "asynchronous collective-permute-start, where the program has one, counted "
                  "operand and result."]
    failed = [(row, r) for row, r in zip(rows, reports) if r is None or not r.compiled]
    if failed:
        lines += ["", "Not compiled:", ""]
        lines += [f"- {row['case']}: {row['report'].get('error', '?')[:300]}"
                  for row, _ in failed]
    machines = {f"{m['cpu_count']}-core {m['cpu']}, jax {m['jax']}"
                for m in (row["machine"] for row in rows)}
    commits = sorted({row["machine"]["commit"] for row in rows})
    dates = sorted({row["machine"]["date"][:10] for row in rows})
    span = dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}"
    lines += ["", f"Compiled on {'; '.join(sorted(machines))}, {span}, at "
              f"commits {', '.join(commits)} (`python -m experiments.scale.run`); the settings, "
              "machine load and commit of each case are in results.jsonl."]
    TABLE.write_text("\n".join(lines) + "\n")
    return TABLE.read_text()


def define_flags(values: flags.FlagValues) -> None:
    flags.DEFINE_string("only", "", "run cases whose name contains this", flag_values=values)
    flags.DEFINE_bool("rerun", False, "compile cases already done", flag_values=values)
    flags.DEFINE_float("timeout_minutes", 45.0, "time limit of one case's compilation",
                       flag_values=values)
    flags.DEFINE_bool("table", False, "only rewrite results.md", flag_values=values)
    flags.DEFINE_string("case", None, "(internal) compile this one case in this process",
                        flag_values=values)
    flags.DEFINE_string("out", None, "(internal) where --case writes its row", flag_values=values)


def main(argv: list[str] | None = None) -> None:
    args, _ = cli.parse_flags(define_flags, argv, __doc__)
    by_key = {key(c): c for c in cases()}
    if args.case:
        run_case(by_key[args.case], args.out)
        return
    if not args.table:
        done = read_results()
        for case in cases():
            if args.only.lower() not in key(case).lower() or (key(case) in done
                                                              and not args.rerun):
                continue
            print(f"== {key(case)}", flush=True)
            row = compile_case(case, args.timeout_minutes * 60)
            with RESULTS.open("a") as f:
                f.write(json.dumps(row) + "\n")
            report = row["report"]
            print(f"   compiled={report['compiled']} in {row['wall_seconds']:.0f} s "
                  f"{report.get('error') or ''}"[:400], flush=True)
            write_table(read_results())
    print(write_table(read_results()))


if __name__ == "__main__":
    main()
