"""Writes the Hugging Face parity fixtures of tests/test_interop.py (dev only: needs torch and
transformers, which neither users nor CI install).

    python3 -m venv .venv-hf && .venv-hf/bin/pip install -e ".[hf]"
    .venv-hf/bin/python tools/make_hf_fixtures.py            # -> tests/fixtures/hf/<family>/

For each family a tiny random model is built with transformers, its weights re-drawn at unit
scale (transformers' own init, N(0, 0.02^2), makes near-uniform logits and near-tied routers),
and saved with `save_pretrained` (config.json + safetensors, the layout of the Hub's
checkpoints; Mixtral in several shards with an index). `expected.npz` holds a fixed input,
the float32 logits, each sparse layer's router logits [N, E] and chosen experts [N, k], and the
smallest gap between the k-th and (k+1)-th router probability (the input is redrawn until it
exceeds MIN_ROUTER_GAP, so float32 reordering cannot flip a choice).

The frontier families (FRONTIER: DeepSeek-V3, GPT-OSS, Llama 4 text) use LONG_LENGTH tokens so
that sliding windows and attention chunks matter, transformers' eager attention and experts,
and routers read through forward hooks: `expected.npz` adds the gates `expert_weights` [M, N, k]
and `moe_layers`, and the gap is measured on what each router ranks (DeepSeek-V3: the biased
sigmoid scores and the group scores; GPT-OSS and Llama 4: the router logits). `gpt_oss_mxfp4`
is a GPT-OSS model whose experts are stored as the released checkpoints store them (MXFP4
blocks and scales, `quantization_config` in config.json); `dequantized.npz` holds the float32
expert tensors transformers dequantizes them to, in the unquantized checkpoint's names and
layout (no gradients there: the format is for import; GPT-OSS's gradients are gpt_oss's).

`gradients.npz` (every other family): the float32 gradient of the mean next-token
cross-entropy, `cross_entropy(logits[:, :-1], input_ids[:, 1:])` averaged over the B * (T - 1)
predicted tokens (no auxiliary losses), on expected.npz's input, with respect to every
parameter, under the checkpoint's own tensor names and shapes (the gradient written by
`save_pretrained`, so per-expert tensors where the checkpoint has them; buffers such as
DeepSeek-V3's e_score_correction_bias have none); `gradients.json` holds the loss, its float64
value and the gradients' float32 error. Neither is a .safetensors file, so a loader that reads
every *.safetensors of the directory reads the weights only. They are computed from the
directory on disk, loaded with `from_pretrained`. A family whose directory exists keeps its
weights and expected.npz (the committed tests compare against them; a newer torch moves the
float32 logits by ~2e-6) unless --rewrite is given.

`--check_export=DIR --family=NAME` loads a directory written by `python -m moe_jax.convert
--to_hf=DIR` with transformers and compares its logits with the fixture's.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import torch
import transformers
from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "hf")
BATCH, LENGTH = 2, 12
LONG_LENGTH = 32  # frontier families: longer than GPT-OSS's window and Llama 4's chunks (8)
MIN_ROUTER_GAP = 1e-3

COMMON = dict(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5,
              rope_theta=50000.0, tie_word_embeddings=False)
EAGER = dict(attn_implementation="eager", experts_implementation="eager")

# family -> (config class, model class, config overrides, save_pretrained kwargs)
FAMILIES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2,
                     sliding_window=None), {"max_shard_size": "150KB"}),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(intermediate_size=64, moe_intermediate_size=24,
                       shared_expert_intermediate_size=48, num_experts=4, num_experts_per_tok=2,
                       norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[0],
                       qkv_bias=True), {}),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(head_dim=16, intermediate_size=64, moe_intermediate_size=24,
                       num_experts=4, num_experts_per_tok=2, norm_topk_prob=True,
                       decoder_sparse_step=1, mlp_only_layers=[]), {}),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM",
              dict(intermediate_size=24, num_experts=4, num_experts_per_tok=2,
                   norm_topk_prob=False, clip_qkv=None), {}),
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(intermediate_size=48), {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM",
              dict(intermediate_size=48, tie_word_embeddings=True), {}),
    # MLA with a low-rank query, YaRN (mscale != mscale_all_dim, so both the rotary attention
    # factor and the softmax-scale correction are not 1; the rotary dims fall in all three YaRN
    # ranges: extrapolated, ramp, interpolated), 12 experts in 4 groups of 3, 2 groups kept,
    # top-3 of sigmoid scores + a random correction bias, 2 shared experts, layer 0 dense.
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    dict(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
                         intermediate_size=48, moe_intermediate_size=8, q_lora_rank=16,
                         kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=6,
                         n_routed_experts=12, n_shared_experts=2, num_experts_per_tok=3,
                         n_group=4, topk_group=2, routed_scaling_factor=1.7,
                         norm_topk_prob=True, first_k_dense_replace=1, rope_interleave=True,
                         max_position_embeddings=256, rope_theta=10000.0,
                         rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                              mscale=1.0, mscale_all_dim=0.8, beta_fast=32.0,
                                              beta_slow=1.0,
                                              original_max_position_embeddings=64)), {}),
    # Sinks, a sliding layer (window 8) then a full one, q/k/v/o biases, router bias, expert
    # biases, the clamped SwiGLU (expert weights drawn 4x larger so the clamp at 7 acts), YaRN
    # as released (factor 32 over 4096 positions, truncate False).
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM",
                dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                     intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
                     sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                     attention_bias=True, swiglu_alpha=1.702, swiglu_limit=7.0,
                     max_position_embeddings=131072, rope_theta=150000.0,
                     rope_parameters=dict(rope_type="yarn", rope_theta=150000.0, factor=32.0,
                                          beta_fast=32.0, beta_slow=1.0, truncate=False,
                                          original_max_position_embeddings=4096)), {}),
    # Dense and MoE layers alternate (interleave step 2: layers 1 and 3 are MoE, top-1 with a
    # shared expert); layers 1 and 2 are NoPE (no_rope_layers 0: full attention, temperature
    # tuning with floor_scale 8 so it acts within 32 tokens), layers 0 and 3 use rope, the
    # L2 (weightless RMS) qk norm and chunked attention (chunks of 8).
    "llama4_text": ("Llama4TextConfig", "Llama4ForCausalLM",
                    dict(num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=8, intermediate_size=16, intermediate_size_mlp=40,
                         num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=2,
                         no_rope_layers=[1, 0, 0, 1], attention_chunk_size=8, use_qk_norm=True,
                         attn_temperature_tuning=True, floor_scale=8, attn_scale=0.1,
                         rope_theta=500000.0), {}),
}
FRONTIER = ("deepseek_v3", "gpt_oss", "llama4_text")
# GPT-OSS as released: experts in MXFP4 (32 values per block along the input dimension), the
# rest in bfloat16; d = f = 64 so that each expert row holds two blocks; one layer.
MXFP4 = "gpt_oss_mxfp4"
MXFP4_OVERRIDES = dict(hidden_size=64, intermediate_size=64, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, num_hidden_layers=1,
                       layer_types=["sliding_attention"])
FP4_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                       -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32)  # E2M1 codes
MXFP4_SCALE_BIAS = 127  # scales are uint8 biased exponents: 2 ** (scale - 127)
MXFP4_BLOCK = 32


def _config(family: str, **extra) -> transformers.PretrainedConfig:
    config_cls, _, overrides, _ = FAMILIES[family]
    kwargs = {**COMMON, **overrides, **extra}
    if family in FRONTIER:
        kwargs.update(EAGER)
    return getattr(transformers, config_cls)(**kwargs)


def build(family: str, seed: int = 0, **extra) -> torch.nn.Module:
    _, model_cls, _, _ = FAMILIES[family]
    config = _config(family, **extra)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name:  # norm scales around 1, each entry different
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif p.ndim == 1:  # biases
                p.copy_(0.1 * torch.randn_like(p))
            else:  # [out, in] (experts: [E, out, in]) at variance 1 / fan_in
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
        if family in FRONTIER:
            _frontier_init(family, model)
    return model


def _frontier_init(family: str, model: torch.nn.Module) -> None:
    """What the generic draw above gets wrong or leaves unexercised in the frontier families."""
    for name, p in model.named_parameters():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")) and family != "deepseek_v3":
            # GPT-OSS and Llama 4 store experts as [E, in, out] (x @ W): fan-in is axis 1.
            # GPT-OSS's are 4x larger so that gate and up values pass the clamp at +-7.
            gain = 4.0 if family.startswith("gpt_oss") and "gate_up" in name else 1.0
            p.copy_(gain * torch.randn_like(p) / p.shape[1] ** 0.5)
        elif name.endswith("_proj_bias"):  # GPT-OSS expert biases [E, out]
            p.copy_(0.2 * torch.randn_like(p))
        elif name.endswith("self_attn.sinks"):  # one logit per head, comparable to the scores'
            p.copy_(torch.randn_like(p))
        elif name.endswith("mlp.router.bias"):
            p.copy_(0.5 * torch.randn_like(p))
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):  # reorders the sigmoid scores (in (0, 1))
            b.copy_(0.15 * torch.randn_like(b))


def forward(model: torch.nn.Module, input_ids: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    with torch.no_grad():
        out = model(torch.from_numpy(input_ids), output_router_logits=True)
    routers = [r.float().numpy() for r in (getattr(out, "router_logits", None) or ())]
    return out.logits.float().numpy(), routers


def router_choices(router_logits: list[np.ndarray], k: int) -> tuple[np.ndarray, float]:
    """([M, N, k] chosen experts, smallest k-th vs (k+1)-th probability gap)."""
    choices, gap = [], np.inf
    for logits in router_logits:
        probs = torch.softmax(torch.from_numpy(logits).double(), dim=-1).numpy()
        order = np.argsort(-probs, axis=-1, kind="stable")
        choices.append(order[:, :k])
        ranked = np.take_along_axis(probs, order, axis=-1)
        gap = min(gap, float(np.min(ranked[:, k - 1] - ranked[:, k])))
    return np.stack(choices).astype(np.int32), gap


def _kth_gap(values: np.ndarray, k: int) -> float:
    """Smallest (k-th largest - (k+1)-th largest) over the rows of `values` (-inf = excluded)."""
    ranked = -np.sort(-values, axis=-1)
    if k >= ranked.shape[-1]:
        return np.inf
    gap = ranked[:, k - 1] - ranked[:, k]
    return float(np.min(np.where(np.isfinite(gap), gap, np.inf)))


def _routers(family: str, model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """Decoder layer index -> its router module, for the frontier families."""
    out = {}
    for i, layer in enumerate(model.model.layers):
        if family == "deepseek_v3" and hasattr(layer.mlp, "gate"):
            out[i] = layer.mlp.gate
        elif family.startswith("gpt_oss"):
            out[i] = layer.mlp.router
        elif family == "llama4_text" and getattr(layer, "is_moe_layer", False):
            out[i] = layer.feed_forward.router
    return out


def _deepseek_selection(logits: np.ndarray, bias: np.ndarray, config) -> dict[str, np.ndarray]:
    """DeepSeek-V3's routing recomputed in float64: sigmoid scores, + bias for the choice only,
    group score = sum of the top-2 biased scores of each group, topk_group groups kept, top-k
    of the kept biased scores; gates = unbiased scores of those, / their sum, * scale."""
    n, e = logits.shape
    g, kg, k = config.n_group, config.topk_group, config.num_experts_per_tok
    scores = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    biased = scores + bias.astype(np.float64)
    grouped = biased.reshape(n, g, e // g)
    group_scores = -np.sort(-grouped, axis=-1)[..., :2].sum(-1)
    groups = np.argsort(-group_scores, axis=-1, kind="stable")[:, :kg]
    keep = np.zeros((n, g), bool)
    np.put_along_axis(keep, groups, True, axis=-1)
    masked = np.where(np.repeat(keep, e // g, axis=-1), biased, -np.inf)
    index = np.argsort(-masked, axis=-1, kind="stable")[:, :k]
    gates = np.take_along_axis(scores, index, axis=-1)
    if config.norm_topk_prob:
        gates = gates / (gates.sum(-1, keepdims=True) + 1e-20)
    gates = gates * config.routed_scaling_factor
    # the same routing without the bias, and without the group limit, to show both matter
    plain = np.argsort(-biased, axis=-1, kind="stable")[:, :k]
    unbiased = np.argsort(-np.where(np.repeat(keep, e // g, axis=-1), scores, -np.inf),
                          axis=-1, kind="stable")[:, :k]
    return dict(index=index, gates=gates, groups=np.sort(groups, -1), masked=masked,
                group_scores=group_scores,
                changed_by_bias=np.any(np.sort(unbiased, -1) != np.sort(index, -1), -1),
                changed_by_groups=np.any(np.sort(plain, -1) != np.sort(index, -1), -1))


def route_frontier(family: str, model: torch.nn.Module, input_ids: np.ndarray):
    """Logits and, per MoE layer, what its router computed (read by forward hooks)."""
    routers, seen, mlp_inputs = _routers(family, model), {}, {}
    hooks = [r.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out))
             for i, r in routers.items()]
    if family.startswith("gpt_oss"):  # the experts' input, to count clamped activations
        hooks += [model.model.layers[i].mlp.register_forward_pre_hook(
            lambda m, a, i=i: mlp_inputs.__setitem__(i, a[0].reshape(-1, a[0].shape[-1])))
            for i in routers]
    try:
        with torch.no_grad():
            logits = model(torch.from_numpy(input_ids)).logits.float().numpy()
    finally:
        for h in hooks:
            h.remove()
    config, layers = model.config, sorted(routers)
    out = dict(router_logits=[], expert_index=[], expert_weights=[])
    gap, extra = np.inf, {}
    for i in layers:
        if family == "deepseek_v3":
            router_logits, weights, index = (t.float().numpy() for t in seen[i])
            bias = routers[i].e_score_correction_bias.float().numpy()
            sel = _deepseek_selection(router_logits, bias, config)
            # transformers' top-k is unsorted: compare sets, store ours (by biased score)
            assert np.array_equal(np.sort(index, -1), np.sort(sel["index"], -1)), family
            order = np.argsort(index, -1)
            ours = np.argsort(np.argsort(sel["index"], -1), -1)
            hf_weights = np.take_along_axis(np.take_along_axis(weights, order, -1), ours, -1)
            assert np.allclose(hf_weights, sel["gates"], atol=1e-6), family
            index, weights = sel["index"], hf_weights
            gap = min(gap, _kth_gap(sel["masked"], config.num_experts_per_tok),
                      _kth_gap(sel["group_scores"], config.topk_group))
            for key in ("groups", "changed_by_bias", "changed_by_groups"):
                extra.setdefault(key, []).append(sel[key])
        elif family.startswith("gpt_oss"):
            router_logits, weights, index = (t.float().numpy() for t in seen[i])
            gap = min(gap, _kth_gap(router_logits, config.num_experts_per_tok))
            extra.setdefault("clamped", []).append(_clamp_counts(
                model.model.layers[i].mlp.experts, mlp_inputs[i], index))
        else:  # llama4_text: (sigmoid scores scattered into [N, E], router logits)
            scores, router_logits = (t.float().numpy() for t in seen[i])
            index = np.argsort(-router_logits, -1, kind="stable")[:, :config.num_experts_per_tok]
            weights = np.take_along_axis(scores, index, -1)
            assert np.all((scores > 0).sum(-1) <= config.num_experts_per_tok), family
            gap = min(gap, _kth_gap(router_logits, config.num_experts_per_tok))
        out["router_logits"].append(router_logits)
        out["expert_index"].append(index.astype(np.int32))
        out["expert_weights"].append(weights.astype(np.float32))
    routing = {k: np.stack(v) for k, v in out.items()}
    routing["moe_layers"] = np.array(layers, np.int32)
    if family == "deepseek_v3":
        routing["group_index"] = np.stack(extra["groups"]).astype(np.int32)
        routing["e_score_correction_bias"] = np.stack(
            [routers[i].e_score_correction_bias.float().numpy() for i in layers])
        routing["tokens_changed_by_bias"] = np.stack(extra["changed_by_bias"])
        routing["tokens_changed_by_group_limit"] = np.stack(extra["changed_by_groups"])
    if "clamped" in extra:  # [M, 3]: gate > limit, up > limit, up < -limit (routed pairs)
        routing["swiglu_clamped"] = np.stack(extra["clamped"]).astype(np.int32)
    return logits, routing, gap


def _clamp_counts(experts: torch.nn.Module, x: torch.Tensor, index: np.ndarray) -> np.ndarray:
    """How many of the routed (token, expert) pairs' gate / up values the SwiGLU clamps."""
    counts = np.zeros(3, np.int64)
    with torch.no_grad():
        for e in range(experts.num_experts):
            rows = torch.from_numpy(np.nonzero((index == e).any(-1))[0])
            gate_up = x[rows] @ experts.gate_up_proj[e] + experts.gate_up_proj_bias[e]
            gate, up = gate_up[..., ::2], gate_up[..., 1::2]
            counts += [int((gate > experts.limit).sum()), int((up > experts.limit).sum()),
                       int((up < -experts.limit).sum())]
    return counts


