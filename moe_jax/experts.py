"""Expert feed-forward networks: one FFN, a batch of experts, and a grouped (ragged) batch.

Shape letters: E experts, N rows per expert buffer, M routed rows, d model width, f hidden width.
FFN (no biases): relu/gelu: act(x @ wi) @ wo; swiglu (Shazeer 2020, eq. 6):
(silu(x @ wi_gate) * (x @ wi)) @ wo. Weights are cast to the activation dtype of `x`.
Expert dropout (`Dropout`) drops hidden units, the [.., f] activations before `wo`, as the
intermediate dropout of T5's FFN (Switch Sec. 2.4).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from moe_jax.kernels.grouped_matmul import grouped_matmul

Array = jax.Array
Params = dict[str, Array]


class Dropout(NamedTuple):
    """Inverted dropout of the hidden activations: each unit is zeroed with probability `rate`
    and the others scaled by 1 / (1 - rate); `rng` draws the masks."""

    rate: float
    rng: Array


def _dropped(hidden: Array, dropout: Dropout | None) -> Array:
    if dropout is None:
        return hidden
    keep = jax.random.bernoulli(dropout.rng, 1.0 - dropout.rate, hidden.shape)
    return jnp.where(keep, hidden / (1.0 - dropout.rate), 0).astype(hidden.dtype)


def _hidden(pre: Array, gate_pre: Array | None, activation: str) -> Array:
    """The FFN nonlinearity on the first projection(s)."""
    if activation == "relu":
        return jax.nn.relu(pre)
    if activation == "gelu":
        return jax.nn.gelu(pre)
    if activation == "swiglu":
        return jax.nn.silu(gate_pre) * pre
    raise ValueError(f"unknown activation {activation!r}; use 'relu', 'gelu' or 'swiglu'.")


def ffn(params: Params, x: Array, activation: str, dropout: Dropout | None = None) -> Array:
    """One FFN. params: wi [d, f], wo [f, d] (+ wi_gate [d, f] for swiglu); x: [..., d];
    dropout: on the hidden activations [..., f], if given."""
    dt = x.dtype
    pre = x @ params["wi"].astype(dt)
    gate_pre = x @ params["wi_gate"].astype(dt) if activation == "swiglu" else None
    return _dropped(_hidden(pre, gate_pre, activation), dropout) @ params["wo"].astype(dt)


def expert_ffn(params: Params, x: Array, activation: str, *, expert_axis: int = 0,
               dropout: Dropout | None = None) -> Array:
    """Every expert on its own buffer: params wi [E, d, f], wo [E, f, d]; x with E on
    `expert_axis`, e.g. [E, N, d] or [G, E, C, d] (expert_axis=1). Returns x's shape.
    dropout: expert dropout, with an independent key per expert (split over E).

    The experts' matmuls always run on [E, rows, d] (E leading, the other dims merged): batching
    over a non-leading axis makes XLA:CPU transpose the [.., f] intermediates, which is slower
    (experiments/benchmarks/README.md has the measurement).
    """
    leading = jnp.moveaxis(x, expert_axis, 0)
    rows = leading.reshape(leading.shape[0], -1, leading.shape[-1])
    if dropout is None:
        out = jax.vmap(ffn, in_axes=(0, 0, None))(params, rows, activation)
    else:
        keys = jax.random.split(dropout.rng, rows.shape[0])
        out = jax.vmap(lambda p, r, k: ffn(p, r, activation, Dropout(dropout.rate, k)))(
            params, rows, keys)
    return jnp.moveaxis(out.reshape(leading.shape), 0, expert_axis)


def grouped_ffn(params: Params, x: Array, group_sizes: Array, activation: str,
                impl: str = "auto", partitioned: bool = False,
                dropout: Dropout | None = None) -> Array:
    """Experts on rows sorted by expert, without padding (MegaBlocks-style dropless).

    params: wi [E, d, f], wo [E, f, d] (+ wi_gate); x: [M, d], rows of expert e contiguous and in
    expert order; group_sizes: [E] int32 rows per expert (sum <= M; later rows produce zeros).
    `impl` and `partitioned` pick the grouped matmul (see `moe_jax.kernels.grouped_matmul`);
    dropout: expert dropout on the hidden activations [M, f], if given.
    """

    def dot(a: Array, w: Array) -> Array:
        return grouped_matmul(a, w.astype(a.dtype), group_sizes, impl, partitioned=partitioned)

    pre = dot(x, params["wi"])
    gate_pre = dot(x, params["wi_gate"]) if activation == "swiglu" else None
    return dot(_dropped(_hidden(pre, gate_pre, activation), dropout), params["wo"])


def init_ffn(key: Array, d_model: int, d_ff: int, activation: str, *, scale: float = 1.0,
             batch: tuple[int, ...] = (), dtype: jnp.dtype = jnp.float32) -> Params:
    """FFN weights with truncated-normal variance scaling over fan-in (Switch Sec. 2.4 uses
    scale 0.1). `batch=(E,)` makes a stack of E experts."""
    init = jax.nn.initializers.variance_scaling(
        scale, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1,
        batch_axis=tuple(range(len(batch))))
    keys = jax.random.split(key, 3)
    params = {
        "wi": init(keys[0], (*batch, d_model, d_ff), dtype),
        "wo": init(keys[1], (*batch, d_ff, d_model), dtype),
    }
    if activation == "swiglu":
        params["wi_gate"] = init(keys[2], (*batch, d_model, d_ff), dtype)
    return params
