"""Sparse upcycling: with identical experts and gates that sum to one the upcycled model
computes the dense model's function; noise and Drop-Upcycling's re-init change it by the
expected amount; mismatched checkpoints fail naming the parameters; runs start from
checkpoints at step 0 with a fresh optimizer (`init` config section)."""

from __future__ import annotations

import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import suites
from experiments.library.base import Member, Suite
from experiments.library.results import Results
from experiments.suites import upcycling as upcycling_suite
from moe_jax import MoeConfig, interop, schema
from moe_jax.interop import upcycle
from moe_jax.models import ModelConfig, Transformer, upcycling
from moe_jax.models.upcycling import expert_copies
from moe_jax.train import checkpoint, init_from

B, L = 2, 16
DENSE = ModelConfig(vocab_size=259, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    d_ff=64, activation="swiglu", max_seq_len=L)
SPARSE = DENSE.replace(moe_layers=(1,))
TOP2 = MoeConfig(num_experts=4, top_k=2, d_ff=64, activation="swiglu", renormalize_gates=True,
                 dispatch="dropless")
FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "hf")


@functools.cache
def _model(model: ModelConfig, moe: MoeConfig):
    transformer = Transformer(model, moe)
    init = jax.jit(lambda key: nn.meta.unbox(transformer.init(
        {"params": key}, jnp.zeros((1, L), jnp.int32), train=False))["params"])
    apply = jax.jit(lambda params, ids: transformer.apply({"params": params}, ids,
                                                          train=False)[0])
    return init, apply


def _inputs() -> jax.Array:
    return jax.random.randint(jax.random.key(3), (B, L), 3, 259, jnp.int32)


def _dense():
    init, apply = _model(DENSE, TOP2)
    params = init(jax.random.key(0))
    return params, apply(params, _inputs())


def _upcycled(moe: MoeConfig = TOP2, **kwargs):
    dense, _ = _dense()
    init, apply = _model(SPARSE, moe)
    params = upcycling.upcycle(dense, init(jax.random.key(1)), SPARSE, key=jax.random.key(2),
                               **kwargs)
    return params, apply(params, _inputs())


def test_upcycled_model_computes_the_dense_function():
    _, dense_logits = _dense()
    params, logits = _upcycled()
    np.testing.assert_allclose(logits, dense_logits, atol=2e-5, rtol=0)
    experts = params["block_1"]["moe"]["experts"]
    dense, _ = _dense()
    for name in ("wi", "wi_gate", "wo"):
        assert experts[name].shape[0] == TOP2.num_experts
        for e in range(TOP2.num_experts):
            np.testing.assert_array_equal(experts[name][e], dense["block_1"]["ffn"][name])
    assert "ffn" not in params["block_1"]
    np.testing.assert_array_equal(params["block_0"]["ffn"]["wi"], dense["block_0"]["ffn"]["wi"])


def test_gates_that_do_not_sum_to_one_change_the_function():
    _, dense_logits = _dense()
    _, logits = _upcycled(TOP2.replace(renormalize_gates=False))  # raw top-2 probabilities
    assert np.max(np.abs(np.asarray(logits) - np.asarray(dense_logits))) > 1e-2


def test_noise_perturbs_each_expert_by_its_relative_size_and_the_logits_linearly():
    dense, dense_logits = _dense()
    w = dense["block_1"]["ffn"]["wi"]
    noisy = expert_copies(dense["block_1"]["ffn"], 8, jax.random.key(5), noise=0.05)["wi"]
    for e in range(8):
        relative = float(jnp.std(noisy[e] - w) / jnp.std(w))
        assert 0.045 < relative < 0.055  # 2048 draws: the estimate is within ~2%
    assert float(jnp.min(jnp.std(noisy - noisy[0], axis=(1, 2))[1:])) > 0  # experts differ
    # first order in the noise: twice the noise, twice the change of the logits
    deltas = [np.abs(np.asarray(_upcycled(noise=s)[1]) - np.asarray(dense_logits)).mean()
              for s in (1e-3, 2e-3)]
    assert deltas[0] > 1e-5
    assert 1.9 < deltas[1] / deltas[0] < 2.1


