"""Decode cost against batch size: MoE models against their active- and total-parameter-matched
dense models, per decode step with the key/value cache.

    python -m experiments.benchmarks.decode          # ~30 min on 2 loaded CPU cores
    python -m experiments.benchmarks.decode --quick  # small shapes, 3 batch sizes: the harness

writes results/decode-<platform>-<date>.{md,json,png}. Models (`MODELS`; d 512, 2 blocks, 8
heads, SwiGLU, every FFN sparse, byte vocabulary; ~28M parameters, 111 MB in float32, past this
CPU's 32 MB L3): `moe_e8k2` (top-2 of 8 experts of width 1024, Mixtral-style), `moe_e64k8`
(top-8 of 64 experts of width 128, fine-grained: the same total, half the active expert width),
each against the dense model with its active parameters (`dense_active_*`: FFN width k * f) and
the dense model with its total (`dense_total`: width 8192); `*_int8`: the MoE models with
int8 expert weights (`moe_jax.models.quantize`, qwix), dequantized inside the step.

Each step: `decode.step` (jitted, the state donated) on B rows whose cache holds 16 slots
(rolling), the next token the greedy choice; the MoE models' dropless grouped matmul is XLA's
per-expert row blocks (`GROUPED_MATMUL`), which computes only the touched experts. Timing: for
each batch size, every model compiled and warmed up (`WARMUP` steps), then `ROUNDS` rounds
that each time `STEPS` consecutive steps of every model in turn (interleaved, so load from
other work spreads over all models). Reported: the best (minimum) of the ROUNDS * STEPS step
times, the least disturbed by the other jobs on the machine, and their median; ratios, the
roofline and the plot use the best. The load average is recorded before and after.

Also: the distinct experts each MoE block touches per step (from the routing the layers sow,
averaged over the timed steps and blocks) with the untrained (random) router of the timed
models, with a trained router (the tiny `mixtral.py:e8` and `fine_grained.py:e64k8s0` runs in
runs/, when present, decoding validation text), and with uniform routing (random top-k sets,
simulated), against the expectation E * (1 - (1 - k/E)^B) of B independent uniform tokens.
Weight bytes read per step: every non-expert parameter plus the touched experts (at their
stored precision); per token: divided by B. Roofline: the step's time floor
max(bytes / bandwidth, FLOPs / matmul peak) with the bandwidth and float32 matmul ceiling
measured in the same run (`read_bandwidth`: a matrix-vector product over 256 MB, the weight-read
pattern of a decode step; `layer.ceiling`). `--trained_only` re-measures them.
"""

from __future__ import annotations

import json
import os
import pathlib
import statistics
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from experiments.benchmarks import layer
from experiments.benchmarks.run import RESULTS
from experiments.benchmarks.timing import command_line, machine_info, measure, measured_line
from moe_jax.analysis import flops
from moe_jax.config import MoeConfig
from moe_jax.models import ModelConfig, decode, quantize
from moe_jax.utils import cli

CACHE_SLOTS = 16
ROUNDS, STEPS, WARMUP = 2, 3, 1
# The dropless grouped matmul of the MoE models: XLA's per-expert row blocks (experts without
# rows skipped). The CPU default, the host-BLAS custom call, paid ~300 ms of host overhead per
# single-token step on the loaded machine of these runs (43 ms blocked, 9 ms the
# active-matched dense; 8 experts, B=1).
GROUPED_MATMUL = "blocked"
BATCH_SIZES = tuple(2**i for i in range(9))  # 1 ... 256: expert counts
# Timed batch sizes: every power of two (each is one compilation per model);
# `--timed_batch_sizes=1,4,16,64,256` halves the run.
TIMED_BATCH_SIZES = BATCH_SIZES


