"""A Hugging Face directory (config.json + safetensors) <-> a moe_jax experiment and its
variables.

    imported = load(hf_dir)                  # .config (ConfigDict), .variables, .family, .hf
    save(out_dir, experiment, variables, family, base_hf=imported.hf)

`load` never downloads: the directory must hold config.json and the safetensors files (one, or
shards with model.safetensors.index.json), as `save_pretrained` and the Hub store them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from moe_jax import layers, schema
from moe_jax.interop import hf_config, hf_deepseek, hf_gpt_oss, hf_weights
from moe_jax.interop.hf_config import Family
from moe_jax.models import Transformer

CONFIG_FILE = "config.json"


@dataclasses.dataclass(frozen=True)
class Imported:
    config: ml_collections.ConfigDict  # the experiment config (validated)
    variables: dict[str, Any]  # {"params": ..., "model_state": ...} of NumPy arrays
    family: Family
    hf: dict[str, Any]  # config.json as read


def read_config(directory: str) -> dict[str, Any]:
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: --from_hf takes a local Hugging Face model "
                                "directory (config.json + *.safetensors); nothing is downloaded.")
    with open(path) as f:
        return json.load(f)


def is_hf_directory(directory: str) -> bool:
    """Whether `directory` holds a Hugging Face config.json (it names a model_type)."""
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        return "model_type" in json.load(f)


def variable_shapes(experiment: Any) -> dict[str, Any]:
    """{"params", "model_state"} of ShapeDtypeStructs for the experiment's Transformer."""
    model = Transformer(experiment.model, experiment.moe)
    seq_len = min(8, experiment.model.max_seq_len)
    shapes = nn.meta.unbox(jax.eval_shape(
        lambda: model.init({"params": jax.random.key(0)}, jnp.zeros((1, seq_len), jnp.int32),
                           train=False)))
    return {"params": shapes["params"],
            "model_state": {k: v for k, v in shapes.items() if k != "params"}}


def load(directory: str) -> Imported:
    """The experiment config and variables of a Hugging Face model directory."""
    hf = read_config(directory)
    where = f" ({os.path.join(directory, CONFIG_FILE)})"
    family = hf_config.family_of(hf, os.path.join(directory, CONFIG_FILE))
    config = hf_config.experiment_config(hf, family, os.path.join(directory, CONFIG_FILE))
    experiment = schema.parse_config(config)
    shapes = variable_shapes(experiment)
    table = hf_weights.tensors(family, experiment.model, experiment.moe)
    skip = hf_deepseek.mtp_prefixes(hf) if family.model_type == "deepseek_v3" else ()
    if skip and any(name.startswith(skip) for name in hf_weights.tensor_files(directory)):
        logging.warning("%s: the multi-token-prediction layers %s are not imported (moe_jax's "
                        "MTP module, model.mtp_depth, starts from scratch).", directory, skip)
    params = hf_weights.read(directory, table, {**shapes["params"], **shapes["model_state"]},
                             tied=bool(hf.get("tie_word_embeddings")), where=where, skip=skip,
                             mxfp4=family.gpt_oss and hf_gpt_oss.is_mxfp4(hf))
    model_state = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes["model_state"])
    if layers.STATE in params:  # read state (the router's score bias) over the zeros
        model_state[layers.STATE] = _merge(model_state[layers.STATE], params.pop(layers.STATE))
    return Imported(config, {"params": params, "model_state": model_state}, family, hf)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Nested dict `base` with the leaves of `update` written over it."""
    out = dict(base)
    for key, value in update.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) else value
    return out


def infer_family(experiment: Any) -> Family:
    """The first family that can represent the experiment's model; UnsupportedModelError with
    each family's reason otherwise."""
    reasons = []
    for family in hf_config.FAMILIES.values():
        try:
            hf_config.check_exportable(experiment, family)
            return family
        except hf_config.UnsupportedModelError as err:
            reasons.append(str(err))
    raise hf_config.UnsupportedModelError("no supported Hugging Face family fits this model:\n  "
                                          + "\n  ".join(reasons))


def save(directory: str, experiment: Any, variables: dict[str, Any], family: Family,
         base_hf: dict[str, Any] | None = None, max_shard_bytes: int = 5 * 2**30) -> list[str]:
    """Writes config.json and the safetensors of `variables` to `directory` (which must exist).

    Tied embeddings: written tied when `base_hf` ties them and the output matrix still equals
    the embedding's transpose; moe_jax's own tied logits (scaled by d**-0.5) are written as an
    untied lm_head holding that scaled embedding. Padded vocabulary rows are dropped.
    Returns the files written.
    """
    hf = hf_config.hf_config(experiment, family, base_hf)
    m = experiment.model
    params = {**variables.get("model_state", {}), **variables["params"]}
    embedding = np.asarray(params["embedding"])[:m.vocab_size]
    params["embedding"] = embedding
    if m.tie_embeddings:
        params["output"] = (embedding * m.d_model**-0.5).T
    else:
        params["output"] = np.asarray(params["output"])[:, :m.vocab_size]
    tied = bool(hf.get("tie_word_embeddings")) and np.array_equal(params["output"], embedding.T)
    hf["tie_word_embeddings"] = tied
    table = hf_weights.tensors(family, m, experiment.moe)
    files = hf_weights.write(directory, params, table, dtype=hf["dtype"], tied=tied,
                             max_shard_bytes=max_shard_bytes)
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(hf, f, indent=2, sort_keys=True)
    return [CONFIG_FILE, *files]
