"""Grouped matmul: rows sorted by expert times that expert's weights, paying only routed rows.

    out[m] = x[m] @ w[e(m)]      x [M, k], w [E, k, n], group_sizes [E] -> out [M, n]

`jax.lax.ragged_dot` computes this, but XLA:CPU lowers it to a dense product against every
expert (E times the useful FLOPs). `blocked_grouped_matmul` walks each expert's rows in blocks
(`BLOCK_SIZES`: full blocks of 256 rows, then 32-row blocks for the tail, so at most 31 wasted
rows per expert) with dynamic trip counts, reading the operands in place (no padded copies), and
has a custom VJP built from the same loops: dx = grouped(dy, w^T) and dw[e] = sum over e's
blocks of x_b^T dy_b. Rows past sum(group_sizes) come out as zeros.

On CPU the default is `blas_grouped_matmul`: one host-BLAS GEMM per expert through an XLA
custom call (`grouped_matmul_cpu`), which writes each output row once where the XLA loop
fills and rewrites a loop carry (experiments/benchmarks/README.md has the measurements). It
runs only on the jaxlib versions it was tested with (`cpu_ffi.TESTED`); elsewhere
"auto" uses "blocked", with one warning per process.

On accelerators "auto" uses the field's kernels (`grouped_matmul_kernels`): megablox on
TPU, tokamax on GPU when installed. The choice is made per platform when the program is
lowered, so a TPU program compiled on a CPU host gets the TPU kernel.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from moe_jax.kernels import cpu_ffi, grouped_matmul_cpu, grouped_matmul_kernels

Array = jax.Array

BLOCK_SIZES = (256, 32)
IMPLEMENTATIONS = ("auto", "ragged_dot", "blocked", "blas", "megablox", "tokamax")
KERNEL_IMPLS = ("megablox", "tokamax")  # per-device kernels: not partitionable by GSPMD


def _for_blocks(start: Array, end: Array, block_sizes: tuple[int, ...], num_rows: int,
                body: Callable, carry):
    """carry = body(carry, window, size, row_mask) over blocks covering rows [start, end):
    full blocks of each size in turn; the last size also covers the remainder.

    Full blocks get row_mask=None: all `size` rows from `window` are theirs. The last size's
    blocks read the window [window, window + size) with window = min(s, num_rows - size) for a
    block at row s, so that no slice runs past the last row (which would need a padded copy of
    the operands); row_mask [size, 1] marks the window's rows in [s, min(s + size, end)), the
    ones that belong to the block.
    """
    for i, size in enumerate(block_sizes):
        rows_left = end - start
        last = i == len(block_sizes) - 1
        count = (rows_left + size - 1) // size if last else rows_left // size

        def block(j, carry, start=start, size=size, last=last):
            s = start + j * size
            if not last:
                return body(carry, s, size, None)
            window = jnp.minimum(s, num_rows - size)
            rows = window + jnp.arange(size)
            row_mask = ((rows >= s) & (rows < jnp.minimum(s + size, end)))[:, None]
            return body(carry, window, size, row_mask)

        carry = jax.lax.fori_loop(0, count, block, carry)
        start = start + count * size
    return carry


def _usable(block_sizes: tuple[int, ...], num_rows: int) -> tuple[int, ...]:
    """The block sizes smaller than `num_rows` (a single block of all rows if none is).

    A full-block loop over blocks of all `num_rows` rows would slice the whole operand, which
    does not depend on the loop index: XLA hoists that matmul out of the loop and computes it
    for every expert, also where the loop runs zero times (E whole-batch matmuls per call)."""
    return tuple(b for b in block_sizes if b < num_rows) or (num_rows,)


def _grouped(x: Array, w: Array, group_sizes: Array, transpose_w: bool,
             block_sizes: tuple[int, ...]) -> Array:
    """out[m] = x[m] @ w[e(m)] (or @ w[e(m)].T): [M, k] -> [M, n]."""
    num_rows = x.shape[0]
    block_sizes = _usable(block_sizes, num_rows)
    contract = 1 if transpose_w else 0
    out = jnp.zeros((num_rows, w.shape[1 + (1 - contract)]), x.dtype)
    offsets = jnp.cumsum(group_sizes) - group_sizes

    def per_expert(e, out):
        def rows_of_expert(out):
            w_e = w[e].astype(x.dtype)

            def body(out, window, size, row_mask):
                x_block = jax.lax.dynamic_slice_in_dim(x, window, size)
                y = jax.lax.dot_general(x_block, w_e, (((1,), (contract,)), ((), ())))
                if row_mask is not None:  # rows of the window outside the block keep theirs
                    y = jnp.where(row_mask, y, jax.lax.dynamic_slice_in_dim(out, window, size))
                return jax.lax.dynamic_update_slice_in_dim(out, y, window, axis=0)

            return _for_blocks(offsets[e], offsets[e] + group_sizes[e], block_sizes, num_rows,
                               body, out)

        # An expert without rows is skipped, its weights never read (decoding touches few).
        return jax.lax.cond(group_sizes[e] > 0, rows_of_expert, lambda out: out, out)

    return jax.lax.fori_loop(0, w.shape[0], per_expert, out)


def _weight_grad(x: Array, dy: Array, group_sizes: Array, num_experts: int,
                 block_sizes: tuple[int, ...]) -> Array:
    """dw[e] = sum over rows m of expert e of x[m]^T dy[m]: [E, k, n], float32 accumulation."""
    num_rows = x.shape[0]
    block_sizes = _usable(block_sizes, num_rows)
    offsets = jnp.cumsum(group_sizes) - group_sizes
    k, n = x.shape[1], dy.shape[1]

    def per_expert(e, dw):
        def body(acc, window, size, row_mask):
            x_block = jax.lax.dynamic_slice_in_dim(x, window, size)
            if row_mask is not None:
                x_block = jnp.where(row_mask, x_block, 0)
            dy_block = jax.lax.dynamic_slice_in_dim(dy, window, size)
            return acc + jax.lax.dot_general(x_block, dy_block, (((0,), (0,)), ((), ())),
                                             preferred_element_type=jnp.float32)

        acc = _for_blocks(offsets[e], offsets[e] + group_sizes[e], block_sizes, num_rows,
                          body, jnp.zeros((k, n), jnp.float32))
        return dw.at[e].set(acc)

    return jax.lax.fori_loop(0, num_experts, per_expert,
                             jnp.zeros((num_experts, k, n), jnp.float32))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def blocked_grouped_matmul(x: Array, w: Array, group_sizes: Array,
                           block_sizes: tuple[int, ...] = BLOCK_SIZES) -> Array:
    """x [M, k] rows sorted by expert, w [E, k, n], group_sizes [E] int32 -> [M, n]."""
    return _grouped(x, w, group_sizes, False, block_sizes)


def _fwd(x, w, group_sizes, block_sizes):
    return _grouped(x, w, group_sizes, False, block_sizes), (x, w, group_sizes)


def _bwd(block_sizes, residuals, dy):
    x, w, group_sizes = residuals
    dx = _grouped(dy, w, group_sizes, True, block_sizes)
    dw = _weight_grad(x, dy, group_sizes, w.shape[0], block_sizes).astype(w.dtype)
    return dx, dw, None


blocked_grouped_matmul.defvjp(_fwd, _bwd)


@jax.custom_vjp
def blas_grouped_matmul(x: Array, w: Array, group_sizes: Array) -> Array:
    """x [M, k] float32 rows sorted by expert, w [E, k, n] float32, group_sizes [E] -> [M, n]:
    the host BLAS through an XLA:CPU custom call (`grouped_matmul_cpu`), with its VJP."""
    return grouped_matmul_cpu.grouped_matmul_cpu(x, w, group_sizes)


def _blas_fwd(x, w, group_sizes):
    return blas_grouped_matmul(x, w, group_sizes), (x, w, group_sizes)


def _blas_bwd(residuals, dy):
    x, w, group_sizes = residuals
    dx = grouped_matmul_cpu.grouped_matmul_cpu(dy, w, group_sizes, transpose_w=True)
    dw = grouped_matmul_cpu.grouped_weight_grad_cpu(x, dy, group_sizes)
    return dx, dw, None


blas_grouped_matmul.defvjp(_blas_fwd, _blas_bwd)


def _cpu_default() -> str:
    """"auto" on XLA:CPU: "blas", or "blocked" (one warning) on an untested jaxlib."""
    if jax.default_backend() != "cpu":  # tracing for CPU from an accelerator host: no warning
        return "blocked"
    return "blas" if cpu_ffi.usable_for_auto() else "blocked"


def _gpu_default() -> str:
    """"auto" on GPU: tokamax when installed and traced on a GPU host (it picks its kernel from
    the host's device), else ragged_dot (docs/dispatch.md has XLA:GPU's cuDNN ragged-dot fusion
    flag)."""
    on_gpu = jax.default_backend() == "gpu"
    return "tokamax" if on_gpu and grouped_matmul_kernels.tokamax_available() else "ragged_dot"


def _on_platform(x: Array, w: Array, group_sizes: Array, **impls: str) -> Array:
    """The grouped matmul `impls[platform]` (or impls["default"]), chosen when the program is
    lowered for its platform (`jax.lax.platform_dependent`), not from the host's default
    backend: a program compiled on a CPU host for a TPU topology gets the TPU kernel."""
    branches = {platform: functools.partial(grouped_matmul, impl=impl)
                for platform, impl in impls.items()}
    return jax.lax.platform_dependent(x, w, group_sizes, **branches)


def grouped_matmul(x: Array, w: Array, group_sizes: Array, impl: str = "auto", *,
                   partitioned: bool = False) -> Array:
    """out[m] = x[m] @ w[e(m)]: x [M, k] rows sorted by expert, w [E, k, n], group_sizes [E].

    impl:
      "ragged_dot"  `jax.lax.ragged_dot` (XLA:CPU computes it densely over all experts).
      "blocked"     per-expert row blocks in XLA, with a custom VJP.
      "blas"        XLA:CPU only, on a tested jaxlib (`cpu_ffi.untested_reason`):
                    the host BLAS per expert; bfloat16/float16 operands run as float32 copies
                    and are rounded back, as XLA:CPU's own dots of those types compute in
                    float32.
      "megablox"    the megablox TPU kernels (`grouped_matmul_kernels`); interpret mode off TPU.
      "tokamax"     `tokamax.ragged_dot` (the `gpu` extra): its own kernel choice on GPU, its
                    "xla" implementation elsewhere.
      "auto"        per platform, at lowering: megablox on TPU; tokamax on GPU when installed,
                    else ragged_dot; on CPU "blas", or "blocked" with one
                    `UntestedJaxlibWarning` per process where the jaxlib is untested.
    partitioned: the call runs on arrays that XLA's GSPMD partitioner splits over several
    devices (outside `shard_map`). Mosaic and Triton kernels cannot be partitioned: there
    "auto" is ragged_dot on TPU and GPU, and "megablox" and "tokamax" are refused.
    """
    if partitioned and impl in KERNEL_IMPLS:
        raise ValueError(
            f"grouped matmul {impl!r} cannot run on arrays that GSPMD partitions over a mesh "
            "(Mosaic/Triton kernels must be called per device); use the explicit "
            "expert-parallel form (mesh.expert_parallel='explicit') or grouped_matmul='auto'.")
    if impl == "auto":
        kernel = "ragged_dot" if partitioned else "megablox"
        return _on_platform(x, w, group_sizes, cpu=_cpu_default(), tpu=kernel,
                            cuda="ragged_dot" if partitioned else _gpu_default(),
                            default="ragged_dot")
    if impl == "megablox":
        def kernel(x, w, group_sizes, interpret):
            return grouped_matmul_kernels.megablox_grouped_matmul(x, w, group_sizes,
                                                                  interpret=interpret)
        return jax.lax.platform_dependent(
            x, w, group_sizes, tpu=functools.partial(kernel, interpret=False),
            default=functools.partial(kernel, interpret=True))
    if impl == "tokamax":  # tokamax picks its kernel from the host's device when traced
        implementation = None if jax.default_backend() == "gpu" else "xla"
        return grouped_matmul_kernels.tokamax_grouped_matmul(x, w, group_sizes,
                                                             implementation=implementation)
    if impl == "blocked":
        return blocked_grouped_matmul(x, w, group_sizes)
    if impl == "blas":
        if jax.default_backend() != "cpu":
            raise ValueError(f"grouped matmul 'blas' runs on XLA:CPU only (backend "
                             f"{jax.default_backend()!r}); use 'auto' or 'ragged_dot'.")
        if not (jnp.issubdtype(x.dtype, jnp.floating) and jnp.issubdtype(w.dtype, jnp.floating)):
            raise ValueError(f"grouped matmul 'blas' needs floating operands; got {x.dtype} x "
                             f"{w.dtype}.")
        f32 = jnp.float32
        return blas_grouped_matmul(x.astype(f32), w.astype(f32), group_sizes).astype(x.dtype)
    if impl == "ragged_dot":
        return jax.lax.ragged_dot(x, w.astype(x.dtype), group_sizes)
    raise ValueError(f"unknown grouped matmul {impl!r}; use one of {IMPLEMENTATIONS}.")
