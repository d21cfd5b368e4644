"""The field's grouped-matmul kernels behind the signature of `moe_jax.kernels.grouped_matmul`:

    out[m] = x[m] @ w[e(m)]      x [M, k], w [E, k, n], group_sizes [E] -> out [M, n]

- megablox (`jax.experimental.pallas.ops.tpu.megablox`): Pallas/Mosaic kernels for TPU, `gmm`
  for the product and the input gradient, `tgmm` for the weight gradient (MaxText's dropless
  path). Off TPU they run in Pallas interpret mode (slow; for tests).
- tokamax (`tokamax.ragged_dot`, the optional `gpu` extra): Mosaic GPU kernels on sm90/sm100
  (H100/H200/B200), Triton elsewhere, with a VJP built from ragged dots; off GPU only its "xla"
  implementation runs.

Both keep `grouped_matmul`'s contract: rows past sum(group_sizes) come out as zeros and get
zero gradients; bfloat16 operands accumulate in float32.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util

import jax
import jax.numpy as jnp

Array = jax.Array

# Megablox tiles (rows, contraction, output columns): MaxText's defaults (tile_batch_seq 512,
# tile_activation_dim 1024, tile_weight_dim 1024), cut down to fit small dimensions.
MEGABLOX_TILING = (512, 1024, 1024)
# Row tiles hold a multiple of 16 rows (bfloat16 packs 16 rows per TPU vreg sublane group).
ROW_ALIGN = 16
MEGABLOX_DTYPES = (jnp.bfloat16, jnp.float32)

TOKAMAX_INSTALL = 'pip install "moe_jax[gpu]"  (or: pip install tokamax)'


def _row_tile(num_rows: int, tile: int) -> int:
    """Rows per megablox tile: `tile`, or all rows (rounded up to ROW_ALIGN) when fewer."""
    return min(tile, -(-num_rows // ROW_ALIGN) * ROW_ALIGN)


def _dim_tile(size: int, tile: int) -> int:
    """A tile that divides `size` exactly (no edge blocks): `size` itself up to `tile`, else
    the largest of tile, tile/2, ... >= 128 that divides it, else `size` (one block)."""
    if size <= tile:
        return size
    while tile >= 128:
        if size % tile == 0:
            return tile
        tile //= 2
    return size


def _tiling(rows: int, k: int, n: int) -> tuple[int, int, int]:
    """Megablox tiles (rows, contraction, output columns) of a [rows, k] x [k, n] product."""
    tm, tk, tn = MEGABLOX_TILING
    return _row_tile(rows, tm), _dim_tile(k, tk), _dim_tile(n, tn)


def _padded_groups(group_sizes: Array, num_rows: int) -> Array:
    """[E + 1] int32: the E groups, then one group of the rows past them. Megablox computes
    only the first E groups (one per weight matrix) and writes zeros elsewhere."""
    sizes = group_sizes.astype(jnp.int32)
    return jnp.concatenate([sizes, (num_rows - jnp.sum(sizes))[None]])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _megablox(x: Array, w: Array, group_sizes: Array, interpret: bool) -> Array:
    """x [R, k] with R a multiple of the row tile, w [E, k, n], group_sizes [E + 1] (last:
    padding rows) -> [R, n]."""
    return _gmm(x, w, group_sizes, interpret, transpose_w=False)


def _megablox_backend():
    """The module of megablox's `gmm` and `tgmm` kernels (the package face exports only the
    function `gmm`, under the module's name)."""
    return importlib.import_module("jax.experimental.pallas.ops.tpu.megablox.gmm")


def _gmm(x: Array, w: Array, group_sizes: Array, interpret: bool, transpose_w: bool) -> Array:
    k, n = (w.shape[2], w.shape[1]) if transpose_w else (w.shape[1], w.shape[2])
    return _megablox_backend().gmm(x, w, group_sizes, x.dtype, _tiling(x.shape[0], k, n),
                                   transpose_rhs=transpose_w, interpret=interpret)


def _megablox_fwd(x, w, group_sizes, interpret):
    return _megablox(x, w, group_sizes, interpret), (x, w, group_sizes)


def _megablox_bwd(interpret, residuals, dy):
    """dx = grouped(dy, w^T) (gmm), dw[e] = x_e^T dy_e (tgmm), each with its own exact tiles."""
    x, w, group_sizes = residuals
    dx = _gmm(dy.astype(x.dtype), w, group_sizes, interpret, transpose_w=True)
    dw = _megablox_backend().tgmm(x.swapaxes(0, 1), dy.astype(x.dtype), group_sizes, w.dtype,
                                  _tiling(x.shape[0], w.shape[1], w.shape[2]),
                                  num_actual_groups=w.shape[0], interpret=interpret)
    return dx, dw, None


_megablox.defvjp(_megablox_fwd, _megablox_bwd)


def megablox_grouped_matmul(x: Array, w: Array, group_sizes: Array, *,
                            interpret: bool) -> Array:
    """x [M, k] rows sorted by expert, w [E, k, n], group_sizes [E] -> [M, n] through megablox.

    Rows are padded to a whole number of row tiles (the padding is one extra group that no
    weight matrix serves, so megablox skips its tiles and writes zeros there). bfloat16 and
    float32 run as they are, with float32 accumulation; other float types run as float32 and
    are rounded back. `interpret`: run the Pallas kernels in interpret mode (off TPU).
    """
    dtype = x.dtype
    compute = dtype if dtype in MEGABLOX_DTYPES else jnp.float32
    num_rows = x.shape[0]
    tile = _row_tile(num_rows, MEGABLOX_TILING[0])
    padded = -(-num_rows // tile) * tile
    xp = jnp.pad(x.astype(compute), ((0, padded - num_rows), (0, 0)))
    out = _megablox(xp, w.astype(compute), _padded_groups(group_sizes, padded), interpret)
    return out[:num_rows].astype(dtype)


def tokamax_available() -> bool:
    """Whether tokamax (the optional `gpu` extra) is installed."""
    return importlib.util.find_spec("tokamax") is not None


def tokamax_grouped_matmul(x: Array, w: Array, group_sizes: Array, *,
                           implementation: str | None) -> Array:
    """x [M, k] rows sorted by expert, w [E, k, n], group_sizes [E] -> [M, n] through
    `tokamax.ragged_dot` (its VJP). implementation None lets tokamax pick (Mosaic GPU on
    sm90/sm100, else Triton, else XLA); "xla" is the one that runs on CPU. Rows past
    sum(group_sizes) are set to zero here, whatever the kernel leaves in them."""
    if not tokamax_available():
        raise ImportError(f"grouped matmul 'tokamax' needs the tokamax package: "
                          f"{TOKAMAX_INSTALL}; or use 'auto' or 'ragged_dot'.")
    import tokamax
    from absl import flags

    if not flags.FLAGS.is_parsed():
        # tokamax reads its options from absl flags and otherwise parses sys.argv on first use,
        # which fails under pytest or Jupyter: use its defaults unless the program parsed them.
        flags.FLAGS.mark_as_parsed()
    out = tokamax.ragged_dot(x, w.astype(x.dtype), group_sizes.astype(jnp.int32),
                             implementation=implementation)
    rows = jnp.arange(x.shape[0])[:, None]
    return jnp.where(rows < jnp.sum(group_sizes), out, 0).astype(x.dtype)
