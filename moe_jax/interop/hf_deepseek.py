"""The `deepseek_v3` family's own config.json keys (transformers' DeepseekV3Config, 5.x) <->
moe_jax fields: multi-head latent attention, YaRN, and the sigmoid router with its correction
bias, expert groups, routed scaling and shared experts.

    latent attention  q_lora_rank, kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim,
                      v_head_dim, rope_interleave -> ModelConfig fields of the same names;
                      the latent RMSNorms' eps is 1e-6 (transformers builds q_a_layernorm and
                      kv_a_layernorm without rms_norm_eps)
    rope              rope_parameters (or rope_scaling) of type "yarn": factor,
                      original_max_position_embeddings, beta_fast, beta_slow, mscale,
                      mscale_all_dim, truncate -> ModelConfig.yarn_*
    MoE               n_routed_experts, num_experts_per_tok, moe_intermediate_size,
                      n_shared_experts (each moe_intermediate_size wide, no gate), n_group,
                      topk_group, routed_scaling_factor -> MoeConfig (router sigmoid_bias);
                      first_k_dense_replace dense blocks first (intermediate_size wide)

Refused with the fix: an fp8 `quantization_config` (the released weights), norm_topk_prob
false (or true with one expert per token), and `num_nextn_predict_layers` > 0 is read but its
MTP layers' tensors are not imported (`mtp_prefixes`).
"""

from __future__ import annotations

from typing import Any

import ml_collections

from moe_jax.interop.hf_keys import cannot_write, read_yarn, unsupported, yarn_parameters

# transformers' DeepseekV3RMSNorm default, used for q_a_layernorm and kv_a_layernorm.
LATENT_NORM_EPS = 1e-6
LATENT_KEYS = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
               "v_head_dim")


def configure(config: ml_collections.ConfigDict, hf: dict[str, Any], where: str) -> None:
    """Sets the DeepSeek-V3 fields of an experiment config from config.json (after the common
    keys are mapped)."""
    quantization = hf.get("quantization_config")
    if quantization:
        raise unsupported(where, f"quantization_config {quantization.get('quant_method', '?')!r} "
                     "(the released fp8 weights) is not supported; dequantize to bf16 first "
                     "(e.g. DeepSeek's inference/fp8_cast_bf16.py) and drop quantization_config")
    missing = [key for key in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                               "v_head_dim") if hf.get(key) is None]
    if missing:
        raise unsupported(where, f"has no {missing}, which multi-head latent attention needs")
    top_k = hf["num_experts_per_tok"]
    if not hf.get("norm_topk_prob", True) or top_k == 1:
        raise unsupported(where, f"norm_topk_prob={hf.get('norm_topk_prob')} with "
                     f"num_experts_per_tok={top_k} is not supported (moe_jax's sigmoid_bias "
                     "router normalises the gates of k > 1 experts over the chosen ones, and "
                     "keeps the raw score for k = 1)")
    model = config.model
    model.update({key: hf.get(key) for key in LATENT_KEYS})
    model.update(dict(latent_norm_eps=LATENT_NORM_EPS, num_kv_heads=None, head_dim=None,
                      rope_interleave=bool(hf.get("rope_interleave", True))))
    read_yarn(model, hf)
    config.moe.update(dict(
        router="sigmoid_bias", num_shared_experts=int(hf.get("n_shared_experts") or 0),
        shared_expert_gate=False, expert_groups=int(hf.get("n_group") or 1),
        top_expert_groups=int(hf.get("topk_group") or 1),
        routed_scaling_factor=float(hf.get("routed_scaling_factor") or 1.0),
        renormalize_gates=True, load_balance_coef=0.0))


def describe(experiment: Any) -> dict[str, Any]:
    """The DeepSeek-V3 keys of config.json for an experiment (`hf_config.hf_config` adds the
    common ones)."""
    m, e = experiment.model, experiment.moe
    if e.top_k == 1:
        raise cannot_write("deepseek_v3", "its top-1 sigmoid_bias gates are the raw scores, "
                           "deepseek_v3's are normalised to 1; use top_k >= 2")
    rope = yarn_parameters(m)
    return {**{key: getattr(m, key) for key in LATENT_KEYS},
            "qk_head_dim": m.qk_nope_head_dim + m.qk_rope_head_dim,
            "head_dim": m.qk_rope_head_dim, "rope_interleave": m.rope_interleave,
            "rope_parameters": rope, "num_key_value_heads": m.num_heads,
            "n_routed_experts": e.num_experts, "n_shared_experts": e.num_shared_experts,
            "moe_intermediate_size": e.d_ff, "n_group": e.expert_groups,
            "topk_group": e.top_expert_groups, "routed_scaling_factor": e.routed_scaling_factor,
            "norm_topk_prob": True}


def mtp_prefixes(hf: dict[str, Any]) -> tuple[str, ...]:
    """Tensor-name prefixes of the checkpoint's multi-token-prediction layers (blocks
    num_hidden_layers .. + num_nextn_predict_layers - 1), which import skips (transformers
    skips them too); moe_jax's MTP module (`ModelConfig.mtp_depth`) starts from scratch."""
    first = hf.get("num_hidden_layers") or 0
    return tuple(f"model.layers.{first + j}." for j in range(hf.get("num_nextn_predict_layers")
                                                             or 0))
