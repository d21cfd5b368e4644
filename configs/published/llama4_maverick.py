"""Llama 4 Maverick 17B-128E (Meta 2025, Llama 4 model card; HF
meta-llama/Llama-4-Maverick-17B-128E config.json, text_config): Scout's shapes (48 layers,
d 5120, 40 query and 8 key/value heads of 128 dims) with MoE in every other block
(interleave_moe_layer_step 2: blocks 1, 3, ..., 47) of 128 experts of width 8192, top-1 (the
sigmoid of the router logit scaling the expert's input) plus one shared expert, and a dense
SwiGLU FFN of width 16384 in blocks 0, 2, ..., 46; no QK-norm (use_qk_norm false); every 4th
block NoPE with temperature tuning, the others rotary with chunked attention (8192); 1M
positions.
Published: 400B total parameters, 17B active per token (model card). Counted as for Scout
(every embedding and output parameter in both): total 400.71B (0.2% above 400B), active
17.18B (1.1% above 17B).
"""

from moe_jax import schema

LAYERS = 48


def get_config():
    config = schema.base_config()
    config.model.update(dict(
        vocab_size=202048, vocab_multiple=1, d_model=5120, num_layers=LAYERS, num_heads=40,
        num_kv_heads=8, head_dim=128, d_ff=16384, activation="swiglu", norm="rmsnorm",
        norm_eps=1e-5, positions="rotary", rope_base=5e5, rope_interleave=True,
        max_seq_len=1048576, tie_embeddings=False, moe_layers=tuple(range(1, LAYERS, 2)),
        qk_norm="none", nope_layers=tuple(range(3, LAYERS, 4)),
        chunked_layers=tuple(i for i in range(LAYERS) if (i + 1) % 4),
        attention_chunk=8192, attn_temperature_floor=8192.0, attn_temperature_scale=0.1))
    config.moe.update(dict(
        num_experts=128, top_k=1, router="sigmoid_top_k", gate_inputs=True, d_ff=8192,
        num_shared_experts=1, activation="swiglu", dispatch="dropless"))
    return schema.checked(config)
