"""The blocked and BLAS grouped matmuls equal jax.lax.ragged_dot in values and gradients; the
BLAS path runs only on a tested jaxlib."""

import os
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax.kernels import cpu_ffi, grouped_matmul_cpu
from moe_jax.kernels.grouped_matmul import (
    BLOCK_SIZES,
    _usable,
    blas_grouped_matmul,
    blocked_grouped_matmul,
    grouped_matmul,
)

IMPLS = {"blocked": blocked_grouped_matmul, "blas": blas_grouped_matmul}

# Tests that run the BLAS custom call: skipped on a jaxlib it was not tested with, unless
# MOE_JAX_ALLOW_UNTESTED_BLAS=1 (how to check a new jaxlib before adding it to TESTED).
requires_blas = pytest.mark.skipif(
    cpu_ffi.untested_reason() is not None,
    reason=f"untested jaxlib {cpu_ffi.detected_versions()}; set "
           f"{cpu_ffi.ALLOW_UNTESTED_ENV}=1 to test the BLAS path on it")
UNTESTED = ("0.0.1", (0, 3))  # a jaxlib version that is not in TESTED, with a tested FFI API


@pytest.mark.parametrize("impl", [
    "blocked", pytest.param("blas", marks=requires_blas)])
@pytest.mark.parametrize("sizes", [
    [0, 300, 5, 33, 0, 1],  # empty groups, full 256-row blocks, 32-row tails
    [64, 0, 0, 0, 0, 0],    # one expert takes everything
    [1, 1, 1, 1, 1, 300],
    [40, 40, 40, 40, 40, 49],  # 256 rows in all: as many as the largest block
])
def test_grouped_matmul_equals_ragged_dot(impl, sizes):
    rng = np.random.default_rng(0)
    group_sizes = jnp.array(sizes, jnp.int32)
    rows = sum(sizes) + 7  # rows past the last group must come out as zeros
    x = jnp.asarray(rng.normal(size=(rows, 16)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(6, 16, 24)), jnp.float32)
    matmul = IMPLS[impl]
    out = jax.jit(matmul)(x, w, group_sizes)
    np.testing.assert_allclose(out, jax.lax.ragged_dot(x, w, group_sizes), rtol=1e-5, atol=1e-5)
    assert not np.any(np.asarray(out[sum(sizes):]))

    def loss(mm):
        return lambda x, w: jnp.sum(jnp.sin(mm(x, w, group_sizes)))

    grads = jax.jit(jax.grad(loss(matmul), argnums=(0, 1)))(x, w)
    expected = jax.grad(loss(jax.lax.ragged_dot), argnums=(0, 1))(x, w)
    for g, e in zip(grads, expected):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4)


def test_no_block_spans_all_rows():
    """A block of all rows slices the whole operand whatever the loop index, so XLA hoists its
    matmul out of the loop and runs it for every expert (8x slower decoding at 256 rows)."""
    for rows in (33, 255, 256, 257, 512):
        assert all(b < rows for b in _usable(BLOCK_SIZES, rows))
    assert _usable(BLOCK_SIZES, 32) == (32,) and _usable(BLOCK_SIZES, 20) == (20,)


@requires_blas
@pytest.mark.parametrize("threads", [None, 1, 2, 3])
def test_blas_gemms_in_row_blocks_on_threads(monkeypatch, threads):
    # Blocks of 1+ multiply-adds: every GEMM with rows to spare is split, down to 1-row blocks.
    monkeypatch.setattr(grouped_matmul_cpu, "gemm_threads", threads)
    monkeypatch.setattr(grouped_matmul_cpu, "_MIN_BLOCK_WORK", 1)
    test_grouped_matmul_equals_ragged_dot("blas", [0, 300, 5, 33, 0, 1])
    test_grouped_matmul_equals_ragged_dot("blas", [1, 2, 0, 0, 0, 0])


