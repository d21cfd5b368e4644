"""GPT-OSS's pieces with hand-made numbers: attention sinks, sliding windows (and their cache
mask), the clamped SwiGLU, expert and router biases, the softmax over the top-k logits, YaRN
without truncation, MXFP4 dequantization; the MXFP4 checkpoint imports to transformers'
logits; decoding the imported fixture with its sinks and window equals the full forward pass."""

from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open

from moe_jax import experts, interop, layers, moe, routing, schema
from moe_jax.analysis import flops
from moe_jax.config import MoeConfig
from moe_jax.interop import hf_weights, mxfp4
from moe_jax.models import Transformer, decode, stack
from moe_jax.models.attention import (
    attention_mask,
    cache_mask,
    dot_product_attention,
    softmax_with_sink,
)
from moe_jax.models.config import ModelConfig
from moe_jax.models.positions import Yarn
from moe_jax.utils.fields import ConfigError

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "hf")
FIXTURE = os.path.join(FIXTURES, "gpt_oss")
MXFP4_FIXTURE = os.path.join(FIXTURES, "gpt_oss_mxfp4")
ATOL = 1e-4  # tests/test_interop.py's float32 parity


def test_a_sink_takes_probability_mass_and_gives_no_value():
    low = jnp.finfo(jnp.float32).min
    # exp(0), exp(ln 2), a masked key, and the sink exp(0): 1 / 4, 2 / 4, 0
    probs = softmax_with_sink(jnp.asarray([[0.0, math.log(2), low]]), jnp.asarray([0.0]))
    np.testing.assert_allclose(probs, [[0.25, 0.5, 0.0]], atol=1e-7)
    # shifted by 1000 (the max is subtracted first, nothing overflows): the same, up to
    # float32's rounding of 1000 + ln 2 (its spacing there is 6e-5)
    probs = softmax_with_sink(jnp.asarray([1000.0, 1000 + math.log(2)]), jnp.asarray(1000.0))
    np.testing.assert_allclose(probs, [0.25, 0.5], rtol=1e-4)
    # a sink far below the logits: the plain softmax
    probs = softmax_with_sink(jnp.asarray([0.0, math.log(2)]), jnp.asarray(-1e30))
    np.testing.assert_allclose(probs, [1 / 3, 2 / 3], rtol=1e-6)


def test_each_head_has_its_own_sink():
    # h = 1 (scale 1), two query heads sharing one key/value head; keys 0 and 1, values 10, 20
    k = jnp.asarray([0.0, 1.0]).reshape(1, 2, 1, 1)
    v = jnp.asarray([10.0, 20.0]).reshape(1, 2, 1, 1)
    q = jnp.asarray([0.0, math.log(3)]).reshape(1, 1, 2, 1)
    mask = jnp.ones((1, 1, 2), bool)
    sinks = jnp.asarray([math.log(2), 0.0])
    # head 0: logits (0, 0), sink ln 2: weights 1/4, 1/4 -> 2.5 + 5; head 1: logits (0, ln 3),
    # sink 0: weights 1/5, 3/5 -> 2 + 12
    out = dot_product_attention(q, k, v, mask, sinks)
    np.testing.assert_allclose(out.ravel(), [7.5, 14.0], rtol=1e-6)
    np.testing.assert_allclose(dot_product_attention(q, k, v, mask).ravel(),
                               [15.0, 17.5], rtol=1e-6)  # no sinks: weights 1/2 and 1/4, 3/4


def test_sliding_window_masks_in_the_forward_pass_and_the_cache():
    mask = attention_mask(jnp.ones((1, 4), jnp.int32), causal=True, window=2)
    np.testing.assert_array_equal(mask[0], [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0],
                                            [0, 0, 1, 1]])
    packed = attention_mask(jnp.asarray([[1, 1, 2, 2]]), causal=True, window=2)
    np.testing.assert_array_equal(packed[0], [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0],
                                              [0, 0, 1, 1]])
    cache = {"positions": jnp.asarray([[0, 1, 2, 3]]), "filled": jnp.ones((1, 4), bool)}
    query = jnp.asarray([[3]])
    np.testing.assert_array_equal(cache_mask(query, cache, 2)[0, 0], [0, 0, 1, 1])
    np.testing.assert_array_equal(cache_mask(query, cache)[0, 0], [1, 1, 1, 1])


