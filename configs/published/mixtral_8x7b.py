"""Mixtral-8x7B (Jiang et al. 2024, "Mixtral of Experts", Table 1; HF mistralai/Mixtral-8x7B-v0.1
config.json): 32 layers, d 4096, 32 query / 8 key-value heads of 128, every FFN an MoE of 8
SwiGLU experts of width 14336 with top-2 renormalised gates, vocabulary 32000, untied output,
RoPE base 1e6, context 32768. Published: 46.7B total and 12.9B active parameters per token
(mistral.ai/news/mixtral-of-experts). For parameter and FLOP accounting; not trained here.
"""

from moe_jax import schema


def get_config():
    config = schema.base_config()
    config.model.update(dict(
        vocab_size=32000, vocab_multiple=1, d_model=4096, num_layers=32, num_heads=32,
        num_kv_heads=8, head_dim=128, d_ff=14336, activation="swiglu", norm="rmsnorm",
        norm_eps=1e-5, positions="rotary", rope_base=1e6, max_seq_len=32768,
        tie_embeddings=False, moe_every=1))
    config.moe.update(dict(
        num_experts=8, top_k=2, renormalize_gates=True, d_ff=14336, activation="swiglu",
        dispatch="dropless"))
    return schema.checked(config)
