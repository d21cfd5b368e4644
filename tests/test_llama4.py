"""Llama 4's pieces with hand-made numbers: sigmoid top-k routing, gates on the expert inputs,
chunked masks (full pass and cache), NoPE temperature tuning, the weightless QK-norm, per-block
attention kinds and the scan over them, the "llama3" rotary scaling (hand-made and
transformers' numbers, import and export); named errors; the published counts; and decoding the
imported fixture (chunks, NoPE blocks, temperature tuning) equals its full forward pass."""

from __future__ import annotations

import json
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import dispatch, interop, moe, routing, schema
from moe_jax.analysis import flops
from moe_jax.config import MoeConfig
from moe_jax.interop import hf_llama4, hf_weights
from moe_jax.models import Transformer, decode, stack
from moe_jax.models.attention import attention_mask, cache_mask, temperature_scale
from moe_jax.models.config import AttentionKind, ModelConfig
from moe_jax.models.norms import rms_norm
from moe_jax.models.positions import Llama3Scaling, apply_rotary, rotary_scaling_of
from moe_jax.utils.fields import ConfigError

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "hf", "llama4_text")


def test_sigmoid_top_k_gates_are_the_sigmoid_of_each_chosen_logit():
    logits = jnp.asarray([[2.0, -1.0, 0.5, 0.0]])
    top1 = routing.route_sigmoid_top_k(logits, 1)
    np.testing.assert_array_equal(top1.expert_index, [[0]])
    np.testing.assert_allclose(top1.gate, [[1 / (1 + math.exp(-2))]], rtol=1e-6)  # 0.8808
    top2 = routing.route_sigmoid_top_k(logits, 2)  # not normalised over the two
    np.testing.assert_array_equal(top2.expert_index, [[0, 2]])
    np.testing.assert_allclose(top2.gate, [[0.880797, 0.622459]], rtol=1e-5)
    # through `route`: the distribution of the statistics is the softmax of the logits
    routed = routing.route(logits, MoeConfig(num_experts=4, router="sigmoid_top_k",
                                             dispatch="dropless"), num_groups=1, train=False)
    np.testing.assert_allclose(routed.tokens.probs, jax.nn.softmax(logits), rtol=1e-6)


def _squares(x, *_):  # an "expert" x -> x^2, where scaling the input and the output differ
    return x * x


def test_gates_scale_the_expert_inputs_in_every_dispatch():
    x = jnp.asarray([[2.0], [3.0]])  # two tokens, d = 1
    choice = routing.TokenChoice(jnp.asarray([[1], [0]], jnp.int32), jnp.asarray([[0.5], [0.25]]),
                                 jnp.ones((2, 1), bool))
    inputs, outputs = [1.0, 0.5625], [2.0, 2.25]  # (g x)^2 and g x^2
    for gate_inputs, expected in ((True, inputs), (False, outputs)):
        y = dispatch.dropless_moe(x, choice, _squares, 2, gate_inputs)
        np.testing.assert_allclose(y.ravel(), expected, rtol=1e-6)
        slots = jax.tree.map(lambda a: a[None], routing.assign_slots(choice, 2, 2, "rank"))
        for strategy in ("gather", "einsum"):
            y = dispatch.capacity_moe(x[None], slots, _squares, strategy, gate_inputs)
            np.testing.assert_allclose(y.ravel(), expected, rtol=1e-6, err_msg=strategy)


def test_llama4_moe_layer_equals_its_definition():
    """y = shared(x) + expert_e(sigmoid(l_e) x), e the top-1 expert (transformers'
    Llama4TextMoe), computed in NumPy."""
    config = MoeConfig(num_experts=4, top_k=1, router="sigmoid_top_k", gate_inputs=True,
                       num_shared_experts=1, d_ff=6, activation="swiglu", dispatch="dropless")
    params = moe.init_params(jax.random.key(0), config, 8)
    x = np.asarray(jax.random.normal(jax.random.key(1), (5, 8)))
    p = jax.tree.map(np.asarray, params)

    def swiglu(w, v):
        gate = v @ w["wi_gate"]
        return (gate / (1 + np.exp(-gate)) * (v @ w["wi"])) @ w["wo"]

    logits = x @ p["router"]["kernel"]
    expected = swiglu(p["shared"], x)
    for t, e in enumerate(np.argmax(logits, axis=-1)):
        score = 1 / (1 + np.exp(-logits[t, e]))
        expected[t] += swiglu({k: w[e] for k, w in p["experts"].items()}, score * x[t])
    for dispatch_name in ("dropless", "gather"):
        y, _ = moe.apply(params, jnp.asarray(x), config.replace(dispatch=dispatch_name),
                         train=False)
        np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6, err_msg=dispatch_name)