def model_configs(d: int = 512, f: int = 1024) -> dict[str, tuple[ModelConfig, MoeConfig, str]]:
    """name -> (ModelConfig, MoeConfig, weight precision of the experts)."""
    base = ModelConfig(d_model=d, num_layers=2, num_heads=8, d_ff=f, activation="swiglu",
                       max_seq_len=CACHE_SLOTS)
    moe = MoeConfig(activation="swiglu", dispatch="dropless", renormalize_gates=True,
                    grouped_matmul=GROUPED_MATMUL)
    e8 = (base.replace(moe_every=1), moe.replace(num_experts=8, top_k=2, d_ff=f))
    e64 = (base.replace(moe_every=1), moe.replace(num_experts=64, top_k=8, d_ff=f // 8,
                                                  renormalize_gates=False))
    return {
        "moe_e8k2": (*e8, "float32"),
        "moe_e8k2_int8": (*e8, "int8"),
        "dense_active_e8k2": (base.replace(d_ff=2 * f), moe, "float32"),
        "moe_e64k8": (*e64, "float32"),
        "moe_e64k8_int8": (*e64, "int8"),
        "dense_active_e64k8": (base.replace(d_ff=f), moe, "float32"),
        "dense_total": (base.replace(d_ff=8 * f), moe, "float32"),
    }


def expected_distinct(num_experts: int, k: int, tokens: int) -> float:
    """E * (1 - (1 - k/E)^B): experts touched by B tokens that each pick a uniform k-subset."""
    return num_experts * (1 - (1 - k / num_experts) ** tokens)


def uniform_distinct(num_experts: int, k: int, tokens: int, draws: int = 200) -> float:
    """The same, measured: B tokens route with iid Gumbel logits (uniform k-subsets)."""
    logits = jax.random.gumbel(jax.random.key(tokens), (draws, tokens, num_experts))
    chosen = jax.nn.one_hot(jax.lax.top_k(logits, k)[1], num_experts).sum((1, 2))
    return float(jnp.mean(jnp.sum(chosen > 0, -1)))


class Model:
    """One benchmarked model: parameters, its jitted decode step, and its byte accounting."""

    def __init__(self, name: str, model_config: ModelConfig, moe: MoeConfig, precision: str):
        self.name, self.config, self.moe, self.precision = name, model_config, moe, precision
        self.model = decode.decoding_model(model_config, moe)
        tokens = jnp.zeros((1, 4), jnp.int32)
        params = jax.tree.map(
            lambda x: x.unbox() if hasattr(x, "unbox") else x,
            self.model.init({"params": jax.random.key(0)}, tokens, train=False)["params"],
            is_leaf=lambda x: hasattr(x, "unbox"))
        self.sparse = bool(model_config.sparse_layers)
        if precision != "float32":
            params = quantize.quantize_experts(params, model_config, precision)
        self.params = params
        self.stored_bytes = quantize.array_bytes(params)
        count = flops.count_model(model_config, moe, seq_len=CACHE_SLOTS)
        self.total_params, self.active_params = count.total_params, count.active_params
        self.flops_per_token = count.forward_flops_per_token
        self.expert_params = 3 * model_config.d_model * moe.d_ff if self.sparse else 0
        self.num_experts = moe.num_experts if self.sparse else 0
        self.step = jax.jit(self._step, donate_argnums=1)

    def _step(self, params, state, tokens):
        if self.precision != "float32":
            params = quantize.dequantize_experts(params, self.config)
        logits, state, routed = decode.step(self.model, {"params": params}, state, tokens)
        experts = (jnp.stack([r.choice.expert_index for r in routed]) if routed
                   else jnp.zeros((0, tokens.shape[0], 1), jnp.int32))
        return state, jnp.argmax(logits, -1).astype(jnp.int32), experts

    def start(self, batch: int) -> tuple[Any, jax.Array]:
        """(state, tokens) of B rows with an empty cache."""
        params = self.params
        if self.precision != "float32":
            params = quantize.dequantize_experts(params, self.config)
        cache = decode.init_cache(self.model, {"params": params}, batch, CACHE_SLOTS)
        state = decode.DecodeState(cache, jnp.zeros((batch,), jnp.int32))
        return state, jax.random.randint(jax.random.key(batch), (batch,), 3, 259, jnp.int32)

    def weight_bytes_read(self, distinct_per_layer: float) -> float:
        """Weights a step must read: all non-expert parameters (float32) plus the touched
        experts of each MoE block at their stored precision."""
        bytes_per = flops.BYTES_PER_PARAM[self.precision]
        layers = len(self.config.sparse_layers)
        non_expert = self.total_params - layers * self.num_experts * self.expert_params
        return 4.0 * non_expert + bytes_per * layers * distinct_per_layer * self.expert_params

    def kv_bytes_read(self, batch: int) -> float:
        c = self.config
        return 2.0 * c.num_layers * CACHE_SLOTS * c.kv_heads * c.head_size * 4 * batch