def test_windowed_and_full_blocks_alternate_and_scan_as_a_unit_of_two():
    config = ModelConfig(num_layers=4, moe_every=1, sliding_window=3,
                         sliding_window_layers=(2, 0))
    assert config.sliding_window_layers == (0, 2)
    assert [config.attention_kind(i).window for i in range(4)] == [3, None, 3, None]
    # every block sparse, but the unit is two blocks: windowed, then full
    assert stack.scan_plan(config) == stack.ScanPlan(0, (True, True), 2)
    every = ModelConfig(num_layers=4, sliding_window=5)  # every block windowed
    assert [every.attention_kind(i).window for i in range(4)] == [5] * 4
    assert stack.scan_plan(every) == stack.ScanPlan(0, (False,), 4)


def test_clamped_swiglu():
    def expected(gate: float, up: float) -> float:
        g, u = min(gate, 7.0), min(max(up, -7.0), 7.0)
        return g / (1 + math.exp(-1.702 * g)) * (u + 1)

    gate, up = jnp.asarray([-1.0, 0.5, 9.0]), jnp.asarray([-9.0, 2.0, 0.5])
    # (-1, -7): -1 * sigmoid(-1.702) * -6 = 0.9253; (0.5, 2): 0.5 * sigmoid(0.851) * 3 = 1.0504;
    # (7, 0.5): 7 * sigmoid(11.914) * 1.5 = 10.5
    np.testing.assert_allclose(experts.clamped_swiglu(gate, up, 1.702, 7.0),
                               [expected(-1, -9), expected(0.5, 2), expected(9, 0.5)], rtol=1e-6)
    np.testing.assert_allclose(expected(-1, -9), 0.92528, rtol=1e-4)
    # the clamps cut the gradient: d/dgate at 9 and d/dup at -9 are 0
    d_gate, d_up = jax.grad(lambda g, u: experts.clamped_swiglu(g, u, 1.702, 7.0).sum(),
                            argnums=(0, 1))(gate, up)
    assert d_gate[2] == 0 and d_up[0] == 0 and d_gate[1] != 0 and d_up[1] != 0


def test_grouped_experts_add_each_experts_biases():
    np.testing.assert_array_equal(experts.row_experts(jnp.asarray([2, 0, 1]), 4), [0, 0, 2, 3])
    rng = np.random.default_rng(0)
    e, d, f = 3, 4, 2
    params = {name: rng.normal(size=shape).astype(np.float32) for name, shape in (
        ("wi", (e, d, f)), ("wi_gate", (e, d, f)), ("wo", (e, f, d)), ("wi_bias", (e, f)),
        ("wi_gate_bias", (e, f)), ("wo_bias", (e, d)))}
    x = rng.normal(size=(4, d)).astype(np.float32)  # rows of experts 0, 0, 2; a padding row
    activation = experts.ClampedSwiglu(1.702, 7.0)
    out = experts.grouped_ffn(jax.tree.map(jnp.asarray, params), jnp.asarray(x),
                              jnp.asarray([2, 0, 1], jnp.int32), activation, impl="ragged_dot")

    def row(r: np.ndarray, i: int) -> np.ndarray:  # NumPy, one expert
        gate = r @ params["wi_gate"][i] + params["wi_gate_bias"][i]
        up = r @ params["wi"][i] + params["wi_bias"][i]
        g, u = np.minimum(gate, 7.0), np.clip(up, -7.0, 7.0)
        hidden = g / (1 + np.exp(-1.702 * g)) * (u + 1)
        return hidden @ params["wo"][i] + params["wo_bias"][i]

    np.testing.assert_allclose(out, [row(x[0], 0), row(x[1], 0), row(x[2], 2), np.zeros(d)],
                               rtol=1e-5, atol=1e-6)


def test_router_bias_and_the_softmax_over_the_top_k_logits():
    config = MoeConfig(num_experts=4, top_k=2, router_bias=True, renormalize_gates=True)
    params = {"router": {"kernel": jnp.eye(2, 4), "bias": jnp.asarray([1.0, 2.0, 2.0, 0.0])}}
    logits = moe.router_logits(params, jnp.asarray([[0.0, 1.0]]), config, train=False, rng=None)
    np.testing.assert_allclose(logits, [[1.0, 3.0, 2.0, 0.0]])
    # GPT-OSS: top-2 of the logits (experts 1, 2), softmax over (3, 2): e / (e + 1), 1 / (e + 1);
    # the same as the full softmax renormalised over the two
    choice = routing.route_top_k(jax.nn.softmax(logits), 2, renormalize=True)
    np.testing.assert_array_equal(choice.expert_index, [[1, 2]])
    np.testing.assert_allclose(choice.gate, [[math.e / (math.e + 1), 1 / (math.e + 1)]],
                               rtol=1e-6)


