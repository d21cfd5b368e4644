"""Grouped matmul on XLA:CPU as an FFI custom call that runs the host BLAS on XLA's own buffers.

    grouped_matmul_cpu(x, w, group_sizes)             out[m] = x[m] @ w[e(m)]     [M, k] -> [M, n]
    grouped_matmul_cpu(x, w, group_sizes, True)       out[m] = x[m] @ w[e(m)].T   [M, n] -> [M, k]
    grouped_weight_grad_cpu(x, dy, group_sizes)       dw[e] = x_e^T dy_e          -> [E, k, n]

XLA:CPU has no grouped GEMM: `jax.lax.ragged_dot` computes every expert densely, and a loop of
dynamic-size blocks in XLA (`grouped_matmul.blocked_grouped_matmul`) must build its output in a
zero-filled loop carry and accumulate weight gradients block by block (slower than the dense
FFN on the same rows; experiments/benchmarks/README.md has the measurements). Here each
expert's rows go through numpy's BLAS, reading the operands and writing the result in place
(`np.matmul(..., out=)` on views of the XLA buffers, through `cpu_ffi`): one pass over each
row, no copies. `jax.pure_callback` would copy every operand and result between XLA and numpy.
The calls run only on a jaxlib `cpu_ffi` was tested with: `grouped_matmul(impl="auto")` on an
untested one uses the XLA-loop "blocked" matmul with one `UntestedJaxlibWarning` per process,
an explicit "blas" raises `UntestedJaxlibError` (`cpu_ffi.untested_reason` says why).

The GEMMs run in row blocks on one thread per core, each block a one-thread BLAS call, on
threads that sleep when idle (`gemm_threads`): OpenBLAS's own threads busy-wait during and after
each call, taking the cores XLA's threads need, and the process environment (e.g.
OPENBLAS_THREAD_TIMEOUT) is left as the user set it.
float32 buffers only (numpy has no fast bfloat16 GEMM): `grouped_matmul` passes bfloat16 and
float16 operands as float32 copies, as XLA:CPU itself computes dots of those types in float32.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import itertools
import os
import threading

import jax
import jax.numpy as jnp
import numpy as np
import threadpoolctl

from moe_jax.kernels import cpu_ffi

Array = jax.Array

# _MIN_BLOCK_WORK multiply-adds on up to this many threads, each block a one-thread BLAS call
# (threadpoolctl limits the BLAS to one thread during the custom call), and the threads sleep
# between blocks and calls. None: each GEMM is one BLAS call on the BLAS's own threads, which in
# OpenBLAS busy-wait for each other during the call and for 2^OPENBLAS_THREAD_TIMEOUT cycles
# after it (2^28 unless that variable is set before numpy loads), on the cores XLA's threads use.
gemm_threads: int | None = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                            else os.cpu_count() or 1)
_MIN_BLOCK_WORK = 2**22
_pool: concurrent.futures.ThreadPoolExecutor | None = None
_pool_size = 0
_pool_pid = 0


def _workers(count: int) -> concurrent.futures.ThreadPoolExecutor:
    """A pool of at least `count` threads of this process (a forked child makes its own)."""
    global _pool, _pool_size, _pool_pid
    if _pool is None or _pool_size < count or _pool_pid != os.getpid():
        if _pool is not None and _pool_pid == os.getpid():
            _pool.shutdown(wait=False)
        _pool = concurrent.futures.ThreadPoolExecutor(count, thread_name_prefix="moe_jax_gemm")
        _pool_size, _pool_pid = count, os.getpid()
    return _pool


@functools.cache
def _controller() -> threadpoolctl.ThreadpoolController:
    return threadpoolctl.ThreadpoolController()


def _blas_threads():
    """Context of the custom call's GEMMs: the BLAS limited to one thread, unless
    gemm_threads is None."""
    if gemm_threads is None:
        return contextlib.nullcontext()
    return _controller().limit(limits=1, user_api="blas")


def _matmul(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:
    """out = a @ b; in row blocks on `gemm_threads` threads when it has the work for them."""
    rows = a.shape[0]
    blocks = 1 if gemm_threads is None else max(1, min(
        gemm_threads, rows, rows * a.shape[1] * b.shape[1] // _MIN_BLOCK_WORK))
    if blocks == 1:
        np.matmul(a, b, out=out)
        return
    bounds = [rows * i // blocks for i in range(blocks + 1)]
    pool = _workers(blocks - 1)
    others = [pool.submit(np.matmul, a[start:end], b, out=out[start:end])
              for start, end in itertools.pairwise(bounds[1:])]
    np.matmul(a[:bounds[1]], b, out=out[:bounds[1]])
    for block in others:
        block.result()


def _offsets(group_sizes: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(group_sizes, dtype=np.int64)])


def _grouped(x: np.ndarray, w: np.ndarray, group_sizes: np.ndarray, out: np.ndarray,
             transpose_w: bool) -> None:
    offsets = _offsets(group_sizes)
    for e in range(w.shape[0]):
        start, end = offsets[e], offsets[e + 1]
        if end > start:
            _matmul(x[start:end], w[e].T if transpose_w else w[e], out[start:end])
    out[offsets[-1]:] = 0


def _weight_grad(x: np.ndarray, dy: np.ndarray, group_sizes: np.ndarray,
                 out: np.ndarray) -> None:
    offsets = _offsets(group_sizes)
    for e in range(out.shape[0]):
        start, end = offsets[e], offsets[e + 1]
        if end > start:
            _matmul(x[start:end].T, dy[start:end], out[e])
        else:
            out[e] = 0


# XLA:CPU runs independent ops concurrently; two of these calls at once would each run their
# GEMMs on all the threads, on the same cores.
_BLAS_LOCK = threading.Lock()


def _serialised(compute):
    """compute under the lock, with the BLAS on one thread (unless gemm_threads is None)."""

    def run(*buffers: np.ndarray) -> None:
        with _BLAS_LOCK, _blas_threads():
            compute(*buffers)

    return run


_TARGETS = {
    "moe_jax_grouped_matmul": lambda x, w, g, out: _grouped(x, w, g, out, False),
    "moe_jax_grouped_matmul_wt": lambda x, w, g, out: _grouped(x, w, g, out, True),
    "moe_jax_grouped_weight_grad": _weight_grad,
}


@functools.cache
def _register() -> None:
    for name, compute in _TARGETS.items():
        cpu_ffi.register(name, _serialised(compute))


def _check_float32(*arrays: Array) -> None:
    if any(a.dtype != jnp.float32 for a in arrays):
        raise ValueError(f"the CPU grouped matmul takes float32 operands; got "
                         f"{[str(a.dtype) for a in arrays]} (grouped_matmul(impl='blas') "
                         "converts other float types).")


def grouped_matmul_cpu(x: Array, w: Array, group_sizes: Array, transpose_w: bool = False
                       ) -> Array:
    """x [M, k] float32 rows sorted by expert, w [E, k, n] (transpose_w: [E, n, k]) float32,
    group_sizes [E] int32 -> [M, n] float32; rows past sum(group_sizes) are zeros."""
    _check_float32(x, w)
    cpu_ffi.require_tested()
    _register()
    n = w.shape[1] if transpose_w else w.shape[2]
    target = "moe_jax_grouped_matmul_wt" if transpose_w else "moe_jax_grouped_matmul"
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32),
                            vmap_method="sequential")
    return call(x, w, group_sizes.astype(jnp.int32))


def grouped_weight_grad_cpu(x: Array, dy: Array, group_sizes: Array) -> Array:
    """x [M, k], dy [M, n] float32 rows sorted by expert, group_sizes [E] int32 -> dw [E, k, n]
    float32, dw[e] = sum over rows m of expert e of x[m]^T dy[m]."""
    _check_float32(x, dy)
    cpu_ffi.require_tested()
    _register()
    shape = (group_sizes.shape[0], x.shape[1], dy.shape[1])
    call = jax.ffi.ffi_call("moe_jax_grouped_weight_grad",
                            jax.ShapeDtypeStruct(shape, jnp.float32), vmap_method="sequential")
    return call(x, dy, group_sizes.astype(jnp.int32))
