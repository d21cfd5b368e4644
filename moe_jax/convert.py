"""Hugging Face checkpoints in and out.

    python -m moe_jax.convert --from_hf=DIR --workdir=OUT       # HF model -> moe_jax
    python -m moe_jax.convert --workdir=RUN --to_hf=DIR         # moe_jax -> HF model

Import reads a Hugging Face directory of a supported family (`interop.FAMILIES`) and writes an
initial checkpoint and config.json to OUT, from which `moe_jax.main` fine-tunes; export writes
RUN's newest checkpoint as a Hugging Face directory (`interop.conversion` says what each
writes). Nothing in OUT or DIR is overwritten without --overwrite. Each directory may be a gs://
URL (`moe_jax.utils.storage`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from absl import app, flags, logging

from moe_jax import interop
from moe_jax.interop import conversion
from moe_jax.train import checkpoint
from moe_jax.utils import storage


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    flags.DEFINE_string("from_hf", None, "Import: a local Hugging Face model directory "
                        "(config.json + *.safetensors).", flag_values=flag_values)
    flags.DEFINE_string("to_hf", None, "Export: the directory to write the Hugging Face model "
                        "to.", flag_values=flag_values)
    flags.DEFINE_string("workdir", None, "Import: where to write the moe_jax checkpoint and "
                        "config. Export: the run (or converted directory) to export.",
                        flag_values=flag_values)
    flags.DEFINE_string("family", None, "Export: the Hugging Face architecture (model_type), "
                        f"one of {sorted(interop.FAMILIES)}; default: the one the run was "
                        "converted from, else the first that fits.", flag_values=flag_values)
    flags.DEFINE_bool("overwrite", False, "Replace what an earlier conversion wrote in the "
                      "output directory.", flag_values=flag_values)


def run(flag_values: flags.FlagValues) -> dict[str, Any]:
    """Import or export, as the flags say; returns what was written."""
    if not flag_values.workdir or bool(flag_values.from_hf) == bool(flag_values.to_hf):
        raise app.UsageError("use --from_hf=DIR --workdir=OUT (import) or --workdir=RUN "
                             "--to_hf=DIR (export).")
    if flag_values.from_hf:
        return conversion.import_hf(flag_values.from_hf, flag_values.workdir, flag_values.overwrite)
    return conversion.export_hf(flag_values.workdir, flag_values.to_hf, flag_values.family,
                     flag_values.overwrite)


def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {list(argv[1:])}.")
    if not flags.FLAGS["verbosity"].present:  # orbax logs every read and write at INFO
        logging.set_verbosity(logging.WARNING)
    try:
        written = run(flags.FLAGS)
    except (interop.UnsupportedModelError, interop.CheckpointMismatchError, FileExistsError,
            FileNotFoundError, checkpoint.CheckpointError, storage.StorageError) as err:
        raise SystemExit(f"moe_jax.convert: {type(err).__name__}: {err}") from err
    if flags.FLAGS.from_hf:
        print(f"converted {written['family']} from {flags.FLAGS.from_hf} into "
              f"{flags.FLAGS.workdir}; fine-tune with:\n  python -m moe_jax.main "
              f"--config={written['config']} --workdir=runs/NAME")
        if written["tokenizer"] == "bytes":
            print("note: the model's tokenizer is not SentencePiece, so training on moe_jax's "
                  "data pipeline feeds it byte ids (data.tokenizer='bytes').")
    else:
        print(f"wrote {written['family']} to {flags.FLAGS.to_hf}: {written['files']}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
