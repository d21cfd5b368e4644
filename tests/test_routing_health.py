"""Routing health in real (tiny) training runs: the monitor's alarms provoked by no balance loss
with a high learning rate (collapse), capacity 0.25 (drops) and a scaled-up router init
(instability), a healthy run that raises none, the routing profiles saved at every evaluation,
`python -m moe_jax.train.routing_report` on them and on labelled documents of the user's, and a
fine-tuning run started from another run's weights (`init.checkpoint`) with a frozen router,
expert dropout and one training domain.

All runs share one model shape (4 experts, top-1, block 1 sparse) on the tiny corpus.
"""

from __future__ import annotations

import glob
import json
import os
import pathlib

import jax
import numpy as np
import pytest

from moe_jax import schema
from moe_jax.models import Transformer
from moe_jax.train import checkpoint, loop, monitor, optim, profiles, reevaluate, routing_report
from moe_jax.train.metrics import read_metrics
from moe_jax.train.state import init_train_state

TINY = {
    "model.d_model": 32, "model.num_layers": 2, "model.num_heads": 2, "model.d_ff": 64,
    "model.max_seq_len": 32, "model.moe_every": 2,
    "moe.num_experts": 4, "moe.top_k": 1, "moe.d_ff": 64,
    "train.batch_size": 4, "train.num_train_steps": 8, "train.warmup_steps": 1,
    "train.learning_rate": 1e-2, "train.log_every": 1, "train.eval_every": 4,
    "train.checkpoint_every": 4, "train.progress_bar": False,
    "data.name": "embedded_tiny", "monitor.grace_steps": 0,
}
ORBAX_LEFTOVERS = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def settings(data_dir: str, **changes) -> dict:
    return {**TINY, "data.data_dir": data_dir, **changes}


def train(data_dir: str, workdir, **changes) -> dict:
    config = schema.override(schema.base_config(), settings(data_dir, **changes))
    return loop.train_and_evaluate(config, str(workdir))


def alarms(workdir) -> list[tuple]:
    return [(a["kind"], a["step"], a["layer"], a["expert"])
            for a in monitor.read_alerts(str(workdir))]


@pytest.fixture(scope="module")
def healthy(data_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("healthy")
    train(data_dir, workdir)
    return str(workdir)


def test_a_healthy_run_raises_no_alarm_and_logs_every_layer(healthy):
    assert alarms(healthy) == [] and not os.path.exists(os.path.join(healthy, "alerts.jsonl"))
    logged = read_metrics(healthy)
    assert len(logged[8]["train/layer_1/assignment_fraction"]) == 4
    for name in ("dropped_fraction", "max_router_logit", "router_z_loss", "router_entropy"):
        assert isinstance(logged[8][f"train/layer_1/{name}"], float), name
    # the mean over layers is still logged as it was (one sparse layer: the same number)
    assert logged[8]["train/max_router_logit"] == logged[8]["train/layer_1/max_router_logit"]


def test_no_balance_loss_and_a_high_learning_rate_collapse_experts(data_dir, tmp_path):
    # MaxVio <= E - 1 = 3 with 4 experts: the default bound (3) cannot fire, 1.5 can.
    train(data_dir, tmp_path, **{"moe.load_balance_coef": 0.0, "train.learning_rate": 0.1,
                                 "train.num_train_steps": 12, "train.eval_every": 0,
                                 "train.checkpoint_every": 0, "monitor.max_violation": 1.5})
    found = alarms(tmp_path)
    assert {kind for kind, *_ in found} == {"collapse", "imbalance"}, found
    assert all(layer == 1 and expert is not None for _, _, layer, expert in found)
    assert min(step for _, step, *_ in found) >= 3  # patience: 3 consecutive logs


@ORBAX_LEFTOVERS
def test_capacity_and_router_init_raise_drops_and_instability_and_stop(data_dir, tmp_path):
    with pytest.raises(monitor.RoutingAlarmError) as error:
        train(data_dir, tmp_path, **{"moe.capacity_factor": 0.25, "moe.init_scale": 1e4,
                                     "monitor.stop_on": ("drops",),
                                     "train.checkpoint_every": 2})
    message = str(error.value)
    for part in ("[drops] at step 3", "layer 1", "> 0.5 for 3 consecutive logs",
                 "stop_on lists 'drops'", "last good checkpoint is step 2"):
        assert part in message, message
    found = alarms(tmp_path)
    assert ("instability", 1, 1, None) in found and ("drops", 3, 1, None) in found, found
    assert checkpoint.Checkpoints(str(tmp_path / "checkpoints"), max_to_keep=2).all_steps() == [2]
    events = b"".join(pathlib.Path(f).read_bytes()
                      for f in glob.glob(str(tmp_path / "tensorboard" / "*")))
    assert b"alerts/drops" in events and b"alerts/instability" in events

    # Resumed from step 2 without stop_on: the history continues (drops still fires at step 3,
    # not 3 logs later) and the alarms of the re-run step 3 are not written twice.
    train(data_dir, tmp_path, **{"moe.capacity_factor": 0.25, "moe.init_scale": 1e4,
                                 "train.checkpoint_every": 2})
    resumed = alarms(tmp_path)
    assert resumed[:len(found)] == found, resumed
    assert [a for a in resumed if a[0] == "drops"] == [("drops", 3, 1, None)], resumed


def test_every_evaluation_saves_a_routing_profile(healthy):
    assert profiles.steps(healthy) == [4, 8]
    p = profiles.load(healthy, 8)
    assert p["layers"] == [1] and p["domains"] == ["code", "prose", "math"]
    for entry in p["per_layer"]["1"].values():
        assert sum(entry["share"]) == pytest.approx(1.0)
        assert sum(entry["load"]) == pytest.approx(1.0 - entry["dropped"])
        assert sum(entry["top1_gate"]) == pytest.approx(1.0)
    # the saved profile is the one the checkpoint gives again
    metrics, again = reevaluate.evaluate_checkpoint(healthy)
    for domain, entry in p["per_layer"]["1"].items():
        assert again["per_layer"]["1"][domain]["share"] == pytest.approx(entry["share"])
        assert again["per_layer"]["1"][domain]["entropy"] == pytest.approx(entry["entropy"])
    summary = json.loads(pathlib.Path(healthy, "summary.json").read_text())
    assert metrics["loss"] == pytest.approx(summary["eval_loss"])


def test_routing_report_on_a_run(healthy, tmp_path, capsys):
    result = routing_report.main([f"--workdir={healthy}", f"--out={tmp_path}"])
    text = capsys.readouterr().out
    assert "== drift from step 4 to step 8" in text and "layer 1:" in text, text
    assert result["drift"]["1"]["verdict"] in ("stable", "drifting", "shifted")
    assert (tmp_path / "routing_report.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "routing_report.json").read_text())
    assert saved["drift"]["1"]["js"] == pytest.approx(result["drift"]["1"]["js"])
    with pytest.raises(SystemExit, match="either --compare=B or --steps"):
        routing_report.main([f"--workdir={healthy}", "--steps=4,8", f"--compare={healthy}"])
    with pytest.raises(SystemExit, match="no saved routing profile of step 5"):
        routing_report.main([f"--workdir={healthy}", "--steps=4,5", f"--out={tmp_path}"])


def test_routing_report_on_your_own_labelled_documents(healthy, tmp_path, capsys):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": text * 8, "domain": domain}) + "\n" for text, domain
                            in (("def f(x):\n    return x\n", "python"),
                                ("Dear Sir, thank you. ", "letters"))))
    result = routing_report.main([f"--workdir={healthy}", "--steps=4,8",
                                  f"--eval_data={docs}", f"--out={tmp_path / 'report'}"])
    text = capsys.readouterr().out
    assert [p["profile"]["domains"] for p in result["profiles"]] == [["python", "letters"]] * 2
    assert "python-letters" in text and "by domain python" in text, text
    assert [p["step"] for p in result["profiles"]] == [4, 8]
    assert all(p["profile"]["per_layer"]["1"][d]["tokens"] > 0
               for p in result["profiles"] for d in ("python", "letters"))


