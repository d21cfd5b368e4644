"""gpt-oss-20b (OpenAI 2025, "gpt-oss-120b & gpt-oss-20b Model Card", Table 1; HF
openai/gpt-oss-20b config.json): gpt-oss-120b's blocks (configs/published/gpt_oss_120b.py), 24
of them, with 32 experts per MoE layer (top-4).
Published: 20.91B total parameters, 3.61B active per token (Table 1, counting the unembedding
but not the embedding table): moe_jax's count gives 20.91B total and 4.19B active with both
matrices, 3.61B without the embedding (0.58B).
"""

import os

from moe_jax import schema

NUM_LAYERS = 24


def get_config():
    config = schema.load_config(os.path.join(os.path.dirname(__file__), "gpt_oss_120b.py"))
    config.model.update(dict(num_layers=NUM_LAYERS, moe_layers=tuple(range(NUM_LAYERS)),
                             sliding_window_layers=tuple(range(0, NUM_LAYERS, 2))))
    config.moe.num_experts = 32
    return schema.checked(config)
