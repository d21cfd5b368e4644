"""`DataConfig`: which dataset, tokenizer and input-pipeline options a run uses, validated once.

Every field is a plain scalar or string, so an ml_collections `ConfigDict` can hold the same
fields and the training code builds the dataclass with `DataConfig(**config.data)`.
"""

from __future__ import annotations

import dataclasses
import os
import re

# Built-in corpus (moe_jax.data.corpus) names -> TFDS builder config. "embedded_tiny" is a
# ~100 KB variant for tests and smoke runs; "embedded" is the full ~6 MB corpus.
EMBEDDED_DATASETS = {"embedded": "default", "embedded_tiny": "tiny"}
TOKENIZERS = ("bytes", "sentencepiece")
DATA_DIR_ENV = "MOE_JAX_DATA_DIR"
DEFAULT_DATA_DIR = os.path.join("~", ".cache", "moe_jax", "tfds")
# A TFDS name: "lm1b", "c4/en", "wiki40b/en:1.3.0", "my_dataset/config:1.0.0".
_TFDS_NAME = re.compile(r"^[a-z][a-z0-9_]*(/[A-Za-z0-9_.\-]+)?(:[0-9]+\.[0-9]+\.[0-9]+)?$")
# sentencepiece with byte fallback needs 256 byte pieces + pad/bos/eos/unk + some merges.
MIN_SPM_VOCAB_SIZE = 384


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Dataset, tokenizer and input-pipeline settings (see moe_jax/data/pipeline.py)."""

    # "embedded" (built-in offline corpus, built on first use), "embedded_tiny", or a TFDS name
    # such as "lm1b", "c4/en", "wiki40b/en" prepared under `data_dir`.
    name: str = "embedded"
    # None: $MOE_JAX_DATA_DIR if set, else ~/.cache/moe_jax/tfds for the embedded corpus and
    # TFDS's own default ($TFDS_DATA_DIR or ~/tensorflow_datasets) for other datasets.
    data_dir: str | None = None
    train_split: str = "train"
    eval_split: str = "validation"
    text_key: str = "text"  # the feature holding each document's text
    tokenizer: str = "bytes"  # "bytes" (256 bytes + pad/bos/eos) or "sentencepiece"
    # A trained SentencePiece model file; None trains one on the train split (cached in data_dir).
    spm_model_path: str | None = None
    spm_vocab_size: int = 1024  # only used when training a SentencePiece model
    # True: concatenate documents and split into full rows (no padding inside rows).
    # False: one document per row, truncated to seq_len and padded.
    packing: bool = True
    # Seed of the shuffle order; None uses the `seed` given to make_train_iterator.
    shuffle_seed: int | None = None
    # grain worker processes. 0 reads in the main process. >0 changes which documents land in
    # which batch (each worker packs its own slice), so keep it fixed for a run and its resumes.
    worker_count: int = 0
    eval_batches: int | None = None  # max evaluation batches; None evaluates the whole split

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not (
            self.name in EMBEDDED_DATASETS or _TFDS_NAME.match(self.name)
        ):
            raise ValueError(
                f"DataConfig.name={self.name!r} is not a dataset name; use one of "
                f"{tuple(EMBEDDED_DATASETS)} or a TFDS name such as 'lm1b', 'c4/en' or "
                "'wiki40b/en'."
            )
        for field in ("train_split", "eval_split", "text_key"):
            value = getattr(self, field)
            if not isinstance(value, str) or not value:
                raise ValueError(f"DataConfig.{field}={value!r} must be a non-empty string.")
        for field in ("data_dir", "spm_model_path"):
            value = getattr(self, field)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"DataConfig.{field}={value!r} must be None or a path string.")
        if self.tokenizer not in TOKENIZERS:
            raise ValueError(
                f"DataConfig.tokenizer={self.tokenizer!r} is not supported; use one of "
                f"{TOKENIZERS}."
            )
        if not _is_int(self.spm_vocab_size) or self.spm_vocab_size < MIN_SPM_VOCAB_SIZE:
            raise ValueError(
                f"DataConfig.spm_vocab_size={self.spm_vocab_size!r} must be an int >= "
                f"{MIN_SPM_VOCAB_SIZE} (256 byte-fallback pieces + specials + merges)."
            )
        if not isinstance(self.packing, bool):
            raise ValueError(f"DataConfig.packing={self.packing!r} must be True or False.")
        if self.shuffle_seed is not None and not (
            _is_int(self.shuffle_seed) and 0 <= self.shuffle_seed < 2**32
        ):
            raise ValueError(
                f"DataConfig.shuffle_seed={self.shuffle_seed!r} must be None or an int in "
                "[0, 2**32)."
            )
        if not _is_int(self.worker_count) or self.worker_count < 0:
            raise ValueError(
                f"DataConfig.worker_count={self.worker_count!r} must be an int >= 0 "
                "(0 = read in the main process)."
            )
        if self.eval_batches is not None and (
            not _is_int(self.eval_batches) or self.eval_batches < 1
        ):
            raise ValueError(
                f"DataConfig.eval_batches={self.eval_batches!r} must be None (whole split) or "
                "an int >= 1."
            )

    @property
    def is_embedded(self) -> bool:
        return self.name in EMBEDDED_DATASETS

    def resolved_data_dir(self) -> str | None:
        """The directory to read from; None lets TFDS use its default (non-embedded only)."""
        path = self.data_dir or os.environ.get(DATA_DIR_ENV)
        if path is None and self.is_embedded:
            path = DEFAULT_DATA_DIR
        return None if path is None else os.path.expanduser(path)

    def replace(self, **changes) -> DataConfig:
        return dataclasses.replace(self, **changes)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