def _draw_input(family: str, model: torch.nn.Module, length: int):
    """The first input (from a fixed seed) whose routing has no near-tie."""
    k = getattr(model.config, "num_experts_per_tok", 0)
    rng = np.random.default_rng(0)
    for _ in range(100):
        input_ids = rng.integers(0, model.config.vocab_size, (BATCH, length)).astype(np.int64)
        if family in FRONTIER or family == MXFP4:
            logits, routing, gap = route_frontier(family, model, input_ids)
        else:
            logits, routers = forward(model, input_ids)
            choices, gap = router_choices(routers, k) if routers else (
                np.zeros((0,), np.int32), np.inf)
            routing = dict(router_logits=np.stack(routers) if routers else
                           np.zeros((0,), np.float32), expert_index=choices)
        if gap > MIN_ROUTER_GAP:
            return input_ids, logits, routing, gap
    raise RuntimeError(f"{family}: no input with a router gap above {MIN_ROUTER_GAP}")


def _finish(out: str) -> None:
    for extra in ("generation_config.json",):
        if os.path.exists(os.path.join(out, extra)):
            os.remove(os.path.join(out, extra))


def _size(out: str) -> str:
    files = sorted(os.listdir(out))
    size = sum(os.path.getsize(os.path.join(out, f)) for f in files)
    largest = max(os.path.getsize(os.path.join(out, f)) for f in files)
    return f"{files}, {size / 1024:.0f} KiB (largest file {largest / 1024:.0f} KiB)"


