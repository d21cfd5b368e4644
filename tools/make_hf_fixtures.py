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
MIN_ROUTER_GAP = 1e-3

COMMON = dict(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5,
              rope_theta=50000.0, tie_word_embeddings=False)

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
}


def build(family: str, seed: int = 0) -> torch.nn.Module:
    config_cls, model_cls, overrides, _ = FAMILIES[family]
    config = getattr(transformers, config_cls)(**{**COMMON, **overrides})
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
    return model


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


def write(family: str) -> None:
    model = build(family)
    k = getattr(model.config, "num_experts_per_tok", 0)
    rng = np.random.default_rng(0)
    for _ in range(100):
        input_ids = rng.integers(0, model.config.vocab_size, (BATCH, LENGTH)).astype(np.int64)
        logits, routers = forward(model, input_ids)
        choices, gap = router_choices(routers, k) if routers else (np.zeros((0,), np.int32),
                                                                   np.inf)
        if gap > MIN_ROUTER_GAP:
            break
    else:
        raise RuntimeError(f"{family}: no input with a router gap above {MIN_ROUTER_GAP}")
    out = os.path.join(FIXTURES, family)
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(out, **FAMILIES[family][3])
    for extra in ("generation_config.json",):
        if os.path.exists(os.path.join(out, extra)):
            os.remove(os.path.join(out, extra))
    np.savez_compressed(
        os.path.join(out, "expected.npz"), input_ids=input_ids.astype(np.int32), logits=logits,
        router_logits=np.stack(routers) if routers else np.zeros((0,), np.float32),
        expert_index=choices, router_gap=np.float64(gap))
    size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    print(f"{family}: {sorted(os.listdir(out))}, {size / 1024:.0f} KiB, router gap {gap:.2e}")


def check_export(directory: str, family: str) -> None:
    """transformers loads an exported directory and gives the fixture's logits."""
    expected = np.load(os.path.join(FIXTURES, family, "expected.npz"))
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    logits, _ = forward(model.eval(), expected["input_ids"].astype(np.int64))
    err = float(np.max(np.abs(logits - expected["logits"])))
    print(f"{directory}: transformers loads it; max |logits - fixture| = {err:.2e}")
    if err > 1e-4:
        raise SystemExit(f"exported {family} differs from the fixture by {err}")


flags.DEFINE_string("families", ",".join(FAMILIES), "comma-separated families to write")
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
        write(family)
    print(json.dumps({"transformers": transformers.__version__, "torch": torch.__version__}))


if __name__ == "__main__":
    app.run(main)
