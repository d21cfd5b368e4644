"""Opening one split of a dataset as a random-access source of documents (no TensorFlow needed).

  embedded / embedded_tiny  the built-in corpus, built on first use (moe_jax.data.corpus);
  array_record TFDS data    `builder.as_data_source(split)`: random access straight from disk;
  tfrecord TFDS data        read once through TensorFlow (`builder.as_dataset`) into memory;
                            without TensorFlow: an error that says how to convert it.

Every failure names the dataset, the directory searched and how to prepare the data.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
from collections.abc import Sequence
from typing import Any

import tensorflow_datasets as tfds

from moe_jax.data.config import EMBEDDED_DATASETS, EMBEDDED_DOMAINS, DataConfig

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DocumentSource:
    """Records of one split: `records[i][text_key]` is bytes; `domain_key` (if set) an int label."""

    records: Sequence[dict[str, Any]]  # len() and __getitem__, picklable (grain workers)
    text_key: str
    domain_key: str | None  # None: the dataset has no domains (batches get domains = -1)
    description: str  # "lm1b:validation in /data/tfds", for messages


class _Subset(Sequence):
    """Records `indices` of `records`, in order (random access, picklable)."""

    def __init__(self, records: Sequence[dict[str, Any]], indices: Sequence[int]) -> None:
        self.records = records
        self.indices = list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.records[self.indices[index]]


def keep_domains(source: DocumentSource, domains: Sequence[str]) -> DocumentSource:
    """The documents of `source` whose domain label is one of `domains` (names of
    `EMBEDDED_DOMAINS`); reads every record's label once."""
    if source.domain_key is None:
        raise ValueError(f"{source.description} has no domain labels to filter by; "
                         "DataConfig.train_domains needs the embedded corpus.")
    labels = {EMBEDDED_DOMAINS.index(d) for d in domains}
    kept = [i for i in range(len(source.records))
            if int(source.records[i][source.domain_key]) in labels]
    if not kept:
        raise ValueError(f"{source.description} has no document of domains {list(domains)}.")
    return dataclasses.replace(source, records=_Subset(source.records, kept),
                               description=f"{source.description}, domains {list(domains)}")


def _tensorflow_available() -> bool:
    return importlib.util.find_spec("tensorflow") is not None


def _split_names(builder) -> list[str]:
    return sorted(builder.info.splits.keys())


def _check_split(builder, split: str, where: str) -> None:
    base = split.split("[", 1)[0]  # TFDS sub-splits such as "train[:90%]"
    if base not in builder.info.splits:
        raise ValueError(
            f"Split {split!r} does not exist in {where}; available splits: "
            f"{_split_names(builder)}. Set DataConfig.train_split / eval_split accordingly."
        )


