"""Training on a mesh of 8 simulated CPU devices (tests/conftest.py).

The sharded model's loss and gradients equal the single-device ones; parameters, optimizer
state, batches and MoE buffers land on the intended mesh axes; the explicit form's compiled
train step exchanges expert buffers with all-to-all over the expert axis and keeps 1/n of the
expert weights per device; a short run under the explicit form follows the single-device loss
curve; checkpoints restore onto other meshes with identical values; bad meshes fail early with
the numbers and the fix. The tiny experiment is `multihost_worker.SETTINGS` (shared with the
two-process test, so compilations are shared through the persistent cache).
"""

from __future__ import annotations

import functools
import os
import re
import shutil

import jax
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec
from multihost_worker import CONFIG, SETTINGS

from moe_jax import schema
from moe_jax.models import Transformer
from moe_jax.parallel import distributed, sharding
from moe_jax.train import jitted, loop, objective, placement
from moe_jax.train.checkpoint import Checkpoints
from moe_jax.train.metrics import read_metrics
from moe_jax.train.state import init_train_state

# Mesh shapes in `sharding.MESH_AXES` order: (data, fsdp, expert, model).
MESHES = [(1, 1, 1, 1), (8, 1, 1, 1), (2, 1, 4, 1), (1, 1, 8, 1), (2, 1, 2, 2),
          (1, 8, 1, 1), (1, 2, 4, 1), (1, 2, 2, 2)]
SEQ, ROWS, STEPS = (SETTINGS["model.max_seq_len"], SETTINGS["train.batch_size"],
                    SETTINGS["train.num_train_steps"])
# Per routing group of 16 tokens and 8 experts: capacity factor 1 gives C = 2k slots per expert
# and drops; a capacity of 16 can never overflow.
DROPS = {True: {"moe.capacity_factor": 1.0}, False: {"moe.expert_capacity": 16}}


def make_config(mesh=(1, 1, 1, 1), form="gspmd", **settings):
    sizes = {f"mesh.{axis}": size for axis, size in zip(sharding.MESH_AXES, mesh, strict=True)}
    return schema.override(schema.load_config(CONFIG), {
        **SETTINGS, **sizes, "mesh.expert_parallel": form, **settings})


def make_batch() -> dict[str, np.ndarray]:
    """A [8, 16] batch like the pipeline's, with padding (rows 1, 6) and two packed segments
    (row 3)."""
    rng = np.random.default_rng(0)
    segment_ids = np.ones((ROWS, SEQ), np.int32)
    segment_ids[1, 10:] = 0
    segment_ids[6, 3:] = 0
    segment_ids[3, 8:] = 2
    starts = np.maximum.accumulate(np.where(
        np.diff(segment_ids, prepend=-1, axis=1) != 0, np.arange(SEQ), 0), axis=1)
    weights = (segment_ids > 0).astype(np.float32)
    inputs = rng.integers(1, 259, (ROWS, SEQ)).astype(np.int32)
    return {"inputs": inputs, "targets": np.roll(inputs, -1, axis=1), "weights": weights,
            "segment_ids": segment_ids, "positions": (np.arange(SEQ) - starts).astype(np.int32),
            "domains": np.where(weights > 0, 1, -1).astype(np.int32), "target_bytes": weights}


BATCH = make_batch()


def loss_and_grads(model, moe_config):
    def loss(params, batch):
        logits, aux = model.apply({"params": params}, batch["inputs"],
                                  segment_ids=batch["segment_ids"], positions=batch["positions"],
                                  train=True)
        return objective.compute_loss(logits, batch, aux, moe_config)

    return jax.value_and_grad(loss, has_aux=True)


@functools.cache
def reference(k: int, drops: bool):
    """Single device, no mesh: (params, (loss, metrics), grads)."""
    experiment = schema.parse_config(make_config(**{"moe.top_k": k}, **DROPS[drops]))
    model = Transformer(experiment.model, experiment.moe)
    params = jax.jit(lambda key: init_train_state(key, model, optax.sgd(1.0), seq_len=SEQ)
                     .params)(jax.random.key(0))
    return params, jax.jit(loss_and_grads(model, experiment.moe))(params, BATCH)


def sharded_setup(mesh, form, **settings):
    """(experiment, model, jitted functions, initial state, global batch) on a mesh."""
    experiment = schema.parse_config(make_config(mesh, form, **settings))
    model, fns = jitted.setup(experiment, SEQ)
    state = fns["init"](experiment.seed)
    return experiment, model, fns, state, placement.global_batch(BATCH, fns["batch_sharding"],
                                                                 ROWS)


FAST = {((2, 1, 4, 1), "explicit", 2, True), ((2, 1, 2, 2), "gspmd", 1, False),
        ((2, 1, 2, 2), "explicit", 1, True), ((1, 8, 1, 1), "gspmd", 2, True),
        ((1, 2, 2, 2), "explicit", 2, False)}


