"""DeepSeek-V3 (Liu et al. 2024, "DeepSeek-V3 Technical Report", arXiv:2412.19437, Sec. 4.2; HF
deepseek-ai/DeepSeek-V3 config.json): 61 layers, d 7168, 128 heads of multi-head latent
attention (query latent 1536, key/value latent 512, 128 + 64 rotary query/key dims, 128 value
dims), blocks 0-2 a dense SwiGLU FFN of width 18432, blocks 3-60 MoE with 256 routed experts
(sigmoid scores with the correction bias, 8 groups of 32 of which a token uses 4, top-8,
gates normalised then x 2.5) and 1 shared expert, all SwiGLU of width 2048; vocabulary 129280,
untied output; YaRN x40 from a 4096-token pre-training context (163840 positions).
Published: 671B total parameters, 37B activated per token (Sec. 1 and 4.2); the 685B of the
released checkpoint add the 14B multi-token-prediction module (its block, projection and norms,
11.6B, plus stored copies of the embedding and output matrices), which is not counted here
(mtp_depth=0). moe_jax counts every embedding and output parameter in both figures: total
671.03B, active 37.55B (1.5% above the printed 37B; the input embedding, a lookup, is 0.93B).
"""

from moe_jax import schema


def get_config():
    config = schema.base_config()
    config.model.update(dict(
        vocab_size=129280, vocab_multiple=1, d_model=7168, num_layers=61, num_heads=128,
        d_ff=18432, activation="swiglu", norm="rmsnorm", norm_eps=1e-6, positions="rotary",
        rope_base=1e4, max_seq_len=163840, tie_embeddings=False,
        moe_layers=tuple(range(3, 61)), q_lora_rank=1536, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, rope_interleave=True,
        rope_scaling="yarn", yarn_factor=40.0, yarn_original_max_seq_len=4096,
        yarn_beta_fast=32.0, yarn_beta_slow=1.0, yarn_mscale=1.0, yarn_mscale_all_dim=1.0))
    config.moe.update(dict(
        num_experts=256, top_k=8, router="sigmoid_bias", expert_groups=8, top_expert_groups=4,
        routed_scaling_factor=2.5, d_ff=2048, num_shared_experts=1, activation="swiglu",
        dispatch="dropless", bias_update_rate=1e-3, load_balance_coef=0.0))
    return schema.checked(config)