def _tfds_builder(config: DataConfig):
    data_dir = config.resolved_data_dir()
    where = f"{config.name!r} in {data_dir or tfds.core.constants.DATA_DIR}"
    prepare_hint = (
        f"Prepare it with `tfds build {config.name.split(':')[0]} --file_format=array_record"
        f"{' --data_dir=' + data_dir if data_dir else ''}` (downloads the data; array_record "
        "needs no TensorFlow to read), or set DataConfig.data_dir (or $MOE_JAX_DATA_DIR) to the "
        f"directory that holds it. Offline, use DataConfig.name={tuple(EMBEDDED_DATASETS)}."
    )
    try:
        builder = tfds.builder(config.name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise FileNotFoundError(
            f"TFDS dataset {where} was not found: no prepared copy there and no TFDS builder of "
            f"that name. {prepare_hint}"
        ) from e
    except Exception as e:  # unreadable dataset_info.json, missing builder dependencies, ...
        raise FileNotFoundError(
            f"TFDS dataset {where} could not be opened ({type(e).__name__}: {e}). {prepare_hint}"
        ) from e
    if not builder.is_prepared():
        raise FileNotFoundError(
            f"TFDS dataset {where} is not prepared (looked for {builder.data_dir}). {prepare_hint}"
        )
    return builder, where


def _embedded_builder(config: DataConfig):
    # Imported here so that `python -m moe_jax.data.corpus` does not import itself twice.
    from moe_jax.data import corpus

    builder = corpus.prepare_embedded_corpus(
        config.resolved_data_dir(), EMBEDDED_DATASETS[config.name]
    )
    return builder, f"{config.name!r} (moe_jax_corpus) in {builder.data_dir}"


def _read_through_tensorflow(builder, split: str, keys: list[str]) -> list[dict[str, Any]]:
    """Loads a tfrecord split into memory as numpy records (random access for the pipeline)."""
    log.warning(
        "Reading %s:%s (tfrecord) through TensorFlow into memory. For large datasets convert it "
        "once to array_record (`tfds convert_format --dataset_version_dir=%s "
        "--out_file_format=array_record`) to read it from disk with random access.",
        builder.name, split, builder.data_dir,
    )
    dataset = builder.as_dataset(split=split, shuffle_files=False)
    return [{k: example[k] for k in keys} for example in tfds.as_numpy(dataset)]


def open_split(config: DataConfig, split: str) -> DocumentSource:
    """The documents of `split` of `config.name`; raises FileNotFoundError/ValueError with a fix."""
    if config.is_embedded:
        builder, where = _embedded_builder(config)
        domain_key = "domain"
    else:
        builder, where = _tfds_builder(config)
        domain_key = None
    _check_split(builder, split, where)
    features = list(builder.info.features.keys()) if builder.info.features else []
    if features and config.text_key not in features:
        raise ValueError(
            f"Dataset {where} has no feature {config.text_key!r}; its features are {features}. "
            "Set DataConfig.text_key to the one holding the text."
        )
    formats = {f.value for f in builder.info.available_file_formats()}
    if "array_record" in formats:
        records = builder.as_data_source(split=split, file_format="array_record")
    elif _tensorflow_available():
        records = _read_through_tensorflow(builder, split, [config.text_key])
    else:
        raise RuntimeError(
            f"Dataset {where} is stored as {sorted(formats)}, which only TensorFlow can read, "
            "and TensorFlow is not installed. Either `pip install tensorflow`, or convert the "
            "prepared data once to array_record (on a machine with TensorFlow): `tfds "
            f"convert_format --dataset_version_dir={builder.data_dir} "
            "--out_file_format=array_record`, or rebuild it with `tfds build "
            f"{config.name.split(':')[0]} --file_format=array_record`."
        )
    if len(records) == 0:
        raise ValueError(f"Split {split!r} of dataset {where} is empty.")
    return DocumentSource(records, config.text_key, domain_key, f"{where}, split {split!r}")


def read_labelled_documents(path: str) -> tuple[DocumentSource, tuple[str, ...]]:
    """Your own evaluation documents with domain labels: a JSON-lines file, one document per
    line, `{"text": "...", "domain": "legal"}` (any domain names). Returns the source (domains
    as label ids) and the domain names in order of first appearance."""
    records: list[dict[str, Any]] = []
    names: list[str] = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
                text, domain = doc["text"], doc["domain"]
                if not isinstance(text, str) or not isinstance(domain, str) or not text:
                    raise TypeError("text and domain must be non-empty strings")
            except (ValueError, KeyError, TypeError) as err:
                raise ValueError(
                    f"{path}:{number} is not a labelled document ({type(err).__name__}: {err}); "
                    'each line must be a JSON object {"text": "...", "domain": "..."}.') from err
            if domain not in names:
                names.append(domain)
            records.append({"text": text.encode("utf-8"), "domain": names.index(domain)})
    if not records:
        raise ValueError(f"{path} holds no document; write one JSON object per line.")
    return DocumentSource(records, "text", "domain", path), tuple(names)
