"""`ModelConfig`: the Transformer around the MoE layers, validated once.

Which blocks are sparse is a model setting (`moe_every`, `moe_layers`); what a sparse block does
is the `MoeConfig`. A model whose settings select no block is dense, so every experiment config
carries both sections and `--config.moe.num_experts=16` is valid on every config.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax.numpy as jnp

from moe_jax.config import ACTIVATIONS, MoeConfig
from moe_jax.utils import fields

NORMS = ("rmsnorm", "layernorm")
POSITIONS = ("rotary", "learned")
QK_NORMS = ("none", "per_head", "projection", "weightless")
DTYPES = ("float32", "bfloat16", "float16")
# Rematerialisation of each block in the backward pass (`models.stack`): "none" keeps every
# activation; "full" keeps only each block's input and recomputes the rest; "save_dots" keeps
# the outputs of matmuls without batch dimensions (the projections and FFNs, not the attention
# scores): `jax.checkpoint_policies.dots_with_no_batch_dims_saveable`.
REMAT_POLICIES = ("none", "full", "save_dots")
ROPE_SCALINGS = ("none", "yarn", "llama3")


class AttentionKind(NamedTuple):
    """What one block's attention does (`ModelConfig.attention_kind`): rotary positions or
    none (NoPE), chunked (the chunk length) or not (None), NoPE temperature tuning, its
    QK-norm (`ModelConfig.qk_norm`, "none" where it does not apply), and its sliding window
    (GPT-OSS; None: the whole context)."""

    rotary: bool
    chunk: int | None
    temperature: bool
    qk_norm: str
    window: int | None = None


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A pre-norm Transformer (decoder-only LM, or a bidirectional encoder with causal=False).

    Shape letters: B batch, L sequence length, d `d_model`, H query heads, K key/value heads,
    h `head_dim`, f dense `d_ff`, V padded vocabulary.
    """

    # Byte tokenizer: 256 bytes + pad=0, bos=1, eos=2. The embedding and output matrices are
    # padded to a multiple of `vocab_multiple` rows (e.g. 259 -> 384) for aligned matmuls; padded
    # rows are real parameters and count in params and FLOPs, but logits are returned for the
    # `vocab_size` real tokens only.
    vocab_size: int = 259
    vocab_multiple: int = 128
    d_model: int = 192
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int | None = None  # grouped-query attention (Ainslie et al. 2023); None = MHA
    head_dim: int | None = None  # None = d_model // num_heads
    d_ff: int = 768  # hidden width of the dense FFN blocks
    activation: str = "gelu"  # dense FFN: "relu", "gelu" or "swiglu" (same math as the experts)
    norm: str = "rmsnorm"
    norm_eps: float = 1e-6
    positions: str = "rotary"  # RoPE (Su et al. 2021) or a learned table of max_seq_len rows
    rope_base: float = 10000.0
    max_seq_len: int = 128  # longest sequence; the context length FLOPs are counted at
    # Untied: logits = h @ output, output ~ truncated normal with variance 1/d, so initial
    # logits are ~N(0, 1) and the initial loss is ~ln(V). Tied: logits = h @ embedding.T * d**-0.5
    # (T5); at init a token's own logit is then ~sqrt(d), a copy-the-input bias training removes.
    tie_embeddings: bool = False
    qkv_bias: bool = False  # biases on the query/key/value projections (Qwen)
    out_bias: bool = False  # a bias on the attention output projection (GPT-OSS)
    # Sliding-window attention (Mistral 7B, Jiang et al. 2023, Sec. 2): in the blocks of
    # `sliding_window_layers` (None: every block) a query attends to itself and the
    # sliding_window - 1 tokens before it; the other blocks attend to the whole context.
    # GPT-OSS alternates: blocks 0, 2, 4, ... windowed (128 tokens), the others full.
    sliding_window: int | None = None
    sliding_window_layers: tuple[int, ...] | None = None
    # A learned sink logit per head in the attention softmax's denominator (GPT-OSS;
    # `attention.softmax_with_sink`).
    attention_sinks: bool = False
    # QK-norm (Henry et al. 2020; Dehghani et al. 2023, ViT-22B): q and k normalised (`norm`,
    # `norm_eps`) after the projections, before the rotary positions. "per_head": over each
    # head's h dims, one [h] scale shared by the heads (Qwen3, Yang et al. 2025, Sec. 2);
    # "projection": over the whole projection, scales [H*h] and [K*h] (OLMoE, Muennighoff et
    # al. 2024, as released); "weightless": each head's h dims divided by their RMS, no scale,
    # in the blocks with rotary positions only (Llama 4 as released, `use_qk_norm`).
    qk_norm: str = "none"
    dropout_rate: float = 0.0  # on the embeddings and on each residual branch
    causal: bool = True  # False: bidirectional encoder (masked-LM objective)
    # Sparse blocks. moe_every=n makes block i sparse iff (i + 1) % n == 0: n=1 every block,
    # n=2 blocks 1, 3, 5, ... (GShard/Switch "every other FFN"; block 0 stays dense). 0 = none.
    # `moe_layers`, when set, lists the sparse blocks explicitly and overrides moe_every.
    moe_every: int = 0
    moe_layers: tuple[int, ...] | None = None
    dtype: str = "float32"  # activations; the router always runs in MoeConfig.router_dtype
    param_dtype: str = "float32"
    embed_init_std: float = 1.0  # token (and learned position) embeddings ~ N(0, std^2)
    # One `nn.scan` over the repeating unit of blocks (moe_every=2: a dense then a sparse block),
    # parameters stacked along a leading "layers" axis: compile time independent of depth.
    # Blocks before the repeating unit stay unrolled (`models.stack`).
    scan_layers: bool = False
    remat_policy: str = "none"  # see REMAT_POLICIES
    # Multi-head latent attention (MLA; DeepSeek-V2, Liu et al. 2024, Sec. 2.1; DeepSeek-V3
    # Sec. 2.1.1), on when kv_lora_rank is set (`models.latent_attention`): keys and values
    # come from one kv_lora_rank-wide latent per token, queries through a q_lora_rank-wide one
    # (None: a full-rank query projection); each head's query/key is qk_nope_head_dim dims
    # without positions plus qk_rope_head_dim rotary dims whose key is shared by the heads;
    # values have v_head_dim dims. The latents' RMSNorms use latent_norm_eps. num_kv_heads
    # and head_dim do not apply.
    q_lora_rank: int | None = None
    kv_lora_rank: int | None = None
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    latent_norm_eps: float = 1e-6
    # Rotary pairs (2i, 2i+1) instead of (i, i + h/2) (`positions.apply_rotary`).
    rope_interleave: bool = False
    # Rotary frequency scaling (`positions.rotary_scaling_of`): "yarn", YaRN with the yarn_*
    # fields; "llama3", Llama 3.1's with the llama3_* fields (grouped-query attention only;
    # defaults: Llama 3.1's released values).
    rope_scaling: str = "none"
    yarn_factor: float = 1.0
    yarn_original_max_seq_len: int = 4096
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    yarn_mscale: float = 1.0
    yarn_mscale_all_dim: float = 0.0
    yarn_truncate: bool = True
    llama3_factor: float = 8.0
    llama3_original_max_seq_len: int = 8192
    llama3_low_freq_factor: float = 1.0
    llama3_high_freq_factor: float = 4.0
    # Multi-token prediction (DeepSeek-V3 Sec. 2.2, `models.multi_token`): mtp_depth sequential
    # modules, module k predicting token i + 1 + k; their mean cross-entropy is added to the
    # loss times mtp_loss_weight (lambda, eq. 25). 0: none.
    mtp_depth: int = 0
    mtp_loss_weight: float = 0.3
    # Per-block attention (Llama 4 as released; `attention_kind`): `nope_layers` have no
    # positions at all (NoPE, Kazemnejad et al. 2023); `chunked_layers` attend only to the
    # earlier tokens of their own chunk of `attention_chunk` positions (chunk = position //
    # attention_chunk). With `attn_temperature_floor` set, the NoPE blocks multiply each query
    # at position p by log(floor((p + 1) / floor) + 1) * attn_temperature_scale + 1
    # (`attention.temperature_scale`; Nakanishi 2025, "Scalable-Softmax").
    nope_layers: tuple[int, ...] = ()
    chunked_layers: tuple[int, ...] = ()
    attention_chunk: int | None = None
    attn_temperature_floor: float | None = None
    attn_temperature_scale: float = 0.1

    def __post_init__(self) -> None:
        for name in ("vocab_size", "vocab_multiple", "d_model", "num_layers", "num_heads", "d_ff",
                     "max_seq_len"):
            fields.integer(self, name, minimum=1)
        for name in ("num_kv_heads", "head_dim"):
            fields.integer(self, name, minimum=1, optional=True)
        fields.integer(self, "moe_every", minimum=0,
                           fix="0 = no sparse block, 1 = every block, 2 = every other block")
        if self.num_heads % self.kv_heads:
            fields.fail(self, "num_heads", f"must be a multiple of num_kv_heads="
                            f"{self.num_kv_heads}", "change one of them")
        if self.head_dim is None and self.d_model % self.num_heads:
            fields.fail(self, "d_model", f"is not divisible by num_heads={self.num_heads}",
                            "change one or set head_dim explicitly")
        if self.positions == "rotary" and self.head_size % 2:
            fields.fail(self, "head_dim", "gives an odd head dimension, and rotary positions "
                            "need an even head dimension", "set head_dim or num_heads",
                            value=self.head_size)
        fields.one_of(self, "activation", ACTIVATIONS)
        fields.one_of(self, "norm", NORMS)
        fields.one_of(self, "positions", POSITIONS)
        fields.one_of(self, "qk_norm", QK_NORMS)
        fields.one_of(self, "dtype", DTYPES)
        fields.one_of(self, "param_dtype", DTYPES)
        for name in ("norm_eps", "rope_base", "embed_init_std"):
            fields.number(self, name, above=0)
        fields.number(self, "dropout_rate", at_least=0, below=1)
        fields.one_of(self, "remat_policy", REMAT_POLICIES)
        for name in ("tie_embeddings", "qkv_bias", "out_bias", "attention_sinks", "causal",
                     "scan_layers"):
            fields.boolean(self, name)
        self._check_latent_attention()
        self._check_sliding_window()
        self._check_rope_scaling()
        if self.moe_layers is not None:
            self._check_layers("moe_layers")
        self._check_block_attention()

    def _check_layers(self, name: str) -> None:
        layers = tuple(getattr(self, name))
        bad = [i for i in layers if not isinstance(i, int) or not 0 <= i < self.num_layers]
        if bad or len(set(layers)) != len(layers):
            fields.fail(self, name, f"must list distinct block indices in [0, "
                        f"{self.num_layers}); offending entries: {bad or 'duplicates'}")
        object.__setattr__(self, name, tuple(sorted(layers)))

    def _check_block_attention(self) -> None:
        for name in ("nope_layers", "chunked_layers"):
            self._check_layers(name)
        fields.integer(self, "attention_chunk", minimum=1, optional=True)
        if self.chunked_layers and self.attention_chunk is None:
            fields.fail(self, "chunked_layers", "need a chunk length", "set attention_chunk",
                        value=self.chunked_layers)
        if self.attn_temperature_floor is not None:
            fields.number(self, "attn_temperature_floor", above=0,
                          fix="None turns temperature tuning off")
            if not self.nope_layers:
                fields.fail(self, "attn_temperature_floor", "tunes the temperature of NoPE "
                            "blocks only, and nope_layers is empty",
                            "list the NoPE blocks in nope_layers or set it to None")
        fields.number(self, "attn_temperature_scale", at_least=0)
        uses = self.nope_layers or self.chunked_layers or self.qk_norm == "weightless"
        if uses and self.latent_attention:
            fields.fail(self, "nope_layers", "and chunked_layers (and qk_norm='weightless') "
                        "are implemented for grouped-query attention only",
                        "set kv_lora_rank=None or leave them empty", value=self.nope_layers)
        if self.nope_layers and self.positions != "rotary":
            fields.fail(self, "nope_layers", "leave out the rotary positions of some blocks, "
                        f"but positions={self.positions!r}", "set positions='rotary'",
                        value=self.nope_layers)

    def attention_kind(self, layer: int | None) -> AttentionKind:
        """The attention of block `layer` (None, or an index outside the stack such as a
        multi-token-prediction module's: the default, rotary and unchunked)."""
        inside = layer is not None and 0 <= layer < self.num_layers
        rotary = self.positions == "rotary" and not (inside and layer in self.nope_layers)
        chunk = self.attention_chunk if inside and layer in self.chunked_layers else None
        tuned = self.attn_temperature_floor is not None and inside and layer in self.nope_layers
        windowed = inside and (self.sliding_window_layers is None
                               or layer in self.sliding_window_layers)
        return AttentionKind(rotary=rotary, chunk=chunk, temperature=tuned,
                             qk_norm=self.qk_norm if rotary or self.qk_norm != "weightless"
                             else "none", window=self.sliding_window if windowed else None)

    def _check_latent_attention(self) -> None:
        for name in ("q_lora_rank", "kv_lora_rank"):
            fields.integer(self, name, minimum=1, optional=True)
        for name in ("qk_nope_head_dim", "v_head_dim"):
            fields.integer(self, name, minimum=1)
        fields.integer(self, "qk_rope_head_dim", minimum=2)
        fields.integer(self, "mtp_depth", minimum=0, fix="0 = no multi-token prediction")
        fields.number(self, "latent_norm_eps", above=0)
        fields.number(self, "mtp_loss_weight", at_least=0)
        fields.boolean(self, "rope_interleave")
        if self.kv_lora_rank is not None and self.qk_rope_head_dim % 2:
            fields.fail(self, "qk_rope_head_dim", "must be even for rotary positions",
                        "use an even number")
        if self.mtp_depth and not self.causal:
            fields.fail(self, "mtp_depth", "predicts later tokens of a causal LM",
                        "set causal=True or mtp_depth=0")

    def _check_sliding_window(self) -> None:
        """GPT-OSS's attention options: the window, its blocks, sinks and the output bias."""
        fields.integer(self, "sliding_window", minimum=1, optional=True,
                       fix="None attends to the whole context")
        for name in ("sliding_window", "attention_sinks", "out_bias"):
            if getattr(self, name) not in (None, False) and self.latent_attention:
                fields.fail(self, name, "is implemented for grouped-query attention, not "
                            "multi-head latent attention", f"set kv_lora_rank=None or unset "
                            f"{name}")
        if self.sliding_window is not None and not self.causal:
            fields.fail(self, "sliding_window", "is implemented for causal attention",
                        "set causal=True or sliding_window=None")
        if self.sliding_window_layers is None:
            return
        self._check_layers("sliding_window_layers")
        if self.sliding_window is None:
            fields.fail(self, "sliding_window_layers", "lists windowed blocks but "
                        "sliding_window is None", "set sliding_window or "
                        "sliding_window_layers=None")

    def _check_rope_scaling(self) -> None:
        fields.one_of(self, "rope_scaling", ROPE_SCALINGS)
        for name in ("yarn_original_max_seq_len", "llama3_original_max_seq_len"):
            fields.integer(self, name, minimum=1)
        for name in ("yarn_factor", "yarn_beta_fast", "yarn_beta_slow", "llama3_factor",
                     "llama3_low_freq_factor", "llama3_high_freq_factor"):
            fields.number(self, name, above=0)
        for name in ("yarn_mscale", "yarn_mscale_all_dim"):
            fields.number(self, name, at_least=0)
        fields.boolean(self, "yarn_truncate")
        if self.llama3_high_freq_factor < self.llama3_low_freq_factor:
            fields.fail(self, "llama3_high_freq_factor", "must be at least "
                        f"llama3_low_freq_factor={self.llama3_low_freq_factor} (frequencies "
                        "turning fewer than low times over the original context are divided "
                        "by the factor, more than high times kept)", "swap them, or set them "
                        "equal for a step (Llama 4 Scout: both 1.0)")
        if self.yarn_mscale_all_dim and self.kv_lora_rank is None:
            fields.fail(self, "yarn_mscale_all_dim", "scales the softmax of multi-head latent "
                        "attention (DeepSeek-V2/V3) only", "set kv_lora_rank or "
                        "yarn_mscale_all_dim=0")
        if self.rope_scaling == "llama3" and self.kv_lora_rank is not None:
            fields.fail(self, "rope_scaling", "is implemented for grouped-query attention only",
                        "set kv_lora_rank=None, or rope_scaling='yarn' for latent attention")
        if self.rope_scaling != "none" and self.positions != "rotary":
            fields.fail(self, "rope_scaling", "scales rotary frequencies, but "
                        f"positions={self.positions!r}", "set positions='rotary' or "
                        "rope_scaling='none'")

    @property
    def latent_attention(self) -> bool:
        """Whether the blocks use multi-head latent attention (kv_lora_rank set)."""
        return self.kv_lora_rank is not None

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    @property
    def padded_vocab_size(self) -> int:
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

    @property
    def sparse_layers(self) -> tuple[int, ...]:
        """Indices of the blocks whose FFN is an MoE layer."""
        if self.moe_layers is not None:
            return self.moe_layers
        if self.moe_every == 0:
            return ()
        return tuple(i for i in range(self.num_layers) if (i + 1) % self.moe_every == 0)

    @property
    def jnp_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def jnp_param_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def check_compatible(model: ModelConfig, moe: MoeConfig) -> None:
    """Cross-section checks: a causal LM with sparse blocks refuses routers that mix tokens
    (`MoeConfig.check_causal`)."""
    if model.sparse_layers:
        moe.check_causal(model.causal)