@requires_blas
def test_auto_is_the_blas_custom_call_on_cpu_for_every_float_type():
    rng = np.random.default_rng(2)
    sizes = jnp.array([5, 0, 11], jnp.int32)
    x = jnp.asarray(rng.normal(size=(16, 8)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(3, 8, 4)), jnp.bfloat16)
    assert "moe_jax_grouped_matmul" in _lowered_auto(x, w, sizes)
    out = grouped_matmul(x, w, sizes)
    assert out.dtype == jnp.bfloat16
    # float32 products of the bfloat16 inputs, rounded once to bfloat16 (within 2^-8 relative)
    expected = jax.lax.ragged_dot(x.astype(jnp.float32), w.astype(jnp.float32), sizes)
    np.testing.assert_allclose(out.astype(jnp.float32), expected, rtol=2**-8, atol=1e-6)


@requires_blas
def test_blas_under_vmap_runs_each_batch_element():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(3, 10, 4)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 2, 4, 5)), jnp.float32)
    sizes = jnp.array([[4, 6], [0, 10], [7, 1]], jnp.int32)
    out = jax.vmap(blas_grouped_matmul)(x, w, sizes)
    np.testing.assert_allclose(out, jax.vmap(jax.lax.ragged_dot)(x, w, sizes), rtol=1e-5,
                               atol=1e-5)


@requires_blas
def test_blas_error_inside_the_custom_call_is_raised_not_crashed():
    grouped_matmul_cpu._register()
    wrong_shape = jax.ffi.ffi_call("moe_jax_grouped_matmul",
                                   jax.ShapeDtypeStruct((4, 7), jnp.float32))  # w gives 3 columns
    with pytest.raises(Exception,
                       match=r"moe_jax_grouped_matmul \(XLA:CPU FFI target\): ValueError"):
        jax.block_until_ready(wrong_shape(jnp.ones((4, 2)), jnp.ones((2, 2, 3)),
                                          jnp.array([1, 3], jnp.int32)))


def test_unknown_or_unusable_impl_is_refused():
    with pytest.raises(ValueError, match="unknown grouped matmul 'dense'"):
        grouped_matmul(jnp.zeros((2, 2)), jnp.zeros((1, 2, 2)), jnp.array([2]), "dense")
    with pytest.raises(ValueError, match="'blas' needs floating operands"):
        grouped_matmul(jnp.zeros((2, 2), jnp.int32), jnp.zeros((1, 2, 2), jnp.int32),
                       jnp.array([2]), "blas")
    with pytest.raises(ValueError, match="takes float32 operands"):
        blas_grouped_matmul(jnp.zeros((2, 2), jnp.bfloat16), jnp.zeros((1, 2, 2)),
                            jnp.array([2]))


def _small_problem():
    rng = np.random.default_rng(3)
    sizes = jnp.array([5, 0, 9, 2], jnp.int32)
    x = jnp.asarray(rng.normal(size=(20, 8)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(4, 8, 6)), jnp.float32)
    return x, w, sizes


def _lowered_auto(x, w, sizes) -> str:
    """The text of a fresh trace of grouped_matmul(impl="auto"): jax reuses traces of the same
    function, which would keep the choice made under another test's versions."""
    return jax.jit(lambda x, w, sizes: grouped_matmul(x, w, sizes)).lower(x, w, sizes).as_text()


def _untested(monkeypatch, versions=UNTESTED):
    monkeypatch.setattr(cpu_ffi, "detected_versions", lambda: versions)
    monkeypatch.setattr(cpu_ffi, "_warned", False)
    monkeypatch.delenv(cpu_ffi.ALLOW_UNTESTED_ENV, raising=False)


