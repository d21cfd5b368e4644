"""experiments.run --launcher=slurm (experiments/runner/slurm.py, experiments/runner/slurm_task.py).

Fast (default suite), through submitit's local executor, which runs the same array tasks as
processes here: a suite goes out as jobs, --status reports them while they run and after, a
preempted task is requeued and resumes, a failed training is restarted then reported failed
with its log and error line and submitted again by the next run, collection is idempotent and
finished runs are never resubmitted; the training is a stand-in script (`FAKE_PYTHON`) so that
the tests time submitit, not JAX. Bad input: no sbatch, SLURM refusing the array (a fake
sbatch), bad resources.

Slow (`-m slow`), against a real single-node SLURM started by tests/slurm/start_cluster.sh
(skipped when the SLURM binaries are missing): a 2-member micro suite trained as a job array
equals the same suite run locally; --status while it runs and after; a cancelled member is
reported failed and resubmitted; a 2-task job (two processes, jax.distributed from SLURM's
environment) trains the tiny MoE with the losses of one process; a requeued job takes over the
lock of its killed first copy.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from experiments import run
from experiments.library.base import Member, Suite
from experiments.runner import run_dir, slurm, slurm_status, steps, sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MICRO_MODEL = {  # tests/test_experiments.py's micro suite shapes
    "model.d_model": 32, "model.num_layers": 2, "model.num_heads": 2, "model.d_ff": 64,
    "model.max_seq_len": 32, "moe.d_ff": 64, "data.name": "embedded_tiny",
    "data.eval_batches": 2, "train.batch_size": 4,
}
MICRO_TRAIN = {"train.num_train_steps": 3, "train.warmup_steps": 1, "train.log_every": 1}

# Stands in for `python -m moe_jax.main ... --workdir=DIR` (the runner's training command):
# what the run directory's name maps to in $FAKE_TRAINING_PLAN decides what it does.
#   a number: the run's validation loss; it trains (writes metrics.jsonl, summary.json)
#   "fail": exits 1 with a Python error; "hang": writes `fake_checkpoint` (naming its parent,
#   the array task) and sleeps the first time, trains (resuming) the next time.
FAKE_PYTHON = """#!{python}
import json, os, sys, time
args = dict(a.split("=", 1) for a in sys.argv[3:] if "=" in a)
workdir = args["--workdir"]
name = os.path.basename(workdir)
with open(os.environ["FAKE_TRAINING_PLAN"]) as f:
    plan = json.load(f)[name]
marker = os.path.join(workdir, "fake_checkpoint")
if plan == "fail":
    print("Traceback (most recent call last):", flush=True)
    print("ValueError: the fake training fails", flush=True)
    sys.exit(1)
if plan == "hang" and not os.path.exists(marker):
    with open(marker + ".tmp", "w") as f:
        json.dump({{"task_pid": os.getppid()}}, f)
    os.replace(marker + ".tmp", marker)
    time.sleep(300)
    sys.exit(3)
loss = 2.5 if plan == "hang" else float(plan)
steps = int(args["--config.train.num_train_steps"])
with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
    for step in range(1, steps + 1):
        f.write(json.dumps({{"step": step, "train/loss": loss + 1.0 / step}}) + "\\n")
with open(os.path.join(workdir, "summary.tmp"), "w") as f:
    json.dump({{"steps": steps, "eval_loss": loss}}, f)
os.replace(os.path.join(workdir, "summary.tmp"), os.path.join(workdir, "summary.json"))
print("resumed from fake_checkpoint" if os.path.exists(marker) else "trained", flush=True)
"""


def micro_suite(data_dir: str | None = None,
                names: tuple[str, ...] = ("dense", "switch", "top2")) -> Suite:
    """tests/test_experiments.py's micro suite (3 steps at tiny shapes), plus a top-2 member."""
    model = {**MICRO_MODEL, **({"data.data_dir": data_dir} if data_dir else {})}
    members = (Member("dense", "dense.py:tiny", model, {"experts": 1}),
               Member("switch", "switch.py:e4", model, {"experts": 4}),
               Member("top2", "switch.py:e4", {**model, "moe.top_k": 2}, {"experts": 4}))
    chosen = tuple(m for m in members if m.name in names)
    return Suite(name="micro", title="micro", references=(), claims=(),
                 members=lambda scale: chosen, train={"tiny": MICRO_TRAIN})


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """(python, set_plan, paths): the stand-in training and where the suite writes; every local
    job still running at the end is stopped by its process id."""
    python = tmp_path / "fake_python"
    python.write_text(FAKE_PYTHON.format(python=sys.executable))
    python.chmod(0o755)
    plan_file = tmp_path / "plan.json"
    monkeypatch.setenv("FAKE_TRAINING_PLAN", str(plan_file))

    def set_plan(**plan):
        plan_file.write_text(json.dumps({f"{name}_s0": value for name, value in plan.items()}))

    paths = {"workdir_root": str(tmp_path / "runs"), "results_dir": str(tmp_path / "results")}
    yield str(python), set_plan, paths
    for record_file in (tmp_path / "runs").glob(f"tiny/*/{slurm_status.JOB_FILE}"):
        record = json.loads(record_file.read_text())
        if record["executor"] == "local" and slurm_status._process_alive(record["job_id"]):
            os.kill(int(record["job_id"]), signal.SIGKILL)


