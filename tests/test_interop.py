"""Hugging Face checkpoints in and out: each family's committed fixture (a tiny random model
built with transformers 5.24 by tools/make_hf_fixtures.py, with its float32 logits and router
logits on a fixed input) imports to the same logits and the same chosen experts; export then
import is the identity; bad directories fail naming the tensor, the shapes and the fix."""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from moe_jax import interop, layers, sample, schema
from moe_jax.analysis import flops
from moe_jax.interop import conversion, hf_weights
from moe_jax.models import Transformer
from moe_jax.models.sampling import SamplingConfig
from moe_jax.train import checkpoint, evaluate

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "hf")
FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "llama", "qwen2", "deepseek_v3",
            "llama4_text", "gpt_oss")
# float32 parity with transformers: the measured max |difference| of the logits is ~5e-6
# (logits of magnitude ~5); 1e-4 leaves room for other BLAS summation orders.
ATOL = 1e-4


@functools.cache
def _imported(family: str) -> interop.Imported:
    return interop.load(os.path.join(FIXTURES, family))


def _expected(family: str) -> dict[str, np.ndarray]:
    return dict(np.load(os.path.join(FIXTURES, family, "expected.npz")))


def _forward(family: str):
    imported = _imported(family)
    experiment = schema.parse_config(imported.config)
    model = Transformer(experiment.model, experiment.moe)
    (logits, _), collections = jax.jit(
        lambda variables, ids: model.apply(variables, ids, train=False,
                                           mutable=[layers.ROUTING]))(
        {"params": imported.variables["params"], **imported.variables["model_state"]},
        jnp.asarray(_expected(family)["input_ids"]))
    tokens = (evaluate.layer_routing(collections, experiment.model)
              if experiment.model.sparse_layers else [])
    return experiment, np.asarray(logits), tokens


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_and_chosen_experts_match_transformers(family):
    expected = _expected(family)
    experiment, logits, tokens = _forward(family)
    assert logits.shape == expected["logits"].shape
    np.testing.assert_allclose(logits, expected["logits"], atol=ATOL, rtol=0)
    assert len(tokens) == len(expected["router_logits"]) == len(experiment.model.sparse_layers)
    for layer, routed in enumerate(tokens):
        np.testing.assert_allclose(np.asarray(routed.logits), expected["router_logits"][layer],
                                   atol=ATOL, rtol=0)
        # the same experts in the same order (highest probability first); the fixtures' inputs
        # keep every k-th / (k+1)-th probability gap above 1e-3, far above float32 noise
        np.testing.assert_array_equal(np.asarray(routed.choice.expert_index),
                                      expected["expert_index"][layer])
    assert float(expected["router_gap"]) > 1e-3


