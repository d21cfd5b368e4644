"""Run directories on Cloud Storage (gs://), against a local emulator that the tests start
(tests/gcs_emulator.py: gcp-storage-emulator in this process, on a free port, with the variables
that point google-cloud-storage, gcsfs and tensorstore at it).

The stock emulator ignores ifGenerationMatch and leaves the generation out of download headers;
gcs_emulator adds both, so the lock's races below are decided by the same preconditions as on
Cloud Storage, and orbax's tensorstore reads are reliable. A run on gs:// writes every file of a
local run, ends with exactly its numbers, resumes after a kill (also mid-save), refuses a
second writer and another run's directory, and names the path and the fix for a missing bucket
or missing credentials. The tiny model of tests/test_train.py keeps compilation shared.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

pytest.importorskip("gcp_storage_emulator", reason="the gs:// tests need the Cloud Storage "
                    "emulator: pip install -e '.[dev]' (gcp-storage-emulator)")
pytest.importorskip("gcsfs", reason="gs:// paths need gcsfs: pip install -e '.[gcs]'")
pytest.importorskip("google.cloud.storage", reason="the gs:// writer lock needs "
                    "google-cloud-storage: pip install -e '.[gcs]'")

import gcs_emulator
from google.cloud import storage as gcs
from test_train import CHECKPOINT_EVERY, STEPS, TINY, _interrupt_train_iterator

from moe_jax import schema
from moe_jax.interop import conversion
from moe_jax.models import Transformer
from moe_jax.train import checkpoint, init_from, lock, loop, optim, routing_report
from moe_jax.train.lock import WorkdirLock, WorkdirLockedError
from moe_jax.train.metrics import read_metrics
from moe_jax.train.restore import restore_run
from moe_jax.train.state import init_train_state
from moe_jax.utils import storage

BUCKET = "moe-jax-test"
FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "hf")


@pytest.fixture(scope="module")
def emulator():
    """The emulator's URL; the clients' variables point at it while the module runs."""
    server, url = gcs_emulator.start(BUCKET)
    variables = gcs_emulator.environment(url)
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    yield url
    server.stop()
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture
def url(emulator, request):
    """A fresh run directory in the bucket."""
    return f"gs://{BUCKET}/{request.node.name.replace('[', '-').rstrip(']')}"


@pytest.fixture(scope="module")
def config(data_dir):
    return schema.override(schema.base_config(), {**TINY, "data.data_dir": data_dir})


@pytest.fixture(scope="module")
def local_run(config, tmp_path_factory):
    """The uninterrupted local run that gs:// runs must equal: (workdir, summary)."""
    workdir = str(tmp_path_factory.mktemp("local"))
    return workdir, loop.train_and_evaluate(config, workdir)


@pytest.fixture(scope="module")
def gs_run(emulator, config, local_run):
    """An uninterrupted run in the bucket: (url, summary)."""
    url = f"gs://{BUCKET}/finished"
    return url, loop.train_and_evaluate(config, url)


def _losses(workdir: str) -> list[float]:
    logged = read_metrics(workdir)
    return [logged[s]["train/loss"] for s in range(1, STEPS + 1)]


def _objects(url: str) -> list[str]:
    """Every object under `url`, relative to it."""
    bucket, prefix = storage.bucket_and_name(url)
    return sorted(b.name[len(prefix) + 1:] for b in
                  gcs.Client().list_blobs(bucket, prefix=prefix + "/"))


def _put(path: str, data: str | bytes) -> None:
    """Writes an object directly, unconditionally: another process's doing."""
    bucket, name = storage.bucket_and_name(path)
    gcs.Client().bucket(bucket).blob(name).upload_from_string(data)


def _lock_content(**fields) -> str:
    return json.dumps({"token": "other", "host": "node-b", "pid": 4242, "pid_start": None,
                       "started": time.time() - 600, "renewed": time.time(),
                       "lease_seconds": lock.LEASE_SECONDS, "slurm_job": None,
                       "slurm_restart": 0, **fields})


def _scalar_steps(events: bytes, tag: str) -> list[int]:
    """The steps at which a TensorBoard event file (TFRecord framing) holds scalar `tag`."""
    from tensorboardX.proto import event_pb2

    steps, offset = [], 0
    while offset < len(events):
        (length,) = struct.unpack_from("<Q", events, offset)
        event = event_pb2.Event.FromString(events[offset + 12:offset + 12 + length])
        offset += 12 + length + 4
        steps += [event.step for value in event.summary.value if value.tag == tag]
    return steps


