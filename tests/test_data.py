"""Tests of moe_jax.data: the embedded corpus, tokenizers and the grain input pipeline.

One tiny corpus (32 KiB per domain) is built per session; rows are short (L = 32) so that
documents are cut across rows and packing states have remainders.
"""

import importlib.util
import json
import os
import platform
import shutil

import ml_collections
import numpy as np
import pytest

from moe_jax.data import corpus
from moe_jax.data.config import DataConfig
from moe_jax.data.pipeline import (
    BATCH_FEATURES,
    get_tokenizer,
    make_eval_batches,
    make_train_iterator,
    shuffled_epochs,
    vocab_size,
)
from moe_jax.data.tokenizers import ByteTokenizer

SEQ_LEN, BATCH = 32, 4
TINY_CAP = next(c for c in corpus.MoeJaxCorpus.BUILDER_CONFIGS if c.name == "tiny")


@pytest.fixture(scope="session")
def config(data_dir):
    return DataConfig(name="embedded_tiny", data_dir=data_dir)


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


# --- corpus ------------------------------------------------------------------------------------


def test_corpus_has_every_domain_in_both_splits_and_records_version_and_hash(data_dir):
    builder = corpus.prepare_embedded_corpus(data_dir, "tiny")
    meta = builder.info.metadata
    assert meta["python_version"] == platform.python_version()
    documents = corpus.collect_documents(TINY_CAP.max_bytes_per_domain)
    assert meta["content_sha256"] == corpus.content_sha256(documents)
    sources = {}
    for split in ("train", "validation"):
        records = builder.as_data_source(split=split)
        domains = [corpus.DOMAINS[int(r["domain"])] for r in records]
        assert set(domains) == set(corpus.DOMAINS), split
        for domain in corpus.DOMAINS:
            assert meta["stats"][split][domain]["examples"] == domains.count(domain)
        sources[split] = {r["source"].decode() for r in records}
        assert all(corpus.split_of(source) == split for source in sources[split])
    assert not sources["train"] & sources["validation"]


def test_corpus_content_is_deterministic_and_math_answers_are_right():
    first = corpus.collect_documents(8 * 1024)
    assert corpus.content_sha256(first) == corpus.content_sha256(corpus.collect_documents(8 * 1024))
    math_lines = [line for split in first.values() for doc in split if doc.domain == "math"
                  for line in doc.text.decode().splitlines() if "=" in line and "(" in line]
    assert math_lines
    for line in math_lines:  # "(a + b) * c = d"
        expression, answer = line.split(" = ")
        assert eval(expression) == int(answer)  # generated arithmetic only


def test_corpus_built_by_another_python_warns(data_dir, tmp_path):
    version_dir = os.path.join("moe_jax_corpus", "tiny", str(corpus.MoeJaxCorpus.VERSION))
    shutil.copytree(os.path.join(data_dir, version_dir), tmp_path / version_dir)
    metadata = tmp_path / version_dir / "metadata.json"
    meta = json.loads(metadata.read_text())
    metadata.write_text(json.dumps({**meta, "python_version": "2.7.18"}))
    with pytest.warns(UserWarning, match=r"built by Python 2\.7\.18"):
        corpus.prepare_embedded_corpus(str(tmp_path), "tiny")


def test_corpus_cli_builds_and_prints_stats(tmp_path, capsys):
    corpus.main([f"--data_dir={tmp_path}", "--config=tiny"])
    out = capsys.readouterr().out
    assert "build time" in out and platform.python_version() in out
    assert all(f"validation  {domain}" in out for domain in corpus.DOMAINS)
    corpus.main([f"--data_dir={tmp_path}", "--config=tiny"])  # idempotent: reuses the copy
    assert "already prepared" in capsys.readouterr().out
    corpus.main([f"--data_dir={tmp_path}", "--config=tiny", "--overwrite"])
    assert "build time" in capsys.readouterr().out


# --- tokenizers --------------------------------------------------------------------------------


