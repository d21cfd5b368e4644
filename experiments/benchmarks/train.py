"""Training throughput of the real jitted train step: dense models vs their FLOP-matched sparse
models.

Each config is built the way `moe_jax.train.loop` builds it (`jitted.setup`: the model, the
optimizer, the state created by the jitted init on the config's mesh, the jitted train step
donating its state), without data files or checkpoints: the step runs on one synthetic batch of
the config's batch size and sequence length (random tokens, one document per row), fed the
same way the loop feeds its batches (`placement.global_batch`). Input-pipeline time is not
included. tokens/s = batch_size * seq_len / median step time.

Model FLOPs utilisation (MFU; Chowdhery et al. 2022, PaLM, appendix B) = model FLOPs per token
x tokens/s / the machine's peak FLOP/s. Model FLOPs per token are the training FLOPs of
`moe_jax.analysis.flops.count_model` without capacity padding and einsum dispatch (3 x the useful
forward FLOPs: what `flops.match_flops` makes equal between a sparse model and its dense
baseline); the FLOPs the step computes (padding and dispatch included) are reported beside
them, and XLA's own count of the compiled step (`cost_analysis`) too. The peak is:
  - on CPU, the `ceiling` suite's matmul GFLOP/s measured in the same run (float32 row for
    float32 models, bfloat16 row otherwise); no ceiling in the run, no MFU;
  - on GPU/TPU, the vendor's dense (non-sparse) bfloat16 peak of the device (`PEAK_BF16`).

Scales map to configs as in `experiments.library.base` (`dense_variant`, `family`) with that
scale's training settings (`base.SCALES`: batch size, activation dtype). `small` runs for
minutes per model on 2 CPU cores, so it is timed only on an accelerator or when asked.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from experiments.benchmarks.timing import available_host_memory, measure
from experiments.library import base
from moe_jax import schema
from moe_jax.analysis import flops
from moe_jax.data.pipeline import BATCH_FEATURES
from moe_jax.train import jitted, placement

# Dense bfloat16 peak FLOP/s per device (no 2:4 structured sparsity), matched against
# `device.device_kind` in order (first substring that matches). Sources: NVIDIA H100 Tensor
# Core GPU datasheet (SXM 989.4, PCIe 756, NVL 835 TFLOP/s: half the "with sparsity" figures),
# NVIDIA H200 datasheet (SXM 989, NVL 835), NVIDIA A100 datasheet (312); Google Cloud TPU
# system architecture pages (v4 275, v5e 197, v5p 459, v6e 918 TFLOP/s per chip).
PEAK_BF16: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H200 NVL", 835e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("A100", 312e12),
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v5", 459e12),
    ("TPU v6 lite", 918e12),
    ("TPU v6e", 918e12),
)
CEILING_ROW = {"float32": "float32"}  # model dtype -> `layer.ceiling` row; else the bf16 row
CEILING_BF16 = "bfloat16 in, float32 acc"


@dataclasses.dataclass(frozen=True)
class TrainModel:
    """One timed config: `spec` ("file.py:member" in configs/); `baseline` names the dense
    model of the same scale whose step time and FLOPs it is compared with ("" for dense)."""

    name: str
    spec: str
    baseline: str = ""


def models(scale: str, *, swiglu: bool = True) -> tuple[TrainModel, ...]:
    """Dense, Switch top-1 E=8 and GShard top-2 E=8 (both FLOP-matched to the dense model), and
    with `swiglu` the SwiGLU dense model with its Mixtral-style top-2 E=8 match."""
    out = (TrainModel("dense", base.dense_variant(scale)),
           TrainModel("switch_e8", base.family("switch.py", scale, "e8"), "dense"),
           TrainModel("gshard_e8", base.family("gshard.py", scale, "e8"), "dense"))
    if swiglu:
        out += (TrainModel("dense_swiglu", base.dense_variant(scale, "_swiglu")),
                TrainModel("mixtral_e8", base.family("mixtral.py", scale, "e8"), "dense_swiglu"))
    return out


def peak_flops(platform: str, device_kind: str, dtype: str,
               ceiling: Sequence[dict[str, Any]] = ()) -> tuple[float | None, str]:
    """(peak FLOP/s, where it comes from) for MFU; (None, why) when there is none.

    ceiling: rows of the `ceiling` suite from the same run (used on CPU only).
    """
    if platform == "cpu":
        wanted = CEILING_ROW.get(dtype, CEILING_BF16)
        row = next((r for r in ceiling if r["dtype"] == wanted), None)
        if row is None:
            return None, "no CPU peak: run the ceiling suite in the same run (--only=ceiling,train)"
        return row["gflops_per_s"] * 1e9, f"{wanted} matmul ceiling of this run"
    for key, value in PEAK_BF16:
        if key.lower() in device_kind.lower():
            return value, f"{key} dense bf16 peak (vendor datasheet)"
    return None, (f"no peak for device_kind {device_kind!r}: add it to PEAK_BF16 in "
                  "experiments/benchmarks/train.py")


def scale_config(spec: str, scale: str, batch_size: int | None = None
                 ) -> ml_collections.ConfigDict:
    """`spec` with the training settings of `scale` (`base.SCALES`) and, if given, another
    batch size."""
    settings = dict(base.SCALES[scale])
    if batch_size is not None:
        settings["train.batch_size"] = batch_size
    return schema.override(schema.load_config(spec), settings)


def synthetic_batch(batch_size: int, seq_len: int, vocab_size: int, seed: int = 0
                    ) -> dict[str, np.ndarray]:
    """A batch in the input pipeline's format (`BATCH_FEATURES`, each [B, L]): random tokens,
    one document per row, every target counted, one byte per target."""
    rng = np.random.default_rng(seed)
    shape = (batch_size, seq_len)
    values = {"inputs": rng.integers(0, vocab_size, shape),
              "targets": rng.integers(0, vocab_size, shape),
              "weights": np.ones(shape), "segment_ids": np.ones(shape),
              "positions": np.broadcast_to(np.arange(seq_len), shape),
              "domains": np.zeros(shape), "target_bytes": np.ones(shape)}
    return {name: np.asarray(values[name], dtype) for name, dtype in BATCH_FEATURES.items()}


def time_train_step(config: ml_collections.ConfigDict, *, steps: int = 10, warmup: int = 2,
                    memory_limit: int | None = None) -> dict[str, Any]:
    """Compiles and times the jitted train step of `config` (median over `steps` after
    `warmup`), and counts its FLOPs and parameters. MFU and ratios are added by `run`.
    memory_limit: bytes; MemoryError if the compiled step needs more (see `timing.measure`)."""
    experiment = schema.parse_config(config)
    train = experiment.train
    seq_len = train.seq_len or experiment.model.max_seq_len
    _, fns = jitted.setup(experiment, seq_len)
    state = fns["init"](experiment.seed)
    batch = placement.global_batch(
        synthetic_batch(train.batch_size, seq_len, experiment.model.vocab_size),
        fns["batch_sharding"], train.batch_size)
    timing = measure(fns["train_step"], state, batch, repeats=steps, warmup=warmup, carry=True,
                     memory_limit=memory_limit)
    # Routing groups are the whole micro-batch unless moe.group_size is set (moe._check_input).
    count = flops.count_model(experiment.model, experiment.moe, seq_len=seq_len,
                              tokens_per_group=train.micro_batch_size * seq_len)
    tokens = train.batch_size * seq_len
    return {
        "benchmark": "train", "batch_size": train.batch_size, "seq_len": seq_len,
        "tokens_per_step": tokens, "dtype": experiment.model.dtype,
        "timing": timing.as_dict(), "tokens_per_s": tokens / timing.median_s,
        "model_flops_per_token": 3 * count.useful_forward_flops_per_token,
        "computed_flops_per_token": count.training_flops_per_token,
        "xla_flops_per_token": timing.xla_flops / tokens if timing.xla_flops else None,
        "params_total": count.total_params, "params_active": count.active_params,
    }


def with_mfu_and_ratios(rows: list[dict[str, Any]], platform: str, device_kind: str,
                        ceiling: Sequence[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    """Adds to each timed row its peak, MFU, and for sparse rows the ratios to their baseline
    (same scale): step time sparse/dense and model FLOPs per token sparse/dense."""
    out = []
    for row in rows:
        if "skipped" in row:
            out.append(row)
            continue
        peak, source = peak_flops(platform, device_kind, row["dtype"], ceiling)
        row = {**row, "peak_flops_per_s": peak, "peak_source": source,
               "mfu": row["model_flops_per_token"] * row["tokens_per_s"] / peak if peak else None}
        dense = next((r for r in rows if r.get("model") == row.get("baseline")
                      and r.get("scale") == row.get("scale") and "skipped" not in r), None)
        if dense is not None:
            row["ratio_step_time"] = row["timing"]["median_s"] / dense["timing"]["median_s"]
            row["ratio_model_flops"] = (row["model_flops_per_token"]
                                        / dense["model_flops_per_token"])
        out.append(row)
    return out


def run(*, quick: bool = False, small: bool | None = None, small_batch: int | None = None,
        steps: int = 10, ceiling: Sequence[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    """The `train` suite: every model of `models(scale)` at the tiny scale, and at the small
    scale when `small` (default: only on a GPU/TPU backend). quick: 4-row batches, no SwiGLU
    pair. small_batch: rows per small-scale batch (None: the scale's). ceiling: the `ceiling`
    rows of the same run (CPU MFU)."""
    device = jax.devices()[0]
    if small is None:
        small = device.platform != "cpu"
    rows: list[dict[str, Any]] = []
    # On a CPU host, running out of memory kills the process: refuse a step that cannot fit,
    # keeping a fifth of the available memory for the runtime's other buffers (a step whose
    # temporaries were 94% of it was killed).
    available = available_host_memory() if device.platform == "cpu" else None
    memory_limit = int(0.8 * available) if available else None
    for scale in ("tiny", "small"):
        if scale == "small" and not small:
            reason = (f"{device.platform} backend: the small models compute 6-7 TFLOP per 32 x 512 "
                      "batch, tens of seconds per step on a CPU; pass --train_small to time them")
            print(f"  train {scale}: skipped ({reason})", flush=True)
            rows.append({"benchmark": "train", "scale": scale, "skipped": reason})
            continue
        for m in models(scale, swiglu=not quick):
            batch = 4 if quick else (small_batch if scale == "small" else None)
            config = scale_config(m.spec, scale, batch)
            try:
                result = time_train_step(config, steps=steps, warmup=1 if quick else 2,
                                         memory_limit=memory_limit)
            except (MemoryError, jax.errors.JaxRuntimeError) as error:
                if not isinstance(error, MemoryError) and "RESOURCE_EXHAUSTED" not in str(error):
                    raise
                # Keep the rows measured so far; say what did not fit.
                reason = f"out of memory on {device.platform}: {str(error).splitlines()[0]}"
                print(f"  train {scale} {m.name}: skipped ({reason})", flush=True)
                rows.append({"benchmark": "train", "scale": scale, "model": m.name,
                             "skipped": reason})
                continue
            rows.append({**result, "scale": scale, "model": m.name, "config": m.spec,
                         "baseline": m.baseline})
            print(f"  train {scale} {m.name:12} {result['timing']['median_s'] * 1e3:8.1f} ms/step "
                  f"{result['tokens_per_s']:9.0f} tokens/s "
                  f"(compile {result['timing']['compile_s']:.1f} s)", flush=True)
    rows = with_mfu_and_ratios(rows, device.platform, getattr(device, "device_kind", ""), ceiling)
    for row in rows:
        if "ratio_step_time" in row:
            print(f"  train {row['scale']} {row['model']} / {row['baseline']}: step time "
                  f"{row['ratio_step_time']:.2f}x, model FLOPs/token "
                  f"{row['ratio_model_flops']:.3f}x", flush=True)
    return rows