# --- a run on gs:// -------------------------------------------------------------------------------


def test_a_run_on_gs_writes_every_file_to_the_bucket_and_equals_a_local_run(
        gs_run, local_run, monkeypatch, tmp_path):
    url, summary = gs_run
    objects = _objects(url)
    for name in ("config.json", "metrics.jsonl", "summary.json", "routing_profiles/8.json",
                 f"checkpoints/{CHECKPOINT_EVERY}/commit_success.txt",
                 f"checkpoints/{STEPS}/commit_success.txt"):
        assert name in objects, name
    assert "writer.lock" not in objects  # released at the end
    assert json.loads(storage.read_text(f"{url}/summary.json")) == json.loads(json.dumps(summary))
    assert json.loads(storage.read_text(f"{url}/config.json"))["train"]["num_train_steps"] == STEPS
    # The numbers of the local run, exactly.
    assert _losses(url) == _losses(local_run[0])
    assert summary["eval_loss"] == local_run[1]["eval_loss"]
    events = [name for name in objects if name.startswith("tensorboard/events.out.tfevents")]
    assert len(events) == 1
    data = storage.read_bytes(f"{url}/{events[0]}")
    assert _scalar_steps(data, "train/loss") == list(range(1, STEPS + 1))
    # Nothing local: no directory named "gs:" where the run started.
    monkeypatch.chdir(tmp_path)
    assert not os.path.exists("gs:") and not os.path.exists(os.path.join(os.getcwd(), "gs:"))


def test_a_run_killed_on_gs_resumes_with_the_numbers_of_an_uninterrupted_run(
        config, local_run, url, monkeypatch, caplog):
    # Dies while fetching the batch of step 7: the last checkpoint is step 4.
    _interrupt_train_iterator(monkeypatch, at_batch=7, error=KeyboardInterrupt("killed"))
    with pytest.raises(KeyboardInterrupt):
        loop.train_and_evaluate(config, url)
    monkeypatch.undo()
    assert checkpoint.complete_steps(f"{url}/checkpoints") == [CHECKPOINT_EVERY]
    # What a kill -9 leaves besides: its lock (a process of this host that is gone) and a
    # half-written checkpoint of step 8 (no commit marker: object storage cannot rename).
    _put(f"{url}/writer.lock", _lock_content(host=socket.gethostname(), pid=2**22 + 17))
    _put(f"{url}/checkpoints/{STEPS}/state/_CHECKPOINT_METADATA", b"half")
    with caplog.at_level(logging.WARNING):
        summary = loop.train_and_evaluate(config, url)
    assert "that process is gone" in caplog.text
    assert summary["steps"] == STEPS and summary["eval_loss"] == local_run[1]["eval_loss"]
    assert _losses(url) == _losses(local_run[0])
    assert checkpoint.complete_steps(f"{url}/checkpoints") == [CHECKPOINT_EVERY, STEPS]
    # The resumed process wrote its metrics to a second object; the first run's is untouched.
    assert [n for n in _objects(url) if n.startswith("metrics")] == ["metrics.jsonl",
                                                                     "metrics.jsonl.0001"]


@pytest.mark.slow
def test_a_sigkilled_process_resumes_from_the_bucket_with_identical_losses(
        config, local_run, url):
    """A real kill -9 of a training process once its first checkpoint is committed."""
    slow = schema.override(config, {"train.async_checkpointing": True})
    script = (f"import json, ml_collections; from moe_jax.train import loop; "
              f"loop.train_and_evaluate(ml_collections.ConfigDict(json.loads({slow.to_json()!r})),"
              f" {url!r})")
    process = subprocess.Popen([sys.executable, "-c", script], env=dict(os.environ))
    marker = f"{url}/checkpoints/{CHECKPOINT_EVERY}/commit_success.txt"
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None and not storage.exists(marker):
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL  # killed, not finished
    subprocess.run([sys.executable, "-c", script], env=dict(os.environ), check=True)
    assert _losses(url) == _losses(local_run[0])


# --- one writer -----------------------------------------------------------------------------------


def test_a_second_writer_is_refused_and_writes_nothing(config, url):
    _put(f"{url}/writer.lock", _lock_content())
    with pytest.raises(WorkdirLockedError,
                       match=rf"run directory {url} is in use: pid 4242 on host node-b .*"
                             rf"delete {url}/writer.lock"):
        loop.train_and_evaluate(config, url)
    assert _objects(url) == ["writer.lock"]


