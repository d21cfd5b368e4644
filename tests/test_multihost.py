"""Two processes on 127.0.0.1 join through `jax.distributed` (gloo CPU collectives), 4
simulated devices each, and train the tiny MoE of `multihost_worker` through the command line
with its 8 experts spread over the 8 devices of both processes (mesh data=1, expert=8, explicit
form: the all-to-all crosses processes). They must produce the single-process losses, write one
metrics file (process 0), save checkpoints from both processes, and resume from one.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from multihost_worker import CONFIG, SETTINGS

from moe_jax import schema
from moe_jax.data import corpus
from moe_jax.train import loop
from moe_jax.train.metrics import read_metrics

WORKER = os.path.join(os.path.dirname(__file__), "multihost_worker.py")
STEPS = SETTINGS["train.num_train_steps"]
FIRST_STEPS = 4  # the first run stops here (checkpoint); the second resumes to STEPS
TIMEOUT_S = 300


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tfds"))
    corpus.prepare_embedded_corpus(path, "tiny")  # before the workers, which only read it
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


EXPLICIT_EXPERT_PARALLEL = {"mesh.data": 1, "mesh.expert": -1,
                            "mesh.expert_parallel": "explicit"}


def _run_two_processes(workdir: str, data_dir: str, tmp_path,
                       settings: dict = EXPLICIT_EXPERT_PARALLEL,
                       step_counts: str = f"{FIRST_STEPS},{STEPS}") -> list[str]:
    """Starts both workers, waits (bounded), kills what is left; returns their logs."""
    # No persistent compilation cache: JAX writes it from process 0 only, so with a warm cache
    # process 0 would reach the first collective while process 1 still compiles, and gloo's
    # rendezvous (30 s) can time out on a loaded machine.
    inherited = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env = {**inherited, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{_free_port()}", "JAX_NUM_PROCESSES": "2"}
    flags = [f"--workdir={workdir}", f"--config.data.data_dir={data_dir}",
             *[f"--config.{key}={value}" for key, value in settings.items()]]
    logs = [str(tmp_path / f"process_{i}.log") for i in range(2)]
    processes = []
    try:
        for i, log in enumerate(logs):
            with open(log, "w") as out:
                processes.append(subprocess.Popen(
                    [sys.executable, WORKER, step_counts, *flags],
                    env={**env, "JAX_PROCESS_ID": str(i)}, stdout=out, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + TIMEOUT_S
        for process in processes:
            process.wait(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    texts = []
    for log in logs:
        with open(log) as f:
            texts.append(f.read())
    for i, (process, text) in enumerate(zip(processes, texts)):
        assert process.returncode == 0, f"process {i} exited with {process.returncode}:\n" \
                                        f"{text[-4000:]}"
    return texts


def test_two_processes_train_save_and_resume_like_one(data_dir, tmp_path):
    workdir = str(tmp_path / "two_processes")
    logs = _run_two_processes(workdir, data_dir, tmp_path)
    for i, log in enumerate(logs):
        assert f"process {i} of 2: 4 local devices of 8: done" in log

    reference_dir = str(tmp_path / "one_process")
    reference = loop.train_and_evaluate(
        schema.override(schema.load_config(CONFIG), {**SETTINGS, "data.data_dir": data_dir}),
        reference_dir)

    # Only process 0 writes metrics: one train/loss line per step, steps 5-6 from the resumed run.
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        steps = [json.loads(line)["step"] for line in f if '"train/loss"' in line]
    assert steps == list(range(1, STEPS + 1))
    losses = [read_metrics(d)[s]["train/loss"] for d in (workdir, reference_dir)
              for s in range(1, STEPS + 1)]
    np.testing.assert_allclose(losses[:STEPS], losses[STEPS:], rtol=1e-4)
    with open(os.path.join(workdir, "summary.json")) as f:
        np.testing.assert_allclose(json.load(f)["eval_loss"], reference["eval_loss"], rtol=1e-4)

    # Both processes' data positions are in the checkpoint, which both wrote and read.
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == [str(FIRST_STEPS),
                                                                        str(STEPS)]
    # orbax's JSON item file: checkpoints/<step>/host/metadata
    with open(os.path.join(workdir, "checkpoints", str(STEPS), "host", "metadata")) as f:
        iterators = json.load(f)["data_iterator_by_process"]
    assert [it["pipeline"]["process_index"] for it in iterators] == [0, 1]
    assert all(it["step"] == STEPS for it in iterators)


@pytest.mark.slow
def test_two_processes_dropless_data_parallel_match_one(data_dir, tmp_path):
    # Dropless on CPU runs its grouped matmuls as a custom call that the SPMD partitioner
    # cannot split: each process must run it on the gathered rows and get the same losses.
    settings = {"mesh.data": -1, "mesh.expert": 1, "moe.dispatch": "dropless",
                "train.checkpoint_every": 0}
    workdir = str(tmp_path / "two_processes")
    _run_two_processes(workdir, data_dir, tmp_path, settings, step_counts="3")
    reference_dir = str(tmp_path / "one_process")
    loop.train_and_evaluate(schema.override(schema.load_config(CONFIG), {
        **SETTINGS, **settings, "data.data_dir": data_dir, "train.num_train_steps": 3}),
        reference_dir)
    losses = [[read_metrics(d)[s]["train/loss"] for s in range(1, 4)]
              for d in (workdir, reference_dir)]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)