@ORBAX_LEFTOVERS
def test_finetuning_from_another_run_with_a_frozen_router(healthy, data_dir, tmp_path, capsys,
                                                         monkeypatch):
    workdir = tmp_path / "finetuned"
    monkeypatch.chdir(os.path.dirname(healthy))  # init.checkpoint relative to the working directory
    summary = train(data_dir, workdir, **{
        "init.checkpoint": os.path.basename(healthy), "train.freeze_router": True,
        "moe.expert_dropout": 0.4,
        "model.dropout_rate": 0.1, "data.train_domains": "math", "train.num_train_steps": 4,
        "train.eval_every": 0, "train.checkpoint_every": 0})
    assert summary["steps"] == 4 and sorted(read_metrics(str(workdir))) == [1, 2, 3, 4]

    start = _params(healthy)
    end = _params(str(workdir))
    np.testing.assert_array_equal(end["block_1"]["moe"]["router"]["kernel"],
                                  start["block_1"]["moe"]["router"]["kernel"])
    assert not np.allclose(end["block_1"]["moe"]["experts"]["wi"],
                           start["block_1"]["moe"]["experts"]["wi"])
    result = routing_report.main([f"--workdir={workdir}", f"--compare={healthy}",
                                  f"--out={tmp_path / 'report'}"])
    assert f"== drift from {healthy} to {workdir}" in capsys.readouterr().out
    assert set(result["drift"]) == {"1"}


def _params(workdir: str) -> dict:
    """The parameters of a run's latest checkpoint (numpy)."""
    experiment = reevaluate.run_experiment(workdir)
    model = Transformer(experiment.model, experiment.moe)
    abstract = jax.eval_shape(lambda k: init_train_state(
        k, model, optim.make_optimizer(experiment.train), seq_len=32), jax.random.key(0))
    weights, _ = checkpoint.read_weights(workdir, abstract)
    return jax.tree.map(np.asarray, weights["params"])


@ORBAX_LEFTOVERS
def test_init_checkpoint_errors_name_the_directory(healthy, data_dir, tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint in"):
        train(data_dir, tmp_path / "a", **{"init.checkpoint": str(tmp_path / "nowhere")})
    with pytest.raises(ValueError, match="its parameters do not match this run's model config"):
        train(data_dir, tmp_path / "b", **{"init.checkpoint": healthy, "moe.d_ff": 32})
