"""Grouped matmul on XLA:CPU as an FFI custom call that runs the host BLAS on XLA's own buffers.

    grouped_matmul_cpu(x, w, group_sizes)             out[m] = x[m] @ w[e(m)]     [M, k] -> [M, n]
    grouped_matmul_cpu(x, w, group_sizes, True)       out[m] = x[m] @ w[e(m)].T   [M, n] -> [M, k]
    grouped_weight_grad_cpu(x, dy, group_sizes)       dw[e] = x_e^T dy_e          -> [E, k, n]

XLA:CPU has no grouped GEMM: `jax.lax.ragged_dot` computes every expert densely, and a loop of
dynamic-size blocks in XLA (`grouped_matmul.blocked_grouped_matmul`) must build its output in a
zero-filled loop carry and accumulate weight gradients block by block (~1.35x the dense FFN on
the same rows, experiments/benchmarks/README.md). Here each expert's rows are one GEMM of
numpy's BLAS, reading the operands and writing the result in place (`np.matmul(..., out=)` on
views of the XLA buffers): one pass over each row, no copies. `jax.pure_callback` would copy
every operand and result between XLA and numpy (~85 ms for a [16384, 2048] float32 result here).

The handler is a Python function called through ctypes with the XLA FFI C ABI
(xla/ffi/api/c_api.h in jaxlib's `jax.ffi.include_dir()`): it reads the call frame's buffers,
answers XLA's metadata query with the API version it was written against, and runs only in the
execute stage. ctypes takes the GIL for the handler; numpy releases it inside each GEMM.
float32 buffers only (numpy has no fast bfloat16 GEMM): `grouped_matmul` passes bfloat16 and
float16 operands as float32 copies, as XLA:CPU itself computes dots of those types in float32.
"""

from __future__ import annotations

import ctypes
import functools
import threading

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

_API_VERSION = (0, 1)  # answered to XLA's metadata query; jaxlib 0.10.2 (FFI API 0.3) accepts it
_STAGE_EXECUTE = 3
_EXTENSION_METADATA = 1
_ERROR_INTERNAL = 13
_DTYPES = {4: np.int32, 11: np.float32}  # XLA_FFI_DataType_S32, _F32


class _ExtensionBase(ctypes.Structure):
    pass


_ExtensionBase._fields_ = [("struct_size", ctypes.c_size_t), ("type", ctypes.c_int),
                           ("next", ctypes.POINTER(_ExtensionBase))]


class _ApiVersion(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.c_void_p),
                ("major_version", ctypes.c_int), ("minor_version", ctypes.c_int)]


class _Metadata(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("api_version", _ApiVersion),
                ("traits", ctypes.c_uint32), ("state_type_id", ctypes.c_int64)]


class _MetadataExtension(ctypes.Structure):
    _fields_ = [("extension_base", _ExtensionBase), ("metadata", ctypes.POINTER(_Metadata))]


class _Buffer(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.c_void_p),
                ("dtype", ctypes.c_int), ("data", ctypes.c_void_p), ("rank", ctypes.c_int64),
                ("dims", ctypes.POINTER(ctypes.c_int64))]


class _List(ctypes.Structure):  # XLA_FFI_Args and XLA_FFI_Rets
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.c_void_p),
                ("size", ctypes.c_int64), ("types", ctypes.POINTER(ctypes.c_int)),
                ("items", ctypes.POINTER(ctypes.c_void_p))]


class _Attrs(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.c_void_p),
                ("size", ctypes.c_int64), ("types", ctypes.c_void_p), ("names", ctypes.c_void_p),
                ("attrs", ctypes.c_void_p)]


class _ErrorCreateArgs(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.c_void_p),
                ("message", ctypes.c_char_p), ("errc", ctypes.c_int)]


_ErrorCreate = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.POINTER(_ErrorCreateArgs))


class _Api(ctypes.Structure):  # only the leading fields, up to XLA_FFI_Error_Create
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.c_void_p),
                ("api_version", _ApiVersion), ("internal_api", ctypes.c_void_p),
                ("error_create", _ErrorCreate)]


