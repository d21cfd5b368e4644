"""gpt-oss-120b (OpenAI 2025, "gpt-oss-120b & gpt-oss-20b Model Card", Sec. 2 and Table 1; HF
openai/gpt-oss-120b config.json): 36 blocks, d 2880, grouped-query attention with 64 query
heads and 8 key/value heads of 64 dims, biases on the q, k, v and o projections and a learned
sink logit per head, blocks 0, 2, 4, ... attending to a 128-token sliding window and the others
to the whole context; every block MoE with 128 experts of width 2880, top-4 (softmax over the
4 chosen router logits, router with a bias), experts with biases and the clamped SwiGLU
(alpha 1.702, limit 7); RMSNorm eps 1e-5; o200k_harmony vocabulary of 201088, untied output;
YaRN x32 (truncate false) from a 4096-token pre-training context (131072 positions),
rope_theta 150000.
Published: 116.83B total parameters, 5.13B active per token (Table 1), which counts the
unembedding but not the embedding table (a lookup): moe_jax's count gives 116.83B total and
5.71B active with both matrices, 5.13B without the embedding (0.58B). The released
checkpoint stores the experts in MXFP4 (imported dequantized, `moe_jax.interop.mxfp4`). The
balance-loss coefficient is not published (moe_jax's default here).
"""

from moe_jax import schema

NUM_LAYERS = 36


def get_config():
    config = schema.base_config()
    config.model.update(dict(
        vocab_size=201088, vocab_multiple=128, d_model=2880, num_layers=NUM_LAYERS,
        num_heads=64, num_kv_heads=8, head_dim=64, d_ff=2880, activation="swiglu",
        norm="rmsnorm", norm_eps=1e-5, positions="rotary", rope_base=150000.0,
        max_seq_len=131072, tie_embeddings=False, moe_layers=tuple(range(NUM_LAYERS)),
        qkv_bias=True, out_bias=True, attention_sinks=True, sliding_window=128,
        sliding_window_layers=tuple(range(0, NUM_LAYERS, 2)), rope_scaling="yarn",
        yarn_factor=32.0, yarn_original_max_seq_len=4096, yarn_beta_fast=32.0,
        yarn_beta_slow=1.0, yarn_truncate=False))
    config.moe.update(dict(
        num_experts=128, top_k=4, router="top_k", renormalize_gates=True, router_bias=True,
        d_ff=2880, activation="clamped_swiglu", expert_bias=True, swiglu_alpha=1.702,
        swiglu_limit=7.0, dispatch="dropless"))
    return schema.checked(config)