def test_byte_tokenizer_round_trip_and_bytes_per_token():
    tok = ByteTokenizer()
    text = "def f(x):\n    return 'é 中文'\n"
    ids, num_bytes = tok.encode_with_bytes(text)
    assert tok.vocab_size == 259 and (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert ids.dtype == np.int32 and ids.min() >= 3 and ids.max() < 259
    assert len(ids) == len(text.encode()) == num_bytes.sum()
    assert tok.decode(ids) == text
    assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id]) == text


def test_sentencepiece_trains_locally_and_round_trips(config):
    spm_config = config.replace(tokenizer="sentencepiece", spm_vocab_size=384)
    tok = get_tokenizer(spm_config)
    assert vocab_size(spm_config) == tok.vocab_size == 384
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    text = "class Point:\n    x: int = 42  # é\n\n\tdone"
    ids, num_bytes = tok.encode_with_bytes(text)
    assert tok.decode(ids) == text
    assert num_bytes.sum() == len(text.encode())
    assert len(ids) < len(text.encode())  # merges learned from the corpus
    batch = next(make_train_iterator(spm_config, seq_len=SEQ_LEN, global_batch_size=2, seed=0))
    assert batch["inputs"].max() < 384
    assert batch["target_bytes"].sum() > batch["weights"].sum()  # pieces cover > 1 byte


# --- training batches --------------------------------------------------------------------------


def test_batches_have_the_documented_shapes_and_dtypes(config):
    batch = next(make_train_iterator(config, seq_len=SEQ_LEN, global_batch_size=BATCH, seed=0))
    assert batch.keys() == BATCH_FEATURES.keys()
    for key, dtype in BATCH_FEATURES.items():
        assert batch[key].shape == (BATCH, SEQ_LEN) and batch[key].dtype == dtype, key


def test_same_seed_same_batches_and_another_seed_other_batches(config):
    def batches(seed):
        return take(make_train_iterator(config, seq_len=SEQ_LEN, global_batch_size=BATCH,
                                        seed=seed), 3)

    assert_batches_equal(batches(0), batches(0))
    assert not np.array_equal(batches(0)[0]["inputs"], batches(1)[0]["inputs"])
    # DataConfig.shuffle_seed overrides the run seed.
    fixed = config.replace(shuffle_seed=1)
    assert_batches_equal(
        take(make_train_iterator(fixed, seq_len=SEQ_LEN, global_batch_size=BATCH, seed=0), 2),
        batches(1)[:2])


def test_every_epoch_is_a_new_permutation():
    order = shuffled_epochs(list(range(10)), seed=3)
    epochs = [[order[e * 10 + i] for i in range(10)] for e in range(3)]
    assert all(sorted(epoch) == list(range(10)) for epoch in epochs)
    assert epochs[0] != epochs[1] != epochs[2]


@pytest.mark.parametrize("packing", [True, False])
def test_resume_from_json_state_gives_the_uninterrupted_batches(config, packing):
    config = config.replace(packing=packing)
    make = lambda: make_train_iterator(config, seq_len=SEQ_LEN, global_batch_size=BATCH,
                                       seed=5)
    reference = take(make(), 12)
    for n in (0, 1, 4, 7):
        interrupted = make()
        take(interrupted, n)
        state = json.loads(json.dumps(interrupted.get_state()))
        resumed = make()
        resumed.set_state(state)
        assert resumed.step == n
        assert_batches_equal(take(resumed, 12 - n), reference[n:])


def test_resume_with_a_different_pipeline_is_refused(config):
    iterator = make_train_iterator(config, seq_len=SEQ_LEN, global_batch_size=BATCH, seed=0)
    next(iterator)
    other = make_train_iterator(config, seq_len=2 * SEQ_LEN, global_batch_size=BATCH, seed=0)
    with pytest.raises(ValueError, match="seq_len: saved 32 != now 64"):
        other.set_state(iterator.get_state())


