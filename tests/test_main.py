"""The command line: `--config.x.y=...` overrides reach the run, bad ones fail clearly, and the
no-argument main job prints its side-by-side table. Model shapes match tests/test_train.py, so
the compilations are shared through the persistent cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import pytest

from moe_jax import main

TINY_FLAGS = [
    "--config.model.d_model=32", "--config.model.num_layers=2", "--config.model.num_heads=2",
    "--config.model.d_ff=64", "--config.model.max_seq_len=32", "--config.model.moe_every=2",
    "--config.moe.num_experts=4", "--config.moe.top_k=2", "--config.moe.router=sigmoid_bias",
    "--config.moe.d_ff=64", "--config.moe.bias_update_rate=0.01", "--config.moe.group_size=32",
    "--config.train.batch_size=4", "--config.train.warmup_steps=1",
    "--config.train.learning_rate=0.01", "--config.train.log_every=1",
    "--config.train.eval_every=0", "--config.train.checkpoint_every=4",
    "--config.train.progress_bar=False", "--config.data.name=embedded_tiny",
]


def test_config_overrides_reach_the_run(data_dir, tmp_path, capsys):
    workdir = str(tmp_path / "run")
    rows = main.run_from_argv([
        "moe_jax.main", "--config=configs/dense.py:tiny", f"--workdir={workdir}", *TINY_FLAGS,
        f"--config.data.data_dir={data_dir}", "--config.train.num_train_steps=3",
        "--config.seed=7"])
    (name, spec, summary), = rows
    assert (name, spec) == ("run", "configs/dense.py:tiny")
    with open(os.path.join(workdir, "config.json")) as f:
        written = json.load(f)
    assert written["model"]["d_model"] == 32
    assert written["moe"]["router"] == "sigmoid_bias"
    assert written["train"]["num_train_steps"] == 3
    assert written["seed"] == 7
    assert summary["steps"] == 3 and summary["seed"] == 7
    with open(os.path.join(workdir, "summary.json")) as f:
        assert json.load(f)["steps"] == 3
    table = capsys.readouterr().out
    assert "| val loss |" in table and "configs/dense.py:tiny" in table


def test_an_invalid_override_names_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"config\.train\.optimizer='sgd'"):
        main.run_from_argv(["moe_jax.main", "--config=configs/dense.py:tiny",
                            f"--workdir={tmp_path}", "--config.train.optimizer=sgd"])
    assert not os.path.exists(os.path.join(tmp_path, "config.json"))


def test_default_workdir_names_the_config():
    assert main.default_workdir("configs/switch.py:e16") == os.path.join("runs", "switch_e16")
    assert main.default_workdir("/x/dense.py") == os.path.join("runs", "dense")


def test_main_job_prints_dense_and_switch_side_by_side(data_dir, tmp_path, capsys):
    """The no-argument job's code path with tiny shapes and 2 steps (the real one is timed in
    docs/training.md)."""
    settings = {**main.MAIN_JOB_SETTINGS, "model.d_model": 32, "model.num_layers": 2,
                "model.num_heads": 2, "model.d_ff": 64, "model.max_seq_len": 32, "moe.d_ff": 64,
                "train.batch_size": 4, "train.num_train_steps": 2, "train.warmup_steps": 1,
                "train.eval_every": 0, "train.progress_bar": False,
                "data.name": "embedded_tiny", "data.data_dir": data_dir, "data.eval_batches": 2}
    rows = main.run_main_job(str(tmp_path), settings)
    assert [name for name, _, _ in rows] == ["dense", "switch"]
    dense, switch = rows[0][2], rows[1][2]
    assert dense["params_active"] == dense["params_total"]
    assert switch["params_total"] > switch["params_active"]
    out = capsys.readouterr().out
    assert "| dense " in out and "| switch " in out and "bits/byte" in out
    for name in ("dense", "switch"):
        assert os.path.exists(os.path.join(tmp_path, name, "summary.json"))


@pytest.mark.slow
def test_python_dash_m_runs_and_resumes(data_dir, tmp_path):
    """The real command line in a subprocess; the second call finds the run finished."""
    workdir = str(tmp_path / "cli")
    command = [sys.executable, "-m", "moe_jax.main", "--config=configs/dense.py:tiny",
               f"--workdir={workdir}", *TINY_FLAGS, f"--config.data.data_dir={data_dir}",
               "--config.train.num_train_steps=2"]
    for _ in range(2):
        result = subprocess.run(command, capture_output=True, text=True, check=True)
        assert "| val loss |" in result.stdout
    with open(os.path.join(workdir, "summary.json")) as f:
        assert json.load(f)["steps"] == 2


def test_sample_restores_a_trained_run_and_prints_its_text(data_dir, tmp_path, capsys):
    """`python -m moe_jax.sample`'s code path on a 3-step run (the config of the override test,
    so the training compilations are shared): restore_run rebuilds the config and state, and
    the continuation of each prompt is printed with the speed and the experts chosen."""
    from moe_jax import sample
    from moe_jax.models.sampling import SamplingConfig
    from moe_jax.train.restore import restore_run

    workdir = str(tmp_path / "run")
    (_, _, summary), = main.run_from_argv([
        "moe_jax.main", "--config=configs/dense.py:tiny", f"--workdir={workdir}", *TINY_FLAGS,
        f"--config.data.data_dir={data_dir}", "--config.train.num_train_steps=3",
        "--config.seed=7"])
    run = restore_run(workdir)
    assert run.step == 3 and run.experiment.seed == 7
    assert sum(x.size for x in jax.tree.leaves(run.params)) == summary["params_total"]
    assert "moe_state" in run.model_state  # the sigmoid_bias router's bias comes back too
    texts = sample.run(workdir, ["ab", "x"], max_new_tokens=5,
                       sampling=SamplingConfig(temperature=0.8), seed=0)
    assert texts[0].startswith("ab") and texts[1].startswith("x")
    out = capsys.readouterr().out
    assert "tokens/s" in out and "block 1 experts chosen by the new tokens" in out
