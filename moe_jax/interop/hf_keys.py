"""What every Hugging Face family's config.json reading shares: the error of a config moe_jax
cannot represent, the rope settings under their 4.x and 5.x spellings, YaRN's keys, and Llama
3.1's "llama3" rope scaling (Llama 3.1, Llama 4 Scout) in and out."""

from __future__ import annotations

from typing import Any


class UnsupportedModelError(ValueError):
    """A Hugging Face config moe_jax cannot represent exactly."""


def unsupported(where: str, problem: str) -> UnsupportedModelError:
    """The error of the config.json at `where` that moe_jax cannot read: "where: problem"."""
    return UnsupportedModelError(f"{where}: {problem}")


def cannot_write(family: str, problem: str) -> UnsupportedModelError:
    """The error of an export to `family` (its model_type, maybe with its architecture) that
    cannot represent the model."""
    return UnsupportedModelError(f"this model cannot be written as {family}: {problem}.")


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


# rope_parameters keys of rope_type "llama3" -> ModelConfig fields (`positions.Llama3Scaling`).
LLAMA3_KEYS = {"factor": "llama3_factor", "low_freq_factor": "llama3_low_freq_factor",
               "high_freq_factor": "llama3_high_freq_factor",
               "original_max_position_embeddings": "llama3_original_max_seq_len"}


def llama3_fields(hf: dict[str, Any], where: str) -> dict[str, Any]:
    """ModelConfig fields of a config with rope_type "llama3" ({} for other rope types).
    original_max_position_embeddings defaults to max_position_embeddings, as in transformers'
    `standardize_rope_params`; the other three keys are required."""
    rope = rope_parameters(hf)
    if rope["rope_type"] != "llama3":
        return {}
    if rope.get("original_max_position_embeddings") is None:
        rope["original_max_position_embeddings"] = hf.get("max_position_embeddings")
    missing = [key for key in LLAMA3_KEYS if rope.get(key) is None]
    if missing:
        raise UnsupportedModelError(f"{where}: rope_type 'llama3' needs {missing} in "
                                    "rope_parameters (rope_scaling in transformers 4.x); add "
                                    "them from the model's original config.json")
    return {"rope_scaling": "llama3",
            **{field: (int if key.startswith("original") else float)(rope[key])
               for key, field in LLAMA3_KEYS.items()}}


def rope_parameters_of(model: Any) -> dict[str, Any]:
    """`rope_parameters` of a ModelConfig without rope scaling or with rope_scaling="llama3"
    (what `llama3_fields` reads back)."""
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": model.rope_base}
    if model.rope_scaling == "llama3":
        rope.update({"rope_type": "llama3",
                     **{key: getattr(model, field) for key, field in LLAMA3_KEYS.items()}})
    return rope
