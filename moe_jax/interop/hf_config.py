"""Hugging Face `config.json` <-> moe_jax experiment config, one `Family` per supported
architecture.

    family = family_of(hf)                      # the Family of a config.json dict
    config = experiment_config(hf, family)      # ml_collections ConfigDict (schema layout)
    hf = hf_config(experiment, family, base=hf) # back to config.json

Every architectural option of the families maps to a field of `ModelConfig` / `MoeConfig`; the
numerical conventions were checked against transformers' modeling code (5.x): RMSNorm with eps
inside the square root in float32; rotary positions on the half-split layout (rotate_half) with
`rope_theta`; router softmax in float32, top-k, then (`norm_topk_prob`, always for Mixtral) the
k gates divided by their sum; SwiGLU experts `down(silu(gate(x)) * up(x))`; no capacity
(dropless). Rope scaling: "llama3" for llama and llama4_text (`hf_keys.llama3_fields`), "yarn"
for deepseek_v3 and gpt_oss. An option moe_jax has no equivalent for (other rope scalings,
sliding windows in use, clipped qkv, output-projection or MLP biases, other activations) is
refused with its key, except where a family implements it (GPT-OSS's windows, sinks, biases
and clamped SwiGLU, `hf_gpt_oss`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import ml_collections

from moe_jax import schema
from moe_jax.interop import hf_deepseek, hf_gpt_oss, hf_llama4
from moe_jax.interop.hf_keys import (
    UnsupportedModelError,
    cannot_write,
    llama3_fields,
    rope_parameters,
    rope_parameters_of,
)

ARCHITECTURE_KEYS = ("model_type", "architectures")
DEFAULT_TRAIN_SEQ_LEN = 2048  # converted configs train on at most this many tokens per row


@dataclasses.dataclass(frozen=True)
class Family:
    """One Hugging Face architecture: how its config keys and tensor names map to moe_jax.

    sparse: an MoE family; moe_prefix: the submodule of a sparse block's MLP
    ("block_sparse_moe" for Mixtral, else "mlp"); expert_names: HF names of an expert's
    (wi_gate, wi, wo) = (gate, up, down); experts_keys / width_key: config keys of E and the
    expert width; renormalize: True (always) or the config key (`norm_topk_prob`); qkv_bias:
    True/False (fixed) or the config key of q/k/v-only biases; qk_norm: ModelConfig.qk_norm;
    shared: Qwen2-MoE's gated shared expert; qwen_layers: sparse blocks chosen by
    `decoder_sparse_step` and `mlp_only_layers` (else every block is sparse); must_be_false:
    keys of options moe_jax does not implement (biases on the output projection or the MLP).
    """

    model_type: str
    architecture: str
    source: str  # the paper or model card
    sparse: bool = True
    moe_prefix: str = "mlp"
    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    experts_keys: tuple[str, ...] = ("num_experts", "num_local_experts")
    width_key: str = "moe_intermediate_size"
    renormalize: bool | str = "norm_topk_prob"
    qkv_bias: bool | str = False
    qk_norm: str | tuple[str, ...] = "none"
    shared: bool = False
    qwen_layers: bool = False
    must_be_false: tuple[str, ...] = ("attention_bias", "mlp_bias")
    # DeepSeek-V3-style options: the router (`MoeConfig.router`); rope types accepted besides
    # "default"; the shared experts' submodule; the config key of the number of leading dense
    # blocks (every later block sparse); multi-head latent attention; `configure(config, hf,
    # where)` and `describe(experiment) -> dict` map the family's own keys in and out.
    router: str = "top_k"
    rope_types: tuple[str, ...] = ("default",)
    shared_prefix: str = "shared_expert"
    first_dense_key: str | None = None
    latent_attention: bool = False
    configure: Callable[[ml_collections.ConfigDict, dict[str, Any], str], None] | None = None
    describe: Callable[[Any], dict[str, Any]] | None = None
    # Llama 4-style options: the dense FFN's submodule; the router's name in the MoE
    # submodule; experts fused in gate_up_proj / down_proj tensors; the config key listing the
    # sparse blocks (any set of blocks); gates scaling the expert inputs (`MoeConfig.
    # gate_inputs`); per-block attention (NoPE, chunked, temperature tuning, interleaved rotary).
    dense_prefix: str = "mlp"
    router_name: str = "gate"
    fused_experts: bool = False
    layers_key: str | None = None
    gate_inputs: bool = False
    block_attention: bool = False
    # GPT-OSS-style options: gate and up interleaved in the fused gate_up_proj (even / odd
    # columns); `gpt_oss` marks the family with attention sinks, sliding windows, an
    # output-projection bias, router and expert biases and the clamped SwiGLU (the others
    # refuse them on export); its sliding_window key is read by `configure`.
    interleaved_gate_up: bool = False
    gpt_oss: bool = False


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("mixtral", "MixtralForCausalLM", "Jiang et al. 2024, Mixtral of Experts",
           moe_prefix="block_sparse_moe", expert_names=("w1", "w3", "w2"),
           experts_keys=("num_local_experts",), width_key="intermediate_size", renormalize=True),
    Family("qwen2_moe", "Qwen2MoeForCausalLM", "Qwen1.5-MoE model card; Yang et al. 2024, "
           "Qwen2 Technical Report, Sec. 2.2.2", qkv_bias="qkv_bias", shared=True,
           qwen_layers=True),
    Family("qwen3_moe", "Qwen3MoeForCausalLM", "Yang et al. 2025, Qwen3 Technical Report, "
           "Sec. 2", qk_norm="per_head", qwen_layers=True),
    Family("olmoe", "OlmoeForCausalLM", "Muennighoff et al. 2024, OLMoE",
           width_key="intermediate_size", qk_norm="projection"),
    Family("llama", "LlamaForCausalLM", "Touvron et al. 2023, LLaMA", sparse=False,
           rope_types=("llama3",)),
    Family("qwen2", "Qwen2ForCausalLM", "Yang et al. 2024, Qwen2 Technical Report",
           sparse=False, qkv_bias=True),
    Family("deepseek_v3", "DeepseekV3ForCausalLM", "Liu et al. 2024, DeepSeek-V3 Technical "
           "Report", experts_keys=("n_routed_experts",), router="sigmoid_bias",
           rope_types=("yarn",), shared_prefix="shared_experts",
           first_dense_key="first_k_dense_replace", latent_attention=True, shared=True,
           configure=hf_deepseek.configure, describe=hf_deepseek.describe),
    Family("llama4_text", "Llama4ForCausalLM", "Meta 2025, Llama 4 model card; transformers' "
           "Llama4TextModel", experts_keys=("num_local_experts",), width_key="intermediate_size",
           renormalize=False, qk_norm=("weightless", "none"), shared=True, rope_types=("llama3",),
           moe_prefix="feed_forward", dense_prefix="feed_forward", router_name="router",
           fused_experts=True, layers_key="moe_layers", gate_inputs=True, block_attention=True,
           router="sigmoid_top_k", configure=hf_llama4.configure, describe=hf_llama4.describe),
    Family("gpt_oss", "GptOssForCausalLM", "OpenAI 2025, gpt-oss-120b & gpt-oss-20b Model Card",
           experts_keys=("num_local_experts",), width_key="intermediate_size", renormalize=True,
           qkv_bias="attention_bias", must_be_false=(), rope_types=("yarn",),
           router_name="router", fused_experts=True, interleaved_gate_up=True, gpt_oss=True,
           configure=hf_gpt_oss.configure, describe=hf_gpt_oss.describe),
)}


def supported() -> str:
    return ", ".join(f"{f.model_type} ({f.architecture})" for f in FAMILIES.values())


def family_of(hf: dict[str, Any], where: str = "config.json") -> Family:
    """The Family of a config.json dict; UnsupportedModelError naming the supported ones."""
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"{where}: model_type={model_type!r} (architectures {hf.get('architectures')}) is "
            f"not supported; supported: {supported()}.")
    return FAMILIES[model_type]


def _get(hf: dict[str, Any], key: str, where: str, default: Any = dataclasses.MISSING) -> Any:
    if hf.get(key) is None:
        if default is dataclasses.MISSING:
            raise UnsupportedModelError(f"{where} has no {key!r}, which this family needs.")
        return default
    return hf[key]


def rope_theta(hf: dict[str, Any], where: str, allowed: tuple[str, ...] = ("default",)
               ) -> float:
    """`rope_theta` (transformers 4.x) or `rope_parameters.rope_theta` (5.x); rope scaling other
    than `allowed` (the family's `rope_types`) is refused."""
    params = hf.get("rope_parameters") or {}
    kind = rope_parameters(hf)["rope_type"]
    if kind != "default" and kind not in allowed:
        raise UnsupportedModelError(f"{where}: rope scaling {kind!r} is not supported (only the "
                                    f"original RoPE, rope_type 'default'"
                                    + (f", or {allowed}" if allowed != ("default",) else "")
                                    + ").")
    return float(_get(params, "rope_theta", where) if "rope_theta" in params
                 else _get(hf, "rope_theta", where))


def sparse_layers(hf: dict[str, Any], family: Family, num_layers: int) -> tuple[int, ...]:
    """Qwen-MoE: block i is sparse iff i is not in mlp_only_layers and (i + 1) is a multiple of
    decoder_sparse_step (transformers' Qwen2MoeDecoderLayer); other families: every block."""
    if not family.sparse:
        return ()
    if family.layers_key is not None:
        return hf_llama4.moe_layers(hf, num_layers)
    if family.first_dense_key is not None:
        return tuple(range(int(hf.get(family.first_dense_key) or 0), num_layers))
    if not family.qwen_layers:
        return tuple(range(num_layers))
    step = hf.get("decoder_sparse_step") or 1
    dense = set(hf.get("mlp_only_layers") or ())
    return tuple(i for i in range(num_layers) if i not in dense and (i + 1) % step == 0)


def _check_supported(hf: dict[str, Any], family: Family, where: str) -> None:
    if hf.get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"{where}: hidden_act={hf['hidden_act']!r} is not supported "
                                    "(SwiGLU with silu only).")
    for key in family.must_be_false:
        if hf.get(key):
            raise UnsupportedModelError(f"{where}: {key}=true is not supported (biases on the "
                                        "output projection or the MLP).")
    if hf.get("clip_qkv") is not None:
        raise UnsupportedModelError(f"{where}: clip_qkv={hf['clip_qkv']} is not supported.")
    window = hf.get("sliding_window")
    if not family.gpt_oss and window and hf.get("use_sliding_window", True) and window < hf.get(
            "max_position_embeddings", window + 1):
        raise UnsupportedModelError(f"{where}: sliding_window={window} is not supported "
                                    "(moe_jax attends to the whole sequence).")
    if (hf.get("pretraining_tp") or 1) != 1:
        raise UnsupportedModelError(f"{where}: pretraining_tp={hf['pretraining_tp']} is not "
                                    "supported.")