def test_chunked_masks_keep_each_query_inside_its_chunk():
    positions = jnp.arange(6)[None]
    mask = attention_mask(jnp.ones((1, 6), jnp.int32), causal=True, positions=positions,
                          chunk=4)
    expected = [[1, 0, 0, 0, 0, 0],
                [1, 1, 0, 0, 0, 0],
                [1, 1, 1, 0, 0, 0],
                [1, 1, 1, 1, 0, 0],
                [0, 0, 0, 0, 1, 0],  # position 4 starts the second chunk
                [0, 0, 0, 0, 1, 1]]
    np.testing.assert_array_equal(mask[0], np.asarray(expected, bool))
    # packed rows: chunks count from each sequence's start (its positions restart at 0)
    packed = attention_mask(jnp.asarray([[1, 1, 1, 2, 2, 2]]), causal=True,
                            positions=jnp.asarray([[0, 1, 2, 0, 1, 2]]), chunk=2)
    np.testing.assert_array_equal(packed[0, 2], [0, 0, 1, 0, 0, 0])
    np.testing.assert_array_equal(packed[0, 4], [0, 0, 0, 1, 1, 0])
    # the cache: slots hold positions 0..5; the query at 5 sees 4 and 5 with chunks of 4
    cache = {"positions": jnp.arange(6)[None], "filled": jnp.ones((1, 6), bool)}
    query = jnp.asarray([[5]])
    np.testing.assert_array_equal(cache_mask(query, cache, 4)[0, 0], [0, 0, 0, 0, 1, 1])
    np.testing.assert_array_equal(cache_mask(query, cache)[0, 0], [1] * 6)
    # a rolling cache of 4 slots (position p in slot p mod 4) after position 5
    rolled = {"positions": jnp.asarray([[4, 5, 2, 3]]), "filled": jnp.ones((1, 4), bool)}
    np.testing.assert_array_equal(cache_mask(query, rolled, 4)[0, 0], [1, 1, 0, 0])


def test_temperature_scale_grows_with_the_log_of_the_position():
    # floor((p + 1) / 8) = 0, 0, 1, 2, 3, 8 -> 1 + 0.1 ln(1 + that)
    scale = temperature_scale(jnp.asarray([[0, 6, 7, 15, 23, 63]]), 8.0, 0.1)
    np.testing.assert_allclose(scale[0], [1, 1] + [1 + 0.1 * math.log(n) for n in (2, 3, 4, 9)],
                               rtol=1e-6)


def test_weightless_qk_norm_commutes_with_the_rotation():
    x = jnp.asarray([3.0, 4.0, 0.0, 0.0]).reshape(1, 1, 1, 4)  # RMS sqrt(25 / 4) = 2.5
    np.testing.assert_allclose(rms_norm(x, jnp.ones(()), 1e-6).ravel(), [1.2, 1.6, 0, 0],
                               rtol=1e-6)
    # a rotation keeps the RMS, so normalising before the rotary positions (moe_jax) equals
    # normalising after them (transformers' Llama 4)
    y = jax.random.normal(jax.random.key(0), (2, 5, 3, 8))
    positions = jnp.arange(5)[None].repeat(2, 0) * 7
    before = apply_rotary(rms_norm(y, jnp.ones(()), 1e-5), positions, 5e5, interleaved=True)
    after = rms_norm(apply_rotary(y, positions, 5e5, interleaved=True), jnp.ones(()), 1e-5)
    np.testing.assert_allclose(before, after, rtol=1e-5, atol=1e-6)