def test_the_families_exercise_every_option():
    """The fixtures cover what each family adds (so the parity tests above test them)."""
    models = {f: schema.parse_config(_imported(f).config) for f in FAMILIES}
    assert models["qwen3_moe"].model.qk_norm == "per_head"
    assert models["qwen3_moe"].model.head_dim == 16  # H * h != d
    assert models["olmoe"].model.qk_norm == "projection"
    assert models["qwen2_moe"].moe.shared_expert_gate
    assert models["qwen2_moe"].moe.num_shared_experts == 2
    assert models["qwen2_moe"].model.sparse_layers == (1,)  # mlp_only_layers=[0]
    assert models["qwen2_moe"].model.qkv_bias and models["qwen2"].model.qkv_bias
    assert models["mixtral"].moe.renormalize_gates and models["qwen3_moe"].moe.renormalize_gates
    assert not models["olmoe"].moe.renormalize_gates
    assert not models["qwen2_moe"].moe.renormalize_gates
    assert _imported("qwen2").hf["tie_word_embeddings"]
    deepseek = models.pop("deepseek_v3")
    assert deepseek.model.latent_attention and deepseek.model.q_lora_rank == 16
    assert deepseek.model.yarn_mscale_all_dim == 0.8 and deepseek.model.rope_interleave
    assert deepseek.model.latent_norm_eps == 1e-6 and deepseek.model.norm_eps == 1e-5
    assert deepseek.moe.router == "sigmoid_bias" and deepseek.moe.expert_groups == 4
    assert deepseek.moe.top_expert_groups == 2 and deepseek.moe.routed_scaling_factor == 1.7
    assert deepseek.moe.num_shared_experts == 2 and not deepseek.moe.shared_expert_gate
    assert deepseek.model.sparse_layers == (1, 2)  # first_k_dense_replace=1
    # the fixture's inputs make both the correction bias and the group limit change choices
    expected = _expected("deepseek_v3")
    assert expected["tokens_changed_by_bias"].any()
    assert expected["tokens_changed_by_group_limit"].any()
    llama4 = models.pop("llama4_text")
    assert llama4.model.nope_layers == (1, 2) and llama4.model.chunked_layers == (0, 3)
    assert llama4.model.attention_chunk == 8 and llama4.model.attn_temperature_floor == 8
    assert llama4.model.qk_norm == "weightless" and llama4.model.rope_interleave
    assert llama4.model.sparse_layers == (1, 3) and llama4.model.d_ff == 40
    assert llama4.moe.router == "sigmoid_top_k" and llama4.moe.gate_inputs
    assert llama4.moe.num_shared_experts == 1 and llama4.moe.d_ff == 16
    gpt_oss = models.pop("gpt_oss")
    assert gpt_oss.model.attention_sinks and gpt_oss.model.qkv_bias and gpt_oss.model.out_bias
    assert gpt_oss.model.sliding_window == 8 and gpt_oss.model.sliding_window_layers == (0,)
    assert gpt_oss.model.rope_scaling == "yarn" and not gpt_oss.model.yarn_truncate
    assert gpt_oss.moe.router_bias and gpt_oss.moe.expert_bias
    assert gpt_oss.moe.activation == "clamped_swiglu" and gpt_oss.moe.swiglu_limit == 7.0
    assert _expected("gpt_oss")["swiglu_clamped"].all()  # every clamp acts on the input
    for family, e in models.items():
        assert e.model.rope_base == 50000.0 and e.model.norm_eps == 1e-5, family
        assert e.model.vocab_size == 300 and e.model.padded_vocab_size == 300, family


@pytest.mark.parametrize("family", FAMILIES)
def test_flops_counts_every_parameter_of_the_families(family):
    """QK-norm scales and the shared experts' output gate are counted (moe_jax.analysis.flops)."""
    experiment = schema.parse_config(_imported(family).config)
    params = _imported(family).variables["params"]
    count = flops.count_model(experiment.model, experiment.moe)
    assert count.total_params == sum(int(np.size(x)) for x in jax.tree.leaves(params))


def _tensors(directory: str) -> dict[str, np.ndarray]:
    out = {}
    for name, file in hf_weights.tensor_files(directory).items():
        with safe_open(file, framework="numpy") as f:
            out[name] = f.get_tensor(name)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_export_writes_the_original_tensors_and_import_is_the_identity(family, tmp_path):
    imported = _imported(family)
    experiment = schema.parse_config(imported.config)
    out = str(tmp_path / "hf")
    os.makedirs(out)
    interop.save(out, experiment, imported.variables, imported.family, imported.hf,
                 max_shard_bytes=100_000)  # shards, as large models are written
    original, written = _tensors(os.path.join(FIXTURES, family)), _tensors(out)
    assert sorted(written) == sorted(original)
    for name, value in original.items():
        assert written[name].dtype == value.dtype, name
        np.testing.assert_array_equal(written[name], value, err_msg=name)
    with open(os.path.join(out, "config.json")) as f:
        hf = json.load(f)
    for key, value in imported.hf.items():
        if key not in ("head_dim", "rope_theta", "transformers_version"):
            assert hf[key] == value, key
    again = interop.load(out)
    assert again.config.to_dict() == imported.config.to_dict()
    jax.tree.map(np.testing.assert_array_equal, again.variables, imported.variables)


def _rewrite(directory: str, change) -> None:
    tensors = _tensors(directory)
    change(tensors)
    os.remove(os.path.join(directory, "model.safetensors"))
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})