def test_drop_upcycling_redraws_the_chosen_hidden_units():
    dense, _ = _dense()
    ffn = dense["block_1"]["ffn"]
    experts = expert_copies(ffn, 4, jax.random.key(7), reinit_fraction=0.5)
    f = ffn["wo"].shape[0]
    for e in range(4):
        changed_in = np.any(experts["wi"][e] != ffn["wi"], axis=0)  # [f]
        changed_gate = np.any(experts["wi_gate"][e] != ffn["wi_gate"], axis=0)
        changed_out = np.any(experts["wo"][e] != ffn["wo"], axis=1)
        assert changed_in.sum() == f // 2
        np.testing.assert_array_equal(changed_in, changed_gate)
        np.testing.assert_array_equal(changed_in, changed_out)
    redrawn = np.asarray(experts["wi"][0])[:, np.any(experts["wi"][0] != ffn["wi"], axis=0)]
    assert abs(redrawn.std() / float(jnp.std(ffn["wi"])) - 1) < 0.1
    chosen = [np.flatnonzero(np.any(experts["wo"][e] != ffn["wo"], axis=1)) for e in range(4)]
    assert any(not np.array_equal(chosen[0], c) for c in chosen[1:])  # per-expert choice


def test_a_mismatched_dense_checkpoint_is_refused_naming_the_parameters():
    dense, _ = _dense()
    init, _ = _model(SPARSE, TOP2.replace(d_ff=32))
    with pytest.raises(ValueError, match=r"block_1/ffn/wi: the checkpoint has shape \(32, 64\), "
                       r"this model expects \(32, 32\)"):
        upcycling.upcycle(dense, init(jax.random.key(1)), SPARSE, key=jax.random.key(2))
    with pytest.raises(ValueError, match=r"already sparse \(\['block_1'\]"):
        upcycling.upcycle(init(jax.random.key(1)), init(jax.random.key(1)), SPARSE,
                          key=jax.random.key(2))
    init3, _ = _model(DENSE.replace(num_layers=1, moe_layers=(0,)), TOP2)
    with pytest.raises(ValueError, match=r"no place for: .*block_1"):
        upcycling.upcycle(dense, init3(jax.random.key(1)), DENSE.replace(
            num_layers=1, moe_layers=(0,)), key=jax.random.key(2))


def test_upcycling_the_hf_llama_fixture_keeps_its_logits(tmp_path):
    """moe_jax.interop.upcycle from a Hugging Face directory: every block of the converted Llama
    becomes 4 experts, top-2 renormalised, and the logits stay transformers' logits."""
    config = interop.load(os.path.join(FIXTURES, "llama")).config
    config.model.moe_every = 1
    config.moe.update(dict(num_experts=4, top_k=2, renormalize_gates=True))
    out = str(tmp_path / "upcycled")
    written = upcycle.upcycle(os.path.join(FIXTURES, "llama"), config, out)
    assert written["sparse_layers"] == [0, 1]
    experiment = schema.parse_config(schema.load_config(written["config"]))
    assert experiment.init.checkpoint == os.path.abspath(out) and not experiment.init.upcycle
    variables = checkpoint.read_weights(out)[0]
    model = Transformer(experiment.model, experiment.moe)
    expected = np.load(os.path.join(FIXTURES, "llama", "expected.npz"))
    logits, _ = model.apply({"params": variables["params"]}, jnp.asarray(expected["input_ids"]),
                            train=False)
    np.testing.assert_allclose(logits, expected["logits"], atol=1e-4, rtol=0)
    with pytest.raises(FileExistsError):
        upcycle.upcycle(os.path.join(FIXTURES, "llama"), config, out)