@pytest.mark.parametrize(("mesh", "form", "k", "drops"), [
    pytest.param(mesh, form, k, drops, id="x".join(map(str, mesh)) + f"-{form}-top{k}"
                 + ("-drops" if drops else ""),
                 marks=() if (mesh, form, k, drops) in FAST else pytest.mark.slow)
    for mesh in MESHES for form in ("gspmd", "explicit") for k in (1, 2)
    for drops in (True, False)])
def test_sharded_loss_and_gradients_equal_single_device(mesh, form, k, drops):
    ref_params, ((ref_loss, ref_metrics), ref_grads) = reference(k, drops)
    assert (float(ref_metrics["dropped_fraction"]) > 0.01) == drops
    experiment, model, fns, state, batch = sharded_setup(mesh, form, **{"moe.top_k": k},
                                                         **DROPS[drops])
    # Created directly sharded, the parameters equal the single-device initialisation.
    jax.tree.map(np.testing.assert_array_equal, state.params, ref_params)
    mesh_ = fns["batch_sharding"].mesh
    fn = jax.jit(placement.in_mesh_context(loss_and_grads(model, experiment.moe), mesh_,
                                           experiment.mesh.logical_rules()))
    (loss, metrics), grads = fn(state.params, batch)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for name in ("cross_entropy", "load_balancing_loss", "dropped_fraction"):
        np.testing.assert_allclose(metrics[name], ref_metrics[name], rtol=1e-5, atol=1e-7)
    for g, ref in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(g, ref, rtol=1e-4, atol=1e-5 * float(np.max(np.abs(ref))))


def _leaf(tree, *suffix):
    """The leaves of `tree` whose path ends with `suffix` (dict keys)."""
    return [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
            if placement.path_keys(path)[-len(suffix):] == suffix]


def test_parameters_optimizer_state_batch_and_buffers_are_laid_out_as_intended():
    _, _, fns, state, batch = sharded_setup((1, 2, 2, 2), "gspmd")
    expected = {("block_1", "moe", "experts", "wi"): PartitionSpec("expert", "fsdp", "model"),
                ("block_1", "moe", "experts", "wo"): PartitionSpec("expert", "model", "fsdp"),
                ("block_1", "moe", "router", "kernel"): PartitionSpec("fsdp", None),
                ("block_0", "ffn", "wi"): PartitionSpec("fsdp", "model"),
                ("block_0", "attention", "query"): PartitionSpec("fsdp", "model", None),
                ("embedding",): PartitionSpec("model", "fsdp")}
    for path, spec in expected.items():
        (param,) = _leaf(state.params, *path)
        assert param.sharding.spec == spec, path
        moments = _leaf(state.opt_state, *path)  # AdamW's mu and nu follow the parameter
        assert len(moments) == 2 and all(m.sharding.spec == spec for m in moments), path
    assert state.step.sharding.spec == PartitionSpec()
    for array in batch.values():
        assert array.sharding.spec == PartitionSpec(("data", "fsdp", "expert"), None)

    text = fns["train_step"].lower(state, batch).as_text()
    # MoE buffers [G, E, C, d]: groups over (data, fsdp), experts over expert.
    assert re.search(r'\[\{"data", "fsdp"\}, \{"expert"\}, \{\}, \{\}\]> : tensor<8x8x\d+x32xf32>',
                     text)
    # The model's logical constraints (rules in context): micro-batches [A, B/A, L] and the
    # residual stream [B, L, d] after the embedding and each block (and their transposes in
    # the backward pass) over (data, fsdp, expert).
    assert '[{}, {"data", "fsdp", "expert"}, {}]> : tensor<1x8x16xi32>' in text
    residual = '[{"data", "fsdp", "expert"}, {}, {}]> : tensor<8x16x32xf32>'
    assert text.count(residual) >= 2 * (1 + SETTINGS["model.num_layers"]), text.count(residual)


def _replica_groups(text: str) -> list[list[list[int]]]:
    """The replica groups of every all-to-all in HLO text ({{0,1},{2,3}} or iota
    [G,S]<=[dims]T(perm) form)."""
    groups = []
    for line in text.splitlines():
        if " all-to-all(" not in line:
            continue
        if match := re.search(r"replica_groups=\{(\{[\d,{}]*\})\}", line):
            groups.append([[int(i) for i in g.split(",")]
                           for g in re.findall(r"\{([\d,]+)\}", match.group(1))])
        elif match := re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?",
                                line):
            size = [int(i) for i in match.group(3).split(",")]
            ids = np.arange(np.prod(size)).reshape(size)
            if match.group(4):
                ids = ids.transpose([int(i) for i in match.group(4).split(",")])
            groups.append(ids.reshape(int(match.group(1)), int(match.group(2))).tolist())
    return groups


