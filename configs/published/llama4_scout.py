"""Llama 4 Scout 17B-16E (Meta 2025, Llama 4 model card; HF meta-llama/Llama-4-Scout-17B-16E
config.json, text_config): 48 layers, d 5120, 40 query and 8 key/value heads of 128 dims; every
block MoE (interleave_moe_layer_step 1) with 16 experts, top-1 by the sigmoid of the router
logit, the gate scaling the expert's input, and one shared expert, all SwiGLU of width 8192;
every 4th block (3, 7, ..., 47) NoPE with attention temperature tuning (floor 8192, scale
0.1), the others rotary (interleaved pairs, theta 5e5) with the weightless QK-norm and
attention in chunks of 8192 tokens, their frequencies scaled as rope_scaling "llama3" (factor
16, low_freq_factor = high_freq_factor = 1, original_max_position_embeddings 8192: a step
dividing the frequencies of wavelength above 8192 by 16); vocabulary 202048, untied output;
10M positions (max_position_embeddings 10485760).
Published: 109B total parameters, 17B active per token (model card). moe_jax counts every
embedding and output parameter in both figures (as for DeepSeek-V3): total 107.77B (1.1% below
109B), active 17.17B (1.0% above 17B; without the input embedding, a lookup, 16.13B).
Not represented: the vision encoder.
"""

from moe_jax import schema

LAYERS = 48


def get_config():
    config = schema.base_config()
    config.model.update(dict(
        vocab_size=202048, vocab_multiple=1, d_model=5120, num_layers=LAYERS, num_heads=40,
        num_kv_heads=8, head_dim=128, d_ff=16384, activation="swiglu", norm="rmsnorm",
        norm_eps=1e-5, positions="rotary", rope_base=5e5, rope_interleave=True,
        rope_scaling="llama3", llama3_factor=16.0, llama3_low_freq_factor=1.0,
        llama3_high_freq_factor=1.0, llama3_original_max_seq_len=8192,
        max_seq_len=10485760, tie_embeddings=False, moe_layers=tuple(range(LAYERS)),
        qk_norm="weightless", nope_layers=tuple(range(3, LAYERS, 4)),
        chunked_layers=tuple(i for i in range(LAYERS) if (i + 1) % 4),
        attention_chunk=8192, attn_temperature_floor=8192.0, attn_temperature_scale=0.1))
    config.moe.update(dict(
        num_experts=16, top_k=1, router="sigmoid_top_k", gate_inputs=True, d_ff=8192,
        num_shared_experts=1, activation="swiglu", dispatch="dropless"))
    return schema.checked(config)
