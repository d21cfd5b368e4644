"""Tokenizers with one small interface: bytes (the default) and SentencePiece.

Every tokenizer reports, for each token, how many raw UTF-8 bytes of the input it covers, so
bits per byte is `sum(nll) / ln 2 / sum(bytes)` whatever the vocabulary. Special ids follow one
convention: pad = 0, bos = 1, eos = 2 (a loaded SentencePiece model keeps its own ids).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Iterator
from typing import Protocol

import numpy as np

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


class Tokenizer(Protocol):
    """What the input pipeline and the evaluation need from a tokenizer."""

    @property
    def vocab_size(self) -> int: ...
    @property
    def pad_id(self) -> int: ...
    @property
    def bos_id(self) -> int: ...
    @property
    def eos_id(self) -> int: ...

    def encode(self, text: bytes | str) -> np.ndarray:
        """Token ids `[tokens]` int32, without bos/eos."""

    def encode_with_bytes(self, text: bytes | str) -> tuple[np.ndarray, np.ndarray]:
        """Token ids `[tokens]` int32 and the raw UTF-8 bytes each token covers `[tokens]` int32.

        The byte counts sum to the input's UTF-8 length.
        """

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        """Text of `ids`; special ids are dropped, invalid UTF-8 becomes U+FFFD."""


def _as_bytes(text: bytes | str) -> bytes:
    return text.encode("utf-8") if isinstance(text, str) else bytes(text)


class ByteTokenizer:
    """UTF-8 bytes shifted by 3: ids 0, 1, 2 are pad, bos, eos; byte b is id b + 3 (vocab 259)."""

    offset = 3
    pad_id, bos_id, eos_id = PAD_ID, BOS_ID, EOS_ID

    @property
    def vocab_size(self) -> int:
        return 256 + self.offset

    def encode(self, text: bytes | str) -> np.ndarray:
        return np.frombuffer(_as_bytes(text), dtype=np.uint8).astype(np.int32) + self.offset

    def encode_with_bytes(self, text: bytes | str) -> tuple[np.ndarray, np.ndarray]:
        ids = self.encode(text)
        return ids, np.ones_like(ids)

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        ids = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, dtype=np.int64)
        ids = ids[ids >= self.offset] - self.offset
        if ids.size and ids.max() > 255:
            raise ValueError(f"ByteTokenizer.decode got id {ids.max() + 3} >= vocab_size 259.")
        return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=259)"


def _sentencepiece():
    try:
        import sentencepiece
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "DataConfig.tokenizer='sentencepiece' needs the sentencepiece package: "
            "pip install 'moe_jax[sentencepiece]' (or pip install sentencepiece)."
        ) from e
    return sentencepiece


class SentencePieceTokenizer:
    """A trained SentencePiece model. Bytes per token come from the pieces' input offsets."""

    def __init__(self, model_path: str):
        if not os.path.isfile(model_path):
            raise FileNotFoundError(
                f"SentencePiece model {model_path!r} does not exist; set "
                "DataConfig.spm_model_path to a trained .model file, or to None to train one "
                "on the train split."
            )
        spm = _sentencepiece()
        self.model_path = model_path
        self._sp = spm.SentencePieceProcessor(model_file=model_path)
        self._specials = {i for i in (self.pad_id, self.bos_id, self.eos_id)}

    @property
    def vocab_size(self) -> int:
        return int(self._sp.get_piece_size())

    @property
    def pad_id(self) -> int:
        return max(int(self._sp.pad_id()), 0)  # a model without pad pads with id 0

    @property
    def bos_id(self) -> int:
        bos = int(self._sp.bos_id())
        return bos if bos >= 0 else self.pad_id  # t5x convention: no bos -> pad starts decoding

    @property
    def eos_id(self) -> int:
        eos = int(self._sp.eos_id())
        if eos < 0:
            raise ValueError(f"SentencePiece model {self.model_path!r} has no eos piece.")
        return eos

    def encode(self, text: bytes | str) -> np.ndarray:
        return np.asarray(self._sp.encode(_as_str(text)), dtype=np.int32)

    def encode_with_bytes(self, text: bytes | str) -> tuple[np.ndarray, np.ndarray]:
        # Proto offsets index the UTF-8 input, so they survive normalisation; byte-fallback
        # pieces of one character carry the character's whole span on the last piece.
        try:
            proto = self._sp.encode(_as_str(text), out_type="proto")
        except ValueError:  # older sentencepiece releases call it "immutable_proto"
            proto = self._sp.encode(_as_str(text), out_type="immutable_proto")
        ids = np.fromiter((p.id for p in proto.pieces), dtype=np.int32, count=len(proto.pieces))
        num_bytes = np.fromiter(
            (p.end - p.begin for p in proto.pieces), dtype=np.int32, count=len(proto.pieces)
        )
        return ids, num_bytes

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        return self._sp.decode([int(i) for i in ids if int(i) not in self._specials])

    def __getstate__(self) -> dict:  # grain workers receive the tokenizer by pickling
        return {"model_path": self.model_path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["model_path"])

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({self.model_path!r}, vocab_size={self.vocab_size})"


def _as_str(text: bytes | str) -> str:
    return text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text


def _paragraphs(texts: Iterable[bytes | str], max_bytes: int) -> Iterator[str]:
    """Splits documents into training "sentences" that keep their newlines (code needs them)."""
    for text in texts:
        chunk: list[str] = []
        size = 0
        for line in _as_str(text).splitlines(keepends=True):
            if size + len(line) > max_bytes and chunk:
                yield "".join(chunk)
                chunk, size = [], 0
            chunk.append(line[:max_bytes])
            size += len(chunk[-1])
        if chunk:
            yield "".join(chunk)


def train_sentencepiece(
    texts: Iterable[bytes | str],
    vocab_size: int,
    model_prefix: str,
    *,
    max_sentences: int = 200_000,
) -> SentencePieceTokenizer:
    """Trains a byte-fallback BPE SentencePiece model on `texts`; writes `{model_prefix}.model`.

    Lossless on any input (identity normalisation, whitespace kept, byte fallback), with the
    ids pad=0, bos=1, eos=2, unk=3. Deterministic for the same texts (one trainer thread, no
    sampling of the input). The file is written atomically, so concurrent trainings of the same
    model (several hosts) cannot leave a half-written model behind.
    """
    spm = _sentencepiece()
    path = model_prefix + ".model"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    sentences = []
    for sentence in _paragraphs(texts, max_bytes=4096):
        sentences.append(sentence)
        if len(sentences) >= max_sentences:
            break
    if not sentences:
        raise ValueError("train_sentencepiece got no text to train on.")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=(writer := _AtomicWriter(path)),
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=0.9995,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        max_sentence_length=1 << 16,
        input_sentence_size=0,  # use all given sentences, no sampling
        shuffle_input_sentence=False,
        pad_id=PAD_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        unk_id=3,
        num_threads=1,
        minloglevel=2,
    )
    writer.commit()
    return SentencePieceTokenizer(path)


class _AtomicWriter:
    """A `write(bytes)` sink for the trainer that lands in `path` only on `commit()`."""

    def __init__(self, path: str):
        self._path = path
        self._data = bytearray()

    def write(self, data: bytes) -> None:
        self._data.extend(data)

    def commit(self) -> None:
        directory = os.path.dirname(os.path.abspath(self._path))
        with tempfile.NamedTemporaryFile(dir=directory, suffix=".tmp", delete=False) as f:
            f.write(self._data)
        os.replace(f.name, self._path)