def experiment_config(hf: dict[str, Any], family: Family,
                      where: str = "config.json") -> ml_collections.ConfigDict:
    """The moe_jax experiment config of a Hugging Face config (validated)."""
    _check_supported(hf, family, where)
    config = schema.base_config()
    num_layers = _get(hf, "num_hidden_layers", where)
    heads = _get(hf, "num_attention_heads", where)
    d_model = _get(hf, "hidden_size", where)
    head_dim = hf.get("head_dim") or None
    model = config.model
    model.update(dict(
        vocab_size=_get(hf, "vocab_size", where), vocab_multiple=1, d_model=d_model,
        num_layers=num_layers, num_heads=heads,
        num_kv_heads=_get(hf, "num_key_value_heads", where, heads),
        d_ff=_get(hf, "intermediate_size", where), activation="swiglu", norm="rmsnorm",
        norm_eps=float(_get(hf, "rms_norm_eps", where)), positions="rotary",
        rope_base=rope_theta(hf, where, family.rope_types),
        max_seq_len=_get(hf, "max_position_embeddings", where),
        tie_embeddings=False, qk_norm=_qk_norms(family)[0], dropout_rate=0.0, causal=True,
        qkv_bias=bool(family.qkv_bias if isinstance(family.qkv_bias, bool)
                      else _get(hf, family.qkv_bias, where, True))))
    if head_dim is not None and head_dim * heads != d_model:
        model.head_dim = head_dim
    model.update(llama3_fields(hf, where))
    layers = sparse_layers(hf, family, num_layers)
    if layers:
        model.moe_layers = layers
    config.train.seq_len = min(model.max_seq_len, DEFAULT_TRAIN_SEQ_LEN)
    if family.sparse:
        _moe_section(config.moe, hf, family, len(layers), where)
    else:  # the dense FFN's shape, so `--config.model.moe_every=...` gives upcyclable experts
        config.moe.update(dict(activation="swiglu", d_ff=model.d_ff))
    if family.configure is not None:
        family.configure(config, hf, where)
    return schema.checked(config)