def write(family: str) -> None:
    model = build(family)
    length = LONG_LENGTH if family in FRONTIER else LENGTH
    input_ids, logits, routing, gap = _draw_input(family, model, length)
    out = os.path.join(FIXTURES, family)
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(out, **FAMILIES[family][3])
    _finish(out)
    np.savez_compressed(os.path.join(out, "expected.npz"), input_ids=input_ids.astype(np.int32),
                        logits=logits, **routing, router_gap=np.float64(gap))
    print(f"{family}: router gap {gap:.2e}{_routing_summary(routing)}")


def _routing_summary(routing: dict[str, np.ndarray]) -> str:
    notes = []
    if "tokens_changed_by_bias" in routing:
        notes.append(f"bias changes the experts of {int(routing['tokens_changed_by_bias'].sum())}"
                     f"/{routing['tokens_changed_by_bias'].size} (layer, token)s, the group "
                     f"limit {int(routing['tokens_changed_by_group_limit'].sum())}")
    if "swiglu_clamped" in routing:
        notes.append(f"clamped (gate>7, up>7, up<-7) per layer "
                     f"{routing['swiglu_clamped'].tolist()}")
    return "".join(f"; {n}" for n in notes)


def _load(directory: str, **kwargs) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32, **EAGER, **kwargs).eval()


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits[:, :-1] against input_ids[:, 1:] (B * (T - 1) tokens)."""
    vocab = logits.shape[-1]
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, vocab),
                                             input_ids[:, 1:].reshape(-1))


def _gradients(model: torch.nn.Module, input_ids: np.ndarray) -> tuple[float, np.ndarray]:
    model.zero_grad(set_to_none=True)
    ids = torch.from_numpy(input_ids.astype(np.int64))
    logits = model(ids).logits
    loss = next_token_loss(logits, ids)
    loss.backward()
    return float(loss.detach()), logits.detach().float().numpy()


def checkpoint_tensors(directory: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    out = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(directory, name)))
    return out


def write_gradients(family: str) -> None:
    """gradients.npz: d loss / d parameter under the checkpoint's tensor names (what
    `save_pretrained` writes for a model whose parameters are replaced by their gradients)."""
    import tempfile

    directory = os.path.join(FIXTURES, family)
    expected = np.load(os.path.join(directory, "expected.npz"))
    input_ids = expected["input_ids"]
    model = _load(directory)
    loss, logits = _gradients(model, input_ids)
    drift = float(np.max(np.abs(logits - expected["logits"])))
    grads = {n: p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
             for n, p in model.named_parameters()}
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    # the same in float64 (but for what transformers computes in float32 whatever the dtype:
    # RMSNorm, DeepSeek-V3's router), to state the float32 gradients' own rounding error
    model64 = _load(directory).double()
    loss64, _ = _gradients(model64, input_ids)
    rel = max(float((grads[n].double() - p.grad).abs().max() / p.grad.abs().max().clamp_min(1e-30))
              for n, p in model64.named_parameters() if p.grad is not None)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(grads[n])
        buffers = {n for n, _ in model.named_buffers()}
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        written = checkpoint_tensors(tmp)
    written = {k: v.float().numpy() for k, v in written.items() if k not in buffers}
    # the names and shapes of the checkpoint, less its buffers
    original = {k: v for k, v in checkpoint_tensors(directory).items() if k not in buffers}
    assert sorted(written) == sorted(original), (family, set(written) ^ set(original))
    for k, v in original.items():
        assert tuple(written[k].shape) == tuple(v.shape), (family, k)
    metadata = {
        "loss": loss, "loss_float64": loss64,
        "float64": "model.double(); transformers' RMSNorm and DeepSeek-V3's router still "
                   "compute in float32",
        "loss_definition": "torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), "
                           "input_ids[:, 1:].reshape(-1)), mean over B*(T-1) tokens, float32, "
                           "no auxiliary losses, input_ids from expected.npz",
        "gradient_relative_error_vs_float64": float(f"{rel:.3e}"),
        "no_gradient": no_grad,  # parameters autograd never reached
        "zero_tensors": sorted(k for k, v in written.items() if not v.any()),  # unchosen experts
        "attn_implementation": "eager", "experts_implementation": "eager",
        "transformers": transformers.__version__, "torch": torch.__version__}
    np.savez_compressed(os.path.join(directory, "gradients.npz"), **written)
    with open(os.path.join(directory, "gradients.json"), "w") as f:
        json.dump(metadata, f, indent=2)
        f.write("\n")
    print(f"{family}: loss {loss:.7f} (float64 {loss64:.7f}); {len(written)} gradient tensors; "
          f"float32 vs float64 gradients {rel:.1e} (relative to each tensor's max); logits vs "
          f"expected.npz {drift:.1e}; {_size(directory)}")
    if drift > 1e-4:
        raise SystemExit(f"{family}: the directory's logits moved by {drift} from expected.npz")


def _mxfp4_quantize(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[..., K] float -> (blocks [..., K/32, 16] uint8, scales [..., K/32] uint8): per block of
    32 values the smallest power of two 2^e with max|w| / 2^e <= 6 (E2M1's largest value),
    each value rounded to the nearest E2M1 code (sign in bit 3); element 2j of a block goes to
    the low nibble of byte j, element 2j + 1 to its high nibble; scale = e + 127."""
    *prefix, k = w.shape
    blocks = w.reshape(*prefix, k // MXFP4_BLOCK, MXFP4_BLOCK).astype(np.float64)
    amax = np.abs(blocks).max(-1)
    exponent = np.where(amax > 0, np.ceil(np.log2(np.maximum(amax, 1e-30) / 6.0)), 0).astype(int)
    scaled = blocks / np.exp2(exponent)[..., None]
    codes = np.abs(np.abs(scaled)[..., None] - FP4_VALUES[:8]).argmin(-1)  # magnitude 0..7
    codes = np.where(scaled < 0, codes + 8, codes).astype(np.uint8)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return packed.astype(np.uint8), (exponent + MXFP4_SCALE_BIAS).astype(np.uint8)


def mxfp4_dequantize(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """The inverse layout: [..., G, 16] uint8 and [..., G] uint8 -> [..., G * 32] float32."""
    values = np.stack([FP4_VALUES[blocks & 0x0F], FP4_VALUES[blocks >> 4]], -1)
    values = values.reshape(*blocks.shape[:-1], MXFP4_BLOCK)
    out = values * np.exp2(scales.astype(np.int32) - MXFP4_SCALE_BIAS)[..., None]
    return out.reshape(*blocks.shape[:-2], -1).astype(np.float32)


def write_mxfp4() -> None:
    """GPT-OSS with MXFP4 experts as released: `experts.{gate_up,down}_proj_{blocks,scales}`
    ([E, out, in / 32, 16] and [E, out, in / 32] uint8: the [E, in, out] weights transposed),
    everything else in bfloat16, `quantization_config` in config.json. The model's own experts
    are first replaced by their dequantized values, so its logits are the checkpoint's."""
    from safetensors.torch import save_file
    model = build("gpt_oss", **MXFP4_OVERRIDES)
    quantized, dequantized = {}, {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                blocks, scales = _mxfp4_quantize(p.numpy().transpose(0, 2, 1))
                quantized[f"{name}_blocks"], quantized[f"{name}_scales"] = blocks, scales
                value = mxfp4_dequantize(blocks, scales).transpose(0, 2, 1)
                p.copy_(torch.from_numpy(np.ascontiguousarray(value)))
                dequantized[name] = p.detach().clone()
            else:  # stored in bfloat16
                p.copy_(p.to(torch.bfloat16).float())
    input_ids, logits, routing, gap = _draw_input(MXFP4, model, LONG_LENGTH)
    out = os.path.join(FIXTURES, MXFP4)
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(out)
    _finish(out)
    tensors = {n: t.to(torch.bfloat16) for n, t in checkpoint_tensors(out).items()
               if n not in dequantized}
    tensors.update({n: torch.from_numpy(np.ascontiguousarray(v)) for n, v in quantized.items()})
    os.remove(os.path.join(out, "model.safetensors"))
    save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    np.savez_compressed(os.path.join(out, "dequantized.npz"),
                        **{n: t.numpy() for n, t in dequantized.items()})
    with open(os.path.join(out, "config.json")) as f:
        hf = json.load(f)
    hf["dtype"] = "bfloat16"
    hf["quantization_config"] = {  # as in the released config.json
        "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                   "model.embed_tokens", "lm_head"],
        "quant_method": "mxfp4"}
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(hf, f, indent=2, sort_keys=True)
        f.write("\n")
    np.savez_compressed(os.path.join(out, "expected.npz"), input_ids=input_ids.astype(np.int32),
                        logits=logits, **routing, router_gap=np.float64(gap))
    # transformers reads it back (dequantizing on CPU) to the same experts and logits
    loaded = _load(out, quantization_config=transformers.Mxfp4Config(dequantize=True))
    for name, value in dequantized.items():
        assert torch.equal(loaded.get_parameter(name).float(), value), name
    err = float(np.max(np.abs(route_frontier(MXFP4, loaded, input_ids)[0] - logits)))
    assert err < 1e-5, err
    print(f"{MXFP4}: router gap {gap:.2e}{_routing_summary(routing)}; transformers dequantizes "
          f"the same experts (bit for bit), logits within {err:.1e}; {_size(out)}")


def check_export(directory: str, family: str) -> None:
    """transformers loads an exported directory and gives the fixture's logits."""
    expected = np.load(os.path.join(FIXTURES, family, "expected.npz"))
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    logits, _ = forward(model.eval(), expected["input_ids"].astype(np.int64))
    err = float(np.max(np.abs(logits - expected["logits"])))
    print(f"{directory}: transformers loads it; max |logits - fixture| = {err:.2e}")
    if err > 1e-4:
        raise SystemExit(f"exported {family} differs from the fixture by {err}")


flags.DEFINE_string("families", ",".join([*FAMILIES, MXFP4]),
                    "comma-separated families to write")
flags.DEFINE_bool("rewrite", False,
                  "rebuild the weights and expected.npz of existing directories too")
flags.DEFINE_string("check_export", None, "a directory written by moe_jax.convert --to_hf to "
                    "load with transformers and compare with the fixture")
flags.DEFINE_string("family", None, "the family of --check_export")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    args = flags.FLAGS
    torch.set_num_threads(1)
    if args.check_export:
        check_export(args.check_export, args.family)
        return
    for family in args.families.split(","):
        if args.rewrite or not os.path.exists(os.path.join(FIXTURES, family, "expected.npz")):
            write_mxfp4() if family == MXFP4 else write(family)
        if family != MXFP4:  # an import format (transformers does not train it)
            write_gradients(family)
    print(json.dumps({"transformers": transformers.__version__, "torch": torch.__version__}))


if __name__ == "__main__":
    app.run(main)