def test_llama3_scaling_divides_low_frequencies_and_keeps_high_ones():
    """h = 8, base 1e4: frequencies 1, 0.1, 0.01, 0.001 turn t = 150 f / (2 pi) = 23.9, 2.39,
    0.239, 0.0239 times over an original context of 150; with low 1 and high 4 the first is
    kept (t > 4), the last two are divided by 8 (t < 1), the second blended."""
    scaling = Llama3Scaling(factor=8.0, original_max_seq_len=150, low_freq_factor=1.0,
                            high_freq_factor=4.0)
    inv_freq = np.asarray([1.0, 0.1, 0.01, 0.001])
    keep = (150 * 0.1 / (2 * np.pi) - 1) / (4 - 1)  # 0.4624
    expected = [1.0, keep * 0.1 + (1 - keep) * 0.1 / 8, 0.01 / 8, 0.001 / 8]
    np.testing.assert_allclose(scaling.inverse_frequencies(8, 1e4), expected, rtol=1e-6)
    assert 0 < keep < 1 and np.all(np.asarray(expected) <= inv_freq)
    # equal factors (Llama 4 Scout's 1 and 1): a step at t = 1, nothing blended
    step = Llama3Scaling(factor=8.0, original_max_seq_len=150, low_freq_factor=1.0,
                         high_freq_factor=1.0)
    np.testing.assert_allclose(step.inverse_frequencies(8, 1e4), [1.0, 0.1, 0.01 / 8, 0.001 / 8],
                               rtol=1e-6)
    # no temperature: at position 0 the rotation is the identity
    x = jnp.asarray([0.0, 1.0, 2.0, 3.0]).reshape(1, 1, 1, 4)
    np.testing.assert_array_equal(apply_rotary(x, jnp.zeros((1, 1), jnp.int32), 1e4,
                                               scaling=scaling), x)
    assert rotary_scaling_of(ModelConfig(rope_scaling="llama3", llama3_factor=16.0)) == \
        Llama3Scaling(16.0, 8192, 1.0, 4.0)  # Llama 3.1's defaults, the given factor
    assert rotary_scaling_of(ModelConfig()) is None


def test_llama3_scaling_matches_transformers():
    """transformers' `_compute_llama3_parameters` (5.25), computed once with torch for head_dim
    16 and pasted here: Llama 3.1-like (factor 8, low 1, high 4; original context 150 so that
    every band is hit at h = 16) and Llama 4 Scout's (factor 16, low = high = 1, 8192)."""
    llama31 = [1.0, 3.1622776e-01, 5.2963622e-02, 3.9528473e-03, 1.2500000e-03, 3.9528473e-04,
               1.2500001e-04, 3.9528473e-05]
    scout = [1.0, 1.9392276e-01, 3.7606031e-02, 7.2926651e-03, 1.4142134e-03, 1.7140512e-05,
             3.3239348e-06, 6.4458658e-07]
    np.testing.assert_allclose(Llama3Scaling(8.0, 150, 1.0, 4.0).inverse_frequencies(16, 1e4),
                               llama31, rtol=3e-7)
    np.testing.assert_allclose(Llama3Scaling(16.0, 8192, 1.0, 1.0).inverse_frequencies(16, 5e5),
                               scout, rtol=3e-7)


def test_bad_llama3_scaling_is_named():
    with pytest.raises(ConfigError, match=r"llama3_high_freq_factor=1.0 must be at least "
                       r"llama3_low_freq_factor=4.0.*swap them"):
        ModelConfig(rope_scaling="llama3", llama3_low_freq_factor=4.0,
                    llama3_high_freq_factor=1.0)
    with pytest.raises(ConfigError, match=r"llama3_factor=0.0 must be"):
        ModelConfig(rope_scaling="llama3", llama3_factor=0.0)
    with pytest.raises(ConfigError, match=r"llama3_original_max_seq_len=0 must be"):
        ModelConfig(rope_scaling="llama3", llama3_original_max_seq_len=0)
    with pytest.raises(ConfigError, match="'llama3' is implemented for grouped-query attention"):
        ModelConfig(rope_scaling="llama3", kv_lora_rank=8)
    with pytest.raises(ConfigError, match="scales rotary frequencies, but positions='learned'"):
        ModelConfig(rope_scaling="llama3", positions="learned")


