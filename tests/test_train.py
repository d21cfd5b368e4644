"""Training loop tests on one tiny model shape (a sigmoid_bias top-2 MoE in block 1) and the tiny
embedded corpus: loss goes down, files are written, kill-and-resume is exact, a corrupt
checkpoint is reported and kept, NaN stops the run, the router bias is state, not a parameter.

Every loop run shares the model and batch shapes, so XLA compiles them once (the persistent
compilation cache in conftest.py serves later runs).
"""

from __future__ import annotations

import gc
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moe_jax import routing, schema
from moe_jax.config import MoeConfig
from moe_jax.data import corpus
from moe_jax.main import apply_settings
from moe_jax.models import Transformer
from moe_jax.train import evaluate, inputs, loop, optim, step
from moe_jax.train import state as state_lib
from moe_jax.train.checkpoint import CheckpointError
from moe_jax.train.config import TrainConfig
from moe_jax.train.metrics import read_metrics
from moe_jax.train.state import init_train_state

STEPS, CHECKPOINT_EVERY = 8, 4
TINY = {
    "model.d_model": 32, "model.num_layers": 2, "model.num_heads": 2, "model.d_ff": 64,
    "model.max_seq_len": 32, "model.moe_every": 2,
    "moe.num_experts": 4, "moe.top_k": 2, "moe.router": "sigmoid_bias", "moe.d_ff": 64,
    "moe.activation": "gelu", "moe.bias_update_rate": 0.01, "moe.group_size": 32,
    "train.batch_size": 4, "train.num_train_steps": STEPS, "train.warmup_steps": 1,
    "train.learning_rate": 1e-2, "train.log_every": 1, "train.eval_every": 0,
    "train.checkpoint_every": CHECKPOINT_EVERY, "train.progress_bar": False,
    "data.name": "embedded_tiny",  # the whole validation split (~8k tokens, all domains)
}
# A failed orbax restore leaves its reads' coroutines behind; they are reported when collected.
ORBAX_LEFTOVERS = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(scope="module")
def config(data_dir):
    return apply_settings(schema.base_config(), {**TINY, "data.data_dir": data_dir})


@pytest.fixture(scope="module")
def finished_run(config, tmp_path_factory):
    """An uninterrupted run of STEPS steps: (workdir, summary)."""
    workdir = str(tmp_path_factory.mktemp("run"))
    return workdir, loop.train_and_evaluate(config, workdir)


def _train_losses(workdir: str) -> list[float]:
    logged = read_metrics(workdir)
    return [logged[s]["train/loss"] for s in range(1, STEPS + 1)]


def _interrupt_train_iterator(monkeypatch, *, at_batch: int, error: BaseException | None = None,
                              nan_weights: bool = False) -> None:
    """Makes the training iterator fail (or return NaN weights) at its `at_batch`-th batch."""
    make_inputs = inputs.make_inputs

    def patched(*args, **kwargs):
        made = make_inputs(*args, **kwargs)
        real = made.train
        calls = {"n": 0}

        class Wrapped:
            def __next__(self):
                calls["n"] += 1
                batch = next(real)
                if calls["n"] == at_batch:
                    if error is not None:
                        raise error
                    if nan_weights:
                        batch = {**batch, "weights": batch["weights"].copy()}
                        batch["weights"][0, 0] = np.nan
                return batch

            def get_state(self):
                return real.get_state()

            def set_state(self, state):
                real.set_state(state)

        made.train = Wrapped()
        return made

    monkeypatch.setattr(inputs, "make_inputs", patched)


# --- the loop ------------------------------------------------------------------------------------


def test_a_few_train_steps_lower_the_loss(finished_run):
    workdir, summary = finished_run
    losses = _train_losses(workdir)
    assert all(math.isfinite(x) for x in losses)
    assert np.mean(losses[-3:]) < losses[0] - 0.5, losses
    assert summary["eval_loss"] < losses[0]