def test_explicit_train_step_exchanges_over_the_expert_axis_and_keeps_experts_local():
    _, _, fns, state, batch = sharded_setup((2, 1, 4, 1), "explicit")
    mesh = fns["batch_sharding"].mesh
    hlo = fns["train_step"].lower(state, batch).compile().as_text()
    ids = np.vectorize(lambda d: d.id)(mesh.devices)  # [data, fsdp, expert, model]
    expert_groups = sorted(sorted(g) for g in np.moveaxis(ids, 2, -1).reshape(-1, 4).tolist())
    groups = _replica_groups(hlo)
    assert groups, "no all-to-all in the compiled train step"
    for found in groups:
        assert sorted(sorted(g) for g in found) == expert_groups
    for name in ("wi", "wo"):
        (param,) = _leaf(state.params, "block_1", "moe", "experts", name)
        assert sharding.device_bytes(param) * 4 == param.nbytes  # 1/expert_axis per device
        for moment in _leaf(state.opt_state, "block_1", "moe", "experts", name):
            assert sharding.device_bytes(moment) * 4 == moment.nbytes


@pytest.mark.parametrize("mesh", [(1, 8, 1, 1), (1, 2, 4, 1)])
def test_fsdp_splits_every_parameter_and_optimizer_statistic(mesh):
    """ZeRO-3: each device holds 1/fsdp of every parameter and AdamW moment (every parameter
    has a model dimension, "embed"), expert weights also 1/expert."""
    _, _, _, state, _ = sharded_setup(mesh, "gspmd")
    fsdp, expert = mesh[1], mesh[2]

    def expected(path, leaf):
        return leaf.nbytes // (fsdp * (expert if "experts" in path else 1))

    params = jax.tree_util.tree_leaves_with_path(state.params)
    for path, leaf in params:
        assert sharding.device_bytes(leaf) == expected(placement.path_keys(path), leaf), path
    moments = [(p, leaf) for p, leaf in jax.tree_util.tree_leaves_with_path(state.opt_state)
               if leaf.ndim]
    assert len(moments) == 2 * len(params)  # AdamW's mu and nu, nothing else per parameter
    per_device = sum(sharding.device_bytes(leaf) for _, leaf in moments)
    assert per_device == 2 * sum(expected(placement.path_keys(p), x) for p, x in params)
    total = sum(leaf.nbytes for _, leaf in params)
    assert per_device < 2 * total / fsdp + 1  # < the replicated share, by the expert factor


def test_factored_optimizer_statistics_follow_their_parameter():
    mesh = sharding.make_mesh(sharding.MeshConfig(2, 2, 2))
    params = {"w": jax.ShapeDtypeStruct((4, 128, 256), np.float32),
              "b": jax.ShapeDtypeStruct((8,), np.float32)}
    named = {"w": NamedSharding(mesh, PartitionSpec("expert", None, "model")),
             "b": NamedSharding(mesh, PartitionSpec())}
    state = jax.eval_shape(optax.adafactor(1e-3).init, params)
    specs = jax.tree.map(lambda s: s.spec,
                         placement.opt_state_shardings(state, params, named, mesh))
    (factored,) = [s for s in jax.tree.leaves(specs, is_leaf=lambda x: hasattr(x, "v_row"))
                   if hasattr(s, "v_row")]
    assert factored.v_row["w"] == PartitionSpec("expert", None)  # [4, 128]
    assert factored.v_col["w"] == PartitionSpec("expert", "model")  # [4, 256]
    assert factored.v["w"] == PartitionSpec()  # [1] placeholder
    assert factored.v["b"] == PartitionSpec()


# --- the loop on a mesh --------------------------------------------------------------------------


def _run(data_dir, workdir, mesh, form="gspmd"):
    config = make_config(mesh, form, **{"data.data_dir": data_dir})
    return loop.train_and_evaluate(config, workdir)


def _losses(workdir):
    logged = read_metrics(workdir)
    return [logged[s]["train/loss"] for s in range(1, STEPS + 1)]


@pytest.fixture(scope="module")
def single_device_run(data_dir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("single"))
    return workdir, _run(data_dir, workdir, (1, 1, 1, 1))


@pytest.fixture(scope="module")
def explicit_run(data_dir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("explicit"))
    return workdir, _run(data_dir, workdir, (2, 1, 4, 1), "explicit")


def test_explicit_expert_parallel_training_follows_the_single_device_loss_curve(
        single_device_run, explicit_run):
    (ref_dir, ref), (workdir, summary) = single_device_run, explicit_run
    losses, ref_losses = _losses(workdir), _losses(ref_dir)
    assert ref_losses[-1] < ref_losses[0] - 0.3, ref_losses  # it trains
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-4)
    np.testing.assert_allclose(summary["eval_loss"], ref["eval_loss"], rtol=1e-4)


