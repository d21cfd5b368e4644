"""MoE layer benchmarks: machine ceiling, MoE vs the equal-FLOPs dense FFN, cost growth with the
routing group, and the dropless path against a dense FFN doing the same routed work."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from experiments.benchmarks.timing import measure
from moe_jax import MoeConfig, experts, moe
from moe_jax.kernels import grouped_matmul_kernels


@dataclasses.dataclass(frozen=True)
class LayerShape:
    d_model: int = 512
    d_ff: int = 2048  # dense FFN width; top-k experts get d_ff // k (equal active FLOPs)
    tokens: int = 8192


def ffn_flops(tokens: int, d_model: int, d_ff: int, activation: str) -> float:
    """Forward FLOPs of the FFN: 2 * tokens * d * f per projection (2 or 3 projections)."""
    return 2.0 * tokens * d_model * d_ff * (3 if activation == "swiglu" else 2)


def vjp_loss(apply_fn):
    """fwd+bwd: the value <y, cotangent> and its gradient w.r.t. params and input, as a
    training step needs them. Returning the value keeps the whole forward pass alive: with the
    gradient alone, a loss linear in y lets XLA drop the dense FFN's output matmul (5 of its 6
    matmuls run) while the MoE layer still needs its expert outputs for the gate gradient."""
    def loss(params, x, cotangent):
        return jnp.vdot(apply_fn(params, x), cotangent)
    return jax.value_and_grad(loss, argnums=(0, 1))


def _inputs(shape: LayerShape, tokens: int | None = None):
    tokens = tokens or shape.tokens
    x = jax.random.normal(jax.random.key(1), (tokens, shape.d_model), jnp.float32)
    cotangent = jax.random.normal(jax.random.key(2), x.shape, jnp.float32)
    return x, cotangent


def time_dense(shape: LayerShape, activation: str, *, backward: bool, tokens: int | None = None,
               repeats: int = 5, grouped_matmul: str | None = None) -> dict[str, Any]:
    """The dense FFN; with `grouped_matmul`, run as one expert through that grouped matmul
    (e.g. "blas": the same GEMMs as the dropless path on CPU)."""
    x, cotangent = _inputs(shape, tokens)
    if grouped_matmul is None:
        params = experts.init_ffn(jax.random.key(0), shape.d_model, shape.d_ff, activation)
        apply_fn = lambda p, x: experts.ffn(p, x, activation)
    else:
        params = experts.init_ffn(jax.random.key(0), shape.d_model, shape.d_ff, activation,
                                  batch=(1,))
        sizes = jnp.array([x.shape[0]], jnp.int32)
        apply_fn = lambda p, x: experts.grouped_ffn(p, x, sizes, activation, grouped_matmul)
    if backward:
        timing = measure(vjp_loss(apply_fn), params, x, cotangent, repeats=repeats)
    else:
        timing = measure(apply_fn, params, x, repeats=repeats)
    flops = ffn_flops(x.shape[0], shape.d_model, shape.d_ff, activation) * (3 if backward else 1)
    return {"timing": timing.as_dict(), "useful_flops": flops,
            "useful_gflops_per_s": flops / timing.median_s / 1e9}


def time_moe(shape: LayerShape, config: MoeConfig, *, backward: bool,
             tokens: int | None = None, repeats: int = 5) -> dict[str, Any]:
    params = moe.init_params(jax.random.key(0), config, shape.d_model)
    x, cotangent = _inputs(shape, tokens)
    n = x.shape[0]
    apply_fn = lambda p, x: moe.apply(p, x, config, train=True)[0]
    if backward:
        timing = measure(vjp_loss(apply_fn), params, x, cotangent, repeats=repeats)
    else:
        timing = measure(apply_fn, params, x, repeats=repeats)
    mult = 3 if backward else 1
    useful = ffn_flops(n * config.top_k, shape.d_model, config.d_ff, config.activation) * mult
    if config.dispatch == "dropless":
        rows = n * config.top_k
    else:
        group = config.group_size or n
        rows = config.num_experts * config.capacity(group, train=True) * (n // group)
    padded = ffn_flops(rows, shape.d_model, config.d_ff, config.activation) * mult
    return {"timing": timing.as_dict(), "useful_flops": useful, "padded_flops": padded,
            "useful_gflops_per_s": useful / timing.median_s / 1e9,
            "padded_gflops_per_s": padded / timing.median_s / 1e9}


def ceiling(size: int = 4096, repeats: int = 5) -> list[dict[str, Any]]:
    """A large jitted matmul: float32, and bfloat16 inputs with float32 accumulation."""
    rows = []
    for name, dtype in (("float32", jnp.float32), ("bfloat16 in, float32 acc", jnp.bfloat16)):
        a = jax.random.normal(jax.random.key(0), (size, size), dtype)
        b = jax.random.normal(jax.random.key(1), (size, size), dtype)
        fn = lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32)
        timing = measure(fn, a, b, repeats=repeats)
        flops = 2.0 * size**3
        rows.append({"benchmark": "ceiling", "dtype": name, "size": size,
                     "timing": timing.as_dict(), "gflops_per_s": flops / timing.median_s / 1e9})
    return rows


def memory_bandwidth(megabytes: int = 512, repeats: int = 5) -> dict[str, Any]:
    """Streaming bandwidth: y = 2x over a float32 array larger than the caches, counted as
    read + write. Expert weights and their gradients at E=64 (537 MB each here) stream at this
    rate, whatever the matmul ceiling."""
    x = jnp.ones((megabytes * 2**20 // 4,), jnp.float32)
    timing = measure(lambda x: x * 2.0, x, repeats=repeats)
    moved = 2.0 * x.nbytes
    return {"benchmark": "bandwidth", "bytes": x.nbytes, "timing": timing.as_dict(),
            "gbytes_per_s": moved / timing.median_s / 1e9}


def layer_vs_dense(shape: LayerShape, num_experts: tuple[int, ...] = (8, 64),
                   top_ks: tuple[int, ...] = (1, 2), factors: tuple[float, ...] = (1.0, 1.25),
                   dispatches: tuple[str, ...] = ("gather", "einsum", "dropless"),
                   activation: str = "gelu", repeats: int = 5) -> list[dict[str, Any]]:
    """Every dispatch strategy against the dense FFN of equal active FLOPs."""
    rows = []
    for backward in (False, True):
        dense = time_dense(shape, activation, backward=backward, repeats=repeats)
        rows.append({"benchmark": "layer", "model": "dense", "backward": backward, **dense})
        for e in num_experts:
            for k in top_ks:
                for dispatch in dispatches:
                    for cf in factors if dispatch != "dropless" else (None,):
                        config = MoeConfig(num_experts=e, top_k=k, d_ff=shape.d_ff // k,
                                           capacity_factor=cf or 1.0, dispatch=dispatch,
                                           activation=activation)
                        result = time_moe(shape, config, backward=backward, repeats=repeats)
                        ratio = result["timing"]["median_s"] / dense["timing"]["median_s"]
                        rows.append({"benchmark": "layer", "model": "moe", "backward": backward,
                                     "num_experts": e, "top_k": k, "capacity_factor": cf,
                                     "dispatch": dispatch, "ratio_to_dense": ratio, **result})
                        print(f"  layer {'fwd+bwd' if backward else 'fwd':7} E={e:<3} k={k} "
                              f"cf={cf} {dispatch:8} ratio {ratio:.2f}", flush=True)
    return rows


# Grouped matmuls timed by `dropless_target` on each backend (tokamax: the `gpu` extra).
DROPLESS_IMPLS = {"cpu": ("blas", "blocked", "ragged_dot"),
                  "tpu": ("megablox", "ragged_dot", "blocked"),
                  "gpu": (("tokamax",) if grouped_matmul_kernels.tokamax_available() else ())
                  + ("ragged_dot", "blocked")}


def dropless_target(shape: LayerShape, num_experts: int = 8, repeats: int = 5
                    ) -> list[dict[str, Any]]:
    """Dropless top-2 swiglu (expert d_ff = shape.d_ff) vs a dense swiglu FFN on 2x the tokens
    (the same routed work), fwd+bwd, for each grouped-matmul implementation. On CPU also the
    dense FFN on the BLAS GEMMs of the "blas" path, which is faster than XLA:CPU's dot here:
    the blas row's ratio to it separates the dropless overhead from the GEMM library."""
    rows = []
    tokens = 2 * shape.tokens
    dense = time_dense(shape, "swiglu", backward=True, tokens=tokens, repeats=repeats)
    rows.append({"benchmark": "dropless", "model": "dense on 2T tokens", **dense})
    cpu = jax.default_backend() == "cpu"
    if cpu:
        blas_dense = time_dense(shape, "swiglu", backward=True, tokens=tokens, repeats=repeats,
                                grouped_matmul="blas")
        ratio = blas_dense["timing"]["median_s"] / dense["timing"]["median_s"]
        rows.append({"benchmark": "dropless", "model": "dense on 2T tokens, BLAS GEMMs",
                     "ratio_to_dense": ratio, **blas_dense})
    for impl in DROPLESS_IMPLS[jax.default_backend()]:
        config = MoeConfig(num_experts=num_experts, top_k=2, d_ff=shape.d_ff, dispatch="dropless",
                           activation="swiglu", grouped_matmul=impl)
        slow = cpu and impl == "ragged_dot"  # every expert densely: one timed run
        result = time_moe(shape, config, backward=True, repeats=1 if slow else repeats)
        ratio = result["timing"]["median_s"] / dense["timing"]["median_s"]
        row = {"benchmark": "dropless", "model": f"dropless {impl}", "ratio_to_dense": ratio,
               **result}
        if impl == "blas":
            same = result["timing"]["median_s"] / blas_dense["timing"]["median_s"]
            row.update(ratio_to_blas_dense=same, model=f"dropless blas ({same:.2f}x BLAS dense)")
        rows.append(row)
        print(f"  {row['model']:32} ratio {ratio:.2f}", flush=True)
    return rows


