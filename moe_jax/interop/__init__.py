"""Checkpoints of other libraries in and out: Hugging Face transformers (`hf`: Mixtral,
Qwen2-MoE, Qwen3-MoE, OLMoE, dense Llama and Qwen2), with `hf_config` (config.json <->
experiment config) and `hf_weights` (safetensors <-> parameters). The command line is
`python -m moe_jax.convert`."""

from moe_jax.interop.hf import Imported, infer_family, is_hf_directory, load, save
from moe_jax.interop.hf_config import FAMILIES, Family, UnsupportedModelError
from moe_jax.interop.hf_weights import CheckpointMismatchError

__all__ = ["FAMILIES", "CheckpointMismatchError", "Family", "Imported", "UnsupportedModelError",
           "infer_family", "is_hf_directory", "load", "save"]