def test_unsupported_architecture_names_what_is_supported(hf_variant):
    directory = hf_variant("llama")
    with open(os.path.join(directory, "config.json")) as f:
        hf = json.load(f)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump({**hf, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, f)
    with pytest.raises(interop.UnsupportedModelError, match=r"model_type='gpt2'.*supported: "
                       r"mixtral \(MixtralForCausalLM\), qwen2_moe.*llama"):
        interop.load(directory)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump({**hf, "rope_parameters": {"rope_type": "dynamic", "rope_theta": 5e5}}, f)
    with pytest.raises(interop.UnsupportedModelError, match=r"rope scaling 'dynamic'.*'llama3'"):
        interop.load(directory)


def test_llama3_rope_scaling_of_a_llama_checkpoint_round_trips(hf_variant):
    """Llama 3.1's rope_scaling (transformers 4.x spelling, original context shrunk to 16 for
    the fixture's 64 positions) imports to the llama3_* fields and exports as rope_parameters.
    Checked once against transformers 5.25 (not a fixture): logits within 3.3e-6 of
    LlamaForCausalLM's."""
    directory = hf_variant("llama")
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        hf = json.load(f)
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    with open(path, "w") as f:
        json.dump({**hf, "rope_parameters": None, "rope_theta": 5e4, "rope_scaling": rope}, f)
    imported = interop.load(directory)
    experiment = schema.parse_config(imported.config)
    assert (experiment.model.rope_scaling, experiment.model.llama3_factor,
            experiment.model.llama3_original_max_seq_len) == ("llama3", 8.0, 16)
    written = interop.hf_config.hf_config(experiment, imported.family, imported.hf)
    assert written["rope_parameters"] == {**rope, "rope_theta": 5e4} and \
        "rope_scaling" not in written
    with open(path, "w") as f:
        json.dump(written, f)
    assert interop.load(directory).config.to_dict() == imported.config.to_dict()


def test_missing_extra_and_misshaped_tensors_are_named(hf_variant):
    directory = hf_variant("llama")

    def damage(tensors):
        del tensors["model.layers.1.mlp.up_proj.weight"]
        tensors["model.layers.2.mlp.up_proj.weight"] = np.zeros((48, 32), np.float32)
        tensors["model.layers.0.self_attn.q_proj.weight"] = np.zeros((16, 32), np.float32)

    _rewrite(directory, damage)
    with pytest.raises(interop.CheckpointMismatchError) as err:
        interop.load(directory)
    message = str(err.value)
    assert "model.layers.1.mlp.up_proj.weight: missing (config.json implies shape [48, 32])" \
        in message
    assert ("model.layers.0.self_attn.q_proj.weight: shape [16, 32] in model.safetensors, "
            "config.json implies [32, 32]") in message
    assert "tensors the config does not use: ['model.layers.2.mlp.up_proj.weight']" in message


def test_a_directory_without_safetensors_says_so(tmp_path, hf_variant):
    directory = hf_variant("llama")
    os.remove(os.path.join(directory, "model.safetensors"))
    with pytest.raises(interop.CheckpointMismatchError, match=r"holds no \.safetensors"):
        interop.load(directory)
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        interop.load(str(tmp_path / "nowhere"))


def test_export_refuses_what_a_family_cannot_represent():
    dense = schema.parse_config(schema.load_config("configs/dense.py:tiny"))  # gelu FFN
    with pytest.raises(interop.UnsupportedModelError, match="SwiGLU"):
        interop.infer_family(dense)
    switch = schema.parse_config(schema.load_config("configs/mixtral.py:e8"))
    assert interop.infer_family(switch).model_type == "mixtral"
    with pytest.raises(interop.UnsupportedModelError, match="needs shared experts"):
        interop.hf_config.check_exportable(switch, interop.FAMILIES["qwen2_moe"])
    with pytest.raises(interop.UnsupportedModelError, match="renormalises"):
        interop.hf_config.check_exportable(switch.__class__(**{
            **switch.__dict__, "moe": switch.moe.replace(renormalize_gates=False)}),
            interop.FAMILIES["mixtral"])


def test_convert_cli_writes_a_run_and_exports_it_back(tmp_path):
    source = os.path.join(FIXTURES, "qwen2_moe")
    out, back = str(tmp_path / "converted"), str(tmp_path / "back")
    written = conversion.import_hf(source, out)
    assert written["family"] == "qwen2_moe"
    assert sorted(os.listdir(out)) == ["checkpoints", "config.json", "hf"]
    config = schema.load_config(os.path.join(out, "config.json"))  # a run's config.json
    assert config.init.checkpoint == os.path.abspath(out) and config.moe.shared_expert_gate
    variables = checkpoint.read_weights(out)[0]
    jax.tree.map(np.testing.assert_array_equal, variables, _imported("qwen2_moe").variables)
    with pytest.raises(FileExistsError, match="--overwrite"):
        conversion.import_hf(source, out)
    conversion.import_hf(source, out, overwrite=True)
    assert conversion.export_hf(out, back)["family"] == "qwen2_moe"
    original = _tensors(source)
    for name, value in _tensors(back).items():
        np.testing.assert_array_equal(value, original[name], err_msg=name)
    with pytest.raises(FileExistsError, match="--overwrite"):
        conversion.export_hf(out, back)
    # Sampling text needs the model's own tokenizer, which moe_jax does not ship: refused
    # before anything compiles, saying what to do.
    with pytest.raises(ValueError, match=r"vocabulary of .* tokenizer .*--prompt_ids"):
        sample.run(out, ["def "], max_new_tokens=2, sampling=SamplingConfig(), seed=0)
    # Token ids of the model's own vocabulary decode: greedy continuations equal the argmax of
    # the full forward pass, token by token.
    ids = [5, 17, 250]
    texts = sample.run(out, [], max_new_tokens=3, sampling=SamplingConfig(temperature=0.0),
                       seed=0, prompt_ids=[",".join(map(str, ids))])
    continued = [int(t) for t in texts[0].split(",")]
    assert continued[:3] == ids and len(continued) == 6
    imported = _imported("qwen2_moe")
    experiment = schema.parse_config(imported.config)
    model = Transformer(experiment.model, experiment.moe)
    variables = {"params": imported.variables["params"], **imported.variables["model_state"]}
    logits, _ = model.apply(variables, jnp.asarray([continued[:5]]), train=False)
    np.testing.assert_array_equal(continued[3:], np.argmax(np.asarray(logits)[0, 2:5], -1))
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        sample.run(out, [], max_new_tokens=1, sampling=SamplingConfig(), seed=0,
                   prompt_ids=["1,100000"])
    with pytest.raises(ValueError, match="comma-separated"):
        sample.parse_ids("1;2", 300)


@pytest.mark.slow
def test_a_converted_model_fine_tunes_analyses_and_exports(tmp_path, data_dir):
    """The commands of docs/huggingface.md: convert, fine-tune with moe_jax.main, route the
    validation batches (routing analysis), export the fine-tuned run."""
    from experiments.analyses import routing_stats
    from moe_jax.main import run_from_argv

    out, run_dir, back = (str(tmp_path / n) for n in ("converted", "ft", "back"))
    conversion.import_hf(os.path.join(FIXTURES, "mixtral"), out)
    (_, _, summary), = run_from_argv([
        "moe_jax.main", f"--config={out}/config.json", f"--workdir={run_dir}",
        "--config.data.name=embedded_tiny", f"--config.data.data_dir={data_dir}",
        "--config.data.eval_batches=1", "--config.train.num_train_steps=2",
        "--config.train.warmup_steps=1", "--config.train.batch_size=2",
        "--config.train.seq_len=32", "--config.train.progress_bar=False"])
    assert summary["steps"] == 2 and np.isfinite(summary["eval_loss"])
    analysis = routing_stats.route_batches(run_dir, max_batches=1)
    assert analysis["num_experts"] == 4 and analysis["layers"] == [0, 1]
    assert conversion.export_hf(run_dir, back)["family"] == "mixtral"
    tuned = checkpoint.read_weights(run_dir)[0]["params"]
    again = interop.load(back).variables["params"]
    jax.tree.map(np.testing.assert_array_equal, again, tuned)
    start = _imported("mixtral").variables["params"]
    assert not np.array_equal(tuned["block_0"]["moe"]["router"]["kernel"],
                              start["block_0"]["moe"]["router"]["kernel"])