LLAMA4_LIKE = ModelConfig(num_layers=4, d_model=16, num_heads=2, d_ff=24, moe_every=2,
                          nope_layers=(3,), chunked_layers=(0, 1, 2), attention_chunk=4,
                          qk_norm="weightless", attn_temperature_floor=4.0,
                          rope_interleave=True, activation="swiglu", vocab_size=32,
                          vocab_multiple=1, max_seq_len=16)


def test_attention_kind_of_each_block():
    m = LLAMA4_LIKE
    chunked = AttentionKind(rotary=True, chunk=4, temperature=False, qk_norm="weightless")
    assert [m.attention_kind(i) for i in range(3)] == [chunked] * 3
    # the NoPE block: no rotary positions, temperature tuning, no QK-norm, full attention
    assert m.attention_kind(3) == AttentionKind(False, None, True, "none")
    # outside the stack (a multi-token-prediction module): the default
    assert m.attention_kind(None) == AttentionKind(True, None, False, "weightless")


def test_scanning_repeats_the_attention_kinds_and_equals_the_unrolled_stack():
    eight = LLAMA4_LIKE.replace(num_layers=8, nope_layers=(3, 7),
                                chunked_layers=(0, 1, 2, 4, 5, 6))
    # sparse flags alone repeat every 2 blocks; NoPE every 4th makes the unit 4 blocks
    assert stack.scan_plan(eight) == stack.ScanPlan(0, (False, True, False, True), 2)
    assert stack.scan_plan(eight.replace(nope_layers=(), attn_temperature_floor=None,
                                         chunked_layers=())).period == 2
    moe_config = MoeConfig(num_experts=2, top_k=1, router="sigmoid_top_k", gate_inputs=True,
                           num_shared_experts=1, d_ff=8, activation="swiglu",
                           dispatch="dropless")
    ids = jax.random.randint(jax.random.key(0), (1, 10), 0, 32)
    unrolled = Transformer(eight, moe_config)
    variables = nn.meta.unbox(unrolled.init(jax.random.key(1), ids, train=False))
    scanned = Transformer(eight.replace(scan_layers=True), moe_config)
    stacked = stack.convert_layout(variables, eight, scanned=True)
    np.testing.assert_allclose(scanned.apply(stacked, ids, train=False)[0],
                               unrolled.apply(variables, ids, train=False)[0], atol=1e-5)


def test_bad_llama4_settings_are_named():
    with pytest.raises(ConfigError, match=r"chunked_layers=.* need a chunk length"):
        ModelConfig(num_layers=2, chunked_layers=(0,))
    with pytest.raises(ConfigError, match="tunes the temperature of NoPE blocks only"):
        ModelConfig(attn_temperature_floor=8.0)
    with pytest.raises(ConfigError, match=r"nope_layers=\(2,\) must list distinct block indices"):
        ModelConfig(num_layers=2, nope_layers=(2,))
    with pytest.raises(ConfigError, match="positions='learned'"):
        ModelConfig(num_layers=2, nope_layers=(1,), positions="learned")
    with pytest.raises(ConfigError, match="grouped-query attention only"):
        ModelConfig(num_layers=2, nope_layers=(1,), kv_lora_rank=8)
    with pytest.raises(ConfigError, match=r"gate_inputs.*does not let tokens choose"):
        MoeConfig(router="expert_choice", gate_inputs=True)


def test_fused_gate_up_tensor_splits_into_halves_and_sums_back():
    fused = np.arange(8.0).reshape(1, 2, 4)  # [E=1, d=2, 2f=4]: gate columns 0-1, up 2-3
    gate, up = (hf_weights.Tensor(("w",), ("gate_up_proj",), (1, 2, 4), False, part=(i, 2))
                for i in (0, 1))
    np.testing.assert_array_equal(gate.to_ours([fused], (1, 2, 2)), [[[0, 1], [4, 5]]])
    np.testing.assert_array_equal(up.to_ours([fused], (1, 2, 2)), [[[2, 3], [6, 7]]])
    # each half is written as the whole tensor, zero outside its columns; they sum to it
    (written,) = gate.to_hf(np.asarray([[[0.0, 1], [4, 5]]]))
    np.testing.assert_array_equal(written, [[[0, 1, 0, 0], [4, 5, 0, 0]]])
    np.testing.assert_array_equal(written + up.to_hf(np.asarray([[[2.0, 3], [6, 7]]]))[0],
                                  fused)


