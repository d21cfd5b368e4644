"""Grouped matmul: rows sorted by expert times that expert's weights, paying only routed rows.

    out[m] = x[m] @ w[e(m)]      x [M, k], w [E, k, n], group_sizes [E] -> out [M, n]

`jax.lax.ragged_dot` computes this, but XLA:CPU lowers it to a dense product against every
expert (E times the useful FLOPs). `blocked_grouped_matmul` walks each expert's rows in blocks
(`BLOCK_SIZES`: full blocks of 256 rows, then 32-row blocks for the tail, so at most 31 wasted
rows per expert) with dynamic trip counts, reading the operands in place (no padded copies), and
has a custom VJP built from the same loops: dx = grouped(dy, w^T) and dw[e] = sum over e's
blocks of x_b^T dy_b. Rows past sum(group_sizes) come out as zeros.

On CPU the default is `blas_grouped_matmul`: one host-BLAS GEMM per expert through an XLA
custom call (`moe_jax.grouped_matmul_cpu`), which writes each output row once where the XLA loop
fills and rewrites a loop carry (experiments/benchmarks/README.md has the measurements). It
runs only on the jaxlib versions it was tested with (`cpu_ffi.TESTED`); elsewhere
"auto" uses "blocked", with one warning per process.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from moe_jax import cpu_ffi, grouped_matmul_cpu

Array = jax.Array

BLOCK_SIZES = (256, 32)


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
    """The block sizes that fit in `num_rows` rows (a single block of all rows if none does)."""
    return tuple(b for b in block_sizes if b <= num_rows) or (num_rows,)


def _grouped(x: Array, w: Array, group_sizes: Array, transpose_w: bool,
             block_sizes: tuple[int, ...]) -> Array:
    """out[m] = x[m] @ w[e(m)] (or @ w[e(m)].T): [M, k] -> [M, n]."""
    num_rows = x.shape[0]
    block_sizes = _usable(block_sizes, num_rows)
    contract = 1 if transpose_w else 0
    out = jnp.zeros((num_rows, w.shape[1 + (1 - contract)]), x.dtype)
    offsets = jnp.cumsum(group_sizes) - group_sizes

    def per_expert(e, out):
        w_e = w[e].astype(x.dtype)

        def body(out, window, size, row_mask):
            x_block = jax.lax.dynamic_slice_in_dim(x, window, size)
            y = jax.lax.dot_general(x_block, w_e, (((1,), (contract,)), ((), ())))
            if row_mask is not None:  # rows of the window outside the block keep their values
                y = jnp.where(row_mask, y, jax.lax.dynamic_slice_in_dim(out, window, size))
            return jax.lax.dynamic_update_slice_in_dim(out, y, window, axis=0)

        return _for_blocks(offsets[e], offsets[e] + group_sizes[e], block_sizes, num_rows,
                           body, out)

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
    the host BLAS through an XLA:CPU custom call (`moe_jax.grouped_matmul_cpu`), with its VJP."""
    return grouped_matmul_cpu.grouped_matmul_cpu(x, w, group_sizes)


def _blas_fwd(x, w, group_sizes):
    return blas_grouped_matmul(x, w, group_sizes), (x, w, group_sizes)


def _blas_bwd(residuals, dy):
    x, w, group_sizes = residuals
    dx = grouped_matmul_cpu.grouped_matmul_cpu(dy, w, group_sizes, transpose_w=True)
    dw = grouped_matmul_cpu.grouped_weight_grad_cpu(x, dy, group_sizes)
    return dx, dw, None


blas_grouped_matmul.defvjp(_blas_fwd, _blas_bwd)


def grouped_matmul(x: Array, w: Array, group_sizes: Array, impl: str = "auto") -> Array:
    """out[m] = x[m] @ w[e(m)]. impl: "ragged_dot" (`jax.lax.ragged_dot`), "blocked", "blas"
    (XLA:CPU only, on a tested jaxlib: `cpu_ffi.untested_reason`), or "auto": on CPU
    (where XLA's ragged_dot computes every expert densely) "blas", or "blocked" with one
    `UntestedJaxlibWarning` per process where the jaxlib is untested; ragged_dot elsewhere.
    "blas" runs bfloat16/float16 operands as float32 copies and rounds the result back, as
    XLA:CPU's own dots of those types compute in float32."""
    if impl == "auto":
        if jax.default_backend() != "cpu":
            impl = "ragged_dot"
        else:
            impl = "blas" if cpu_ffi.usable_for_auto() else "blocked"
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
    raise ValueError(
        f"unknown grouped matmul {impl!r}; use 'auto', 'ragged_dot', 'blocked' or 'blas'.")