@pytest.mark.parametrize("process_count", [2, 4])
def test_host_batches_partition_the_global_batch(config, process_count):
    make = lambda index, count: make_train_iterator(
        config, seq_len=SEQ_LEN, global_batch_size=BATCH, seed=0, process_index=index,
        process_count=count)
    global_batches = take(make(0, 1), 3)
    hosts = [take(make(h, process_count), 3) for h in range(process_count)]
    for step, full in enumerate(global_batches):
        parts = [host[step] for host in hosts]
        assert all(p["inputs"].shape == (BATCH // process_count, SEQ_LEN) for p in parts)
        for key in full:
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), full[key])
    # Disjoint: each host reads its own documents, so its first rows differ from the others'.
    firsts = {hosts[h][0]["targets"][0].tobytes() for h in range(process_count)}
    assert len(firsts) == process_count


def check_row_structure(batch, bos, eos):
    """Segment ids, positions and shifted targets of packed rows (see pipeline docstring)."""
    seg, pos, inputs, targets = (batch[k] for k in ("segment_ids", "positions", "inputs",
                                                    "targets"))
    np.testing.assert_array_equal(batch["weights"], (seg > 0).astype(np.float32))
    same = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0)
    np.testing.assert_array_equal(pos[:, 1:][same], pos[:, :-1][same] + 1)
    assert (pos[:, 1:][~same & (seg[:, 1:] > 0)] == 0).all()  # a new document starts at 0
    np.testing.assert_array_equal(targets[:, :-1][same], inputs[:, 1:][same])  # next token
    ends = (targets[:, :-1] == eos) & (seg[:, 1:] > 0)  # after a document's eos ...
    assert (inputs[:, 1:][ends] == bos).all()  # ... the next document starts with bos
    assert (seg[:, 1:][ends] == seg[:, :-1][ends] + 1).all()
    assert (np.diff(seg, axis=1)[seg[:, 1:] > 0] >= 0).all()


def test_packed_rows_are_full_and_respect_document_boundaries(config):
    tok = ByteTokenizer()
    batches = take(make_train_iterator(config, seq_len=SEQ_LEN, global_batch_size=BATCH,
                                       seed=0), 40)
    for batch in batches:
        assert (batch["weights"] == 1).all()  # no padding inside packed rows
        check_row_structure(batch, tok.bos_id, tok.eos_id)
        np.testing.assert_array_equal(batch["target_bytes"], batch["targets"] != tok.eos_id)
        assert set(np.unique(batch["domains"])) <= {0, 1, 2}
    assert max(b["segment_ids"].max() for b in batches) > 1  # some rows hold 2+ documents


def test_unpacked_rows_hold_one_truncated_document(config):
    batch = next(make_train_iterator(config.replace(packing=False), seq_len=SEQ_LEN,
                                     global_batch_size=BATCH, seed=0))
    assert set(np.unique(batch["segment_ids"])) <= {0, 1}
    assert (batch["inputs"][:, 0] == ByteTokenizer.bos_id).all()
    check_row_structure(batch, ByteTokenizer.bos_id, ByteTokenizer.eos_id)


# --- evaluation --------------------------------------------------------------------------------


def test_eval_batches_are_deterministic_padded_and_split_across_hosts(config):
    make = lambda index=0, count=1, cfg=config: make_eval_batches(
        cfg, seq_len=SEQ_LEN, global_batch_size=BATCH, process_index=index,
        process_count=count)
    batches = list(make())
    assert_batches_equal(list(make()), batches)  # same batches on every call
    *full, last = batches
    assert all((b["weights"] == 1).all() for b in full)
    assert last["inputs"].shape == (BATCH, SEQ_LEN) and (last["weights"] == 0).any()
    assert (last["domains"][last["weights"] == 0] == -1).all()
    assert (last["target_bytes"][last["weights"] == 0] == 0).all()
    tok = ByteTokenizer()
    all_targets = np.concatenate([b["targets"][b["weights"] > 0] for b in batches])
    assert (all_targets == tok.eos_id).sum() == make().num_documents  # each doc once
    hosts = [list(make(h, 2)) for h in range(2)]
    assert len(hosts[0]) == len(hosts[1]) == len(batches)
    for step, batch in enumerate(batches):
        np.testing.assert_array_equal(
            np.concatenate([hosts[0][step]["targets"], hosts[1][step]["targets"]]),
            batch["targets"])
    assert len(list(make(cfg=config.replace(eval_batches=2)))) == 2