LOCAL = slurm.SlurmConfig(executor="local", max_requeues=1)


def _states(suite, paths, python, lines=None):
    return {spec.member.name: (state, detail) for spec, state, detail in sweep.suite_status(
        suite, "tiny", seeds=1, python=python, log=(lines or []).append, **paths)}


def _wait_for(path: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.2)


def test_local_executor_array_status_requeue_failure_and_resubmission(fake):
    python, set_plan, paths = fake
    suite = micro_suite()
    set_plan(dense=2.0, switch="hang", top2="fail")
    lines: list[str] = []
    path = sweep.run_suite(suite, "tiny", seeds=1, launcher="slurm", slurm=LOCAL, python=python,
                         log=lines.append, **paths)
    submitted = next(line for line in lines if line.startswith("submitted 3 runs"))
    root = os.path.join(paths["workdir_root"], "tiny")
    records = {n: slurm_status.read_job(os.path.join(root, f"{n}_s0"))
               for n in ("dense", "switch")}
    assert f"switch_s0={records['switch']['job_id']}" in submitted
    assert any(line.startswith("logs: ") for line in lines)

    # While the switch run trains, --status says so and names its job.
    marker = os.path.join(root, "switch_s0", "fake_checkpoint")
    _wait_for(marker)
    states = _states(suite, paths, python)
    assert states["switch"] == ("running", f"job {records['switch']['job_id']} (RUNNING)")
    # A second submission leaves the running member alone.
    again: list[str] = []
    sweep.run_suite(suite, "tiny", seeds=1, members=["switch"], launcher="slurm", slurm=LOCAL,
                  python=python, log=again.append, **paths)
    assert any("switch_s0: running" in line and "not submitted again" in line for line in again)

    # Preempted (the signal submitit handles): requeued, and the training resumes.
    with open(marker) as f:
        os.kill(json.load(f)["task_pid"], signal.SIGUSR2)
    slurm.wait(suite.expand("tiny", 1), paths["workdir_root"], poll_seconds=0.2,
               log=lambda _: None)
    with open(os.path.join(root, "switch_s0", run_dir.LOG_FILE)) as f:
        assert "resumed from fake_checkpoint" in f.read()
    with open(records["switch"]["stdout"]) as f:
        assert "restart 1 of at most 1" in f.read()

    states = _states(suite, paths, python)
    assert [states[n][0] for n in ("dense", "switch", "top2")] == [
        "finished", "finished", "failed"]
    top2_log = os.path.join(root, "top2_s0", run_dir.LOG_FILE)
    assert states["top2"][1].endswith(f"ValueError: the fake training fails (log: {top2_log})")
    with open(top2_log) as f:  # restarted once within the task (max_requeues=1), then failed
        assert f.read().count("ValueError: the fake training fails") == 2
    with open(path) as f:
        data = json.load(f)
    losses = {r["member"]: (r["status"], (r["summary"] or {}).get("eval_loss"))
              for r in data["runs"]}
    assert losses == {"dense": ("finished", 2.0), "switch": ("finished", 2.5),
                      "top2": ("failed", None)}
    # Collecting again changes nothing.
    with open(path, "rb") as f:
        before = f.read()
    _states(suite, paths, python)
    with open(path, "rb") as f:
        assert f.read() == before

    # The next run submits the failed member only; finished runs are neither lost nor rerun.
    set_plan(dense=9.0, switch=9.0, top2=2.25)
    lines.clear()
    sweep.run_suite(suite, "tiny", seeds=1, launcher="slurm", slurm=LOCAL, python=python,
                  wait=True, poll_seconds=0.2, log=lines.append, **paths)
    assert next(line for line in lines if line.startswith("submitted")).startswith(
        "submitted 1 run ")
    with open(path) as f:
        data = json.load(f)
    assert {r["member"]: r["summary"]["eval_loss"] for r in data["runs"]} == {
        "dense": 2.0, "switch": 2.5, "top2": 2.25}