def test_yarn_without_truncation_keeps_the_fractional_ramp_ends():
    # the DeepSeek test's case (h = 8, base 1e4, 64 positions, s = 4): the ramp ends are the
    # dimensions making 32 and 1 turns, -0.497 -> 0 and 1.008; truncated (floor/ceil): 0 and 2,
    # pair 1 half interpolated (0.0625); GPT-OSS (truncate false) ramps over (0, 1.008), pair 1
    # is 0.992 interpolated: 0.1 / 4 * 0.992 + 0.1 * 0.008
    high = 8 * math.log(64 / (2 * math.pi)) / (2 * math.log(1e4))
    ramp = 1 / high
    expected = [1.0, 0.025 * ramp + 0.1 * (1 - ramp), 0.0025, 0.00025]
    yarn = Yarn(factor=4.0, original_max_seq_len=64, truncate=False)
    np.testing.assert_allclose(yarn.inverse_frequencies(8, 1e4), expected, rtol=1e-5)
    truncated = Yarn(factor=4.0, original_max_seq_len=64)
    np.testing.assert_allclose(truncated.inverse_frequencies(8, 1e4)[1], 0.0625, rtol=1e-6)


def test_bad_gpt_oss_settings_are_named():
    with pytest.raises(ConfigError, match="lists windowed blocks but sliding_window is None"):
        ModelConfig(num_layers=2, sliding_window_layers=(0,))
    with pytest.raises(ConfigError, match=r"must list distinct block indices in \[0, 2\)"):
        ModelConfig(num_layers=2, sliding_window=4, sliding_window_layers=(0, 2))
    with pytest.raises(ConfigError, match="sliding_window=4 is implemented for causal"):
        ModelConfig(sliding_window=4, causal=False)
    with pytest.raises(ConfigError, match="attention_sinks=True is implemented for grouped-query"):
        ModelConfig(attention_sinks=True, kv_lora_rank=8, num_heads=4, d_model=32)
    with pytest.raises(ConfigError, match="sliding_window=0"):
        ModelConfig(sliding_window=0)
    with pytest.raises(ConfigError, match=r"swiglu_limit=0 .*GPT-OSS uses"):
        MoeConfig(activation="clamped_swiglu", swiglu_limit=0)
    with pytest.raises(ConfigError, match="activation='clamped_swiglu' is not supported"):
        ModelConfig(activation="clamped_swiglu")  # the experts' activation only


def test_mxfp4_dequantizes_hand_made_blocks():
    blocks = np.zeros((2, 16), np.uint8)  # two blocks of 32 values
    blocks[0, 0] = 0x21  # low nibble 1 (0.5) first, then 2 (1.0)
    blocks[0, 1] = 0xF8  # 8 (-0) then 15 (-6)
    blocks[1, 0] = 0x07  # 7 (6.0) then 0
    scales = np.asarray([128, 125], np.uint8)  # 2 ** 1 and 2 ** -2
    out = mxfp4.dequantize(blocks, scales)
    assert out.shape == (64,) and out.dtype == np.float32
    np.testing.assert_array_equal(out[:4], [1.0, 2.0, -0.0, -12.0])
    assert np.signbit(out[2]) and not np.any(out[4:32])
    np.testing.assert_array_equal(out[32:34], [1.5, 0.0])
    # a checkpoint's [E, out, in / 32, 16] blocks -> [E, in, out]
    weight = mxfp4.unpack_expert(np.stack([blocks, blocks])[None], np.stack([scales] * 2)[None])
    assert weight.shape == (1, 64, 2) == mxfp4.unpacked_shape((1, 2, 2, 16))
    np.testing.assert_array_equal(weight[0, :, 1], out)
    with pytest.raises(ValueError, match="uint8"):
        mxfp4.dequantize(blocks.astype(np.int32), scales)
    with pytest.raises(ValueError, match="disagree"):
        mxfp4.dequantize(blocks, scales[:1])
    assert mxfp4.packed_names(["a_blocks", "a_scales", "b_blocks", "c"]) == {
        "a": ("a_blocks", "a_scales")}


def test_mxfp4_dequantizes_as_transformers_does():
    expected = np.load(os.path.join(MXFP4_FIXTURE, "dequantized.npz"))
    with safe_open(os.path.join(MXFP4_FIXTURE, "model.safetensors"), "numpy") as f:
        for name in expected:
            np.testing.assert_array_equal(
                mxfp4.unpack_expert(f.get_tensor(f"{name}_blocks"), f.get_tensor(f"{name}_scales")),
                expected[name], err_msg=name)


