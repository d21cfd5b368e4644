"""What every Hugging Face family's config.json reading shares: the error of a config moe_jax
cannot represent, and the rope settings under their 4.x and 5.x spellings, YaRN's included."""

from __future__ import annotations

from typing import Any


class UnsupportedModelError(ValueError):
    """A Hugging Face config moe_jax cannot represent exactly."""


def rope_parameters(hf: dict[str, Any]) -> dict[str, Any]:
    """The rope settings: `rope_parameters` (transformers 5.x) over `rope_scaling` (4.x), with
    "rope_type" filled in ("type" in old configs, "default" when absent)."""
    params = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    return params


# rope_parameters key -> ModelConfig field of YaRN (`positions.Yarn`).
YARN_KEYS = {"factor": "yarn_factor", "original_max_position_embeddings":
             "yarn_original_max_seq_len", "beta_fast": "yarn_beta_fast",
             "beta_slow": "yarn_beta_slow", "mscale": "yarn_mscale",
             "mscale_all_dim": "yarn_mscale_all_dim"}


def read_yarn(model: Any, hf: dict[str, Any]) -> None:
    """Sets ModelConfig's rope_scaling and yarn_* fields (in `model`, a ConfigDict) from a
    config.json whose rope type is "yarn" (nothing otherwise); `truncate` (transformers'
    default True, GPT-OSS False) rounds the correction range to whole dimensions or not."""
    rope = rope_parameters(hf)
    if rope["rope_type"] != "yarn":
        return
    model.rope_scaling = "yarn"
    for key, field in YARN_KEYS.items():
        if rope.get(key) is not None:
            model[field] = type(model[field])(rope[key])
    model.yarn_truncate = bool(rope.get("truncate", True))


def yarn_parameters(model: Any) -> dict[str, Any]:
    """config.json's rope_parameters of a ModelConfig (YaRN's keys when rope_scaling='yarn';
    mscale and mscale_all_dim only when mscale_all_dim is set, since without it neither
    transformers nor `positions.Yarn` reads mscale)."""
    yarn = model.rope_scaling == "yarn"
    rope: dict[str, Any] = {"rope_type": "yarn" if yarn else "default",
                            "rope_theta": model.rope_base}
    if yarn:
        rope.update({key: getattr(model, field) for key, field in YARN_KEYS.items()
                     if model.yarn_mscale_all_dim or not key.startswith("mscale")})
        if not model.yarn_truncate:
            rope["truncate"] = False
    return rope
