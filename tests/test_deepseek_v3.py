"""DeepSeek-V3's pieces with hand-made numbers: YaRN frequencies and scales, the interleaved
rotary layout, multi-head latent attention, group-limited sigmoid routing; and decoding a
latent-cache model (the imported fixture) equals its full forward pass."""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from moe_jax import interop, routing, schema
from moe_jax.analysis import flops, memory
from moe_jax.config import MoeConfig
from moe_jax.interop import conversion, hf_weights
from moe_jax.models import decode, latent_attention
from moe_jax.models.config import ModelConfig
from moe_jax.models.positions import Yarn, apply_rotary
from moe_jax.train import checkpoint
from moe_jax.utils.fields import ConfigError

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "hf", "deepseek_v3")


def test_yarn_frequencies_ramp_between_interpolation_and_extrapolation():
    yarn = Yarn(factor=4.0, original_max_seq_len=64, beta_fast=32, beta_slow=1, mscale=1.0,
                mscale_all_dim=0.8)
    # h = 8, base 1e4: original frequencies 1, 0.1, 0.01, 0.001. The ramp ends are the
    # dimensions making 32 and 1 turns in 64 positions: 8 ln(64 / (32 * 2 pi)) / (2 ln 1e4)
    # = -0.50 -> floor, clipped to 0; 8 ln(64 / (2 pi)) / (2 ln 1e4) = 1.008 -> ceil 2. So the
    # ramp is (0, 0.5, 1, 1): pair 0 keeps its frequency, pair 1 mixes 0.1 and 0.1 / 4 half
    # and half, pairs 2 and 3 are divided by 4.
    np.testing.assert_allclose(yarn.inverse_frequencies(8, 1e4),
                               [1.0, 0.0625, 0.0025, 0.00025], rtol=1e-6)
    # mscale(4, m) = 1 + 0.1 m ln 4: 1.13863 (m = 1) and 1.11090 (m = 0.8)
    np.testing.assert_allclose(yarn.attention_factor, 1.138629 / 1.110904, rtol=1e-5)
    np.testing.assert_allclose(yarn.softmax_scale, 1.110904**2, rtol=1e-5)
    plain = Yarn(factor=4.0, original_max_seq_len=64)  # no mscale_all_dim: YaRN's own scale
    np.testing.assert_allclose(plain.attention_factor, 1.138629, rtol=1e-5)
    assert plain.softmax_scale == 1.0


def test_interleaved_rotary_rotates_adjacent_pairs():
    x = jnp.asarray([0.0, 1.0, 0.0, 0.0]).reshape(1, 1, 1, 4)
    position = jnp.ones((1, 1), jnp.int32)  # angles 1 and 0.01 (base 1e4, h = 4)
    # interleaved: pair (x0, x1) = (0, 1) turns by 1 rad -> (-sin 1, cos 1); returned evens
    # first, then odds
    np.testing.assert_allclose(apply_rotary(x, position, 1e4, interleaved=True).ravel(),
                               [-math.sin(1), 0, math.cos(1), 0], atol=1e-6)
    # half-split: pair (x1, x3) = (1, 0) turns by 0.01 rad
    np.testing.assert_allclose(apply_rotary(x, position, 1e4).ravel(),
                               [0, math.cos(0.01), 0, math.sin(0.01)], atol=1e-6)
    yarn = Yarn(factor=4.0, original_max_seq_len=64)
    np.testing.assert_allclose(apply_rotary(x, position * 0, 1e4, scaling=yarn).ravel(),
                               [0, 1.138629, 0, 0], rtol=1e-5)


def test_latent_attention_expands_keys_and_values_from_the_latent():
    kv_up = jnp.asarray([[[2.0, 3.0]]])  # c = H = n = v = 1: key = 2 c_KV, value = 3 c_KV
    latent = jnp.asarray([[[1.0], [2.0]]])  # keys 2, 4; values 3, 6
    q_nope = jnp.ones((1, 2, 1, 1))
    q_rope = jnp.asarray([[[[0.0]], [[1.0]]]])
    rope_key = jnp.asarray([[[1.0], [-1.0]]])
    mask = jnp.tril(jnp.ones((2, 2), bool))[None]
    out = latent_attention.latent_attention(q_nope, q_rope, latent, rope_key, kv_up, mask, 1.0)
    # query 0 sees value 3 only; query 1's logits 2 + 1 and 4 - 1 are equal: (3 + 6) / 2
    np.testing.assert_allclose(out.ravel(), [3.0, 4.5], rtol=1e-6)
    half = latent_attention.latent_attention(q_nope, 0 * q_rope, latent, rope_key, kv_up, mask,
                                             0.5)  # logits 1 and 2
    p = 1 / (1 + math.e)
    np.testing.assert_allclose(half.ravel()[1], 3 * p + 6 * (1 - p), rtol=1e-6)
    assert latent_attention.cache_numbers_per_token(512, 64) == 576