def test_interleaved_columns_read_and_write():
    even = hf_weights.Tensor(("g",), ("x",), (2, 4), False, part=(0, 2), interleaved=True)
    odd = hf_weights.Tensor(("u",), ("x",), (2, 4), False, part=(1, 2), interleaved=True)
    x = np.arange(8.0).reshape(2, 4)
    np.testing.assert_array_equal(even.to_ours([x], (2, 2)), [[0, 2], [4, 6]])
    np.testing.assert_array_equal(odd.to_ours([x], (2, 2)), [[1, 3], [5, 7]])
    parts = even.to_hf(np.asarray([[0.0, 2], [4, 6]]))[0], odd.to_hf(np.asarray([[1.0, 3],
                                                                                [5, 7]]))[0]
    np.testing.assert_array_equal(parts[0] + parts[1], x)


def _forward(imported, ids):
    experiment = schema.parse_config(imported.config)
    model = Transformer(experiment.model, experiment.moe)
    (logits, _), collections = model.apply(
        {"params": imported.variables["params"], **imported.variables["model_state"]}, ids,
        train=False, mutable=[layers.ROUTING])
    from moe_jax.train import evaluate
    return experiment, np.asarray(logits), evaluate.layer_routing(collections, experiment.model)


def test_the_mxfp4_checkpoint_imports_to_transformers_logits_and_exports_float(tmp_path):
    imported = interop.load(MXFP4_FIXTURE)
    expected = np.load(os.path.join(MXFP4_FIXTURE, "expected.npz"))
    dequantized = np.load(os.path.join(MXFP4_FIXTURE, "dequantized.npz"))
    experts_params = imported.variables["params"]["block_0"]["moe"]["experts"]
    gate_up = dequantized["model.layers.0.mlp.experts.gate_up_proj"]
    np.testing.assert_array_equal(experts_params["wi_gate"], gate_up[..., 0::2])
    np.testing.assert_array_equal(experts_params["wi"], gate_up[..., 1::2])
    experiment, logits, tokens = _forward(imported, jnp.asarray(expected["input_ids"]))
    np.testing.assert_allclose(logits, expected["logits"], atol=ATOL, rtol=0)
    np.testing.assert_array_equal(tokens[0].choice.expert_index, expected["expert_index"][0])
    np.testing.assert_allclose(tokens[0].choice.gate, expected["expert_weights"][0], atol=1e-6)
    # export: float experts (the config's bfloat16, exact for MXFP4 values), no quantization
    out = str(tmp_path / "hf")
    os.makedirs(out)
    interop.save(out, experiment, imported.variables, imported.family, imported.hf)
    with open(os.path.join(out, "config.json")) as f:
        assert "quantization_config" not in json.load(f)
    assert not [n for n in hf_weights.tensor_files(out) if n.endswith(("_blocks", "_scales"))]
    again = interop.load(out)
    jax.tree.map(np.testing.assert_array_equal, again.variables, imported.variables)


def test_what_gpt_oss_import_and_export_cannot_represent_is_named(hf_variant):
    other = hf_variant("gpt_oss", lambda hf: hf.update(quantization_config={"quant_method": "fp8"}))
    with pytest.raises(interop.UnsupportedModelError, match="'fp8' is not supported"):
        interop.load(other)
    chunked = hf_variant("gpt_oss", lambda hf: hf.update(layer_types=["chunked_attention"] * 2))
    with pytest.raises(interop.UnsupportedModelError, match="unknown: \\['chunked_attention'\\]"):
        interop.load(chunked)
    # the other families refuse GPT-OSS's options, and gpt_oss refuses a model without them
    experiment = schema.parse_config(interop.load(FIXTURE).config)
    with pytest.raises(interop.UnsupportedModelError, match="go with gpt_oss only"):
        interop.hf_config.check_exportable(experiment, interop.FAMILIES["mixtral"])
    plain = experiment.__class__(**{**experiment.__dict__, "model": experiment.model.replace(
        attention_sinks=False)})
    with pytest.raises(interop.UnsupportedModelError, match="its attention has sinks"):
        interop.hf_config.hf_config(plain, interop.FAMILIES["gpt_oss"])


@pytest.fixture(scope="module")
def imported():
    return interop.load(FIXTURE)


