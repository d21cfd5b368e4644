"""Expert feed-forward networks: one FFN, a batch of experts, and a grouped (ragged) batch.

Shape letters: E experts, N rows per expert buffer, M routed rows, d model width, f hidden width.
FFN: relu/gelu: act(x @ wi) @ wo; swiglu (Shazeer 2020, eq. 6):
(silu(x @ wi_gate) * (x @ wi)) @ wo; GPT-OSS's clamped SwiGLU (`ClampedSwiglu`,
`clamped_swiglu`) in place of silu(gate) * up. Biases: where params hold "wi_bias",
"wi_gate_bias" ([.., f]) or "wo_bias" ([.., d]) they are added after the matmul of the same
name (GPT-OSS's experts); otherwise there are none. Weights are cast to the activation dtype
of `x`.
Expert dropout (`Dropout`) drops hidden units, the [.., f] activations before `wo`, as the
intermediate dropout of T5's FFN (Switch Sec. 2.4).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from moe_jax.kernels.grouped_matmul import grouped_matmul

Array = jax.Array
Params = dict[str, Array]
FFN_MATRICES = ("wi_gate", "wi", "wo")


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


@dataclasses.dataclass(frozen=True)
class ClampedSwiglu:
    """GPT-OSS's clamped SwiGLU (`clamped_swiglu`) with its slope `alpha` and clamp `limit`;
    an activation wherever the functions below take one (hashable: a static argument)."""

    alpha: float = 1.702
    limit: float = 7.0


Activation = str | ClampedSwiglu


def clamped_swiglu(gate: Array, up: Array, alpha: float, limit: float) -> Array:
    """GPT-OSS's gated unit (gpt-oss model card, OpenAI 2025, Sec. 2: a gated SwiGLU with
    clamping and a residual connection; the exact form as in OpenAI's released code and
    transformers' GptOssExperts): g = min(gate, limit), u = clip(up, -limit, limit),
    g * sigmoid(alpha * g) * (u + 1). gate, up: [..., f] -> [..., f].

    g * sigmoid(1.702 g) is the sigmoid approximation of GELU (Hendrycks & Gimpel 2016,
    Sec. 2); the clamps bound the activations, the + 1 offsets the linear unit.
    """
    g = jnp.minimum(gate, limit)
    u = jnp.clip(up, -limit, limit)
    return g * jax.nn.sigmoid(alpha * g) * (u + 1)


def is_gated(activation: Activation) -> bool:
    """Whether the FFN has a gate projection (wi_gate): swiglu and the clamped SwiGLU."""
    return activation == "swiglu" or isinstance(activation, ClampedSwiglu)


def _hidden(pre: Array, gate_pre: Array | None, activation: Activation) -> Array:
    """The FFN nonlinearity on the first projection(s)."""
    if isinstance(activation, ClampedSwiglu):
        return clamped_swiglu(gate_pre, pre, activation.alpha, activation.limit)
    if activation == "relu":
        return jax.nn.relu(pre)
    if activation == "gelu":
        return jax.nn.gelu(pre)
    if activation == "swiglu":
        return jax.nn.silu(gate_pre) * pre
    raise ValueError(f"unknown activation {activation!r}; use 'relu', 'gelu' or 'swiglu'.")


def _biased(y: Array, params: Params, name: str) -> Array:
    """y plus the bias of matmul `name` (params[name + "_bias"]) when there is one."""
    bias = params.get(f"{name}_bias")
    return y if bias is None else y + bias.astype(y.dtype)


Matmul = Callable[[Array, Array], Array]


def ffn(params: Params, x: Array, activation: Activation,
        dropout: Dropout | None = None, matmul: Matmul = jnp.matmul) -> Array:
    """One FFN. params: wi [d, f], wo [f, d] (+ wi_gate [d, f] for gated units; + biases, see
    the module docstring); x: [..., d]; dropout: on the hidden activations [..., f];
    matmul: computes a [N, i] @ w [i, o] (`expert_ffn` passes `few_rows_matmul`)."""
    dt = x.dtype

    def project(a: Array, name: str) -> Array:
        return _biased(matmul(a, params[name].astype(dt)), params, name)

    pre = project(x, "wi")
    gate_pre = project(x, "wi_gate") if is_gated(activation) else None
    return project(_dropped(_hidden(pre, gate_pre, activation), dropout), "wo")


# Rows per expert up to which `expert_ffn` uses `few_rows_matmul` on CPU: above it the plain
# matmul is faster (experiments/benchmarks/README.md, "E=64 top-1 on CPU").
FEW_ROWS = 256


@jax.custom_vjp
def _weights_left_matmul(a: Array, w: Array) -> Array:
    return a @ w


def _weights_left_fwd(a: Array, w: Array) -> tuple[Array, tuple[Array, Array]]:
    return a @ w, (a, w)


def _weights_left_bwd(residuals: tuple[Array, Array], g: Array) -> tuple[Array, Array]:
    a, w = residuals
    # The input gradient g @ w^T as (w @ g^T)^T: the weights [i, o] as the left operand,
    # contracted over their last axis. The barrier keeps XLA from folding the transpose
    # back into the dot.
    return jax.lax.optimization_barrier(w @ g.T).T, a.T @ g


_weights_left_matmul.defvjp(_weights_left_fwd, _weights_left_bwd)


def few_rows_matmul(a: Array, w: Array) -> Array:
    """a [N, i] @ w [i, o] for an expert with few rows N, the same numbers as `a @ w`.

    On XLA:CPU a batch of experts with ~100 rows each spends much of a matmul repacking each
    expert's weights for its few rows, most of all in the input gradient; computing that
    gradient with the weights as the left operand (`_weights_left_bwd`) is faster there.
    Other platforms get the plain matmul (`jax.lax.platform_dependent`: one branch is lowered).
    """
    return jax.lax.platform_dependent(a, w, cpu=_weights_left_matmul, default=jnp.matmul)


def expert_ffn(params: Params, x: Array, activation: Activation, *, expert_axis: int = 0,
               dropout: Dropout | None = None) -> Array:
    """Every expert on its own buffer: params wi [E, d, f], wo [E, f, d]; x with E on
    `expert_axis`, e.g. [E, N, d] or [G, E, C, d] (expert_axis=1). Returns x's shape.
    dropout: expert dropout, with an independent key per expert (split over E).

    The experts' matmuls always run on [E, rows, d] (E leading, the other dims merged): batching
    over a non-leading axis makes XLA:CPU transpose the [.., f] intermediates, which is slower
    (experiments/benchmarks/README.md has the measurement). With at most `FEW_ROWS` rows per
    expert they use `few_rows_matmul`.
    """
    leading = jnp.moveaxis(x, expert_axis, 0)
    rows = leading.reshape(leading.shape[0], -1, leading.shape[-1])
    matmul = few_rows_matmul if rows.shape[1] <= FEW_ROWS else jnp.matmul
    if dropout is None:
        out = jax.vmap(ffn, in_axes=(0, 0, None, None, None))(params, rows, activation, None,
                                                              matmul)
    else:
        keys = jax.random.split(dropout.rng, rows.shape[0])
        out = jax.vmap(lambda p, r, k: ffn(p, r, activation, Dropout(dropout.rate, k),
                                           matmul))(params, rows, keys)
    return jnp.moveaxis(out.reshape(leading.shape), 0, expert_axis)


def row_experts(group_sizes: Array, num_rows: int) -> Array:
    """[M] int32 the expert of each row of rows sorted by expert (group_sizes [E] rows each);
    rows past sum(group_sizes) get E."""
    return jnp.searchsorted(jnp.cumsum(group_sizes), jnp.arange(num_rows),
                            side="right").astype(jnp.int32)


def grouped_ffn(params: Params, x: Array, group_sizes: Array, activation: Activation,
                impl: str = "auto", partitioned: bool = False,
                dropout: Dropout | None = None) -> Array:
    """Experts on rows sorted by expert, without padding (MegaBlocks-style dropless).

    params: wi [E, d, f], wo [E, f, d] (+ wi_gate); x: [M, d], rows of expert e contiguous and in
    expert order; group_sizes: [E] int32 rows per expert (sum <= M; later rows produce zeros).
    `impl` and `partitioned` pick the grouped matmul (see `moe_jax.kernels.grouped_matmul`);
    dropout: expert dropout on the hidden activations [M, f], if given. Expert biases
    ([E, f] / [E, d]) are added to each row of their expert (rows past the groups get none).
    """
    expert = row_experts(group_sizes, x.shape[0]) if any(
        f"{n}_bias" in params for n in FFN_MATRICES) else None

    def dot(a: Array, name: str) -> Array:
        y = grouped_matmul(a, params[name].astype(a.dtype), group_sizes, impl,
                           partitioned=partitioned)
        bias = params.get(f"{name}_bias")
        if bias is None:
            return y
        rows = jnp.take(bias, expert, axis=0, mode="fill", fill_value=0)  # E -> zeros
        return y + rows.astype(y.dtype)

    pre = dot(x, "wi")
    gate_pre = dot(x, "wi_gate") if is_gated(activation) else None
    return dot(_dropped(_hidden(pre, gate_pre, activation), dropout), "wo")


def init_ffn(key: Array, d_model: int, d_ff: int, activation: Activation, *,
             scale: float = 1.0, batch: tuple[int, ...] = (), dtype: jnp.dtype = jnp.float32,
             bias: bool = False) -> Params:
    """FFN weights with truncated-normal variance scaling over fan-in (Switch Sec. 2.4 uses
    scale 0.1). `batch=(E,)` makes a stack of E experts; `bias` adds zero biases."""
    init = jax.nn.initializers.variance_scaling(
        scale, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1,
        batch_axis=tuple(range(len(batch))))
    keys = jax.random.split(key, 3)
    params = {
        "wi": init(keys[0], (*batch, d_model, d_ff), dtype),
        "wo": init(keys[1], (*batch, d_ff, d_model), dtype),
    }
    if is_gated(activation):
        params["wi_gate"] = init(keys[2], (*batch, d_model, d_ff), dtype)
    if bias:
        params |= {f"{name}_bias": jnp.zeros((*batch, params[name].shape[-1]), dtype)
                   for name in FFN_MATRICES if name in params}
    return params