def _fake_commands(tmp_path, sbatch_stderr: str) -> str:
    """A PATH directory with an sbatch that refuses with `sbatch_stderr` and an srun/squeue
    that do nothing."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("sbatch", f"echo {json.dumps(sbatch_stderr)} >&2; exit 1"),
                       ("srun", "exit 0"), ("squeue", "exit 0")):
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    return str(bin_dir)


def test_bad_input_names_the_problem_and_submits_nothing(fake, tmp_path, monkeypatch):
    python, set_plan, paths = fake
    suite = micro_suite()
    set_plan(dense=2.0, switch=2.0, top2=2.0)
    # A finished run in the results file, which nothing below may lose or resubmit.
    sweep.run_suite(suite, "tiny", seeds=1, members=["dense"], python=python, log=lambda _: None,
                  **paths)
    path = steps.results_path("micro", "tiny", paths["results_dir"])
    with open(path, "rb") as f:
        before = f.read()

    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(slurm.SlurmError, match=r"no `sbatch` on the PATH.*--launcher=local"):
        sweep.run_suite(suite, "tiny", seeds=1, launcher="slurm", python=python,
                      log=lambda _: None, **paths)
    refusal = ("sbatch: error: invalid partition specified: nogpu\n"
               "sbatch: error: Batch job submission failed: Invalid partition name specified")
    monkeypatch.setenv("PATH", _fake_commands(tmp_path, refusal) + os.pathsep + "/usr/bin:/bin")
    with pytest.raises(slurm.SlurmError) as error:
        sweep.run_suite(suite, "tiny", seeds=1, launcher="slurm", python=python,
                      slurm=slurm.SlurmConfig(partition="nogpu"), log=lambda _: None, **paths)
    message = str(error.value)
    assert "Invalid partition name specified" in message and "--slurm.partition" in message
    assert "Nothing was submitted" in message
    with open(path, "rb") as f:
        assert f.read() == before
    assert not list((tmp_path / "runs").glob(f"tiny/*/{slurm_status.JOB_FILE}"))
    with pytest.raises(SystemExit, match=r"--slurm\.time='soon' is not a SLURM time limit"):
        run.main(["--suite=capacity", "--launcher=slurm", "--slurm.time=soon"])


def test_a_job_that_ended_before_it_started_is_failed_without_a_log(tmp_path):
    suite = micro_suite(names=("dense",))
    spec = suite.expand("tiny", 1)[0]
    workdir = run_dir.workdir_of(spec, str(tmp_path))
    os.makedirs(workdir)
    with open(os.path.join(workdir, slurm_status.JOB_FILE), "w") as f:  # a process long gone
        json.dump({"job_id": "999999999", "executor": "local",
                   "stdout": str(tmp_path / "never.out"),
                   "stderr": str(tmp_path / "never.err")}, f)
    [(_, state, detail)] = slurm_status.member_states([spec], {"runs": [], "other_runs": []},
                                                      str(tmp_path))
    assert (state, detail) == (
        "failed", "job 999999999 ended ENDED: no log: the job ended before it started")


def test_a_pending_job_that_cannot_start_says_what_to_do(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "squeue").write_text("#!/bin/sh\necho '7_0|PENDING||PartitionConfig'\n"
                                    "echo '7_1|PENDING||Priority'\n")
    (bin_dir / "squeue").chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    states = slurm_status.queue_states([{"job_id": "7_0", "executor": "slurm"},
                                        {"job_id": "7_1", "executor": "slurm"}])
    assert states["7_0"][1].startswith("PENDING: PartitionConfig; it cannot start as submitted")
    assert states["7_0"][1].endswith("scancel 7, then submit again with other --slurm.* flags")
    assert states["7_1"] == ("PENDING", "PENDING: Priority")


def test_slurm_config_maps_to_submitit_parameters():
    config = slurm.SlurmConfig(partition="gpu", time="1-02:30:00", nodes=2, gpus_per_node=8,
                               cpus_per_task=12, mem="256G", account="moe",
                               extra=("qos=high", "exclusive"))
    assert config.minutes() == (24 + 2) * 60 + 30
    assert config.executor_parameters(27) == {
        "timeout_min": 1590, "nodes": 2, "tasks_per_node": 8, "gpus_per_node": 8,
        "cpus_per_task": 12, "slurm_partition": "gpu", "slurm_mem": "256G",
        "slurm_account": "moe", "slurm_array_parallelism": 27,
        "slurm_additional_parameters": {"qos": "high", "exclusive": True}}
    # SLURM's formats: minutes, minutes:seconds, hours:minutes:seconds, days-hours[:minutes]
    assert [slurm.SlurmConfig(time=t).minutes() for t in ("90", "1:30", "2:00:00", "1-2:30")
            ] == [90, 2, 120, 1590]
    for bad, pattern in ((dict(nodes=0), r"SlurmConfig\.nodes=0 must be an integer >= 1"),
                         (dict(mem="lots"), "not a SLURM memory size"),
                         (dict(extra=("--qos=high",)), "without dashes"),
                         (dict(executor="pbs"), "is not supported")):
        with pytest.raises(ValueError, match=pattern):
            slurm.SlurmConfig(**bad)


# --- against a real single-node SLURM (tests/slurm/start_cluster.sh) ------------------------

SLURM_BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel")


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A running single-node SLURM cluster (SLURM_CONF set for this process), stopped after."""
    missing = [name for name in SLURM_BINARIES if _which(name) is None]
    if missing:
        pytest.skip(f"no {', '.join(missing)}: install SLURM to run these tests (as root: "
                    "apt-get update && apt-get install -y slurmctld slurmd slurm-client munge)")
    if os.geteuid() != 0:
        pytest.skip("tests/slurm/start_cluster.sh runs slurmd, which needs root")
    directory = str(tmp_path_factory.mktemp("slurm"))
    script = os.path.join(REPO, "tests", "slurm", "start_cluster.sh")
    subprocess.run([script, directory], check=True, timeout=120)
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = os.path.join(directory, "slurm.conf")
    try:
        yield directory
    finally:
        subprocess.run([script, "--stop", directory], check=False, timeout=120)
        if previous is None:
            del os.environ["SLURM_CONF"]
        else:
            os.environ["SLURM_CONF"] = previous


