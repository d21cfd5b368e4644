"""OLMoE-1B-7B (Muennighoff et al. 2024, "OLMoE", Table 10; HF allenai/OLMoE-1B-7B-0924): 16 layers,
d 2048, 16 heads of 128, every FFN an MoE of 64 SwiGLU experts of width 1024 with top-8 raw
softmax gates (dropless), vocabulary 50304, untied output, context 4096. Published: 6.9B total
and 1.3B active parameters (Tables 1 and 10; active includes the vocabulary parameters).
Not modelled: OLMoE's QK-norm (2 x 2048 scales per layer, 65k parameters in all).
"""

from moe_jax import schema


def get_config():
    config = schema.base_config()
    config.model.update(dict(
        vocab_size=50304, vocab_multiple=1, d_model=2048, num_layers=16, num_heads=16,
        d_ff=1024, activation="swiglu", norm="rmsnorm", norm_eps=1e-5, positions="rotary",
        rope_base=1e4, max_seq_len=4096, tie_embeddings=False, moe_every=1))
    config.moe.update(dict(
        num_experts=64, top_k=8, renormalize_gates=False, d_ff=1024, activation="swiglu",
        dispatch="dropless", load_balance_coef=1e-2, z_loss_coef=1e-3))
    return schema.checked(config)
