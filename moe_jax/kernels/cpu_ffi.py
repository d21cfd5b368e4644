"""A Python function as an XLA:CPU FFI custom-call target, on tested jaxlib versions only.

`register(name, compute)` makes `jax.ffi.ffi_call(name, ...)` run compute(*operands, *results)
on numpy views of XLA's own buffers (no copies): the handler is called through ctypes with the
XLA FFI C ABI (xla/ffi/api/c_api.h in jaxlib's `jax.ffi.include_dir()`). It answers XLA's
metadata query with the API version it was written against and computes only in the execute
stage. ctypes takes the GIL for the handler. int32 and float32 buffers only.

Tested versions. The ctypes structures below mirror C structs that XLA may change; if they
moved, reading them would crash or corrupt memory rather than raise. So the targets run only on
a jaxlib listed in `TESTED` (its version and the FFI C API version it ships), checked before
anything is traced (`untested_reason`):
  - the jaxlib version (`jaxlib.version.__version__`) names the build that was tested;
  - the FFI C API version is read from XLA_FFI_API_MAJOR / XLA_FFI_API_MINOR in the c_api.h
    that jaxlib ships under `jax.ffi.include_dir()`, from the same XLA source as its binary.
    It is the only version available before a call runs: no jaxlib symbol exports the API
    struct, and XLA's metadata query to the handler comes when the call is lowered, after the
    implementation was chosen (and in some XLA versions with no API pointer in the frame). A
    missing or unparseable header counts as untested.
  - At run time each execute-stage call frame carries XLA's `XLA_FFI_Api`, whose leading
    `api_version` is filled from the same two macros (jaxlib 0.10.2: 0.3 in both, tested). The
    handler checks it, and the struct sizes of the frame, its argument lists and buffers,
    before reading anything else, and returns an XLA error if they differ from what was
    tested (or, with the override below, if the major version differs).
MOE_JAX_ALLOW_UNTESTED_BLAS=1 runs the targets on a jaxlib of a tested FFI major version anyway
(to try a new jaxlib: run tests/test_grouped_matmul.py with it, then add it to `TESTED`).
"""

from __future__ import annotations

import ctypes
import functools
import os
import pathlib
import re
import sys
import warnings
from collections.abc import Callable

import jax
import jaxlib.version
import numpy as np

# (jaxlib version, FFI C API (major, minor) of that jaxlib) on which the structures below were
# checked against c_api.h and tests/test_grouped_matmul.py passed.
TESTED: tuple[tuple[str, tuple[int, int]], ...] = (
    ("0.10.2", (0, 3)),
)
ALLOW_UNTESTED_ENV = "MOE_JAX_ALLOW_UNTESTED_BLAS"  # "1": run on an untested jaxlib anyway

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


# Bytes of each XLA struct that the handler reads (or writes, for the metadata): XLA's
# struct_size of each must be at least these.
_FRAME_READ = _CallFrame.rets.offset + ctypes.sizeof(_List)
_API_READ = _Api.error_create.offset + ctypes.sizeof(_ErrorCreate)
_LIST_READ = ctypes.sizeof(_List)
_BUFFER_READ = ctypes.sizeof(_Buffer)
_METADATA_WRITTEN = _Metadata.traits.offset + ctypes.sizeof(ctypes.c_uint32)


class UntestedJaxlibWarning(UserWarning):
    """grouped_matmul(impl="auto") uses "blocked": the running jaxlib is not in `TESTED`."""


class UntestedJaxlibError(RuntimeError):
    """The BLAS grouped matmul was asked for on a jaxlib not in `TESTED`."""


def _header_api_version() -> tuple[int, int] | None:
    """(XLA_FFI_API_MAJOR, XLA_FFI_API_MINOR) of the c_api.h jaxlib ships; None if not found."""
    try:
        text = (pathlib.Path(jax.ffi.include_dir()) / "xla" / "ffi" / "api" / "c_api.h"
                ).read_text()
    except OSError:
        return None
    parts = [re.search(rf"^#define XLA_FFI_API_{name}\s+(\d+)\s*$", text, re.MULTILINE)
             for name in ("MAJOR", "MINOR")]
    if not all(parts):
        return None
    return int(parts[0].group(1)), int(parts[1].group(1))