def time_batch(models: list[Model], batch: int, rounds: int, steps: int) -> dict[str, dict]:
    """Median step time and mean distinct experts per MoE block of every model at batch B."""
    runs = {}
    for m in models:
        state, tokens = m.start(batch)
        for _ in range(WARMUP):
            state, tokens, _ = jax.block_until_ready(m.step(m.params, state, tokens))
        runs[m.name] = {"state": state, "tokens": tokens, "times": [], "distinct": []}
    for _ in range(rounds):
        for m in models:
            run = runs[m.name]
            for _ in range(steps):
                start = time.perf_counter()
                run["state"], run["tokens"], experts = jax.block_until_ready(
                    m.step(m.params, run["state"], run["tokens"]))
                run["times"].append(time.perf_counter() - start)
                if m.sparse:
                    run["distinct"] += [len(np.unique(e)) for e in np.asarray(experts)]
    return {name: {"step_s": min(r["times"]), "median_s": statistics.median(r["times"]),
                   "distinct": float(np.mean(r["distinct"])) if r["distinct"] else None}
            for name, r in runs.items()}


def trained_distinct(workdir: str, batch_sizes: tuple[int, ...], steps: int = 8
                     ) -> dict[int, float] | None:
    """Distinct experts per MoE block per step of a trained run decoding validation text (B
    prompts of 8 bytes from the validation rows, greedy); None if the run is absent."""
    if not os.path.isdir(os.path.join(workdir, "checkpoints")) or not os.listdir(
            os.path.join(workdir, "checkpoints")):
        return None
    from moe_jax.train import inputs as train_inputs
    from moe_jax.train.restore import restore_run

    run = restore_run(workdir)
    e = run.experiment
    model = decode.decoding_model(e.model, e.moe)
    data = train_inputs.make_inputs(e.data, e.model, batch_size=e.train.batch_size,
                                    seq_len=e.model.max_seq_len, seed=e.seed)
    rows = np.concatenate([b["inputs"] for b in data.eval_batches()])
    rows = rows[(rows[:, :8] > 0).all(1)]
    out = {}
    for batch in batch_sizes:
        prompts = jnp.asarray(np.resize(rows, (batch, rows.shape[1]))[:, :8])
        gen = decode.generate(model, run.variables, prompts, jnp.full((batch,), 8),
                              key=jax.random.key(0), max_new_tokens=steps)
        counts = [len(np.unique(np.asarray(r.choice.expert_index)[s]))
                  for r in gen.routing for s in range(steps)]
        out[batch] = float(np.mean(counts))
    return out


def rows_for(models: list[Model], timings: dict[int, dict], ceilings: dict[str, float]
             ) -> list[dict[str, Any]]:
    """One row per (model, batch): time, tokens/s, bytes per token, roofline."""
    rows = []
    for batch, by_model in timings.items():
        for m in models:
            t = by_model[m.name]
            distinct = t["distinct"] if m.sparse else 0.0
            weights = m.weight_bytes_read(distinct) if m.sparse else 4.0 * m.total_params
            kv = m.kv_bytes_read(batch)
            rows.append(roofline({
                "model": m.name, "batch": batch, "step_ms": t["step_s"] * 1e3,
                "median_ms": t["median_s"] * 1e3,
                "tokens_per_s": batch / t["step_s"], "distinct_experts": t["distinct"],
                "weight_bytes_per_token": weights / batch, "kv_bytes_per_step": kv,
                "gbytes_per_s": (weights + kv) / t["step_s"] / 1e9,
                "gflops_per_s": m.flops_per_token * batch / t["step_s"] / 1e9,
                "stored_weight_bytes": m.stored_bytes, "params_total": m.total_params,
                "params_active": m.active_params}, ceilings))
    return rows


