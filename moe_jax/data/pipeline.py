"""The grain input pipeline: documents -> tokens -> fixed-length rows -> per-host batches.

A batch is a dict of numpy arrays, each `[batch, seq_len]` (B rows, L = seq_len):
  inputs        int32    token ids fed to the model
  targets       int32    the next token of each input, within the same document
  weights       float32  1 where the target counts, 0 on padding
  segment_ids   int32    document number within the row (1, 2, ...), 0 on padding
  positions     int32    position within the document's piece in this row
  domains       int32    domain label of each target (embedded corpus: code 0, prose 1,
                         math 2), -1 on padding and for datasets without domains
  target_bytes  float32  raw UTF-8 bytes covered by each target (0 where weights is 0), so
                         bits per byte = sum(nll * weights) / ln 2 / sum(target_bytes)

Targets convention. A document with tokens t1..tn contributes inputs [bos, t1, ..., tn] and
targets [t1, ..., tn, eos]; rows are cut from the concatenation of these pairs (grain's
ConcatThenSplit), so a target is never predicted from another document's tokens as long as
attention respects `segment_ids`. A document cut at a row end continues in the next row of the
same lane as a new segment with positions restarting at 0 (its earlier tokens are not visible
there). eos covers 0 raw bytes: its loss is counted in the nll sum but adds no byte.
With `packing=False` each row holds one document, truncated to L tokens and padded.

Global batch and hosts ("lanes"). Row j of every global batch comes from lane j, which packs the
documents j, j + B, j + 2B, ... of the shuffled, endlessly repeated document order (grain
reshuffles every epoch with seed + epoch). Host h of P builds only lanes [h B/P, (h+1) B/P): hosts
read disjoint documents, and their rows stacked in host order are exactly the single-host global
batch for the same step, whatever P is.

Resuming. `TrainIterator.get_state()` is a JSON-serialisable dict; `set_state(state)` on a fresh
iterator (same config and arguments) continues with exactly the batches the uninterrupted
iterator would have produced. Evaluation batches are the same on every call.
"""

from __future__ import annotations

import copy
import functools
import os
import re
from collections.abc import Iterator
from typing import Any

import grain
import numpy as np
from grain.experimental import ConcatThenSplitIterDataset, ZipIterDataset

from moe_jax.data.config import DEFAULT_DATA_DIR, DataConfig
from moe_jax.data.sources import DocumentSource, keep_domains, open_split
from moe_jax.data.tokenizers import (
    ByteTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    train_sentencepiece,
)

Batch = dict[str, np.ndarray]
BATCH_FEATURES = {
    "inputs": np.int32, "targets": np.int32, "weights": np.float32, "segment_ids": np.int32,
    "positions": np.int32, "domains": np.int32, "target_bytes": np.float32,
}
_PACKED_FEATURES = ("inputs", "targets", "domains", "target_bytes")
# Documents come from memory-mapped array_record or RAM: threads only add GIL contention.
_READ_OPTIONS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
_SPM_TRAINING_BYTES = 4 * 1024 * 1024


# --- tokenizer ---------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def get_tokenizer(config: DataConfig) -> Tokenizer:
    """The tokenizer of `config`; trains (once, cached on disk) a SentencePiece model if needed."""
    if config.tokenizer == "bytes":
        return ByteTokenizer()
    return SentencePieceTokenizer(config.spm_model_path or _trained_spm_path(config))


def vocab_size(config: DataConfig) -> int:
    return get_tokenizer(config).vocab_size


def _trained_spm_path(config: DataConfig) -> str:
    """Path of a SentencePiece model trained on the train split (trained here if missing).

    Cached under <data_dir>/moe_jax_spm/. Training is deterministic, but on multi-host runs
    prefer training once (or setting spm_model_path) before launching all hosts.
    """
    cache = os.path.join(config.resolved_data_dir() or os.path.expanduser(DEFAULT_DATA_DIR),
                         "moe_jax_spm")
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{config.name}-{config.train_split}")
    prefix = os.path.join(cache, f"{name}-bpe{config.spm_vocab_size}")
    if not os.path.isfile(prefix + ".model"):
        source = open_split(config, config.train_split)
        order = grain.MapDataset.range(len(source.records)).shuffle(seed=0)
        texts, total = [], 0
        for index in order:
            texts.append(source.records[index][source.text_key])
            total += len(texts[-1])
            if total >= _SPM_TRAINING_BYTES:
                break
        train_sentencepiece(texts, config.spm_vocab_size, prefix)
    return prefix + ".model"


# --- documents -> rows -------------------------------------------------------------------------