def test_run_writes_config_metrics_tensorboard_and_summary(finished_run, config):
    workdir, summary = finished_run
    with open(os.path.join(workdir, "config.json")) as f:
        written = json.load(f)
    assert written["moe"]["router"] == "sigmoid_bias"
    assert written["train"]["num_train_steps"] == STEPS

    with open(os.path.join(workdir, "summary.json")) as f:
        on_disk = json.load(f)
    assert on_disk == json.loads(json.dumps(summary))
    assert summary["steps"] == STEPS
    assert summary["train_tokens"] == STEPS * 4 * 32
    # flops.count's parameter total agrees with the parameters actually created.
    assert summary["params_total"] == summary["params_in_state"]
    assert summary["params_active"] < summary["params_total"]
    assert summary["tokens_per_second"] > 0 and summary["wall_time_seconds"] > 0
    assert 0 < summary["eval_bits_per_byte"] < 8

    logged = read_metrics(workdir)
    assert sorted(s for s, m in logged.items() if "train/loss" in m) == list(range(1, STEPS + 1))
    final = logged[STEPS]
    assert final["eval/loss"] == pytest.approx(summary["eval_loss"])
    load = final["eval/layer_1/expert_load"]
    assert len(load) == 4
    assert sum(load) == pytest.approx(1 - final["eval/layer_1/dropped_fraction"], abs=1e-5)
    for name in ("load_cv", "router_entropy", "router_z_loss", "max_router_logit"):
        assert math.isfinite(final[f"eval/layer_1/{name}"])
    for domain in corpus.DOMAINS:
        assert sum(final[f"eval/domain/{domain}/layer_1/expert_share"]) == pytest.approx(1.0)
        assert math.isfinite(final[f"eval/domain/{domain}/bits_per_byte"])
    domain_tokens = sum(final[f"eval/domain/{d}/num_tokens"] for d in corpus.DOMAINS)
    assert domain_tokens == final["eval/num_tokens"]

    events = os.listdir(os.path.join(workdir, "tensorboard"))
    assert any(name.startswith("events.out.tfevents") for name in events)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "8"]


def test_killed_run_resumes_with_identical_losses(finished_run, config, tmp_path, monkeypatch):
    reference, _ = finished_run
    workdir = str(tmp_path / "killed")
    # Dies while fetching the batch of step 7: the last checkpoint is step 4.
    _interrupt_train_iterator(monkeypatch, at_batch=7, error=KeyboardInterrupt("killed"))
    with pytest.raises(KeyboardInterrupt):
        loop.train_and_evaluate(config, workdir)
    assert os.listdir(os.path.join(workdir, "checkpoints")) == ["4"]
    monkeypatch.undo()

    summary = loop.train_and_evaluate(config, workdir)
    assert summary["steps"] == STEPS
    np.testing.assert_array_equal(_train_losses(workdir), _train_losses(reference))
    with open(os.path.join(reference, "summary.json")) as f:
        assert summary["eval_loss"] == json.load(f)["eval_loss"]


def test_rerun_of_a_finished_run_evaluates_without_training(finished_run, config, tmp_path):
    workdir = str(tmp_path / "copy")
    shutil.copytree(finished_run[0], workdir)
    summary = loop.train_and_evaluate(config, workdir)
    assert summary["steps"] == STEPS
    assert summary["eval_loss"] == finished_run[1]["eval_loss"]
    assert summary["train_loss"] == finished_run[1]["train_loss"]
    # Nothing was trained in this process: the throughput is the one logged at the last step.
    assert summary["tokens_per_second"] == read_metrics(workdir)[STEPS]["train/tokens_per_second"]


def _snapshot(directory: str) -> dict[str, bytes]:
    files = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, directory)] = f.read()
    return files


@ORBAX_LEFTOVERS
def test_corrupt_checkpoint_error_names_step_and_directory_and_deletes_nothing(
        finished_run, config, tmp_path):
    workdir = str(tmp_path / "corrupt")
    shutil.copytree(finished_run[0], workdir)
    state_dir = os.path.join(workdir, "checkpoints", str(STEPS), "state")
    data_files = [os.path.join(root, name) for root, _, names in os.walk(state_dir)
                  for name in names]
    largest = max(data_files, key=os.path.getsize)
    with open(largest, "r+b") as f:  # a truncated copy
        f.truncate(16)
    before = _snapshot(workdir)

    with pytest.raises(CheckpointError) as error:
        loop.train_and_evaluate(config, workdir)
    message = str(error.value)
    assert f"step {STEPS}" in message
    assert os.path.join(workdir, "checkpoints", str(STEPS)) in message
    assert "Nothing was deleted" in message
    after = _snapshot(workdir)
    # config.json is rewritten at start (same content); everything else is untouched.
    assert after == before
    del error
    gc.collect()


