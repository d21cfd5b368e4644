"""Weight-only quantization of the expert weights for serving, with qwix (Google's JAX
quantization library).

    qparams = quantize.quantize_experts(params, model_config, "int8")   # experts as qwix.QArray
    quantize.array_bytes(qparams)                                        # bytes actually stored
    logits, _ = model.apply({"params": quantize.dequantize_experts(qparams, model_config)}, ...)

Each MoE block's expert weights (wi, wi_gate, wo: [E, d_in, d_out]) become `qwix.QArray`s:
int8 or int4 values with symmetric absmax scales per expert and output column (qwix's
"channelwise" axes 0 and 2), w ~ q * scale. Everything else (attention, dense FFNs, router,
shared experts, embeddings) stays as it is: the experts are the parameters an MoE model has
many more of. Only the weights are quantized; activations and matmuls stay in the model's
dtype, so the model runs on `dequantize_experts(qparams)`, and inside a jitted step XLA
dequantizes from the stored integers at every call. On XLA:CPU that dequantization is a
separate pass over every expert (the dropless grouped matmul runs the host BLAS on float32),
so it saves memory, not time; a kernel that multiplies int8 weights directly (qwix's
`ragged_dot`/`dot_general` on GPU/TPU) is what turns the smaller weights into faster decoding.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import qwix

from moe_jax.models import transformer
from moe_jax.models.config import ModelConfig

PyTree = Any
QTYPES = {"int8": jnp.int8, "int4": jnp.int4}
EXPERT_WEIGHTS = ("wi", "wi_gate", "wo")
EXPERTS = "experts"


def quantize_weight(w: jax.Array, qtype: str) -> qwix.QArray:
    """[E, d_in, d_out] -> QArray with one absmax scale per expert and output column."""
    if qtype not in QTYPES:
        raise ValueError(f"qtype {qtype!r} is not supported; use one of {tuple(QTYPES)}.")
    return qwix.quantize(w, QTYPES[qtype], channelwise_axes=(0, 2))


def _map_experts(params: PyTree, config: ModelConfig, fn) -> PyTree:
    """params with fn applied to every MoE block's expert weights."""
    if not config.sparse_layers:
        raise ValueError("the model has no MoE block (ModelConfig.moe_every / moe_layers): "
                         "there are no expert weights to quantize.")
    layers = [{**layer, EXPERTS: {name: fn(w) if name in EXPERT_WEIGHTS else w
                                  for name, w in layer[EXPERTS].items()}}
              for layer in transformer.moe_layer_variables(params, config)]
    return transformer.with_moe_layer_variables(params, config, layers)


def quantize_experts(params: PyTree, config: ModelConfig, qtype: str = "int8") -> PyTree:
    """The "params" collection with each MoE block's expert weights as `qwix.QArray`."""
    return _map_experts(params, config, lambda w: quantize_weight(w, qtype))


def dequantize_experts(params: PyTree, config: ModelConfig) -> PyTree:
    """The inverse: float expert weights (the scales' dtype) from `quantize_experts`'s output."""
    return _map_experts(params, config,
                        lambda w: qwix.dequantize(w) if isinstance(w, qwix.QArray) else w)


def array_bytes(tree: PyTree, *, packed_int4: bool = True) -> int:
    """Bytes of the arrays of a pytree (QArrays: values plus scales). JAX reports one byte per
    int4 value on CPU; with packed_int4 they count half a byte each, as two per byte pack on
    GPU/TPU."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        if packed_int4 and leaf.dtype == jnp.int4:
            total += leaf.size // 2 + leaf.size % 2
        else:
            total += leaf.nbytes
    return total