def _moe_section(moe: ml_collections.ConfigDict, hf: dict[str, Any], family: Family,
                 num_sparse: int, where: str) -> None:
    num_experts = next((hf[k] for k in family.experts_keys if hf.get(k)), None)
    if num_experts is None:
        raise UnsupportedModelError(f"{where} has none of {family.experts_keys}.")
    top_k = _get(hf, "num_experts_per_tok", where)
    width = _get(hf, family.width_key, where)
    renormalize = family.renormalize if isinstance(family.renormalize, bool) else bool(
        hf.get(family.renormalize, False))
    moe.update(dict(
        num_experts=num_experts, top_k=top_k, d_ff=width, activation="swiglu", router="top_k",
        renormalize_gates=renormalize, dispatch="dropless", router_dtype="float32",
        jitter_eps=0.0, z_loss_coef=0.0,
        # transformers' balance loss is E * sum_e f_e P_e with f over all layers' T*k
        # assignments (summing to k); ours sums per-layer losses whose f sums to 1.
        load_balance_coef=float(hf.get("router_aux_loss_coef") or 0.0) * top_k
        / max(num_sparse, 1)))
    if family.shared and family.configure is None:
        shared = _get(hf, "shared_expert_intermediate_size", where)
        if shared % width:
            raise UnsupportedModelError(
                f"{where}: shared_expert_intermediate_size={shared} is not a multiple of "
                f"{family.width_key}={width}; moe_jax's shared experts are "
                "num_shared_experts x d_ff wide.")
        moe.update(dict(num_shared_experts=shared // width, shared_expert_gate=True))


def _qk_norms(family: Family) -> tuple[str, ...]:
    return family.qk_norm if isinstance(family.qk_norm, tuple) else (family.qk_norm,)


def _must(condition: bool, family: Family, problem: str) -> None:
    if not condition:
        raise cannot_write(f"{family.model_type} ({family.architecture})", problem)


def check_exportable(experiment: Any, family: Family) -> None:
    """Raises UnsupportedModelError naming what `family` cannot represent."""
    m, e = experiment.model, experiment.moe
    _must(m.activation == "swiglu" and m.norm == "rmsnorm" and m.positions == "rotary"
          and m.causal, family, "it needs a causal LM with SwiGLU, RMSNorm and rotary positions")
    _must(family.gpt_oss or not (m.attention_sinks or m.out_bias or m.sliding_window
                                 or e.router_bias or e.expert_bias), family,
          "attention sinks, sliding windows, output-projection, router and expert biases go "
          "with gpt_oss only")
    _must(m.qk_norm in _qk_norms(family), family,
          f"model.qk_norm must be one of {_qk_norms(family)}")
    _must(family.block_attention or not (m.nope_layers or m.chunked_layers or (
        m.rope_interleave and not m.latent_attention)), family, "NoPE blocks, chunked "
          "attention and interleaved rotary pairs outside latent attention go with llama4_text "
          "only (model.nope_layers, model.chunked_layers, model.rope_interleave)")
    fixed = family.qkv_bias
    _must(isinstance(fixed, str) or m.qkv_bias == fixed, family,
          f"its q/k/v projections {'always' if fixed else 'never'} have biases")
    _must(bool(m.sparse_layers) == family.sparse, family,
          "it is " + ("an MoE" if family.sparse else "a dense") + " architecture")
    _must(not m.mtp_depth, family, "multi-token-prediction modules are not exported; set "
          "model.mtp_depth=0 to write the main model without them")
    _must(m.latent_attention == family.latent_attention, family, "its attention is "
          + ("multi-head latent attention (model.kv_lora_rank set)" if family.latent_attention
             else "grouped-query attention (model.kv_lora_rank=None)"))
    _must(m.rope_scaling == "none" or m.rope_scaling in family.rope_types, family,
          f"rope scaling {m.rope_scaling!r} is not one of its {family.rope_types}")
    if not family.sparse:
        return
    first_sparse = m.sparse_layers[0]
    any_layers = family.qwen_layers or family.layers_key is not None
    _must(any_layers or m.sparse_layers == tuple(range(
        first_sparse if family.first_dense_key else 0, m.num_layers)), family,
          "every block must be sparse" + (" after the first dense ones"
                                          if family.first_dense_key else ""))
    activation = "clamped_swiglu" if family.gpt_oss else "swiglu"
    _must(e.router == family.router and e.activation == activation, family,
          f"its router is {family.router!r} over {activation} experts")
    _must(e.gate_inputs == family.gate_inputs, family, "its gates scale the experts' "
          + ("inputs (moe.gate_inputs=True)" if family.gate_inputs
             else "outputs (moe.gate_inputs=False)"))
    _must(family.renormalize is not True or e.renormalize_gates, family,
          "it always renormalises the top-k gates (moe.renormalize_gates=True)")
    _must(family.configure is not None or (bool(e.num_shared_experts) == family.shared
                                           and e.shared_expert_gate == family.shared), family,
          "it needs shared experts with their sigmoid gate (moe.num_shared_experts > 0, "
          "moe.shared_expert_gate=True)" if family.shared else
          "shared experts with their sigmoid gate go with qwen2_moe only")


def hf_config(experiment: Any, family: Family, base: dict[str, Any] | None = None
              ) -> dict[str, Any]:
    """config.json of `experiment` as `family` (keys of `base`, e.g. the original config.json,
    are kept unless the experiment sets them)."""
    check_exportable(experiment, family)
    m, e = experiment.model, experiment.moe
    hf = dict(base or {})
    dtype = hf.get("dtype") or hf.get("torch_dtype") or m.param_dtype
    hf.pop("rope_scaling", None)
    hf.pop("quantization_config", None)  # export writes float weights
    hf.update({
        "model_type": family.model_type, "architectures": [family.architecture],
        "vocab_size": m.vocab_size, "hidden_size": m.d_model, "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_heads, "num_key_value_heads": m.kv_heads,
        "head_dim": m.head_size, "intermediate_size": m.d_ff, "hidden_act": "silu",
        "rms_norm_eps": m.norm_eps, "max_position_embeddings": m.max_seq_len,
        "rope_parameters": rope_parameters_of(m),
        "rope_theta": m.rope_base, "tie_word_embeddings": bool(hf.get("tie_word_embeddings")),
        "dtype": dtype, "torch_dtype": dtype,  # transformers 5.x and 4.x spellings
    })
    if isinstance(family.qkv_bias, str):
        hf[family.qkv_bias] = m.qkv_bias
    for key in family.must_be_false:
        hf[key] = False
    if family.sparse:
        num_sparse = len(m.sparse_layers)
        hf.update({family.experts_keys[0]: e.num_experts, "num_experts_per_tok": e.top_k,
                   family.width_key: e.d_ff,
                   "router_aux_loss_coef": e.load_balance_coef * num_sparse / e.top_k})
        if isinstance(family.renormalize, str):
            hf[family.renormalize] = e.renormalize_gates
        if family.qwen_layers:
            hf["decoder_sparse_step"] = 1
            hf["mlp_only_layers"] = [i for i in range(m.num_layers) if i not in m.sparse_layers]
        if family.first_dense_key is not None:
            hf[family.first_dense_key] = m.sparse_layers[0]
        if family.shared and family.describe is None:
            hf["shared_expert_intermediate_size"] = e.num_shared_experts * e.d_ff
    if family.describe is not None:
        hf.update(family.describe(experiment))
    return hf
