"""What every Hugging Face family's config.json reading shares: the error of a config moe_jax
cannot represent, and the rope settings under their 4.x and 5.x spellings."""

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
