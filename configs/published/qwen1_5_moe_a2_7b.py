"""Qwen1.5-MoE-A2.7B (Qwen team 2024, qwenlm.github.io/blog/qwen-moe; HF Qwen/Qwen1.5-MoE-A2.7B
config.json): 24 layers, d 2048, 16 heads of 128 with query/key/value biases, every FFN an MoE
of 60 routed SwiGLU experts of width 1408 (top-4, raw softmax gates) plus a shared SwiGLU
expert of width 5632 (= 4 x 1408, so num_shared_experts=4 here), vocabulary 151936, untied
output, RoPE base 1e6. Published: 14.3B total and 2.7B activated parameters (HF model card).
Not modelled: the shared expert's scalar sigmoid gate (a [2048, 1] kernel per layer, 49k
parameters in all).
"""

from moe_jax import schema


def get_config():
    config = schema.base_config()
    config.model.update(dict(
        vocab_size=151936, vocab_multiple=1, d_model=2048, num_layers=24, num_heads=16,
        d_ff=5632, activation="swiglu", norm="rmsnorm", norm_eps=1e-6, positions="rotary",
        rope_base=1e6, max_seq_len=8192, tie_embeddings=False, qkv_bias=True, moe_every=1))
    config.moe.update(dict(
        num_experts=60, top_k=4, renormalize_gates=False, d_ff=1408, num_shared_experts=4,
        activation="swiglu", dispatch="dropless"))
    return schema.checked(config)