def test_the_lock_object_is_created_renewed_and_removed(url):
    held = WorkdirLock(url, lease_seconds=60)
    held.acquire()
    first = json.loads(storage.read_text(f"{url}/writer.lock"))
    assert first["token"] == held.token and first["pid"] == os.getpid()
    assert held.renew()
    assert json.loads(storage.read_text(f"{url}/writer.lock"))["renewed"] >= first["renewed"]
    held.release()
    assert _objects(url) == []


def test_lock_races_are_decided_by_generation_preconditions(url, monkeypatch, caplog):
    path = f"{url}/writer.lock"
    # Another writer creates the lock between our look (none) and our create.
    racer = WorkdirLock(url)
    create = racer.file.create
    monkeypatch.setattr(racer.file, "create", lambda content: (
        _put(path, _lock_content(host="node-c")), create(content))[1])
    with pytest.raises(WorkdirLockedError, match="on host node-c"):
        racer.acquire()
    assert json.loads(storage.read_text(path))["host"] == "node-c"  # not overwritten
    # Two processes take over one stale lock: the second's write names the generation it
    # read, which is gone, so it looks again and finds the first one's live lock.
    _put(path, _lock_content(renewed=time.time() - 2 * lock.LEASE_SECONDS))
    taker = WorkdirLock(url)
    take_over = taker.file.take_over
    monkeypatch.setattr(taker.file, "take_over", lambda version, content: (
        _put(path, _lock_content(host="node-d")), take_over(version, content))[1])
    with pytest.raises(WorkdirLockedError, match="on host node-d"):
        taker.acquire()
    # A holder whose lock was taken over in between its read and its renewal loses it, and
    # its release leaves the new holder's lock in place.
    storage.remove(path)
    held = WorkdirLock(url, lease_seconds=60)
    held.acquire()
    renew = held.file.renew
    monkeypatch.setattr(held.file, "renew", lambda version, content: (
        _put(path, _lock_content(host="node-e")), renew(version, content))[1])
    with caplog.at_level(logging.ERROR):
        assert not held.renew()
    assert "taken over by pid 4242 on host node-e" in caplog.text
    held.release()
    assert json.loads(storage.read_text(path))["host"] == "node-e"


# --- bad input ------------------------------------------------------------------------------------


def test_a_missing_bucket_and_missing_credentials_name_the_path_and_the_fix(
        config, emulator, monkeypatch, tmp_path):
    with pytest.raises(storage.StorageError,
                       match=r"gs://no-such-bucket/run/writer.lock: the bucket "
                             r"gs://no-such-bucket does not exist\. Create it \(`gcloud storage "
                             r"buckets create gs://no-such-bucket"):
        loop.train_and_evaluate(config, "gs://no-such-bucket/run")
    monkeypatch.delenv("STORAGE_EMULATOR_HOST")
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing.json"))
    monkeypatch.setenv("NO_GCE_CHECK", "true")
    with pytest.raises(storage.StorageError, match=r"no Google Cloud credentials .*"
                       r"roles/storage.objectAdmin .*gcloud auth application-default login"):
        loop.train_and_evaluate(config, f"gs://{BUCKET}/no-credentials")
    with pytest.raises(storage.StorageError, match=r"no Google Cloud credentials to reach "
                       rf"gs://{BUCKET}/finished"):
        restore_run(f"gs://{BUCKET}/finished")


@pytest.mark.parametrize("where", ["local", "gs"])
def test_the_directory_of_another_run_is_refused_and_left_as_it_was(config, where, url,
                                                                    tmp_path):
    workdir = str(tmp_path / "other") if where == "local" else url
    storage.makedirs(workdir)
    theirs = schema.override(config, {"model.d_ff": 48, "train.learning_rate": 3e-3})
    text = theirs.to_json_best_effort(indent=2, sort_keys=True) + "\n"
    storage.write_text(storage.join(workdir, "config.json"), text)
    storage.write_text(storage.join(workdir, "metrics.jsonl"), '{"step": 1, "train/loss": 5}\n')
    with pytest.raises(loop.AnotherRunError,
                       match=rf"{workdir} holds another run: its config.json differs in "
                             r"model.d_ff \(48 there, 64 here\), train.learning_rate .*Nothing "
                             "was written"):
        loop.train_and_evaluate(config, workdir)
    assert sorted(storage.listdir(workdir)) == ["config.json", "metrics.jsonl"]
    assert storage.read_text(storage.join(workdir, "config.json")) == text