@functools.cache
def detected_versions() -> tuple[str, tuple[int, int] | None]:
    """(jaxlib version, FFI C API version of its c_api.h, None if not found) of this process."""
    return jaxlib.version.__version__, _header_api_version()


def _allow_untested() -> bool:
    return os.environ.get(ALLOW_UNTESTED_ENV) == "1"


def _tested_majors() -> set[int]:
    return {api[0] for _, api in TESTED}


def _api_name(api: tuple[int, int] | None) -> str:
    if api is None:
        return "unknown: no c_api.h under jax.ffi.include_dir()"
    return f"{api[0]}.{api[1]}"


def untested_reason() -> str | None:
    """None where the BLAS path may run: the running (jaxlib, FFI C API) pair is in `TESTED`,
    or MOE_JAX_ALLOW_UNTESTED_BLAS=1 and its FFI major version is a tested one. Otherwise the
    versions found and tested, for a warning or an error."""
    jaxlib_version, api = detected_versions()
    if (jaxlib_version, api) in TESTED:
        return None
    overridable = api is not None and api[0] in _tested_majors()
    if _allow_untested() and overridable:
        return None
    tested = ", ".join(f"jaxlib {j} (FFI C API {_api_name(a)})" for j, a in TESTED)
    reason = (f"the CPU BLAS grouped matmul (moe_jax.kernels.grouped_matmul_cpu) reads XLA's "
              f"FFI call frames through ctypes copies of its C structs, tested on {tested} only; "
              f"this process has jaxlib {jaxlib_version} (FFI C API {_api_name(api)}).")
    if _allow_untested():
        reason += f" {ALLOW_UNTESTED_ENV}=1 is set but does not apply: " + (
            "the FFI C API version is unknown." if api is None else
            f"FFI major version {api[0]} is not a tested one, and c_api.h declares major "
            "versions ABI-incompatible.")
    return reason


_warned = False


def usable_for_auto() -> bool:
    """Whether grouped_matmul(impl="auto") may pick the BLAS path; if not, one
    `UntestedJaxlibWarning` per process says so."""
    global _warned
    reason = untested_reason()
    if reason is None:
        return True
    if not _warned:
        _warned = True
        warnings.warn(
            f"moe_jax: {reason} grouped_matmul='auto' uses 'blocked' instead (per-expert row "
            f"blocks in XLA: the same results, slower on CPU). Set grouped_matmul='blocked' to "
            f"silence this warning, or {ALLOW_UNTESTED_ENV}=1 to run the BLAS path anyway "
            f"(check it with tests/test_grouped_matmul.py, then add the version to "
            f"moe_jax.kernels.grouped_matmul_cpu.TESTED).", UntestedJaxlibWarning, stacklevel=3)
    return False


def require_tested() -> None:
    """Raises `UntestedJaxlibError` unless the BLAS path may run (`untested_reason`)."""
    reason = untested_reason()
    if reason is not None:
        raise UntestedJaxlibError(
            f"moe_jax: {reason} Use grouped_matmul='blocked' (or 'auto', which falls back to "
            f"it), or set {ALLOW_UNTESTED_ENV}=1 to run the BLAS path anyway (check it with "
            f"tests/test_grouped_matmul.py, then add the version to "
            f"moe_jax.kernels.grouped_matmul_cpu.TESTED).")


runtime_api_version: tuple[int, int] | None = None  # the FFI API version of the last call frame