def _tokenize(record: dict[str, Any], *, tokenizer: Tokenizer, text_key: str,
              domain_key: str | None) -> dict[str, np.ndarray]:
    """One document -> its per-token features, each `[n + 1]` (n tokens plus bos/eos)."""
    ids, num_bytes = tokenizer.encode_with_bytes(record[text_key])
    domain = -1 if domain_key is None else int(record[domain_key])
    return {
        "inputs": np.concatenate([[tokenizer.bos_id], ids]).astype(np.int32),
        "targets": np.concatenate([ids, [tokenizer.eos_id]]).astype(np.int32),
        "domains": np.full(len(ids) + 1, domain, np.int32),
        "target_bytes": np.concatenate([num_bytes, [0]]).astype(np.float32),
    }


def _padding_rows(num_rows: int, seq_len: int) -> Batch:
    rows = {k: np.zeros((num_rows, seq_len), dtype) for k, dtype in BATCH_FEATURES.items()}
    rows["domains"][:] = -1
    return rows


def _packed_row(packed: dict[str, np.ndarray]) -> Batch:
    """A ConcatThenSplit output row -> the batch features of one row `[L]`."""
    segment_ids = packed["targets_segment_ids"]
    valid = segment_ids > 0
    return {
        "inputs": packed["inputs"],
        "targets": packed["targets"],
        "weights": valid.astype(np.float32),
        "segment_ids": segment_ids,
        "positions": packed["targets_positions"],
        "domains": np.where(valid, packed["domains"], -1).astype(np.int32),
        "target_bytes": packed["target_bytes"],
    }


def _truncated_row(document: dict[str, np.ndarray], *, seq_len: int) -> Batch:
    """One document -> one row `[L]`: its first L tokens, then padding."""
    row = {k: v[0] for k, v in _padding_rows(1, seq_len).items()}
    n = min(len(document["targets"]), seq_len)
    for key in _PACKED_FEATURES:
        row[key][:n] = document[key][:n]
    row["weights"][:n] = 1
    row["segment_ids"][:n] = 1
    row["positions"][:n] = np.arange(n)
    return row


def _stack(rows: list[Batch]) -> Batch:
    return {key: np.stack([row[key] for row in rows]) for key in BATCH_FEATURES}


def _rows(documents: grain.MapDataset, source: DocumentSource, tokenizer: Tokenizer, *,
          seq_len: int, packing: bool) -> grain.IterDataset:
    """Documents (in the given order) -> rows of `seq_len` tokens."""
    tokenize = functools.partial(_tokenize, tokenizer=tokenizer, text_key=source.text_key,
                                 domain_key=source.domain_key)
    features = documents.to_iter_dataset(_READ_OPTIONS).map(tokenize)
    if not packing:
        return features.map(functools.partial(_truncated_row, seq_len=seq_len))
    length_struct = dict.fromkeys(_PACKED_FEATURES, seq_len)
    return ConcatThenSplitIterDataset(features, length_struct=length_struct).map(_packed_row)


def _check_batch_args(seq_len: int, global_batch_size: int, process_index: int,
                      process_count: int) -> int:
    """Validates the batch arguments; returns the rows per host."""
    for name, value in (("seq_len", seq_len), ("global_batch_size", global_batch_size),
                        ("process_count", process_count)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive int.")
    if not isinstance(process_index, int) or not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index!r} must be in [0, {process_count}).")
    if global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size={global_batch_size} is not divisible by process_count="
            f"{process_count}; every host needs the same number of rows."
        )
    return global_batch_size // process_count


# --- training ----------------------------------------------------------------------------------


class TrainIterator(Iterator[Batch]):
    """Endless training batches (this host's rows) with a JSON-serialisable, restorable state."""

    def __init__(self, dataset: grain.IterDataset, pipeline: dict[str, Any]):
        self._iterator = iter(dataset)
        self._pipeline = pipeline
        self._step = 0

    @property
    def step(self) -> int:
        """Number of batches returned so far (including those before a restored state)."""
        return self._step

    def __next__(self) -> Batch:
        batch = next(self._iterator)
        self._step += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        """Where the iterator is: plain dicts/lists/ints, safe to json.dumps into a checkpoint."""
        return {"step": self._step, "pipeline": dict(self._pipeline),
                "grain": copy.deepcopy(self._iterator.get_state())}

    def set_state(self, state: dict[str, Any]) -> None:
        """Continues from `state` (from get_state(), possibly JSON round-tripped)."""
        saved = state.get("pipeline", {})
        changed = {k: (saved.get(k), v) for k, v in self._pipeline.items() if saved.get(k) != v}
        if changed:
            details = ", ".join(f"{k}: saved {old!r} != now {new!r}"
                                for k, (old, new) in changed.items())
            raise ValueError(
                f"Cannot restore the data iterator: the pipeline differs from the checkpoint's "
                f"({details}). Resume with the same data config, seq_len, batch size, seed and "
                "process layout, or start a new run."
            )
        self._iterator.set_state(_slices_as_tuples(state["grain"]))
        self._step = int(state["step"])