class _CallFrame(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t),
                ("extension_start", ctypes.POINTER(_ExtensionBase)),
                ("api", ctypes.POINTER(_Api)), ("ctx", ctypes.c_void_p), ("stage", ctypes.c_int),
                ("args", _List), ("rets", _List), ("attrs", _Attrs), ("future", ctypes.c_void_p)]


def _array(pointer: int) -> np.ndarray:
    """A numpy view (no copy) of the XLA_FFI_Buffer at `pointer`."""
    buffer = _Buffer.from_address(pointer)
    shape = tuple(buffer.dims[i] for i in range(buffer.rank))
    dtype = np.dtype(_DTYPES[buffer.dtype])
    size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = (ctypes.c_char * size).from_address(buffer.data) if size else bytearray()
    return np.frombuffer(raw, dtype).reshape(shape)


def _offsets(group_sizes: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(group_sizes, dtype=np.int64)])


def _grouped(x: np.ndarray, w: np.ndarray, group_sizes: np.ndarray, out: np.ndarray,
             transpose_w: bool) -> None:
    offsets = _offsets(group_sizes)
    for e in range(w.shape[0]):
        start, end = offsets[e], offsets[e + 1]
        if end > start:
            np.matmul(x[start:end], w[e].T if transpose_w else w[e], out=out[start:end])
    out[offsets[-1]:] = 0


def _weight_grad(x: np.ndarray, dy: np.ndarray, group_sizes: np.ndarray,
                 out: np.ndarray) -> None:
    offsets = _offsets(group_sizes)
    for e in range(out.shape[0]):
        start, end = offsets[e], offsets[e + 1]
        if end > start:
            np.matmul(x[start:end].T, dy[start:end], out=out[e])
        else:
            out[e] = 0


# XLA:CPU runs independent ops concurrently; two of these calls at once would each start the
# BLAS's full thread pool on the same cores.
_BLAS_LOCK = threading.Lock()


def _handler(compute):
    """An XLA FFI handler (XLA_FFI_Error* fn(XLA_FFI_CallFrame*)) running compute(*args, *rets)."""

    def handler(frame_pointer: int) -> int | None:
        # Everything inside the try: an exception escaping a ctypes callback is only printed,
        # and XLA would take the call as succeeded.
        frame = _CallFrame.from_address(frame_pointer)
        try:
            extension = frame.extension_start
            if extension and extension.contents.type == _EXTENSION_METADATA:
                metadata = ctypes.cast(extension, ctypes.POINTER(_MetadataExtension))
                version = metadata.contents.metadata.contents.api_version
                version.major_version, version.minor_version = _API_VERSION
                metadata.contents.metadata.contents.traits = 0
                return None
            if frame.stage != _STAGE_EXECUTE:
                return None
            args = [_array(frame.args.items[i]) for i in range(frame.args.size)]
            rets = [_array(frame.rets.items[i]) for i in range(frame.rets.size)]
            with _BLAS_LOCK:
                compute(*args, *rets)
            return None
        except Exception as error:  # reported to XLA, which raises it in the caller
            message = f"moe_jax grouped matmul (CPU): {type(error).__name__}: {error}".encode()
            create = _ErrorCreateArgs(ctypes.sizeof(_ErrorCreateArgs), None, message,
                                      _ERROR_INTERNAL)
            return frame.api.contents.error_create(ctypes.byref(create))

    return ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p)(handler)


_TARGETS = {
    "moe_jax_grouped_matmul": lambda x, w, g, out: _grouped(x, w, g, out, False),
    "moe_jax_grouped_matmul_wt": lambda x, w, g, out: _grouped(x, w, g, out, True),
    "moe_jax_grouped_weight_grad": _weight_grad,
}
_HANDLERS = {}  # kept alive: XLA holds raw pointers to them


@functools.cache
def _register() -> None:
    for name, compute in _TARGETS.items():
        _HANDLERS[name] = _handler(compute)
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(_HANDLERS[name]), platform="cpu")


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
    _register()
    shape = (group_sizes.shape[0], x.shape[1], dy.shape[1])
    call = jax.ffi.ffi_call("moe_jax_grouped_weight_grad",
                            jax.ShapeDtypeStruct(shape, jnp.float32), vmap_method="sequential")
    return call(x, dy, group_sizes.astype(jnp.int32))
