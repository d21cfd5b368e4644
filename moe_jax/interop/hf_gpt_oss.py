"""The `gpt_oss` family's own config.json keys and tensors (transformers' GptOssConfig and
GptOssForCausalLM, 5.x) <-> moe_jax fields.

    attention   attention_bias -> ModelConfig.qkv_bias and out_bias (q, k, v and o
                projections); self_attn.sinks [H] -> attention_sinks; sliding_window and
                layer_types ("sliding_attention" / "full_attention" per block) ->
                sliding_window, sliding_window_layers; rope_parameters of type "yarn" (GPT-OSS:
                truncate false) -> ModelConfig.yarn_*
    MoE         num_local_experts, num_experts_per_tok, intermediate_size (the experts' width;
                every block is sparse) -> MoeConfig; mlp.router.weight and .bias [E, d], [E]
                -> router kernel and bias (router_bias); top-k of the logits, then a softmax
                over the k chosen = the softmax probabilities renormalised over the k
                (router "top_k", renormalize_gates); experts.gate_up_proj [E, d, 2f] with gate
                = even and up = odd columns (and gate_up_proj_bias [E, 2f] alike), down_proj
                [E, f, d], down_proj_bias [E, d] -> wi_gate, wi, wo and their biases
                (expert_bias); swiglu_alpha, swiglu_limit -> activation "clamped_swiglu"
    MXFP4       quantization_config {"quant_method": "mxfp4"}: the experts' tensors stored as
                *_blocks and *_scales are dequantized on import (`mxfp4`); export writes
                float weights and no quantization_config

Refused with the fix: another quantization method, another rope scaling than YaRN or none,
layer types other than sliding and full attention.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from moe_jax.interop.hf_keys import cannot_write, read_yarn, unsupported, yarn_parameters

LAYER_TYPES = ("sliding_attention", "full_attention")
# transformers' GptOssConfig defaults of the keys a config.json may leave out.
DEFAULT_SWIGLU_ALPHA, DEFAULT_SWIGLU_LIMIT = 1.702, 7.0


def is_mxfp4(hf: dict[str, Any]) -> bool:
    """Whether config.json says the experts are stored as MXFP4 blocks and scales."""
    return (hf.get("quantization_config") or {}).get("quant_method") == "mxfp4"


def sliding_layers(hf: dict[str, Any], where: str) -> tuple[int, ...]:
    """The blocks of layer type "sliding_attention" (transformers' default when layer_types is
    absent: the even blocks)."""
    num_layers = hf["num_hidden_layers"]
    types = hf.get("layer_types") or [LAYER_TYPES[i % 2] for i in range(num_layers)]
    unknown = sorted(set(types) - set(LAYER_TYPES))
    if unknown or len(types) != num_layers:
        raise unsupported(where, f"layer_types {types} must give one of {LAYER_TYPES} for each "
                          f"of the {num_layers} blocks (unknown: {unknown})")
    return tuple(i for i, kind in enumerate(types) if kind == "sliding_attention")


def configure(config: ml_collections.ConfigDict, hf: dict[str, Any], where: str) -> None:
    """Sets the GPT-OSS fields of an experiment config from config.json (after the common keys
    are mapped)."""
    quantization = hf.get("quantization_config")
    if quantization and not is_mxfp4(hf):
        method = quantization.get("quant_method", "?")
        raise unsupported(where, f"quantization_config {method!r} is not supported (GPT-OSS's "
                          "mxfp4 is); dequantize the checkpoint first")
    model = config.model
    bias = bool(hf.get("attention_bias", True))
    layers = sliding_layers(hf, where)
    window = hf.get("sliding_window")
    model.update(dict(qkv_bias=bias, out_bias=bias, attention_sinks=True,
                      sliding_window=int(window) if window and layers else None,
                      sliding_window_layers=layers if window and layers else None))
    read_yarn(model, hf)
    config.moe.update(dict(
        router="top_k", renormalize_gates=True, router_bias=True, expert_bias=True,
        activation="clamped_swiglu",
        swiglu_alpha=float(hf.get("swiglu_alpha") or DEFAULT_SWIGLU_ALPHA),
        swiglu_limit=float(hf.get("swiglu_limit") or DEFAULT_SWIGLU_LIMIT)))


def _must(condition: bool, problem: str) -> None:
    if not condition:
        raise cannot_write("gpt_oss (GptOssForCausalLM)", problem)


def describe(experiment: Any) -> dict[str, Any]:
    """The GPT-OSS keys of config.json for an experiment (`hf_config.hf_config` adds the common
    ones); UnsupportedModelError naming what GptOssForCausalLM cannot represent."""
    m, e = experiment.model, experiment.moe
    _must(m.attention_sinks, "its attention has sinks (model.attention_sinks=True)")
    _must(m.qkv_bias == m.out_bias, "attention_bias puts biases on all of q, k, v and o "
          "(model.qkv_bias == model.out_bias)")
    _must(e.router_bias and e.expert_bias and e.activation == "clamped_swiglu",
          "its router and experts have biases and the experts the clamped SwiGLU "
          "(moe.router_bias, moe.expert_bias, moe.activation='clamped_swiglu')")
    _must(e.renormalize_gates and not e.num_shared_experts,
          "its gates are the softmax over the top-k logits (moe.renormalize_gates=True) and it "
          "has no shared experts")
    _must(not m.yarn_mscale_all_dim and m.yarn_mscale == 1.0, "its YaRN has no mscale split")
    windowed = [m.attention_kind(i).window is not None for i in range(m.num_layers)]
    return {"attention_bias": m.qkv_bias,
            "layer_types": [LAYER_TYPES[0] if w else LAYER_TYPES[1] for w in windowed],
            "sliding_window": m.sliding_window, "rope_parameters": yarn_parameters(m),
            "num_local_experts": e.num_experts, "swiglu_alpha": e.swiglu_alpha,
            "swiglu_limit": e.swiglu_limit}
