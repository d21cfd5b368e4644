"""`DataConfig`: which dataset, tokenizer and input-pipeline options a run uses, validated once.

Every field is a plain scalar or string, so an ml_collections `ConfigDict` can hold the same
fields and the training code builds the dataclass with `DataConfig(**config.data)`.
"""

from __future__ import annotations

import dataclasses
import os
import re

from moe_jax.utils import fields

# Built-in corpus (moe_jax.data.corpus) names -> TFDS builder config. "embedded_tiny" is a
# ~100 KB variant for tests and smoke runs; "embedded" is the ~6 MB corpus; "embedded_large" the
# ~14 MB one (for runs of many more tokens per parameter).
EMBEDDED_DATASETS = {"embedded": "default", "embedded_tiny": "tiny", "embedded_large": "large"}
# The embedded corpus's domain labels, in label order (moe_jax.data.corpus).
EMBEDDED_DOMAINS = ("code", "prose", "math")
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
    # Comma-separated domains whose documents the training split keeps ("code,prose"); "" keeps
    # every document. Evaluation always covers every domain. Embedded corpus only (the one with
    # domain labels).
    train_domains: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not (
            self.name in EMBEDDED_DATASETS or _TFDS_NAME.match(self.name)
        ):
            fields.fail(self, "name", "is not a dataset name",
                            f"use one of {tuple(EMBEDDED_DATASETS)} or a TFDS name such as "
                            "'lm1b', 'c4/en' or 'wiki40b/en'")
        for field in ("train_split", "eval_split", "text_key"):
            fields.text(self, field)
        for field in ("data_dir", "spm_model_path"):
            fields.text(self, field, optional=True)
        fields.one_of(self, "tokenizer", TOKENIZERS)
        fields.integer(self, "spm_vocab_size", minimum=MIN_SPM_VOCAB_SIZE,
                           fix="256 byte-fallback pieces + specials + merges")
        fields.boolean(self, "packing")
        fields.integer(self, "shuffle_seed", minimum=0, optional=True)
        if self.shuffle_seed is not None and self.shuffle_seed >= 2**32:
            fields.fail(self, "shuffle_seed", "must be below 2**32")
        fields.integer(self, "worker_count", minimum=0, fix="0 = read in the main process")
        fields.integer(self, "eval_batches", minimum=1, optional=True,
                           fix="None evaluates the whole split")
        if not isinstance(self.train_domains, str):
            fields.fail(self, "train_domains", "must be a string",
                            "list domains separated by commas, e.g. 'code,prose'")
        if self.train_domains and not self.is_embedded:
            fields.fail(self, "train_domains", f"needs domain labels, which dataset "
                            f"{self.name!r} does not have", "use the embedded corpus or ''")
        names = self.train_domain_names
        if any(d not in EMBEDDED_DOMAINS for d in names) or len(set(names)) != len(names):
            fields.fail(self, "train_domains", "names an unknown or repeated domain",
                            f"use distinct names from {EMBEDDED_DOMAINS}, comma-separated")

    @property
    def train_domain_names(self) -> tuple[str, ...]:
        """The domains of `train_domains` (() keeps every document)."""
        return tuple(d.strip() for d in self.train_domains.split(",") if d.strip())

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