def test_a_run_starts_from_a_checkpoint_with_the_checkpoint_parameters(tmp_path):
    """init.checkpoint (plain and upcycled): the parameters the loop starts from."""
    dense, _ = _dense()
    checkpoint.write_initial(str(tmp_path), {"params": jax.device_get(dense),
                                             "model_state": {}}, {"by": "test"})
    config = schema.base_config()
    config.model.update(dict(vars(DENSE)))
    config.moe.update(dict(vars(TOP2)))
    config.init.checkpoint = str(tmp_path)
    experiment = schema.parse_config(config)
    transformer = Transformer(experiment.model, experiment.moe)
    shapes = nn.meta.unbox(jax.eval_shape(lambda: transformer.init(
        {"params": jax.random.key(0)}, jnp.zeros((1, L), jnp.int32), train=False)))
    fresh = type("Fresh", (), {"params": shapes["params"], "model_state": {}})()
    loaded = init_from.initial_variables(experiment, fresh)
    jax.tree.map(np.testing.assert_array_equal, loaded["params"], dense)

    config.model.moe_layers = (1,)
    config.init.upcycle = True
    sparse = schema.parse_config(config)
    init, _ = _model(SPARSE, TOP2)
    fresh = type("Fresh", (), {"params": init(jax.random.key(1)), "model_state": {}})()
    upcycled = init_from.initial_variables(sparse, fresh)["params"]
    np.testing.assert_array_equal(upcycled["block_1"]["moe"]["experts"]["wo"][3],
                                  dense["block_1"]["ffn"]["wo"])
    np.testing.assert_array_equal(upcycled["block_1"]["moe"]["router"]["kernel"],
                                  fresh.params["block_1"]["moe"]["router"]["kernel"])

    config.model.d_ff = 32
    config.moe.d_ff = 32
    config.model.moe_layers = None
    config.init.upcycle = False
    with pytest.raises(ValueError, match=r"(?s)cannot start from .*block_0/ffn/wi"):
        small = schema.parse_config(config)
        shapes = nn.meta.unbox(jax.eval_shape(lambda: Transformer(small.model, small.moe).init(
            {"params": jax.random.key(0)}, jnp.zeros((1, L), jnp.int32), train=False)))
        init_from.initial_variables(small, type("Fresh", (), {"params": shapes["params"],
                                                              "model_state": {}})())


def test_init_config_is_validated():
    config = schema.base_config()
    config.init.upcycle = True
    with pytest.raises(ValueError, match=r"config\.init\.upcycle=True needs a dense checkpoint"):
        schema.parse_config(config)
    config.init.upcycle = False
    config.init.expert_noise = 0.1
    with pytest.raises(ValueError, match=r"config\.init\.expert_noise=0\.1 only applies"):
        schema.parse_config(config)


def test_suite_members_start_from_an_earlier_member_of_the_same_seed(tmp_path):
    suite = suites.get("upcycling")
    runs = {r.workdir_name: r for r in suite.expand("tiny", seeds=2)}
    workdir = str(tmp_path / "tiny" / "upcycled_x0.25_s1")
    flags = runs["upcycled_x0.25_s1"].flags(workdir)
    assert f"--config.init.checkpoint={tmp_path / 'tiny' / 'dense_s1'}" in flags
    assert "--config.init.upcycle=True" in flags
    assert not any("init.checkpoint" in f for f in runs["moe_scratch_x0.25_s1"].flags(workdir))
    assert runs["upcycled_x0.25_s0"].build_config().init.upcycle
    bad = Suite("bad", "bad", (), lambda scale: (Member("b", "dense.py:tiny", init_from="a"),
                                                 Member("a", "dense.py:tiny")),
                {"tiny": {"train.num_train_steps": 2}}, ())
    with pytest.raises(ValueError, match="'b' starts from 'a', which must be an earlier"):
        bad.expand("tiny", seeds=1)