def _check_frame(frame: _CallFrame) -> None:
    """Raises unless the execute-stage call frame comes from a tested FFI API version and
    holds at least the fields the handler reads."""
    global runtime_api_version
    if frame.struct_size < _FRAME_READ or not frame.api:
        raise RuntimeError(f"unexpected XLA_FFI_CallFrame (struct_size {frame.struct_size})")
    api = frame.api.contents
    version = api.api_version.major_version, api.api_version.minor_version
    runtime_api_version = version
    tested = {a for _, a in TESTED}
    if version not in tested and not (_allow_untested() and version[0] in _tested_majors()):
        raise RuntimeError(f"XLA reports FFI C API {version[0]}.{version[1]} at run time; "
                           f"tested: {', '.join(_api_name(a) for a in sorted(tested))}")
    if api.struct_size < _API_READ:
        raise RuntimeError(f"unexpected XLA_FFI_Api (struct_size {api.struct_size})")
    if frame.args.struct_size < _LIST_READ or frame.rets.struct_size < _LIST_READ:
        raise RuntimeError("unexpected XLA_FFI_Args/XLA_FFI_Rets struct_size")


def _error(frame: _CallFrame, message: bytes) -> int:
    """An XLA_FFI_Error for `message`, through the frame's API if its layout is a tested one
    (major version and size); otherwise the process stops with the message, as calling into an
    API struct of unknown layout could corrupt memory."""
    api = frame.api.contents if frame.api else None
    if api is not None and api.struct_size >= _API_READ and (
            api.api_version.major_version in _tested_majors()):
        create = _ErrorCreateArgs(ctypes.sizeof(_ErrorCreateArgs), None, message,
                                  _ERROR_INTERNAL)
        return api.error_create(ctypes.byref(create))
    sys.stderr.write(message.decode(errors="replace") + "\n(no usable XLA FFI API to report "
                     "it through; aborting)\n")
    sys.stderr.flush()
    os.abort()


def _array(pointer: int) -> np.ndarray:
    """A numpy view (no copy) of the XLA_FFI_Buffer at `pointer`."""
    buffer = _Buffer.from_address(pointer)
    if buffer.struct_size < _BUFFER_READ:
        raise RuntimeError(f"unexpected XLA_FFI_Buffer (struct_size {buffer.struct_size})")
    shape = tuple(buffer.dims[i] for i in range(buffer.rank))
    dtype = np.dtype(_DTYPES[buffer.dtype])
    size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = (ctypes.c_char * size).from_address(buffer.data) if size else bytearray()
    return np.frombuffer(raw, dtype).reshape(shape)


# Threads that run each call's GEMMs: a GEMM is split into row blocks of at least


def _handler(name: str, compute: Callable[..., None]):
    """An XLA FFI handler (XLA_FFI_Error* fn(XLA_FFI_CallFrame*)) running compute(*args, *rets)."""

    def handler(frame_pointer: int) -> int | None:
        # Everything inside the try: an exception escaping a ctypes callback is only printed,
        # and XLA would take the call as succeeded.
        frame = _CallFrame.from_address(frame_pointer)
        try:
            extension = frame.extension_start
            if extension and extension.contents.type == _EXTENSION_METADATA:
                metadata = ctypes.cast(extension, ctypes.POINTER(_MetadataExtension))
                answer = metadata.contents.metadata.contents
                if answer.struct_size >= _METADATA_WRITTEN:  # else XLA sees no version
                    answer.api_version.major_version, answer.api_version.minor_version = (
                        _API_VERSION)
                    answer.traits = 0
                return None
            if frame.stage != _STAGE_EXECUTE:
                return None
            _check_frame(frame)
            args = [_array(frame.args.items[i]) for i in range(frame.args.size)]
            rets = [_array(frame.rets.items[i]) for i in range(frame.rets.size)]
            compute(*args, *rets)
            return None
        except Exception as error:  # reported to XLA, which raises it in the caller
            return _error(frame, f"{name} (XLA:CPU FFI target): {type(error).__name__}: "
                                 f"{error}".encode())

    return ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p)(handler)


_HANDLERS: dict[str, object] = {}  # kept alive: XLA holds raw pointers to them


def register(name: str, compute: Callable[..., None]) -> None:
    """Registers `name` as an XLA:CPU FFI target that runs compute(*operands, *results) on numpy
    views of the buffers (results are written in place). Once per name and process."""
    if name not in _HANDLERS:
        _HANDLERS[name] = _handler(name, compute)
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(_HANDLERS[name]), platform="cpu")
