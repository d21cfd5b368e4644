"""DeepSeekMoE-16B (Dai et al. 2024, "DeepSeekMoE", Sec. 5.1.2; HF deepseek-ai/deepseek-moe-16b-base
config.json): 28 layers, d 2048, 16 heads of 128 (MHA), block 0 a dense SwiGLU FFN of width
10944, blocks 1-27 MoE with 64 routed experts (top-6, raw softmax gates) and 2 shared experts,
all SwiGLU of width 1408, vocabulary 102400, untied output, context 4096. Published: "approximately
16.4B total parameters, with the number of activated parameters around 2.8B" (Sec. 5.1.2).
"""

from moe_jax import schema


def get_config():
    config = schema.base_config()
    config.model.update(dict(
        vocab_size=102400, vocab_multiple=1, d_model=2048, num_layers=28, num_heads=16,
        d_ff=10944, activation="swiglu", norm="rmsnorm", norm_eps=1e-6, positions="rotary",
        rope_base=1e4, max_seq_len=4096, tie_embeddings=False, moe_layers=tuple(range(1, 28))))
    config.moe.update(dict(
        num_experts=64, top_k=6, renormalize_gates=False, d_ff=1408, num_shared_experts=2,
        activation="swiglu", dispatch="dropless"))
    return schema.checked(config)