def markdown(rows: list[dict], experts: dict[str, Any], ceilings: dict[str, float],
             header: str) -> str:
    """The results file: the step table, ratios to the matched dense models, expert counts."""
    lines = [header, "",
             "Ceilings from this run: weight-read bandwidth "
             f"{ceilings['bandwidth'] / 1e9:.1f} GB/s (matrix-vector product; the roofline's), "
             "stream bandwidth "
             f"{ceilings.get('stream_bandwidth', 0) / 1e9:.1f} GB/s (y = 2x, read + write), "
             f"float32 matmul {ceilings['peak'] / 1e9:.0f} GFLOP/s.", "",
             cli.markdown_table(
                 ("model", "B", "step ms (best)", "median", "tokens/s",
                  "distinct experts / block", "weight MB read / token", "GB/s", "GFLOP/s",
                  "bound", "floor ms", "of floor"),
                 [(r["model"], r["batch"], f"{r['step_ms']:.2f}", f"{r['median_ms']:.2f}",
                   f"{r['tokens_per_s']:.0f}",
                   "-" if r["distinct_experts"] is None else f"{r['distinct_experts']:.2f}",
                   f"{r['weight_bytes_per_token'] / 1e6:.2f}", f"{r['gbytes_per_s']:.1f}",
                   f"{r['gflops_per_s']:.1f}", r["bound"], f"{r['floor_ms']:.2f}",
                   f"{r['of_floor']:.0%}") for r in rows])]
    step = {(r["model"], r["batch"]): r["step_ms"] for r in rows}

    def ratio(a: str, b: str, batch: int) -> str:
        return f"{step[(a, batch)] / step[(b, batch)]:.2f}"

    pairs = (("moe_e8k2", "dense_active_e8k2"), ("moe_e8k2", "dense_total"),
             ("moe_e64k8", "dense_active_e64k8"), ("moe_e64k8", "dense_total"),
             ("moe_e8k2_int8", "moe_e8k2"), ("moe_e64k8_int8", "moe_e64k8"))
    lines += ["", "Step time relative to the matched dense models (x = MoE / dense):", "",
              cli.markdown_table(
                  ("B", "e8k2 / active", "e8k2 / total", "e64k8 / active", "e64k8 / total",
                   "e8k2 int8 / fp32", "e64k8 int8 / fp32"),
                  [(batch, *(ratio(a, b, batch) for a, b in pairs))
                   for batch in sorted({r["batch"] for r in rows})])]
    table = []
    for batch in sorted(experts["batches"]):
        cells = []
        for key in ("e8k2", "e64k8"):
            x = experts[key]
            trained = x["trained"].get(batch) if x["trained"] else None
            random = x["random_router"].get(batch)
            cells += [f"{x['expected'][batch]:.2f}", f"{x['uniform'][batch]:.2f}",
                      "-" if random is None else f"{random:.2f}",
                      "-" if trained is None else f"{trained:.2f}"]
        table.append((batch, *cells))
    lines += ["", "Distinct experts per MoE block per decode step (B tokens):", "",
              cli.markdown_table(("B", "E=8 k=2 expected", "uniform (sim.)", "random router",
                                  "trained router", "E=64 k=8 expected", "uniform (sim.)",
                                  "random router", "trained router"), table)]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], experts: dict[str, Any], path: str) -> None:
    """Step time vs batch per model; distinct experts vs batch with the expectation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == name]
        style = "--" if name.startswith("dense") else ":" if name.endswith("int8") else "-"
        left.plot([r["batch"] for r in mine], [r["step_ms"] for r in mine], style, marker="o",
                  label=name)
    left.set(xscale="log", yscale="log", xlabel="batch size B (tokens per step)",
             ylabel="decode step (ms)", title="Decode step time")
    left.legend(fontsize=8)
    batches = sorted(experts["batches"])
    for key, e in (("e8k2", 8), ("e64k8", 64)):
        x = experts[key]
        right.plot(batches, [x["expected"][b] / e for b in batches], "k-", lw=0.8)
        timed = sorted(x["random_router"])
        right.plot(timed, [x["random_router"][b] / e for b in timed], "o--",
                   label=f"{key} random router")
        if x["trained"]:
            right.plot(batches, [x["trained"][b] / e for b in batches], "s-",
                       label=f"{key} trained router")
    right.set(xscale="log", xlabel="batch size B", ylabel="share of experts touched per block",
              title="Distinct experts per step (black: E(1-(1-k/E)^B))")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def read_bandwidth(megabytes: int = 256, repeats: int = 5) -> dict[str, Any]:
    """Weight-read bandwidth: a float32 matrix-vector product over a matrix larger than the
    caches, the access pattern of a decode step at B=1 (each weight read once, nothing large
    written; `layer.memory_bandwidth`'s y = 2x also writes, and faults in, a fresh output)."""
    cols = 4096
    w = jnp.ones((megabytes * 2**20 // (4 * cols), cols), jnp.float32)
    timing = measure(lambda w, v: w @ v, w, jnp.ones((cols,), jnp.float32),
                           repeats=repeats)
    return {"bytes": w.nbytes, "timing": timing.as_dict()}


def measure_ceilings(quick: bool = False) -> dict[str, float]:
    """This machine's weight-read bandwidth (bytes/s, `read_bandwidth`), stream bandwidth (read +
    write, `layer.memory_bandwidth`) and float32 matmul FLOP/s, each from the fastest of its
    timed runs (like the steps: least disturbed by load). The roofline uses the read bandwidth."""
    read = read_bandwidth(32 if quick else 256)
    stream = layer.memory_bandwidth(64 if quick else 512)
    size = 1024 if quick else 2048
    peak = layer.ceiling(size)[0]
    return {"bandwidth": read["bytes"] / read["timing"]["min_s"],
            "stream_bandwidth": 2.0 * stream["bytes"] / stream["timing"]["min_s"],
            "peak": 2.0 * size**3 / peak["timing"]["min_s"]}


def roofline(row: dict[str, Any], ceilings: dict[str, float]) -> dict[str, Any]:
    """The row's roofline fields from its bytes, FLOPs and best step time."""
    seconds = row["step_ms"] / 1e3
    moved = row["weight_bytes_per_token"] * row["batch"] + row["kv_bytes_per_step"]
    step_flops = row["gflops_per_s"] * 1e9 * seconds
    floor = max(moved / ceilings["bandwidth"], step_flops / ceilings["peak"])
    bound = "memory" if moved / ceilings["bandwidth"] > step_flops / ceilings["peak"] \
        else "compute"
    return {**row, "bound": bound, "floor_ms": floor * 1e3, "of_floor": floor / seconds}


TRAINED_RUNS = {"e8k2": "mixtral_e8", "e64k8": "fine_grained_e64k8s0"}


def add_trained(path: str, runs: str) -> None:
    """Fills the trained-router expert counts of a results JSON and rewrites its .md/.png."""
    with open(path) as f:
        results = json.load(f)
    experts = results["experts"]
    batches = tuple(experts["batches"])
    for key, run in TRAINED_RUNS.items():
        trained = trained_distinct(os.path.join(runs, run), batches)
        experts[key]["trained"] = trained
        experts[key]["trained_run"] = run
    results["ceilings"] = measure_ceilings()
    results["ceilings_measured"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    results["rows"] = [roofline(r, results["ceilings"]) for r in results["rows"]]
    for key in TRAINED_RUNS:  # JSON turned the batch keys into strings
        for field in ("expected", "uniform", "random_router"):
            experts[key][field] = {int(b): v for b, v in experts[key][field].items()}
        if experts[key]["trained"]:
            experts[key]["trained"] = {int(b): v for b, v in experts[key]["trained"].items()}
    stem = pathlib.Path(path).with_suffix("")
    header = stem.with_suffix(".md").read_text().split("\n")[0].split(" Ceilings re-")[0]
    header += (f" Ceilings re-measured {results['ceilings_measured']} (best of 5), load "
               f"average {os.getloadavg()[0]:.2f}.")
    stem.with_suffix(".md").write_text(markdown(results["rows"], experts, results["ceilings"],
                                                header))
    pathlib.Path(path).write_text(json.dumps(results, indent=1))
    plot(results["rows"], experts, str(stem.with_suffix(".png")))
    print(stem.with_suffix(".md").read_text())


def define_flags(values: flags.FlagValues) -> None:
    flags.DEFINE_bool("quick", False, "small shapes, 3 batch sizes: the harness",
                      flag_values=values)
    flags.DEFINE_string("runs", "runs", "where the trained tiny runs live", flag_values=values)
    flags.DEFINE_string("timed_batch_sizes", ",".join(map(str, TIMED_BATCH_SIZES)),
                        "comma-separated batch sizes timed", flag_values=values)
    flags.DEFINE_string("trained_only", None, "RESULTS_JSON: add the trained routers' expert "
                        "counts to a finished run's results and re-measure the ceilings "
                        "(rewrites its .md and .png)", flag_values=values)


def main(argv: list[str] | None = None) -> None:
    args, _ = cli.parse_flags(define_flags, argv, __doc__)
    if args.trained_only:
        add_trained(args.trained_only, args.runs)
        return
    load_before = os.getloadavg()[0]
    batch_sizes = (1, 2, 4) if args.quick else BATCH_SIZES
    timed = (1, 4) if args.quick else tuple(int(b) for b in args.timed_batch_sizes.split(","))
    rounds, steps = (1, 2) if args.quick else (ROUNDS, STEPS)
    configs = model_configs(64, 128) if args.quick else model_configs()
    models = [Model(name, *spec) for name, spec in configs.items()]
    ceilings = measure_ceilings(args.quick)
    timings = {}
    for batch in timed:
        timings[batch] = time_batch(models, batch, rounds, steps)
        print(batch, {k: round(v["step_s"] * 1e3, 2) for k, v in timings[batch].items()},
              flush=True)
    rows = rows_for(models, timings, ceilings)
    experts: dict[str, Any] = {"batches": list(batch_sizes)}
    for key, (e, k) in {"e8k2": (8, 2), "e64k8": (64, 8)}.items():
        run = TRAINED_RUNS[key]
        trained = None if args.quick else trained_distinct(os.path.join(args.runs, run),
                                                           batch_sizes)
        experts[key] = {
            "expected": {b: expected_distinct(e, k, b) for b in batch_sizes},
            "uniform": {b: uniform_distinct(e, k, b) for b in batch_sizes},
            "random_router": {b: timings[b][f"moe_{key}"]["distinct"] for b in timed},
            "trained": trained, "trained_run": run}
    m = machine_info()
    m["load_average_before"] = load_before
    command = command_line("experiments.benchmarks.decode", argv)
    header = (measured_line(m, command) + f" Load average at the start {load_before:.2f}: the "
              "2 cores were shared with other jobs, so absolute times are upper bounds; models "
              "are interleaved within each batch size, so ratios are fairer than times.")
    stem = RESULTS / f"decode-{m['platform']}-{m['date'][:10]}{'-quick' if args.quick else ''}"
    stem.with_suffix(".md").write_text(markdown(rows, experts, ceilings, header))
    stem.with_suffix(".json").write_text(json.dumps(
        {"machine": m, "ceilings": ceilings, "rows": rows, "experts": experts}, indent=1))
    plot(rows, experts, str(stem.with_suffix(".png")))
    print(stem.with_suffix(".md").read_text())
    print(f"wrote {stem}.{{md,json,png}}", file=sys.stderr)


if __name__ == "__main__":
    main()
