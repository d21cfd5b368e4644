"""Qwen3-235B-A22B (Yang et al. 2025, "Qwen3 Technical Report", arXiv:2505.09388, Table 2; HF
Qwen/Qwen3-235B-A22B config.json): 94 layers, d 4096, 64 query / 4 key-value heads of 128 with
an RMSNorm over each query and key head (qk_norm), no attention biases, every FFN an MoE of 128
SwiGLU experts of width 1536 with top-8 renormalised gates (norm_topk_prob) and no shared
expert, vocabulary 151936, untied output, RoPE base 1e6, context 40960 (the config's
max_position_embeddings; 128K with YaRN). Published: 235B total and 22B activated parameters
(model card and report title). The activated count includes the input embedding and the output
projection: with them 22.2B, without them 21.0B (flops.count; tests/test_flops.py). For
parameter and FLOP accounting; not trained here.
"""

from moe_jax import schema


def get_config():
    config = schema.base_config()
    config.model.update(dict(
        vocab_size=151936, vocab_multiple=1, d_model=4096, num_layers=94, num_heads=64,
        num_kv_heads=4, head_dim=128, d_ff=12288, activation="swiglu", norm="rmsnorm",
        norm_eps=1e-6, positions="rotary", rope_base=1e6, max_seq_len=40960,
        tie_embeddings=False, qk_norm="per_head", moe_every=1))
    config.moe.update(dict(
        num_experts=128, top_k=8, renormalize_gates=True, d_ff=1536, activation="swiglu",
        dispatch="dropless"))
    return schema.checked(config)