def _queue_state(job: str) -> str:
    out = subprocess.run(["squeue", "--noheader", "--array", "--states=all", "--format=%T",
                          f"--jobs={job}"], capture_output=True, text=True, check=False).stdout
    return out.strip()


def _until(condition, what: str, timeout: float = 900.0, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every)
    return value


def _results(path: str) -> dict:
    with open(path) as f:
        return {r["member"]: r for r in json.load(f)["runs"]}


@pytest.mark.slow
def test_micro_suite_as_a_slurm_array_equals_the_local_run(cluster, data_dir, tmp_path):
    suite = micro_suite(data_dir, names=("dense", "switch"))
    resources = slurm.SlurmConfig(time="30", cpus_per_task=1)
    paths = {"workdir_root": str(tmp_path / "slurm_runs"),
             "results_dir": str(tmp_path / "slurm_results")}
    lines: list[str] = []
    path = sweep.run_suite(suite, "tiny", seeds=1, launcher="slurm", slurm=resources,
                         log=lines.append, **paths)
    assert any(line.startswith("submitted 2 runs as job array") for line in lines), lines
    states = _states(suite, paths, sys.executable)
    assert {state for state, _ in states.values()} <= {"pending", "running", "finished"}
    runs_dir = os.path.join(paths["workdir_root"], "tiny")
    jobs = {n: slurm_status.read_job(os.path.join(runs_dir, f"{n}_s0"))["job_id"]
            for n in ("dense", "switch")}
    assert all(f"job {jobs[n]} (" in states[n][1] for n in jobs
               if states[n][0] in ("pending", "running"))
    # The same suite run here, while the array runs.
    local = sweep.run_suite(suite, "tiny", seeds=1, log=lambda _: None,
                          workdir_root=str(tmp_path / "local_runs"),
                          results_dir=str(tmp_path / "local_results"))
    slurm.wait(suite.expand("tiny", 1), paths["workdir_root"], poll_seconds=2,
               log=lambda _: None)
    states = _states(suite, paths, sys.executable)
    assert states == {"dense": ("finished", "in the results file"),
                      "switch": ("finished", "in the results file")}
    # The run directories are complete before SLURM has closed the jobs (COMPLETING, under load).
    _until(lambda: all(_queue_state(job) == "COMPLETED" for job in jobs.values()),
           "the array's jobs to be COMPLETED", timeout=300)
    ours, theirs = _results(path), _results(local)
    for member in ("dense", "switch"):
        assert ours[member]["status"] == theirs[member]["status"] == "finished"
        assert ours[member]["summary"]["eval_loss"] == pytest.approx(
            theirs[member]["summary"]["eval_loss"], rel=1e-6)
        assert [h["train/loss"] for h in ours[member]["history"] if "train/loss" in h] == \
            pytest.approx([h["train/loss"] for h in theirs[member]["history"]
                           if "train/loss" in h], rel=1e-6)