def test_group_limited_sigmoid_routing():
    scores = jnp.asarray([[0.9, 0.1, 0.6, 0.5]])
    zero = jnp.zeros(4)
    # groups {0, 1} and {2, 3} score 0.9 + 0.1 = 1.0 and 0.6 + 0.5 = 1.1: the token keeps
    # group 1, so experts 2 and 3 although expert 0 scores highest; gates 0.6 / 1.1 and
    # 0.5 / 1.1, times the routed scaling factor 2
    np.testing.assert_allclose(routing.group_scores(scores, 2), [[1.0, 1.1]], rtol=1e-6)
    choice = routing.route_sigmoid_bias(scores, zero, 2, expert_groups=2, top_groups=1,
                                        scale=2.0)
    np.testing.assert_array_equal(choice.expert_index, [[2, 3]])
    np.testing.assert_allclose(choice.gate, [[1.2 / 1.1, 1.0 / 1.1]], rtol=1e-6)
    ungrouped = routing.route_sigmoid_bias(scores, zero, 2)
    np.testing.assert_array_equal(ungrouped.expert_index, [[0, 2]])
    # a bias of -0.3 on expert 2 makes group 1 score 0.8 < 1.0: experts 0 and 1, gated by
    # their raw scores (the bias selects only)
    biased = routing.route_sigmoid_bias(scores, jnp.asarray([0, 0, -0.3, 0]), 2,
                                        expert_groups=2, top_groups=1, scale=2.0)
    np.testing.assert_array_equal(biased.expert_index, [[0, 1]])
    np.testing.assert_allclose(biased.gate, [[1.8, 0.2]], rtol=1e-6)


def test_bad_deepseek_settings_are_named():
    with pytest.raises(ConfigError, match="expert_groups=3 does not divide num_experts=8"):
        MoeConfig(router="sigmoid_bias", expert_groups=3)
    with pytest.raises(ConfigError, match="apply to router='sigmoid_bias' only"):
        MoeConfig(expert_groups=2)
    with pytest.raises(ConfigError, match="top_k=4 exceeds the 2 experts"):
        MoeConfig(router="sigmoid_bias", top_k=4, expert_groups=4, top_expert_groups=1)
    with pytest.raises(ConfigError, match="rope_scaling='yarn' scales rotary frequencies"):
        ModelConfig(rope_scaling="yarn", positions="learned")
    with pytest.raises(ConfigError, match=r"yarn_mscale_all_dim=0\.8 scales the softmax of "
                       "multi-head latent attention"):
        ModelConfig(rope_scaling="yarn", yarn_mscale_all_dim=0.8)


@pytest.fixture(scope="module")
def imported():
    return interop.load(FIXTURE)


def test_decoding_with_the_latent_cache_equals_the_full_forward_pass(imported):
    experiment = schema.parse_config(imported.config)
    model = decode.decoding_model(experiment.model, experiment.moe)
    variables = {"params": imported.variables["params"], **imported.variables["model_state"]}
    ids = jnp.asarray(np.load(os.path.join(FIXTURE, "expected.npz"))["input_ids"])[:, :8]
    full, _ = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, ids)
    prompts, lengths = ids, jnp.asarray([5, 3], jnp.int32)
    prefill = jax.jit(decode.prefill, static_argnums=0, static_argnames="cache_len")
    step = jax.jit(decode.step, static_argnums=0)
    logits, state, _ = prefill(model, variables, prompts, lengths, cache_len=8)
    cache = jax.tree.leaves(state.cache)
    assert {a.shape[-1] for a in cache if a.ndim == 3} == {16, 8}  # latent c, rotary key r
    # the memory planner's bytes per token are those of the latent cache's arrays
    plan = memory.plan(experiment, kv_dtype="float32")
    latent_bytes = sum(a.nbytes for a in cache if a.ndim == 3) / (2 * 8)  # B = 2, S = 8 slots
    assert plan.kv_cache_per_token == latent_bytes == 3 * (16 + 8) * 4
    assert plan.attention_cache_per_token == 3 * 4 * (8 + 8 + 6) * 4  # layers * H * (n+r+v)
    rows = jnp.arange(2)
    for _ in range(3):
        np.testing.assert_allclose(logits, full[rows, state.lengths - 1], atol=1e-4)
        logits, state, _ = step(model, variables, state, ids[rows, state.lengths])