def test_decoding_with_sinks_and_the_sliding_window_equals_the_full_forward_pass(imported):
    experiment = schema.parse_config(imported.config)
    assert experiment.model.sliding_window == 8  # the fixture's 32 tokens outrun the window
    model = decode.decoding_model(experiment.model, experiment.moe)
    variables = {"params": imported.variables["params"], **imported.variables["model_state"]}
    ids = jnp.asarray(np.load(os.path.join(FIXTURE, "expected.npz"))["input_ids"])
    full, _ = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, ids)
    prompts, lengths = ids[:, :16], jnp.asarray([13, 10], jnp.int32)
    prefill = jax.jit(decode.prefill, static_argnums=0, static_argnames="cache_len")
    step = jax.jit(decode.step, static_argnums=0)
    logits, state, _ = prefill(model, variables, prompts, lengths, cache_len=32)
    rows = jnp.arange(2)
    for _ in range(4):
        np.testing.assert_allclose(logits, full[rows, state.lengths - 1], atol=ATOL)
        logits, state, _ = step(model, variables, state, ids[rows, state.lengths])


def test_the_scanned_stack_gives_the_unrolled_logits(imported):
    expected = np.load(os.path.join(FIXTURE, "expected.npz"))
    experiment = schema.parse_config(imported.config)
    scanned = experiment.model.replace(scan_layers=True)
    model = Transformer(scanned, experiment.moe)
    params = stack.convert_layout(imported.variables["params"], scanned, scanned=True)
    logits, _ = model.apply({"params": params}, jnp.asarray(expected["input_ids"]), train=False)
    np.testing.assert_allclose(logits, expected["logits"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("name, total, active", [("gpt_oss_120b", 116.8e9, 5.1e9),
                                                 ("gpt_oss_20b", 20.9e9, 3.6e9)])
def test_published_gpt_oss_counts(name, total, active):
    """Model card, Table 1: total parameters, and active parameters per token counting the
    unembedding but not the embedding table (5.13B and 3.61B)."""
    count = flops.count(schema.load_config(f"configs/published/{name}.py"))
    assert abs(count.total_params / total - 1) <= 0.02, count.total_params
    card_active = count.active_params - count.embedding_params / 2  # less the input embedding
    assert abs(card_active / active - 1) <= 0.02, card_active


def test_the_routing_analysis_reads_an_imported_run(imported_run):
    from experiments.analyses import routing_stats

    family, out = imported_run(FIXTURE)
    assert family == "gpt_oss"
    analysis = routing_stats.route_batches(out, max_batches=1)
    assert analysis["num_experts"] == 4 and analysis["top_k"] == 2
    assert analysis["layers"] == [0, 1] and analysis["tokens"] > 0
    shares = analysis["per_layer"]["1"]["domain_share"]
    assert np.isfinite(np.asarray(shares, float)).all()


def test_biased_clamped_experts_give_the_same_output_with_every_dispatch():
    config = MoeConfig(num_experts=4, top_k=2, d_ff=8, activation="clamped_swiglu",
                       router_bias=True, expert_bias=True, renormalize_gates=True,
                       dispatch="dropless", capacity_factor=4.0, eval_capacity_factor=4.0)
    params = moe.init_params(jax.random.key(0), config, 16)
    params = jax.tree.map(lambda a: a + 0.3 * jax.random.normal(jax.random.key(1), a.shape),
                          params)  # non-zero biases
    x = 3 * jax.random.normal(jax.random.key(2), (2, 6, 16))
    y, _ = moe.apply(params, x, config, train=False)
    for dispatch in ("gather", "einsum"):  # capacity 4x: nothing dropped
        y_capacity, aux = moe.apply(params, x, config.replace(dispatch=dispatch), train=False)
        assert float(aux["dropped_fraction"]) == 0
        np.testing.assert_allclose(y_capacity, y, rtol=1e-5, atol=1e-5)


def test_explicit_expert_parallelism_refuses_expert_biases_over_a_model_axis():
    from moe_jax.parallel import expert_parallel, sharding

    mesh = sharding.make_mesh(sharding.MeshConfig(expert=2, model=2), jax.devices()[:4])
    config = MoeConfig(num_experts=4, top_k=2, d_ff=8, activation="clamped_swiglu",
                       expert_bias=True)
    params = moe.init_params(jax.random.key(0), config, 16)
    explicit = expert_parallel.MoeSharding(mesh, form="explicit")
    with pytest.raises(ValueError, match="would add the output bias once per shard"):
        expert_parallel.expert_param_specs(params, explicit)
    specs = expert_parallel.expert_param_specs(params, expert_parallel.MoeSharding(mesh))
    assert specs["experts"]["wo_bias"] == jax.sharding.PartitionSpec("expert", None)