@pytest.mark.parametrize("mesh", [(2, 1, 4, 1), (4, 1, 2, 1), (1, 1, 1, 1), (1, 4, 2, 1)])
def test_checkpoint_restores_onto_another_mesh_with_identical_values(explicit_run, mesh):
    workdir, _ = explicit_run
    saved_on = schema.parse_config(make_config((2, 1, 4, 1), "explicit"))
    experiment = schema.parse_config(make_config(mesh, "explicit"))
    checkpoints = Checkpoints(os.path.join(workdir, "checkpoints"), max_to_keep=2)
    try:
        saved, _ = checkpoints.restore(STEPS, jitted.setup(saved_on, SEQ)[1]["abstract_state"])
        restored, host = checkpoints.restore(STEPS, jitted.setup(experiment, SEQ)[1][
            "abstract_state"])
    finally:
        checkpoints.close()
    assert int(restored.step) == STEPS and host["data_iterator"]["step"] == STEPS
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 restored, saved)
    (wi,) = _leaf(restored.params, "block_1", "moe", "experts", "wi")
    assert wi.sharding.mesh.shape == dict(zip(sharding.MESH_AXES, mesh))
    assert wi.sharding.spec == PartitionSpec("expert", "fsdp", "model")
    assert sharding.device_bytes(wi) * mesh[1] * mesh[2] == wi.nbytes


@pytest.mark.slow
def test_a_run_resumes_on_another_mesh_and_form(single_device_run, explicit_run, data_dir,
                                                tmp_path):
    """Saved at step 4 under explicit expert=4, resumed under gspmd expert=2."""
    workdir = str(tmp_path / "moved")
    shutil.copytree(explicit_run[0], workdir)
    shutil.rmtree(os.path.join(workdir, "checkpoints", str(STEPS)))
    _run(data_dir, workdir, (4, 1, 2, 1), "gspmd")
    np.testing.assert_allclose(_losses(workdir), _losses(single_device_run[0]), rtol=1e-4)


# --- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("mesh", "form", "settings", "message"), [
    ((1, 1, 8, 1), "gspmd", {"moe.num_experts": 4}, r"num_experts=4 does not divide over mesh "
     r"axes \('expert',\) of total size 8"),
    ((8, 1, 1, 1), "gspmd", {"train.batch_size": 4}, r"global batch=4 does not divide"),
    ((8, 1, 1, 1), "gspmd", {"train.grad_accum_steps": 2}, r"micro-batch of train.batch_size / "
     r"train.grad_accum_steps = 8 / 2 = 4 sequences does not divide over the 8 devices"),
    ((2, 1, 1, 4), "gspmd", {}, r"num_heads=2 does not divide over mesh axes \('model',\)"),
    ((8, 1, 1, 1), "explicit", {"moe.group_size": 32}, r"moe.group_size=32 does not divide the 16 "
     r"tokens of one device"),
    ((2, 1, 1, 4), "gspmd", {"model.num_heads": 4, "moe.d_ff": 30},
     r"block_1/moe/experts/wi of shape \(8, 32, 30\): dimension 2 \('mlp', size 30\) does not "
     r"divide over mesh axes \('model',\) of total size 4.*mesh.rules='mlp='"),
    ((2, 1, 8, 1), "gspmd", {}, r"needs 16 devices but 8 are available"),
    ((1, 8, 1, 1), "gspmd", {"model.d_model": 36}, r"dimension 0 \('embed', size 36\) does not "
     r"divide over mesh axes \('fsdp',\) of total size 8"),
])
def test_a_mesh_that_does_not_fit_fails_before_any_work(mesh, form, settings, message):
    experiment = schema.parse_config(make_config(mesh, form, **settings))
    with pytest.raises(ValueError, match=message):
        jitted.setup(experiment, SEQ)


def test_mesh_config_errors_name_the_key():
    with pytest.raises(ValueError, match=r"config\.mesh\.rules='mlp=modle'.*mesh axes must be"):
        make_config(**{"mesh.rules": "mlp=modle"})
    with pytest.raises(ValueError, match=r"config\.mesh\.expert_parallel='manual'"):
        make_config(form="manual")
    rules = schema.parse_config(make_config(**{"mesh.rules": "batch=data, vocab="})
                                ).mesh.logical_rules()
    assert dict(rules)["batch"] == "data" and dict(rules)["vocab"] is None
    assert dict(rules)["expert"] == "expert"  # the rest stay at DEFAULT_RULES


def test_distributed_environment_is_validated(monkeypatch):
    for name in distributed.DISTRIBUTED_ENV:
        monkeypatch.delenv(name, raising=False)
    assert not distributed.initialize_distributed()  # not asked: nothing happens
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES='two' must be a non-negative"):
        distributed.initialize_distributed()
