"""Quantized experts (qwix): only the expert weights change, their stored bytes shrink as the
precision says, dequantization stays within half a quantization step, and the model's outputs
move by little."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qwix

from moe_jax.config import MoeConfig
from moe_jax.models import ModelConfig, Transformer, quantize

MODEL = ModelConfig(vocab_size=50, vocab_multiple=8, d_model=32, num_layers=2, num_heads=4,
                    d_ff=64, max_seq_len=16, moe_every=2)
MOE = MoeConfig(num_experts=4, top_k=2, d_ff=64, activation="swiglu", dispatch="dropless")
TOKENS = jax.random.randint(jax.random.key(1), (2, 16), 3, 50)


@functools.cache
def params():
    variables = Transformer(MODEL, MOE).init({"params": jax.random.key(0)}, TOKENS, train=False)
    return jax.tree.map(lambda x: x.unbox() if hasattr(x, "unbox") else x, variables["params"],
                        is_leaf=lambda x: hasattr(x, "unbox"))


@pytest.mark.parametrize("qtype,bits", [("int8", 8), ("int4", 4)])
def test_only_expert_weights_are_quantized_and_their_bytes_shrink(qtype, bits):
    p = params()
    q = quantize.quantize_experts(p, MODEL, qtype)
    experts = q["block_1"]["moe"]["experts"]
    assert all(isinstance(experts[n], qwix.QArray) for n in ("wi", "wi_gate", "wo"))
    assert experts["wi"].qvalue.dtype == jnp.dtype(qtype)
    float_experts = sum(x.nbytes for x in jax.tree.leaves(p["block_1"]["moe"]["experts"]))
    values = float_experts * bits // 32
    scales = 4 * sum(x.scale.size for x in experts.values())  # one per expert and column
    assert quantize.array_bytes(experts) == values + scales
    rest = {k: v for k, v in q.items() if k != "block_1"}
    assert jax.tree.all(jax.tree.map(lambda a, b: a is b, rest,
                                     {k: v for k, v in p.items() if k != "block_1"}))


@pytest.mark.parametrize("qtype,levels", [("int8", 127), ("int4", 7)])
def test_dequantized_weights_are_within_half_a_step_and_the_logits_stay_close(qtype, levels):
    p = params()
    d = quantize.dequantize_experts(quantize.quantize_experts(p, MODEL, qtype), MODEL)
    w, wd = p["block_1"]["moe"]["experts"]["wi"], d["block_1"]["moe"]["experts"]["wi"]
    step = jnp.max(jnp.abs(w), axis=1, keepdims=True) / levels  # per expert and column
    assert bool(jnp.all(jnp.abs(w - wd) <= step / 2 + 1e-7))
    model = Transformer(MODEL, MOE)
    logits, _ = model.apply({"params": p}, TOKENS, train=False)
    quantized, _ = model.apply({"params": d}, TOKENS, train=False)
    relative = float(jnp.abs(quantized - logits).max() / jnp.abs(logits).max())
    assert 0 < relative < (0.02 if qtype == "int8" else 0.3)
    np.testing.assert_array_equal(d["block_0"]["ffn"]["wi"], p["block_0"]["ffn"]["wi"])


def test_bad_input_gets_a_clear_error():
    with pytest.raises(ValueError, match="no MoE block"):
        quantize.quantize_experts(params(), MODEL.replace(moe_every=0))
    with pytest.raises(ValueError, match="not supported"):
        quantize.quantize_experts(params(), MODEL, "int2")