@ORBAX_LEFTOVERS
@pytest.mark.parametrize("change, expected", [
    ({"model.d_ff": 48}, "different model/optimizer config"),
    ({"train.batch_size": 8}, "different input pipeline"),
])
def test_checkpoint_of_another_config_is_refused(finished_run, config, tmp_path, change,
                                                 expected):
    workdir = str(tmp_path / "other")
    shutil.copytree(finished_run[0], workdir)
    before = _snapshot(os.path.join(workdir, "checkpoints"))
    with pytest.raises(CheckpointError, match=expected) as error:
        loop.train_and_evaluate(apply_settings(config, change), workdir)
    assert os.path.join(workdir, "checkpoints", str(STEPS)) in str(error.value)
    assert _snapshot(os.path.join(workdir, "checkpoints")) == before
    del error
    gc.collect()


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(config, tmp_path,
                                                                    monkeypatch):
    workdir = str(tmp_path / "nan")
    # Losses are only checked at checkpoints (log_every is large): the NaN of step 6 must be
    # caught before step 8's checkpoint is written.
    nan_config = apply_settings(config, {"train.log_every": 100})
    _interrupt_train_iterator(monkeypatch, at_batch=6, nan_weights=True)
    with pytest.raises(loop.NonFiniteLossError, match="at step 6") as error:
        loop.train_and_evaluate(nan_config, workdir)
    assert "last good checkpoint is step 4" in str(error.value)
    assert os.listdir(os.path.join(workdir, "checkpoints")) == ["4"]
    assert not os.path.exists(os.path.join(workdir, "summary.json"))


@pytest.mark.slow
def test_sigkilled_subprocess_resumes_with_identical_losses(finished_run, config, tmp_path):
    """A real kill -9 at a random moment after the first checkpoint, then a restart."""
    workdir = str(tmp_path / "sigkill")
    slow = apply_settings(config, {"train.async_checkpointing": True})
    script = (f"import json, ml_collections; from moe_jax.train import loop; "
              f"loop.train_and_evaluate(ml_collections.ConfigDict(json.loads({slow.to_json()!r})),"
              f" {workdir!r})")
    env = dict(os.environ)
    process = subprocess.Popen([sys.executable, "-c", script], env=env)
    checkpoints = os.path.join(workdir, "checkpoints")
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if os.path.isdir(os.path.join(checkpoints, str(CHECKPOINT_EVERY))):
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    subprocess.run([sys.executable, "-c", script], env=env, check=True)
    np.testing.assert_array_equal(_train_losses(workdir), _train_losses(finished_run[0]))


# --- the step ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def parts(config):
    experiment = schema.parse_config(config)
    model = Transformer(experiment.model, experiment.moe)
    optimizer = optim.make_optimizer(experiment.train)
    state = jax.jit(lambda k: init_train_state(k, model, optimizer, seq_len=32))(
        jax.random.key(0))
    batch = next(inputs.make_inputs(experiment.data, experiment.model, batch_size=4, seq_len=32,
                                    seed=0).train)
    return experiment, model, optimizer, state, batch


def test_sigmoid_bias_is_moved_by_the_step_not_by_the_optimizer(parts):
    experiment, model, optimizer, state, batch = parts
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(
        (state.params, state.opt_state))]
    assert not any("score_bias" in p for p in paths)  # neither a parameter nor optimizer state

    _, aux = jax.jit(lambda s, b: model.apply(
        {"params": s.params, **s.model_state}, b["inputs"], segment_ids=b["segment_ids"],
        positions=b["positions"], train=True))(state, batch)
    # The loop's exact step (schedule metric, donated state), so its compilation is reused.
    train_step = jax.jit(step.make_train_step(
        model, optimizer, experiment.model, experiment.moe,
        schedule=optim.learning_rate_schedule(experiment.train)), donate_argnums=0)
    old_bias = np.asarray(state.model_state["moe_state"]["block_1"]["moe"]["score_bias"])
    new_state, _ = train_step(jax.tree.map(jnp.copy, state), batch)
    new_bias = new_state.model_state["moe_state"]["block_1"]["moe"]["score_bias"]
    expected = routing.update_score_bias(old_bias, aux["assignment_fraction"][0],
                                         experiment.moe.bias_update_rate)
    np.testing.assert_allclose(new_bias, expected, atol=1e-7)
    assert np.any(np.asarray(new_bias) != 0)