# --- files on object storage ----------------------------------------------------------------------


def test_json_lines_on_object_storage_grow_in_segments_that_resumed_writers_never_rewrite(url):
    path = f"{url}/metrics.jsonl"
    first = storage.JsonLines(path, segment_bytes=60)
    for step in range(1, 5):  # ~25 bytes a line: a segment holds three lines
        first.append([{"step": step, "loss": 1.0}])
    assert storage.listdir(url) == ["metrics.jsonl", "metrics.jsonl.0001"]
    before = storage.read_text(path)
    resumed = storage.JsonLines(path, segment_bytes=60)  # a resumed run: a new segment
    resumed.append([{"step": 4, "loss": 0.5}])
    assert storage.listdir(url)[-1] == "metrics.jsonl.0002"
    assert storage.read_text(path) == before
    assert [r["step"] for r in resumed.read()] == [1, 2, 3, 4, 4]
    assert read_metrics(url)[4]["loss"] == 0.5  # the last line of a step wins
    resumed.rewrite([{"step": 1, "loss": 2.0}])
    assert storage.JsonLines(path).read() == [{"step": 1, "loss": 2.0}]
    assert len(storage.listdir(url)) == 1


def test_tensorboard_events_on_object_storage_are_uploaded_one_file_at_a_time(url):
    from moe_jax.train.metrics import _TensorBoard

    board = _TensorBoard(f"{url}/tensorboard", segment_bytes=400)
    for step in range(1, 21):
        board.writer.add_scalar("loss", float(step), step)
        board.flush()
    board.close()
    names = storage.listdir(f"{url}/tensorboard")
    assert len(names) > 1
    steps = [s for name in names
             for s in _scalar_steps(storage.read_bytes(f"{url}/tensorboard/{name}"), "loss")]
    assert steps == list(range(1, 21))


# --- the other programs ---------------------------------------------------------------------------


def test_sample_routing_report_and_init_checkpoint_read_a_run_on_gs(gs_run, local_run, url):
    run_url = gs_run[0]
    restored, local = restore_run(run_url), restore_run(local_run[0])  # what sample reads
    assert restored.step == STEPS
    np.testing.assert_array_equal(restored.params["embedding"], local.params["embedding"])
    result = routing_report.main([f"--workdir={run_url}", f"--out={url}"])
    assert result["profiles"][0]["profile"]["step"] == STEPS
    assert storage.read_bytes(f"{url}/routing_report.png")[:4] == b"\x89PNG"
    assert json.loads(storage.read_text(f"{url}/routing_report.json"))["profiles"]
    # A new run that starts from the gs:// run's parameters (init.checkpoint).
    experiment = schema.parse_config(schema.override(
        schema.config_from_json(f"{run_url}/config.json"), {"init.checkpoint": run_url}))
    model = Transformer(experiment.model, experiment.moe)
    fresh = jax.eval_shape(lambda key: init_train_state(
        key, model, optim.make_optimizer(experiment.train), seq_len=32), jax.random.key(0))
    variables = init_from.initial_variables(experiment, fresh)
    np.testing.assert_array_equal(variables["params"]["embedding"], local.params["embedding"])


def test_convert_imports_from_and_exports_to_gs(url, tmp_path):
    source = os.path.join(FIXTURES, "qwen2_moe")
    for name in os.listdir(source):
        storage.copy_file(os.path.join(source, name), f"{url}/hf_source/{name}")
    written = conversion.import_hf(f"{url}/hf_source", f"{url}/converted")
    assert written["family"] == "qwen2_moe"
    assert json.loads(storage.read_text(f"{url}/converted/config.json"))["init"][
        "checkpoint"] == f"{url}/converted"
    conversion.export_hf(f"{url}/converted", f"{url}/exported")
    with pytest.raises(FileExistsError, match="--overwrite"):
        conversion.export_hf(f"{url}/converted", f"{url}/exported")
    local = str(tmp_path / "exported")
    os.makedirs(local)
    storage.download(f"{url}/exported", local)
    conversion.export_hf(f"{url}/converted", str(tmp_path / "direct"))
    assert sorted(os.listdir(local)) == sorted(os.listdir(tmp_path / "direct"))
    for name in os.listdir(local):
        assert (tmp_path / "direct" / name).read_bytes() == storage.read_bytes(
            os.path.join(local, name)), name
