"""The `llama4_text` family's own config.json keys (transformers' Llama4TextConfig, 5.x) <->
moe_jax fields: per-block NoPE and chunked attention, the weightless QK-norm, temperature
tuning, interleaved rotary pairs, and the sigmoid top-k router whose gate scales the expert
input, with one shared expert.

    attention   no_rope_layers (1 = rotary, 0 = NoPE) -> model.nope_layers; layer_types
                ("chunked_attention" / "full_attention") -> model.chunked_layers, with
                attention_chunk_size -> model.attention_chunk; use_qk_norm -> model.qk_norm
                "weightless" (rotary blocks only) or "none"; attn_temperature_tuning,
                floor_scale, attn_scale -> model.attn_temperature_floor / _scale (NoPE blocks);
                the rotary pairs are interleaved (2i, 2i + 1): model.rope_interleave=True
    FFN         moe_layers (or every interleave_moe_layer_step-th block) -> model.moe_layers;
                intermediate_size_mlp -> model.d_ff (dense blocks); intermediate_size -> the
                experts' and the one shared expert's moe.d_ff; num_local_experts,
                num_experts_per_tok -> moe (router sigmoid_top_k, gate_inputs)

    rope        rope_type "llama3" (the released Scout's frequencies) -> model.rope_scaling
                "llama3" and the llama3_* fields (`hf_keys.llama3_fields`, shared with llama)

Missing keys take transformers' defaults (`Llama4TextConfig.__post_init__`). Refused with the
fix: a `quantization_config`, layer types other than the two above, rope types other than
"default" and "llama3" (`hf_config.rope_theta` names them).
"""

from __future__ import annotations

from typing import Any

import ml_collections

from moe_jax.interop.hf_keys import cannot_write, unsupported

CHUNKED, FULL = "chunked_attention", "full_attention"
# transformers' Llama4TextConfig defaults.
DEFAULTS = {"no_rope_layer_interval": 4, "attention_chunk_size": 8192, "use_qk_norm": True,
            "attn_temperature_tuning": True, "floor_scale": 8192, "attn_scale": 0.1,
            "interleave_moe_layer_step": 1, "intermediate_size_mlp": 16384}


def _get(hf: dict[str, Any], key: str) -> Any:
    return DEFAULTS[key] if hf.get(key) is None else hf[key]


def moe_layers(hf: dict[str, Any], num_layers: int) -> tuple[int, ...]:
    """The sparse blocks: `moe_layers`, or every interleave_moe_layer_step-th block ending each
    step (step 2: blocks 1, 3, 5, ...), as transformers fills it in."""
    if hf.get("moe_layers") is not None:
        return tuple(int(i) for i in hf["moe_layers"])
    step = int(_get(hf, "interleave_moe_layer_step"))
    return tuple(range(step - 1, num_layers, step))


def rotary_flags(hf: dict[str, Any], num_layers: int) -> list[int]:
    """`no_rope_layers`: 1 where a block has rotary positions, 0 for NoPE; by default every
    no_rope_layer_interval-th block is NoPE (blocks 3, 7, ... for interval 4)."""
    if hf.get("no_rope_layers"):
        return [int(flag) for flag in hf["no_rope_layers"]]
    interval = int(_get(hf, "no_rope_layer_interval"))
    return [int((i + 1) % interval != 0) for i in range(num_layers)]


def configure(config: ml_collections.ConfigDict, hf: dict[str, Any], where: str) -> None:
    """Sets the Llama 4 fields of an experiment config from config.json (after the common keys
    are mapped)."""
    if hf.get("quantization_config"):
        method = hf["quantization_config"].get("quant_method", "?")
        raise unsupported(where, f"quantization_config {method!r} is not supported; use the "
                          "bf16 checkpoint or dequantize it first")
    model = config.model
    num_layers = model.num_layers
    rotary = rotary_flags(hf, num_layers)
    chunk = hf.get("attention_chunk_size", DEFAULTS["attention_chunk_size"])
    types = hf.get("layer_types") or [CHUNKED if flag and chunk is not None else FULL
                                      for flag in rotary]
    if len(rotary) != num_layers or len(types) != num_layers:
        raise unsupported(where, "no_rope_layers and layer_types must have "
                          f"num_hidden_layers={num_layers} entries")
    unknown = sorted(set(types) - {CHUNKED, FULL})
    if unknown:
        raise unsupported(where, f"layer_types {unknown} are not supported (only {CHUNKED!r} "
                          f"and {FULL!r})")
    nope = tuple(i for i, flag in enumerate(rotary) if not flag)
    chunked = tuple(i for i, kind in enumerate(types) if kind == CHUNKED)
    tuned = bool(_get(hf, "attn_temperature_tuning")) and bool(nope)
    model.update(dict(
        d_ff=int(_get(hf, "intermediate_size_mlp")), rope_interleave=True, nope_layers=nope,
        chunked_layers=chunked, attention_chunk=int(chunk) if chunked else None,
        qk_norm="weightless" if _get(hf, "use_qk_norm") else "none",
        attn_temperature_floor=float(_get(hf, "floor_scale")) if tuned else None,
        attn_temperature_scale=float(_get(hf, "attn_scale")),
        moe_layers=moe_layers(hf, num_layers) or None))
    config.moe.update(dict(router="sigmoid_top_k", gate_inputs=True, num_shared_experts=1,
                           shared_expert_gate=False, renormalize_gates=False))


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def describe(experiment: Any) -> dict[str, Any]:
    """The Llama 4 keys of config.json for an experiment (`hf_config.hf_config` adds the
    common ones)."""
    m, e = experiment.model, experiment.moe
    if not m.rope_interleave:
        raise cannot_write("llama4_text", "its rotary pairs are interleaved (2i, 2i + 1); set "
                           "model.rope_interleave=True")
    if m.sparse_layers and (e.num_shared_experts != 1 or e.shared_expert_gate):
        raise cannot_write("llama4_text", "its MoE blocks have exactly one ungated shared expert "
                           "as wide as an expert (moe.num_shared_experts=1, "
                           "moe.shared_expert_gate=False)")
    layers = range(m.num_layers)
    tuned = m.attn_temperature_floor is not None
    return {"no_rope_layers": [int(i not in m.nope_layers) for i in layers],
            "layer_types": [CHUNKED if i in m.chunked_layers else FULL for i in layers],
            "attention_chunk_size": m.attention_chunk, "use_qk_norm": m.qk_norm != "none",
            "attn_temperature_tuning": tuned,
            "floor_scale": _number(m.attn_temperature_floor) if tuned
            else DEFAULTS["floor_scale"],
            "attn_scale": m.attn_temperature_scale, "intermediate_size_mlp": m.d_ff,
            "moe_layers": list(m.sparse_layers), "num_local_experts": e.num_experts,
            "intermediate_size": e.d_ff, "num_experts_per_tok": e.top_k}