def test_gradient_accumulation_matches_the_full_batch(parts):
    experiment, model, _, state, batch = parts
    # AdamW's first step is ~sign(grad), which hides gradient errors: compare with SGD.
    sgd = optax.sgd(1.0)
    sgd_state = state.replace(opt_state=sgd.init(state.params))
    results = []
    for accum in (1, 2):
        fn = step.make_train_step(model, sgd, experiment.model, experiment.moe,
                                  grad_accum_steps=accum)
        results.append(jax.jit(fn)(sgd_state, batch))
    (full, full_metrics), (accum, accum_metrics) = results
    np.testing.assert_allclose(accum_metrics["cross_entropy"], full_metrics["cross_entropy"],
                               rtol=1e-5)
    np.testing.assert_allclose(accum_metrics["nll_sum"], full_metrics["nll_sum"], rtol=1e-5)
    # The attention and embedding gradients depend only on the cross-entropy (the aux losses
    # are per micro-batch): they must agree.
    for name in ("embedding", "block_0"):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6),
                     accum.params[name], full.params[name])


# --- optimiser and statistics -------------------------------------------------------------------


def test_schedules_warm_up_then_decay():
    base = TrainConfig(num_train_steps=100, warmup_steps=10, learning_rate=1.0, end_lr_ratio=0.1)
    cosine = optim.learning_rate_schedule(base)
    assert float(cosine(0)) == 0.0
    assert float(cosine(10)) == pytest.approx(1.0)
    assert float(cosine(100)) == pytest.approx(0.1)
    rsqrt = optim.learning_rate_schedule(base.replace(schedule="rsqrt"))
    assert float(rsqrt(5)) == pytest.approx(0.5)
    assert float(rsqrt(40)) == pytest.approx(math.sqrt(10 / 40))
    constant = optim.learning_rate_schedule(base.replace(schedule="constant"))
    assert float(constant(50)) == pytest.approx(1.0)


def test_weight_decay_skips_vectors_and_adafactor_steps():
    params = {"kernel": jnp.ones((4, 3)), "scale": jnp.ones((3,))}
    assert optim.weight_decay_mask(params) == {"kernel": True, "scale": False}
    config = TrainConfig(optimizer="adafactor", warmup_steps=0, learning_rate=0.1,
                         weight_decay=0.5, grad_clip_norm=0.0)
    optimizer = optim.make_optimizer(config)
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = optimizer.update(zero_grads, optimizer.init(params), params)
    # With zero gradients only the decoupled decay -lr * wd * p acts, on the matrix only.
    np.testing.assert_allclose(updates["kernel"], -0.1 * 0.5 * np.ones((4, 3)), rtol=1e-6)
    np.testing.assert_allclose(updates["scale"], np.zeros(3), atol=0)


def test_train_config_errors_name_the_field():
    with pytest.raises(ValueError, match="batch_size=6 is not a multiple of grad_accum_steps=4"):
        TrainConfig(batch_size=6, grad_accum_steps=4)
    with pytest.raises(ValueError, match=r"config\.train\.optimizer='sgd'"):
        apply_settings(schema.base_config(), {"train.optimizer": "sgd"})


def test_token_routing_shares_on_hand_made_logits():
    logits = jnp.log(jnp.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]]))
    top2 = MoeConfig(num_experts=3, top_k=2)
    share, entropy = evaluate.token_routing(logits, top2)
    np.testing.assert_allclose(share, [[0.5, 0.5, 0.0], [0.0, 0.5, 0.5]])
    np.testing.assert_allclose(entropy[0], -np.sum(np.array([0.7, 0.2, 0.1]) * np.log(
        [0.7, 0.2, 0.1])), rtol=1e-6)
    # sigmoid_bias: a large bias on expert 2 makes every token choose it.
    biased = top2.replace(router="sigmoid_bias", top_k=1)
    share, _ = evaluate.token_routing(logits, biased, jnp.array([0.0, 0.0, 5.0]))
    np.testing.assert_allclose(share, [[0, 0, 1], [0, 0, 1]])
    assert evaluate.coefficient_of_variation(np.array([0.25, 0.25, 0.25, 0.25])) == 0.0


def test_logical_axes_of_the_state_for_the_sharding_code(parts):
    _, model, *_ = parts
    axes = state_lib.logical_axes(model, seq_len=32)
    assert tuple(axes["params"]["block_1"]["moe"]["experts"]["wi"]) == ("expert", "embed", "mlp")
    assert tuple(axes["params"]["embedding"]) == ("vocab", "embed")