def test_published_deepseek_v3_counts():
    """Sec. 1 and 4.2: "671B total parameters with 37B activated for each token" (the MTP
    module's 14B counted apart); ours count every embedding and output parameter."""
    count = flops.count(schema.load_config("configs/published/deepseek_v3.py"))
    assert abs(count.total_params / 671e9 - 1) <= 0.02, count.total_params
    assert abs(count.active_params / 37e9 - 1) <= 0.02, count.active_params
    assert round(count.total_params / 1e9, 2) == 671.03
    assert round(count.active_params / 1e9, 2) == 37.55


def test_what_deepseek_v3_import_cannot_represent_is_named(hf_variant):
    fp8 = hf_variant("deepseek_v3", lambda hf: hf.update(quantization_config={
        "quant_method": "fp8", "weight_block_size": [128, 128]}))
    with pytest.raises(interop.UnsupportedModelError, match=r"'fp8'.*dequantize to bf16 first"):
        interop.load(fp8)
    unnormalised = hf_variant("deepseek_v3", lambda hf: hf.update(norm_topk_prob=False))
    with pytest.raises(interop.UnsupportedModelError, match="norm_topk_prob=False"):
        interop.load(unnormalised)
    other_rope = hf_variant("deepseek_v3",
                            lambda hf: hf["rope_parameters"].update(rope_type="llama3"))
    with pytest.raises(interop.UnsupportedModelError, match="rope scaling 'llama3'"):
        interop.load(other_rope)


def test_mtp_layers_of_a_checkpoint_are_skipped_and_not_exported(hf_variant, imported, caplog):
    # the released checkpoints hold the MTP module as block num_hidden_layers (here 3)
    directory = hf_variant("deepseek_v3")
    save_file({"model.layers.3.eh_proj.weight": np.zeros((32, 64), np.float32)},
              os.path.join(directory, "mtp.safetensors"), metadata={"format": "pt"})
    again = interop.load(directory)
    assert "multi-token-prediction layers" in caplog.text
    jax.tree.map(np.testing.assert_array_equal, again.variables, imported.variables)
    experiment = schema.parse_config(imported.config)
    with_mtp = experiment.__class__(**{**experiment.__dict__,
                                       "model": experiment.model.replace(mtp_depth=1)})
    with pytest.raises(interop.UnsupportedModelError, match=r"set model\.mtp_depth=0"):
        interop.hf_config.check_exportable(with_mtp, interop.FAMILIES["deepseek_v3"])


def test_convert_cli_round_trip_keeps_the_correction_bias(tmp_path, imported):
    out, back = str(tmp_path / "converted"), str(tmp_path / "back")
    assert conversion.import_hf(FIXTURE, out)["family"] == "deepseek_v3"
    variables = checkpoint.read_weights(out)[0]
    jax.tree.map(np.testing.assert_array_equal, variables, imported.variables)
    bias = variables["model_state"]["moe_state"]["block_1"]["moe"]["score_bias"]
    assert np.any(np.asarray(bias) != 0)
    assert conversion.export_hf(out, back)["family"] == "deepseek_v3"
    name = "model.layers.2.mlp.gate.e_score_correction_bias"
    with safe_open(os.path.join(FIXTURE, "model.safetensors"), "numpy") as original, \
            safe_open(hf_weights.tensor_files(back)[name], "numpy") as written:
        np.testing.assert_array_equal(written.get_tensor(name), original.get_tensor(name))


def test_fsdp_shards_every_deepseek_v3_parameter():
    """On fsdp 32 x expert 8 each device holds 1/256 of the routed experts and 1/32 of the rest:
    MLA's up-projections (no "embed" dimension) shard their latent dimension over fsdp instead
    of staying replicated (61 layers: 3.3B parameters, 53 GB of training state per device).
    Blocks 0-2 dense and 3 sparse, as published otherwise."""
    experiment = schema.override(schema.load_config("configs/published/deepseek_v3.py"),
                                 {"model.num_layers": 4, "model.moe_layers": (3,)})
    plan = memory.plan(experiment, {"fsdp": 32, "expert": 8})
    routed = 256 * 3 * 7168 * 2048  # one sparse block's routed experts
    rest = flops.count(experiment).total_params - routed
    assert plan.per_device["params_per_device"] == pytest.approx(routed / 256 + rest / 32,
                                                                 rel=1e-3)
