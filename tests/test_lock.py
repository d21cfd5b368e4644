"""One writer per run directory (moe_jax/train/lock.py): a second process is refused with the
holder named; a lock whose holder died (same host: its pid is gone; another host: its lease ran
out) is taken over with a warning; a requeued SLURM task takes over from its dead first copy
but not from a live one; the training loop refuses a locked directory before writing anything.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time

import pytest

from moe_jax import schema
from moe_jax.train import lock, loop
from moe_jax.train.lock import WorkdirLock, WorkdirLockedError

# A holder in another process that imports the lock module alone (not the training code).
HOLDER = """
import sys, time
from moe_jax.train import lock
lock.WorkdirLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(120)
"""


@pytest.fixture
def holder(tmp_path):
    """A live process on this host that holds the lock of tmp_path/run."""
    workdir = str(tmp_path / "run")
    process = subprocess.Popen([sys.executable, "-c", HOLDER, workdir], stdout=subprocess.PIPE,
                               text=True)
    try:
        assert process.stdout.readline().strip() == "held"
        yield workdir, process
    finally:
        process.kill()
        process.wait()


def _write_lock(workdir: str, **fields) -> dict:
    content = {"token": "other", "host": "node-b", "pid": 4242, "pid_start": None,
               "started": time.time() - 600, "renewed": time.time(),
               "lease_seconds": lock.LEASE_SECONDS, "slurm_job": None, "slurm_restart": 0,
               **fields}
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, lock.LOCK_FILE)
    with open(path + ".test", "w") as f:
        json.dump(content, f)
    os.replace(path + ".test", path)  # whole, as the lock module writes it
    return content


def test_second_writer_is_refused_then_takes_over_once_the_holder_is_gone(holder, caplog):
    workdir, process = holder
    pattern = (rf"run directory {re.escape(workdir)} is in use: pid {process.pid} on host "
               rf"{re.escape(socket.gethostname())} since \d{{4}}-\d\d-\d\dT")
    with pytest.raises(WorkdirLockedError, match=pattern):
        WorkdirLock(workdir).acquire()
    process.kill()
    process.wait()
    second = WorkdirLock(workdir)
    with caplog.at_level(logging.WARNING):
        message = second.acquire()
    assert f"from pid {process.pid} on host" in message and "that process is gone" in message
    assert message in caplog.text
    with open(os.path.join(workdir, lock.LOCK_FILE)) as f:
        assert json.load(f)["pid"] == os.getpid()
    second.release()
    assert not os.path.exists(os.path.join(workdir, lock.LOCK_FILE))


def test_training_refuses_a_locked_run_directory_and_writes_nothing(holder):
    workdir, process = holder
    with pytest.raises(WorkdirLockedError, match=rf"pid {process.pid} on host"):
        loop.train_and_evaluate(schema.load_config("dense.py:tiny"), workdir)
    assert os.listdir(workdir) == [lock.LOCK_FILE]


def test_a_lock_of_another_host_is_taken_over_only_once_its_lease_ran_out(tmp_path):
    workdir = str(tmp_path)
    _write_lock(workdir, renewed=time.time() - 30)
    with pytest.raises(WorkdirLockedError, match=r"pid 4242 on host node-b .*renewed 30 s ago"):
        WorkdirLock(workdir).acquire()
    _write_lock(workdir, renewed=time.time() - 2 * lock.LEASE_SECONDS)
    taker = WorkdirLock(workdir)
    assert "its lease ran out (last renewed 240 s ago)" in taker.acquire()
    taker.release()


def test_a_requeued_slurm_task_takes_over_from_its_dead_first_copy(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    workdir = str(tmp_path)
    # The first copy ran on another node, was killed (no more renewals), lease 0.5 s.
    _write_lock(workdir, slurm_job="77", slurm_restart=0, lease_seconds=0.5)
    taker = WorkdirLock(workdir)
    start = time.monotonic()
    assert "earlier run of this SLURM job stopped renewing it" in taker.acquire()
    assert time.monotonic() - start < 5
    with open(os.path.join(workdir, lock.LOCK_FILE)) as f:
        assert json.load(f)["slurm_restart"] == 1
    taker.release()
    # A first copy that still renews its lock (it runs) is not taken over.
    first = _write_lock(workdir, slurm_job="77", slurm_restart=0, lease_seconds=0.5)
    stop = threading.Event()

    def renew():
        while not stop.wait(0.05):
            _write_lock(workdir, **{**first, "renewed": time.time()})

    thread = threading.Thread(target=renew)
    thread.start()
    try:
        with pytest.raises(WorkdirLockedError, match=r"\(SLURM job 77\)"):
            WorkdirLock(workdir).acquire()
    finally:
        stop.set()
        thread.join()
    # Another job's lock with a fresh lease is refused at once.
    _write_lock(workdir, slurm_job="78", lease_seconds=60)
    with pytest.raises(WorkdirLockedError, match=r"SLURM job 78"):
        WorkdirLock(workdir).acquire()


def test_the_lock_is_renewed_while_held_and_a_lost_lock_is_reported(tmp_path, caplog):
    held = WorkdirLock(str(tmp_path), lease_seconds=0.2)
    held.acquire()
    path = os.path.join(str(tmp_path), lock.LOCK_FILE)
    with open(path) as f:
        first = json.load(f)["renewed"]
    time.sleep(0.3)
    with open(path) as f:
        assert json.load(f)["renewed"] > first
    _write_lock(str(tmp_path), token="thief")
    with caplog.at_level(logging.ERROR):
        assert not held.renew()
    assert "taken over by pid 4242 on host node-b" in caplog.text
    held.release()  # not ours any more: left in place
    assert os.path.exists(path)