@pytest.mark.slow
def test_a_cancelled_member_is_reported_failed_and_resubmitted(cluster, data_dir, tmp_path):
    suite = micro_suite(data_dir, names=("dense",))
    paths = {"workdir_root": str(tmp_path / "runs"), "results_dir": str(tmp_path / "results")}
    with pytest.raises(slurm.SlurmError, match=r"(?s)Invalid partition name.*--slurm\.partition"):
        sweep.run_suite(suite, "tiny", seeds=1, launcher="slurm", log=lambda _: None,
                      slurm=slurm.SlurmConfig(partition="gpu"), **paths)
    assert not os.path.exists(os.path.join(paths["workdir_root"], "tiny", "dense_s0"))
    resources = slurm.SlurmConfig(time="30", cpus_per_task=1)
    sweep.run_suite(suite, "tiny", seeds=1, launcher="slurm", slurm=resources,
                  log=lambda _: None, **paths)
    workdir = os.path.join(paths["workdir_root"], "tiny", "dense_s0")
    job = slurm_status.read_job(workdir)["job_id"]
    _until(lambda: _queue_state(job) == "RUNNING", "the job to start")
    assert _states(suite, paths, sys.executable)["dense"][0] == "running"
    subprocess.run(["scancel", job], check=True)
    _until(lambda: _queue_state(job) == "CANCELLED", "the job to end")
    state, detail = _states(suite, paths, sys.executable)["dense"]
    assert state == "failed" and detail.startswith(f"job {job} ended CANCELLED: ")
    assert "(log: " in detail
    lines: list[str] = []
    path = sweep.run_suite(suite, "tiny", seeds=1, launcher="slurm", slurm=resources, wait=True,
                         poll_seconds=2, log=lines.append, **paths)
    assert any(line.startswith(f"submitted 1 run as job {slurm_status.read_job(workdir)['job_id']}")
               for line in lines), lines
    assert slurm_status.read_job(workdir)["job_id"] != job
    assert _results(path)["dense"]["status"] == "finished"


def _multihost_reference(data_dir: str, tmp_path) -> tuple[list[float], float]:
    from multihost_worker import CONFIG, SETTINGS

    from moe_jax import schema
    from moe_jax.train import loop
    from moe_jax.train.metrics import read_metrics

    workdir = str(tmp_path / "one_process")
    summary = loop.train_and_evaluate(schema.override(schema.load_config(CONFIG), {
        **SETTINGS, "data.data_dir": data_dir, "train.checkpoint_every": 0}), workdir)
    metrics = read_metrics(workdir)
    return [metrics[s]["train/loss"] for s in range(1, SETTINGS["train.num_train_steps"] + 1)], \
        summary["eval_loss"]


MULTIHOST_MESH = {"mesh.data": 1, "mesh.expert": -1, "mesh.expert_parallel": "explicit"}


