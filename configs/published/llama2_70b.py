"""Llama 2 70B (Touvron et al. 2023, "Llama 2", Table 1 and Sec. 2.2; HF meta-llama/Llama-2-70b-hf
config.json), a dense model: 80 layers, d 8192, 64 query / 8 key-value heads of 128, SwiGLU FFN
of width 28672, vocabulary 32000, untied output, RoPE base 1e4, context 4096. Published as
"70B" parameters; the count here is 69.0B. The dense model of MaxText's published v5p
measurements (experiments/scale/maxtext_comparison.md); not trained here.
"""

from moe_jax import schema


def get_config():
    config = schema.base_config()
    config.model.update(dict(
        vocab_size=32000, vocab_multiple=1, d_model=8192, num_layers=80, num_heads=64,
        num_kv_heads=8, head_dim=128, d_ff=28672, activation="swiglu", norm="rmsnorm",
        norm_eps=1e-5, positions="rotary", rope_base=1e4, max_seq_len=4096,
        tie_embeddings=False, moe_every=0))
    config.moe.update(dict(activation="swiglu", d_ff=28672))
    return schema.checked(config)