# --- configuration and errors ------------------------------------------------------------------


def test_data_config_validates_and_accepts_a_config_dict():
    with pytest.raises(ValueError, match=r"DataConfig\.tokenizer='words'.*'bytes'"):
        DataConfig(tokenizer="words")
    with pytest.raises(ValueError, match=r"DataConfig\.name='Not A Name'"):
        DataConfig(name="Not A Name")
    with pytest.raises(ValueError, match=r"DataConfig\.eval_batches=0"):
        DataConfig(eval_batches=0)
    fields = ml_collections.ConfigDict(dict(name="wiki40b/en", packing=False, data_dir=None))
    assert DataConfig(**fields) == DataConfig(name="wiki40b/en", packing=False)


def test_missing_dataset_error_names_dataset_directory_and_fix(tmp_path):
    config = DataConfig(name="lm1b", data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="lm1b") as error:
        make_train_iterator(config, seq_len=SEQ_LEN, global_batch_size=BATCH, seed=0)
    assert str(tmp_path) in str(error.value) and "tfds build lm1b" in str(error.value)


def test_bad_split_and_bad_batch_arguments(config):
    with pytest.raises(ValueError, match=r"'test'.*available splits: \['train', 'validation'\]"):
        make_eval_batches(config.replace(eval_split="test"), seq_len=SEQ_LEN,
                          global_batch_size=BATCH)
    with pytest.raises(ValueError, match="not divisible by process_count=3"):
        make_train_iterator(config, seq_len=SEQ_LEN, global_batch_size=BATCH, seed=0,
                            process_count=3)


def test_a_prepared_tfds_dataset_is_read_by_name(config, data_dir):
    by_name = DataConfig(name="moe_jax_corpus/tiny", data_dir=data_dir)
    batch = next(make_train_iterator(by_name, seq_len=SEQ_LEN, global_batch_size=BATCH, seed=0))
    assert (batch["domains"] == -1).all()  # generic TFDS datasets carry no domain labels
    embedded = next(make_train_iterator(config, seq_len=SEQ_LEN, global_batch_size=BATCH, seed=0))
    np.testing.assert_array_equal(batch["inputs"], embedded["inputs"])


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is not None,
                    reason="TensorFlow is installed, so tfrecord data is readable")
def test_tfrecord_dataset_without_tensorflow_says_how_to_fix(data_dir, tmp_path):
    version_dir = os.path.join("moe_jax_corpus", "tiny", str(corpus.MoeJaxCorpus.VERSION))
    shutil.copytree(os.path.join(data_dir, version_dir), tmp_path / version_dir)
    info = tmp_path / version_dir / "dataset_info.json"
    info.write_text(info.read_text().replace('"array_record"', '"tfrecord"'))
    config = DataConfig(name="moe_jax_corpus/tiny", data_dir=str(tmp_path))
    with pytest.raises(RuntimeError, match=r"pip install tensorflow.*convert_format"):
        make_eval_batches(config, seq_len=SEQ_LEN, global_batch_size=BATCH)


def _prepare_tiny(data_dir: str) -> str:
    return corpus.prepare_embedded_corpus(data_dir, "tiny").info.metadata["content_sha256"]


def test_two_processes_preparing_one_corpus_at_once_both_succeed(tmp_path):
    """Runs started together (a sweep's first members) build the corpus once, not twice."""
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(2) as pool:
        shas = pool.map(_prepare_tiny, [str(tmp_path)] * 2)
    assert shas[0] == shas[1]