def growth(shape: LayerShape, sizes: tuple[int, ...] = (1024, 2048, 4096, 8192, 16384, 32768),
           max_einsum_bytes: float = 4e9, repeats: int = 3) -> list[dict[str, Any]]:
    """fwd+bwd of a top-1 E=8 layer (capacity 1.0) as the routing group grows, per strategy."""
    rows = []
    for tokens in sizes:
        dense = time_dense(shape, "gelu", backward=True, tokens=tokens, repeats=repeats)
        rows.append({"benchmark": "growth", "tokens": tokens, "dispatch": "dense FFN", **dense})
        for dispatch in ("gather", "einsum", "dropless"):
            config = MoeConfig(num_experts=8, top_k=1, d_ff=shape.d_ff, capacity_factor=1.0,
                               dispatch=dispatch, activation="gelu")
            one_hot_bytes = tokens * 8 * config.capacity(tokens, train=True) * 4
            if dispatch == "einsum" and one_hot_bytes > max_einsum_bytes:
                rows.append({"benchmark": "growth", "tokens": tokens, "dispatch": dispatch,
                             "skipped": f"[T, E, C] one-hot tensor alone is "
                                        f"{one_hot_bytes / 1e9:.1f} GB"})
                continue
            result = time_moe(shape, config, backward=True, tokens=tokens, repeats=repeats)
            rows.append({"benchmark": "growth", "tokens": tokens, "dispatch": dispatch,
                         "ratio_to_dense": result["timing"]["median_s"]
                         / dense["timing"]["median_s"], **result})
            print(f"  growth T={tokens:<6} {dispatch:8} "
                  f"{result['timing']['median_s'] * 1e3:.0f} ms", flush=True)
    return rows