def _slices_as_tuples(state: Any) -> Any:
    """Undoes JSON's tuple -> list in ConcatThenSplit states.

    grain 0.2.18 compares `remainder_slices` values with the tuple (-1, -1); a JSON round trip
    turns them into lists and a restored iterator would then invent a remainder document.
    """
    if isinstance(state, dict):
        return {k: ({f: tuple(s) for f, s in v.items()} if k == "remainder_slices"
                    else _slices_as_tuples(v)) for k, v in state.items()}
    if isinstance(state, list):
        return [_slices_as_tuples(v) for v in state]
    return state


def shuffled_epochs(records, seed: int) -> grain.MapDataset:
    """`records` repeated endlessly, epoch e in the order shuffled with seed + e (grain)."""
    return grain.MapDataset.source(records).shuffle(seed=seed).repeat()


def make_train_iterator(
    config: DataConfig,
    *,
    seq_len: int,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> TrainIterator:
    """This host's training batches, `[global_batch_size // process_count, seq_len]` each.

    The order depends only on (config, seq_len, global_batch_size, shuffle seed): `seed` is
    used unless `config.shuffle_seed` is set. Multi-host: call with `jax.process_index()` and
    `jax.process_count()`; the hosts' batches concatenated in host order are the global batch.
    """
    rows_per_host = _check_batch_args(seq_len, global_batch_size, process_index, process_count)
    shuffle_seed = seed if config.shuffle_seed is None else config.shuffle_seed
    if not isinstance(shuffle_seed, int) or not 0 <= shuffle_seed < 2**32:
        raise ValueError(f"seed={shuffle_seed!r} must be an int in [0, 2**32).")
    source = open_split(config, config.train_split)
    if config.train_domain_names:
        source = keep_domains(source, config.train_domain_names)
    tokenizer = get_tokenizer(config)
    documents = shuffled_epochs(source.records, shuffle_seed)
    first = process_index * rows_per_host
    lanes = [
        _rows(documents[lane::global_batch_size], source, tokenizer, seq_len=seq_len,
              packing=config.packing)
        for lane in range(first, first + rows_per_host)
    ]
    dataset = ZipIterDataset(lanes).map(_stack)
    if config.worker_count:
        dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=config.worker_count))
    pipeline = {
        "dataset": config.name, "split": config.train_split, "tokenizer": config.tokenizer,
        "vocab_size": tokenizer.vocab_size, "packing": config.packing, "seq_len": seq_len,
        "global_batch_size": global_batch_size, "shuffle_seed": shuffle_seed,
        "process_index": process_index, "process_count": process_count,
        "worker_count": config.worker_count,
    }
    if config.train_domain_names:
        pipeline["train_domains"] = config.train_domains
    return TrainIterator(dataset, pipeline)


# --- evaluation --------------------------------------------------------------------------------


class EvalBatches:
    """Evaluation batches of one host; every iteration yields the same batches.

    The split is read in its stored order as one stream of rows, cut into global batches of
    `global_batch_size` rows (the last one completed with padding rows of weight 0), of which
    this host keeps rows [h B/P, (h+1) B/P). Every host reads the whole (small) split, so all
    hosts yield the same number of batches. At most `config.eval_batches` batches when set.
    """

    def __init__(self, config: DataConfig, *, seq_len: int, global_batch_size: int,
                 process_index: int = 0, process_count: int = 1,
                 source: DocumentSource | None = None):
        rows_per_host = _check_batch_args(seq_len, global_batch_size, process_index,
                                          process_count)
        self._config = config
        self._seq_len = seq_len
        self._global_batch_size = global_batch_size
        self._host_rows = slice(process_index * rows_per_host,
                                (process_index + 1) * rows_per_host)
        self._source = (source if source is not None  # opened here: missing data fails early
                        else open_split(config, config.eval_split))
        self._tokenizer = get_tokenizer(config)

    @property
    def num_documents(self) -> int:
        return len(self._source.records)

    def __iter__(self) -> Iterator[Batch]:
        rows = _rows(grain.MapDataset.source(self._source.records), self._source,
                     self._tokenizer, seq_len=self._seq_len, packing=self._config.packing)
        batches = rows.batch(self._global_batch_size, drop_remainder=False, batch_fn=_stack)
        for index, batch in enumerate(batches):
            if self._config.eval_batches is not None and index >= self._config.eval_batches:
                return
            missing = self._global_batch_size - len(batch["inputs"])
            if missing:
                padding = _padding_rows(missing, self._seq_len)
                batch = {k: np.concatenate([v, padding[k]]) for k, v in batch.items()}
            yield {k: v[self._host_rows] for k, v in batch.items()}


def make_eval_batches(config: DataConfig, *, seq_len: int, global_batch_size: int,
                      process_index: int = 0, process_count: int = 1,
                      source: DocumentSource | None = None) -> EvalBatches:
    """This host's evaluation batches of `config.eval_split`, or of the documents of `source`
    (e.g. `sources.read_labelled_documents`), tokenized by `config`'s tokenizer (re-iterable;
    see EvalBatches)."""
    return EvalBatches(config, seq_len=seq_len, global_batch_size=global_batch_size,
                       process_index=process_index, process_count=process_count, source=source)
