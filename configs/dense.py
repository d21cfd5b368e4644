"""Dense baselines: the Transformer LMs every sparse family is FLOP-matched to.

Members (`--config=configs/dense.py:MEMBER`):
  mini    d 32, 4 layers, 2 heads, d_ff 128, seq 128: ~74k params (a third of them the byte
          embeddings), trained on ~170 tokens per parameter on 2 CPU cores (the `mini` scale of
          experiments/, calibrated so that model capacity matters)
  tiny    d 192, 4 layers, 4 heads, d_ff 768, seq 128: ~1.9M params, trains on 2 CPU cores
  small   d 640, 12 layers, 10 heads, d_ff 2560, seq 512: ~59M params, one GPU
  base    d 768, 24 layers, 12 heads, d_ff 3072, seq 512: the T5-Base width (d 768, 12 heads,
          d_ff 3072) with T5-Base's 12 + 12 layers stacked as one decoder, ~170M params
Suffixes: `_swiglu` (LLaMA-style: SwiGLU FFN of width 8/3 d rounded to 64, 2 query heads per
key/value head) and `_encoder` (bidirectional, for the masked-LM objective and
expert-choice routing), e.g. `tiny_swiglu`, `small_encoder`.
All: byte vocabulary 259 padded to 384, pre-RMSNorm, rotary positions, untied output, no
dropout. The moe section mirrors the dense FFN (activation, d_ff), so
`--config.model.moe_every=2` turns any of them into a sparse model whose experts are copies of
the dense FFN's shape (2x the dense parameters per sparse block, ~same FLOPs plus the router).
"""

from moe_jax import schema

SCALES = {
    "mini": dict(d_model=32, num_layers=4, num_heads=2, d_ff=128, max_seq_len=128),
    "tiny": dict(d_model=192, num_layers=4, num_heads=4, d_ff=768, max_seq_len=128),
    "small": dict(d_model=640, num_layers=12, num_heads=10, d_ff=2560, max_seq_len=512),
    "base": dict(d_model=768, num_layers=24, num_heads=12, d_ff=3072, max_seq_len=512),
}
VARIANTS = ("", "_swiglu", "_encoder")
MEMBERS = tuple(scale + variant for scale in SCALES for variant in VARIANTS)


def get_config(arg: str = "tiny"):
    if arg not in MEMBERS:
        raise ValueError(f"configs/dense.py member {arg!r} is unknown; use one of {MEMBERS}.")
    scale, _, variant = arg.partition("_")
    config = schema.base_config()
    model = config.model
    model.update(SCALES[scale])
    model.activation = "gelu"
    model.norm = "rmsnorm"
    model.positions = "rotary"
    model.tie_embeddings = False
    model.dropout_rate = 0.0
    if variant == "swiglu":
        model.activation = "swiglu"
        model.d_ff = 64 * round(8 * model.d_model / 3 / 64)
        model.num_kv_heads = model.num_heads // 2
    elif variant == "encoder":
        model.causal = False
        config.train.objective = "masked_lm"  # a bidirectional model would read causal targets
    config.moe.activation = model.activation
    config.moe.d_ff = model.d_ff
    return schema.checked(config)