def test_upcycling_suite_compute_is_matched():
    members = {m.name: m for m in suites.get("upcycling").member_list("tiny")}
    ratio = upcycling_suite.flop_ratio("tiny")
    assert 1.2 < ratio < 1.5  # two of four FFNs run two full-width experts
    dense_steps = members["dense"].overrides["train.num_train_steps"]
    for budget in upcycling_suite.BUDGETS:
        extra = budget * dense_steps
        cont = members[f"dense_cont_x{budget:g}"].overrides["train.num_train_steps"]
        up = members[f"upcycled_x{budget:g}"].overrides["train.num_train_steps"]
        scratch = members[f"moe_scratch_x{budget:g}"].overrides["train.num_train_steps"]
        assert cont == extra and abs(up * ratio - extra) <= ratio
        assert abs(scratch * ratio - (dense_steps + extra)) <= ratio


@pytest.mark.slow
def test_an_upcycled_run_starts_at_the_dense_function(tmp_path):
    """Through the runner: dense (3 steps), then from its checkpoint a dense continuation and
    an upcycled run. Both see the same first batch (same seed), so their first training
    cross-entropy (computed before the first update) is the same: the upcycled model starts as
    the dense function. Training in a converted/upcycled directory itself is refused."""
    from experiments.runner import sweep
    from moe_jax.data import corpus
    from moe_jax.train.metrics import read_metrics

    data_dir = str(tmp_path / "tfds")
    corpus.prepare_embedded_corpus(data_dir, "tiny")
    model = {"model.d_model": 32, "model.num_layers": 2, "model.num_heads": 2,
             "model.d_ff": 64, "model.max_seq_len": 32, "model.activation": "swiglu",
             "moe.activation": "swiglu", "moe.d_ff": 64, "data.name": "embedded_tiny",
             "data.eval_batches": 2, "train.batch_size": 4, "data.data_dir": data_dir}
    sparse = {"model.moe_every": 2, "moe.num_experts": 4, "moe.top_k": 2,
              "moe.renormalize_gates": True, "moe.dispatch": "dropless"}
    chain = Suite(
        name="chain", title="chain", references=(), claims=(),
        members=lambda scale: (
            Member("dense", "dense.py:tiny", model),
            Member("cont", "dense.py:tiny", model, init_from="dense"),
            Member("up", "dense.py:tiny", {**model, **sparse, "init.upcycle": True},
                   init_from="dense")),
        train={"tiny": {"train.num_train_steps": 3, "train.warmup_steps": 1,
                        "train.log_every": 1}})
    root = str(tmp_path / "runs")
    path = sweep.run_suite(chain, "tiny", seeds=1, workdir_root=root,
                         results_dir=str(tmp_path / "results"), log=lambda _: None)
    statuses = {r["member"]: r["status"] for r in Results.load(path).runs}
    assert statuses == {"dense": "finished", "cont": "finished", "up": "finished"}
    first = {name: read_metrics(os.path.join(root, "tiny", f"{name}_s0"))[1]
             for name in ("cont", "up")}
    assert first["up"]["train/cross_entropy"] == pytest.approx(
        first["cont"]["train/cross_entropy"], abs=1e-4)
    assert first["up"]["train/load_balancing_loss"] > 0  # it is the sparse model

    out = str(tmp_path / "upcycled")
    config = schema.load_config(os.path.join(root, "tiny", "up_s0", "config.json"))
    config.init.upcycle = False
    config.init.checkpoint = None
    upcycle.upcycle(os.path.join(root, "tiny", "dense_s0"), config, out)
    from moe_jax.main import run_from_argv
    from moe_jax.train.checkpoint import CheckpointError

    with open(os.path.join(out, "config.json")) as f:
        written = f.read()
    with pytest.raises(CheckpointError, match="a starting point rather than a run"):
        run_from_argv(["moe_jax.main", f"--config={out}/config.json", f"--workdir={out}",
                       "--config.train.num_train_steps=7"])
    with open(os.path.join(out, "config.json")) as f:
        assert f.read() == written