def test_transformers_defaults_for_missing_keys():
    assert hf_llama4.rotary_flags({}, 8) == [1, 1, 1, 0, 1, 1, 1, 0]  # interval 4
    assert hf_llama4.rotary_flags({"no_rope_layer_interval": 2}, 4) == [1, 0, 1, 0]
    assert hf_llama4.moe_layers({"interleave_moe_layer_step": 2}, 8) == (1, 3, 5, 7)
    assert hf_llama4.moe_layers({}, 3) == (0, 1, 2)
    assert hf_llama4.moe_layers({"moe_layers": [2]}, 3) == (2,)


def test_published_llama4_counts():
    """Model card: Scout 109B total / 17B active, Maverick 400B / 17B; ours count every
    embedding and output parameter in both (configs/published/llama4_*.py)."""
    for name, total, active, ours in (("scout", 109e9, 17e9, (107.77, 17.17)),
                                      ("maverick", 400e9, 17e9, (400.71, 17.18))):
        count = flops.count(schema.load_config(f"configs/published/llama4_{name}.py"))
        assert abs(count.total_params / total - 1) <= 0.02, (name, count.total_params)
        assert abs(count.active_params / active - 1) <= 0.02, (name, count.active_params)
        assert (round(count.total_params / 1e9, 2), round(count.active_params / 1e9, 2)) == ours


LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 0.1,
               "high_freq_factor": 2.0, "original_max_position_embeddings": 32}


def test_llama3_rope_imports_and_exports_as_written(tmp_path, hf_variant):
    """The fixture with "llama3" scaling (every band hit at h = 8, theta 5e5, original context
    32). Checked once against transformers 5.25 (not a fixture): logits within 6.2e-6 of
    Llama4ForCausalLM's, 4e-6 for Scout's step (low = high = 1), where the scaling moves them
    by 0.4-0.6; transformers reads the exported config.json's rope_parameters back as written."""
    directory = hf_variant("llama4_text", lambda hf: hf.update(rope_parameters=LLAMA3_ROPE))
    imported = interop.load(directory)
    model = schema.parse_config(imported.config).model
    assert (model.rope_scaling, model.llama3_factor, model.llama3_low_freq_factor,
            model.llama3_high_freq_factor, model.llama3_original_max_seq_len) == (
        "llama3", 8.0, 0.1, 2.0, 32)
    out = str(tmp_path / "exported")
    os.makedirs(out)
    interop.save(out, schema.parse_config(imported.config), imported.variables,
                 imported.family, imported.hf)
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["rope_parameters"] == LLAMA3_ROPE
    assert interop.load(out).config.to_dict() == imported.config.to_dict()
    # transformers 4.x's spelling, as Scout's config.json: rope_scaling and a top-level
    # rope_theta; original_max_position_embeddings defaults to max_position_embeddings
    scout = {"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0,
             "high_freq_factor": 1.0}
    directory = hf_variant("llama4_text", lambda hf: hf.update(rope_parameters=None, rope_theta=5e5,
                                                        rope_scaling=scout))
    model = schema.parse_config(interop.load(directory).config).model
    assert rotary_scaling_of(model) == Llama3Scaling(16.0, 64, 1.0, 1.0)


