"""Hugging Face checkpoints in and out of moe_jax run directories (`python -m moe_jax.convert`).

`import_hf` reads a Hugging Face directory (config.json and safetensors, one file or shards;
nothing is downloaded from the Hub) of a supported family (`interop.FAMILIES`: Mixtral, Qwen2-MoE,
Qwen3-MoE, OLMoE, dense Llama and Qwen2) and writes to OUT:

  config.json           the experiment config (the layout a training run writes), with
                        init.checkpoint = OUT: `python -m moe_jax.main --config=OUT/config.json
                        --workdir=runs/NAME` fine-tunes from the converted parameters
  checkpoints/0/        an initial orbax checkpoint: the parameters and model state
                        (`train.checkpoint.write_initial`), read by training, the routing
                        analysis and `checkpoint.read_weights`
  hf/                   the original config.json and tokenizer files (export reuses them)

`export_hf` writes RUN's newest checkpoint (a training run, or a converted or upcycled
directory) as config.json + safetensors in DIR, in the family RUN was converted from (found in
RUN/hf/ or in the directories its init.checkpoint chain names), or `family`, or the first family
that can represent the model. Nothing in OUT or DIR is overwritten without `overwrite`. Each
directory may be a gs:// URL (`moe_jax.utils.storage`); safetensors are read and written through a
local copy.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from moe_jax import interop, schema
from moe_jax.train import checkpoint
from moe_jax.utils import storage

HF_RECORD = "hf"  # OUT/hf/: the source config.json and tokenizer files
CONFIG_FILE = "config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json", "generation_config.json", "vocab.json",
                   "merges.txt")
WRITTEN = (CONFIG_FILE, checkpoint.CHECKPOINT_DIR, HF_RECORD)  # what an import writes in OUT


def prepare_output(directory: str, overwrite: bool, ours: Sequence[str]) -> None:
    """Creates `directory`; refuses (naming what is there) if it already holds any of `ours`
    (names or glob patterns), unless `overwrite`, which deletes exactly those."""
    storage.makedirs(directory)
    present = sorted({p for pattern in ours for p in storage.glob(directory, pattern)})
    if present and not overwrite:
        raise FileExistsError(
            f"{directory} already holds {[os.path.basename(p) for p in present]}; nothing was "
            "written. Choose another directory or pass --overwrite to replace them.")
    for path in present:
        storage.remove(path)


def write_run_config(config: Any, workdir: str) -> str:
    """`config` (with init.checkpoint = workdir) as workdir/config.json, the way training writes
    it."""
    config = schema.checked(config)
    config.init.checkpoint = storage.absolute(workdir)
    config.init.upcycle = False
    config.init.expert_noise = 0.0
    config.init.reinit_fraction = 0.0
    path = storage.join(workdir, CONFIG_FILE)
    storage.write_text(path, config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
    return path


def import_hf(source: str, workdir: str, overwrite: bool = False) -> dict[str, Any]:
    """Converts the HF directory `source` into `workdir`; returns what was written."""
    with storage.LocalCopy(source, fetch=True) as local:
        imported = interop.load(local.path)
        prepare_output(workdir, overwrite, WRITTEN)
        record = storage.join(workdir, HF_RECORD)
        storage.makedirs(record)
        for name in (CONFIG_FILE, *TOKENIZER_FILES):
            if os.path.isfile(os.path.join(local.path, name)):
                storage.copy_file(os.path.join(local.path, name), storage.join(record, name))
    spm = storage.join(record, "tokenizer.model")
    if storage.isfile(spm):  # a SentencePiece tokenizer the data pipeline can use
        imported.config.data.tokenizer = "sentencepiece"
        imported.config.data.spm_model_path = storage.absolute(spm)
    checkpoint.write_initial(workdir, imported.variables, {
        "by": "moe_jax.convert", "from_hf": storage.absolute(source),
        "model_type": imported.family.model_type})
    config_path = write_run_config(imported.config, workdir)
    return {"family": imported.family.model_type, "config": config_path,
            "tokenizer": imported.config.data.tokenizer}


def recorded_hf(workdir: str, max_depth: int = 8) -> dict[str, Any] | None:
    """The HF config.json a run descends from: <dir>/hf/config.json of the run or of the
    directories its init.checkpoint chain names."""
    directory = storage.absolute(workdir)
    for _ in range(max_depth):
        path = storage.join(directory, HF_RECORD, CONFIG_FILE)
        if storage.isfile(path):
            return json.loads(storage.read_text(path))
        config = storage.join(directory, CONFIG_FILE)
        if not storage.isfile(config):
            return None
        parent = (json.loads(storage.read_text(config)).get("init") or {}).get("checkpoint")
        if not parent or storage.absolute(parent) == directory:
            return None
        directory = storage.absolute(parent)
        if os.path.basename(os.path.dirname(directory)) == checkpoint.CHECKPOINT_DIR:
            directory = os.path.dirname(os.path.dirname(directory))
    return None


def export_hf(workdir: str, target: str, family_name: str | None = None,
              overwrite: bool = False, max_shard_bytes: int = 5 * 2**30) -> dict[str, Any]:
    """Writes the newest checkpoint of `workdir` as a Hugging Face directory `target`."""
    experiment = schema.parse_config(schema.config_from_json(storage.join(workdir,
                                                                          CONFIG_FILE)))
    variables = checkpoint.read_weights(workdir)[0]
    base = recorded_hf(workdir)
    if family_name:
        if family_name not in interop.FAMILIES:
            raise interop.UnsupportedModelError(
                f"--family={family_name!r} is not supported; use one of "
                f"{sorted(interop.FAMILIES)}.")
        family = interop.FAMILIES[family_name]
    elif base is not None and base.get("model_type") in interop.FAMILIES:
        family = interop.FAMILIES[base["model_type"]]
    else:
        family = interop.infer_family(experiment)
    if base is not None and base.get("model_type") != family.model_type:
        base = None
    prepare_output(target, overwrite, (CONFIG_FILE, "*.safetensors", "*.safetensors.index.json",
                                       *TOKENIZER_FILES))
    with storage.LocalCopy(target) as out:
        files = interop.save(out.path, experiment, variables, family, base,
                             max_shard_bytes=max_shard_bytes)
        record = storage.join(workdir, HF_RECORD)
        for name in TOKENIZER_FILES:  # of a converted run (not of its ancestors)
            if storage.isfile(storage.join(record, name)):
                storage.copy_file(storage.join(record, name), os.path.join(out.path, name))
                files.append(name)
        out.publish()
    return {"family": family.model_type, "files": files}