def test_auto_on_an_untested_jaxlib_is_blocked_with_one_warning(monkeypatch):
    _untested(monkeypatch)
    x, w, sizes = _small_problem()
    loss = lambda impl: lambda x, w: jnp.sum(jnp.sin(grouped_matmul(x, w, sizes, impl)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = grouped_matmul(x, w, sizes)
        grads = jax.jit(jax.grad(loss("auto"), argnums=(0, 1)))(x, w)
        text = _lowered_auto(x, w, sizes)
    found = [c for c in caught if issubclass(c.category, cpu_ffi.UntestedJaxlibWarning)]
    assert len(found) == 1, [str(c.message) for c in caught]
    message = str(found[0].message)
    tested, api = cpu_ffi.TESTED[0]
    for part in ("this process has jaxlib 0.0.1 (FFI C API 0.3)",
                 f"tested on jaxlib {tested} (FFI C API {api[0]}.{api[1]})",
                 "grouped_matmul='blocked'", "MOE_JAX_ALLOW_UNTESTED_BLAS=1"):
        assert part in message
    assert "moe_jax_grouped" not in text
    np.testing.assert_array_equal(out, grouped_matmul(x, w, sizes, "blocked"))
    expected = jax.jit(jax.grad(loss("blocked"), argnums=(0, 1)))(x, w)
    for g, e in zip(grads, expected):
        np.testing.assert_array_equal(g, e)


@pytest.mark.parametrize("versions", [
    UNTESTED,
    ("0.10.2", None),  # no c_api.h to read the FFI API version from
    ("0.10.2", (0, 4)),
])
def test_explicit_blas_on_an_untested_jaxlib_is_an_error(monkeypatch, versions):
    _untested(monkeypatch, versions)
    x, w, sizes = _small_problem()
    with pytest.raises(cpu_ffi.UntestedJaxlibError,
                       match=r"tested on jaxlib .* Use grouped_matmul='blocked'"):
        grouped_matmul(x, w, sizes, "blas")
    with pytest.raises(cpu_ffi.UntestedJaxlibError):
        grouped_matmul_cpu.grouped_weight_grad_cpu(x, x, sizes)


@requires_blas
def test_allowing_untested_runs_blas_without_a_warning(monkeypatch):
    _untested(monkeypatch)
    monkeypatch.setenv(cpu_ffi.ALLOW_UNTESTED_ENV, "1")
    x, w, sizes = _small_problem()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "moe_jax_grouped" in _lowered_auto(x, w, sizes)
        out = grouped_matmul(x, w, sizes, "blas")
    np.testing.assert_allclose(out, jax.lax.ragged_dot(x, w, sizes), rtol=1e-5, atol=1e-5)


def test_allowing_untested_does_not_cover_another_ffi_major_version(monkeypatch):
    _untested(monkeypatch, ("9.0.0", (1, 0)))
    monkeypatch.setenv(cpu_ffi.ALLOW_UNTESTED_ENV, "1")
    assert "FFI major version 1 is not a tested one" in cpu_ffi.untested_reason()
    x, w, sizes = _small_problem()
    with pytest.warns(cpu_ffi.UntestedJaxlibWarning):
        out = grouped_matmul(x, w, sizes)
    np.testing.assert_array_equal(out, grouped_matmul(x, w, sizes, "blocked"))


@requires_blas
def test_a_tested_jaxlib_picks_blas_without_a_warning(monkeypatch):
    jaxlib_version, api = cpu_ffi.TESTED[0]
    _untested(monkeypatch, (jaxlib_version, api))
    x, w, sizes = _small_problem()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "moe_jax_grouped_matmul" in _lowered_auto(x, w, sizes)


@requires_blas
def test_the_header_ffi_version_is_the_one_xla_reports_at_run_time():
    header = cpu_ffi._header_api_version()
    assert header is not None and header == cpu_ffi.detected_versions()[1]
    x, w, sizes = _small_problem()
    jax.block_until_ready(blas_grouped_matmul(x, w, sizes))
    assert cpu_ffi.runtime_api_version == header


@requires_blas
def test_handler_refuses_a_call_frame_of_an_untested_ffi_version(monkeypatch):
    grouped_matmul_cpu._register()
    monkeypatch.setattr(cpu_ffi, "TESTED", (("0.10.2", (0, 99)),))
    monkeypatch.delenv(cpu_ffi.ALLOW_UNTESTED_ENV, raising=False)
    call = jax.ffi.ffi_call("moe_jax_grouped_matmul", jax.ShapeDtypeStruct((4, 3), jnp.float32))
    with pytest.raises(Exception, match="reports FFI C API 0\\.3 at run time; tested: 0\\.99"):
        jax.block_until_ready(call(jnp.ones((4, 2)), jnp.ones((2, 2, 3)),
                                   jnp.array([1, 3], jnp.int32)))


def test_import_leaves_the_environment_alone():
    code = ("import os; before = dict(os.environ); import moe_jax, moe_jax.kernels.grouped_matmul; "
            "assert dict(os.environ) == before, set(os.environ.items()) ^ set(before.items())")
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENBLAS")}
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