@pytest.mark.slow
def test_two_slurm_tasks_train_the_tiny_moe_like_one_process(cluster, data_dir, tmp_path,
                                                             monkeypatch):
    from multihost_worker import CONFIG, SETTINGS, as_flags

    from moe_jax.train.metrics import read_metrics

    losses, eval_loss = _multihost_reference(data_dir, tmp_path)
    # Two processes of 4 CPU devices each; the 8 experts spread over both (all-to-all across
    # processes), jax.distributed initialised from SLURM's environment by scripts/train.sbatch.
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
    monkeypatch.setenv("PYTHON", sys.executable)
    # No persistent cache (tests/conftest.py's): JAX writes it from process 0 only, so with a
    # warm cache process 0 skips compiling while process 1 compiles, and waits for it at the
    # first collective longer than gloo's 30 s rendezvous allows on a loaded machine.
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
    workdir = str(tmp_path / "two_tasks")
    log = str(tmp_path / "job.out")
    settings = {**SETTINGS, **MULTIHOST_MESH, "data.data_dir": data_dir,
                "train.checkpoint_every": 0}
    submitted = subprocess.run(
        ["sbatch", "--ntasks=2", "--cpus-per-task=1", f"--output={log}",
         os.path.join(REPO, "scripts", "train.sbatch"), f"--config={CONFIG}",
         f"--workdir={workdir}", *as_flags(settings)],
        cwd=REPO, capture_output=True, text=True, check=True).stdout
    job = submitted.split()[-1]
    state = _until(lambda: (s := _queue_state(job)) not in ("PENDING", "RUNNING", "COMPLETING",
                                                            "CONFIGURING", "") and s,
                   "the 2-task job")
    with open(log) as f:
        output = f.read()
    assert state == "COMPLETED", output[-4000:]
    assert "2 process(es)" in output and "results in" in output
    metrics = read_metrics(workdir)
    np_losses = [metrics[s]["train/loss"] for s in range(1, SETTINGS["train.num_train_steps"] + 1)]
    assert np_losses == pytest.approx(losses, rel=1e-4)
    # The same through the suite runner: one run as 2 tasks of one array task.
    member = Member("moe", CONFIG.removeprefix("configs/"), {**settings}, {})
    suite = Suite(name="micro", title="micro", references=(), claims=(),
                  members=lambda scale: (member,), train={"tiny": {}})
    path = sweep.run_suite(suite, "tiny", seeds=1, launcher="slurm", wait=True, poll_seconds=2,
                         slurm=slurm.SlurmConfig(time="30", tasks_per_node=2, cpus_per_task=1),
                         workdir_root=str(tmp_path / "runs"),
                         results_dir=str(tmp_path / "results"), log=lambda _: None)
    entry = _results(path)["moe"]
    assert entry["status"] == "finished", entry["error"]
    assert entry["summary"]["eval_loss"] == pytest.approx(eval_loss, rel=1e-4)
    assert os.path.exists(os.path.join(tmp_path, "runs", "tiny", "moe_s0", "run.1.log"))


@pytest.mark.slow
def test_a_requeued_job_takes_over_the_lock_of_its_killed_first_copy(cluster, data_dir,
                                                                     tmp_path, monkeypatch):
    from multihost_worker import CONFIG, SETTINGS, as_flags

    monkeypatch.setenv("PYTHON", sys.executable)
    workdir = str(tmp_path / "run")
    log = str(tmp_path / "job.out")
    steps = 3000
    submitted = subprocess.run(
        ["sbatch", "--ntasks=1", f"--output={log}", os.path.join(REPO, "scripts", "train.sbatch"),
         f"--config={CONFIG}", f"--workdir={workdir}",
         *as_flags({**SETTINGS, "data.data_dir": data_dir, "train.num_train_steps": steps,
                    "train.checkpoint_every": 50, "train.log_every": 10})],
        cwd=REPO, capture_output=True, text=True, check=True).stdout
    job = submitted.split()[-1]
    # Requeued (SLURM kills the job, so its lock stays behind) once a checkpoint exists.
    _until(lambda: os.path.exists(os.path.join(workdir, "checkpoints", "50")), "a checkpoint",
           every=0.2)
    assert os.path.exists(os.path.join(workdir, "writer.lock"))
    subprocess.run(["scontrol", "requeue", job], check=True)
    state = _until(lambda: (s := _queue_state(job)) in ("COMPLETED", "FAILED", "CANCELLED")
                   and s, "the requeued job", every=2)
    with open(log) as f:
        output = f.read()
    assert state == "COMPLETED", output[-4000:]
    assert "(restart 1)" in output
    assert "taking over the lock of" in output and "that process is gone" in output
    with open(os.path.join(workdir, "summary.json")) as f:
        assert json.load(f)["steps"] == steps
    assert not os.path.exists(os.path.join(workdir, "writer.lock"))
    with open(os.path.join(workdir, "metrics.jsonl")) as f:  # resumed, not restarted
        logged = [json.loads(line)["step"] for line in f if '"train/loss"' in line]
    assert logged.count(10) == 1 and logged[-1] == steps