def test_what_llama4_import_and_export_cannot_represent_is_named(hf_variant):
    with pytest.raises(interop.UnsupportedModelError, match="rope scaling 'yarn'"):
        interop.load(hf_variant("llama4_text", lambda hf: hf.update(rope_parameters={
            "rope_type": "yarn", "rope_theta": 5e5, "factor": 8.0})))
    with pytest.raises(interop.UnsupportedModelError, match=r"rope_type 'llama3' needs "
                       r"\['low_freq_factor', 'high_freq_factor'\]"):
        interop.load(hf_variant("llama4_text", lambda hf: hf.update(rope_parameters={
            "rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0})))
    with pytest.raises(ValueError, match=r"config.model.llama3_high_freq_factor=0.05 must be "):
        interop.load(hf_variant("llama4_text", lambda hf: hf.update(rope_parameters={
            **LLAMA3_ROPE, "high_freq_factor": 0.05})))
    with pytest.raises(interop.UnsupportedModelError, match=r"layer_types \['sliding"):
        interop.load(hf_variant("llama4_text", lambda hf: hf.update(layer_types=[
            "sliding_attention", "full_attention", "full_attention", "chunked_attention"])))
    with pytest.raises(interop.UnsupportedModelError, match=r"'fbgemm_fp8'.*bf16 checkpoint"):
        interop.load(hf_variant("llama4_text", lambda hf: hf.update(
            quantization_config={"quant_method": "fbgemm_fp8"})))
    experiment = schema.parse_config(interop.load(FIXTURE).config)

    def changed(**model):
        return experiment.__class__(**{**experiment.__dict__,
                                       "model": experiment.model.replace(**model)})

    llama4, mixtral = interop.FAMILIES["llama4_text"], interop.FAMILIES["mixtral"]
    with pytest.raises(interop.UnsupportedModelError, match="rope_interleave=True"):
        interop.hf_config.hf_config(changed(rope_interleave=False), llama4)
    with pytest.raises(interop.UnsupportedModelError, match="go with llama4_text only"):
        interop.hf_config.check_exportable(changed(qk_norm="none"), mixtral)
    ungated = experiment.__class__(**{**experiment.__dict__,
                                      "moe": experiment.moe.replace(gate_inputs=False)})
    with pytest.raises(interop.UnsupportedModelError, match=r"inputs \(moe.gate_inputs=True\)"):
        interop.hf_config.check_exportable(ungated, llama4)


def test_decoding_with_chunks_and_nope_blocks_equals_the_full_forward_pass():
    imported = interop.load(FIXTURE)
    experiment = schema.parse_config(imported.config)
    model = decode.decoding_model(experiment.model, experiment.moe)
    variables = {"params": imported.variables["params"], **imported.variables["model_state"]}
    ids = jnp.asarray(np.load(os.path.join(FIXTURE, "expected.npz"))["input_ids"])  # [2, 32]
    full, _ = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, ids)
    prefill = jax.jit(decode.prefill, static_argnums=0, static_argnames="cache_len")
    step = jax.jit(decode.step, static_argnums=0)
    # prompts of 7 and 10 tokens, then steps across the chunk boundaries at 8 and 16, where
    # temperature tuning also changes (floor_scale 8)
    logits, state, _ = prefill(model, variables, ids, jnp.asarray([7, 10], jnp.int32),
                               cache_len=32)
    rows = jnp.arange(2)
    for _ in range(10):
        np.testing.assert_allclose(logits, full[rows, state.lengths - 1], atol=1e-4)
        logits, state, routed = step(model, variables, state, ids[rows, state.lengths])
    assert [r.choice.expert_index.shape for r in routed] == [(2, 1), (2, 1)]


def test_the_routing_analysis_reads_an_imported_run(imported_run):
    """`experiments.analyses.routing_stats` routes validation batches through a converted
    Llama 4 run (the sigmoid_top_k router's choices, per MoE block)."""
    from experiments.analyses import routing_stats

    family, out = imported_run(FIXTURE)
    assert family == "llama4_text"
    analysis = routing_stats.route_batches(out, max_batches=1)
    assert analysis["layers"] == [1, 3] and analysis["num_experts"] == 4
    assert analysis["tokens"] == 64
    for layer in ("1", "3"):  # routing entropies (nats) of 4 experts
        assert 0 < analysis["per_layer"][layer]["entropy"] <= math.log(4) + 1e-6
        assert 0 < analysis["per_layer"][layer]["marginal_entropy"] <= math.log(4) + 1e-6
