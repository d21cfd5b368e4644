# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/OWNER/moe_jax/blob/main/notebooks/quickstart.ipynb)
#
# # moe_jax quickstart: one MoE layer, then dense vs Switch
#
# Build a Mixture-of-Experts layer with the pure API (`moe.init_params`, `moe.apply`), route a batch
# and look at the routing: which expert each token chose, how loaded the experts are and which
# assignments were dropped for lack of capacity. Then train a tiny dense Transformer and its
# FLOP-matched Switch Transformer on the embedded corpus and compare their loss curves.
#
# Runs on a fresh Colab runtime (CPU, GPU or TPU) and in a local clone (`pip install -e .` first).
# **Fast mode:** set the environment variable `MOE_JAX_FAST=1` to shrink steps and data (the test
# suite runs every notebook this way); the backend cell below prints which mode produced the outputs
# you see.

# %%
# Install moe_jax when it is not importable (a fresh Colab runtime): clone the repository
# (configs/ and experiments/ live there) and install it in editable mode.
import importlib
import importlib.util
import os
import subprocess
import sys

REPO_URL = "https://github.com/OWNER/moe_jax"
if importlib.util.find_spec("moe_jax") is None:
    clone = os.path.abspath("moe_jax")
    if not os.path.isdir(clone):
        subprocess.run(["git", "clone", "--depth=1", REPO_URL, clone], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", clone], check=True)
    sys.path.insert(0, clone)
    importlib.invalidate_caches()

# %%
import moe_jax

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(moe_jax.__file__)))
if not os.path.isdir(os.path.join(REPO_ROOT, "configs")):
    raise RuntimeError("moe_jax is installed without its repository (configs/, experiments/); "
                       f"install it from a clone: git clone {REPO_URL} && pip install -e moe_jax")
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)  # experiments/ is a folder of the repository, not installed
FAST = os.environ.get("MOE_JAX_FAST", "0") == "1"  # fast mode: few steps (the test suite's)

import jax

backend = jax.default_backend()
devices = jax.devices()
print(f"backend: {backend.upper()}, {len(devices)} x {devices[0].device_kind}; jax "
      f"{jax.__version__}")
print("mode:", "fast (MOE_JAX_FAST=1: few steps, small data)" if FAST else
      "full (unset MOE_JAX_FAST)")

# %% [markdown]
# ## 1. One MoE layer
#
# 8 experts, top-2 routing, capacity factor 1.0: each expert takes at most
# `C = ceil(k * T * capacity_factor / E)` of the `T * k` assignments of a routing group (GShard Sec.
# 2.2); the rest are dropped and those tokens keep only the residual path. `moe.apply` returns the
# output and the routing statistics in `aux`.

# %%
import matplotlib.pyplot as plt
import numpy as np

from moe_jax import MoeConfig, moe, routing

config = MoeConfig(num_experts=8, top_k=2, d_ff=128, capacity_factor=1.0,
                   renormalize_gates=True, dispatch="gather")
d_model, num_tokens = 64, 48
params = moe.init_params(jax.random.key(0), config, d_model)
x = jax.random.normal(jax.random.key(1), (1, num_tokens, d_model))  # [batch, seq, d_model]
y, aux = jax.jit(lambda p, x: moe.apply(p, x, config, train=True))(params, x)
print("y:", y.shape, "| dropped fraction:", f"{float(aux['dropped_fraction']):.3f}",
      "| load-balancing loss:", f"{float(aux['load_balancing_loss']):.3f} (1.0 = uniform)")
print("expert load (kept assignments / (N*k)):", np.round(np.asarray(aux["expert_load"]), 3))

# %% [markdown]
# The same routing, step by step with the functions `moe.apply` composes: router probabilities,
# top-k choice, and slot assignment with capacity (all first choices before any second choice,
# earlier tokens first).

# %%
tokens = x.reshape(-1, d_model)                                     # [T, d]
probs = jax.nn.softmax(moe.router_logits(params, tokens, config, train=True, rng=None), -1)
choice = routing.route_top_k(probs, config.top_k, renormalize=config.renormalize_gates)
capacity = config.capacity(num_tokens, train=True)
slots = routing.assign_slots(choice, capacity, config.num_experts, config.drop_priority)
chosen = np.asarray(choice.expert_index)                            # [T, k]
kept = np.asarray(slots.kept)                                       # [T, k]
# The step-by-step routing drops exactly what moe.apply reported.
assert np.isclose(1 - kept.mean(), float(aux["dropped_fraction"]))
print(f"capacity C = {capacity} slots per expert for {num_tokens} tokens x k={config.top_k}; "
      f"{int((~kept).sum())} of {kept.size} assignments dropped")

fig, (ax_map, ax_load) = plt.subplots(1, 2, figsize=(13, 4.2),
                                      gridspec_kw={"width_ratios": [3, 1.2]})
image = ax_map.imshow(np.asarray(probs).T, aspect="auto", cmap="Blues", vmin=0)
fig.colorbar(image, ax=ax_map, label="router probability")
t = np.arange(num_tokens)
for rank, kept_marker, dropped_marker in ((0, "o", "X"), (1, "s", "x")):
    ok = kept[:, rank]
    ax_map.scatter(t[ok], chosen[ok, rank], marker=kept_marker, facecolors="none",
                   edgecolors="k", s=30, label=f"choice {rank + 1}, kept")
    ax_map.scatter(t[~ok], chosen[~ok, rank], marker=dropped_marker, color="red", s=40,
                   label=f"choice {rank + 1}, dropped")
ax_map.set(xlabel="token position", ylabel="expert",
           title="Routing of one group: token x expert probabilities and choices")
ax_map.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=4, fontsize=8)

assigned = np.bincount(chosen.ravel(), minlength=config.num_experts)
kept_count = np.bincount(chosen[kept], minlength=config.num_experts)
experts = np.arange(config.num_experts)
ax_load.bar(experts, kept_count, color="tab:blue", label="kept")
ax_load.bar(experts, assigned - kept_count, bottom=kept_count, color="tab:red", label="dropped")
ax_load.axhline(capacity, color="k", linestyle="--", label=f"capacity C = {capacity}")
ax_load.set(xlabel="expert", ylabel="assignments (tokens)", title="Expert load",
            xticks=experts)
ax_load.legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 2. Dense vs Switch, trained on the embedded corpus
#
# The main job of `python -m moe_jax.main`: `configs/dense.py:tiny` (1.9M parameters) and
# `configs/switch.py:e8` (every other block an 8-expert top-1 layer, experts FLOP-matched to the
# dense FFN: ~3x the parameters at the same FLOPs per token). The embedded corpus (code, prose and
# arithmetic built from the Python standard library, no download) is built on first use. Full mode
# trains each model 300 steps of 16 x 128 byte tokens (a few minutes per model on 2 CPU cores); fast
# mode 30 steps of 8 x 128 on the tiny corpus, enough to see the curves fall, not to compare the
# models.

# %%
# Short outputs: no TFDS progress bars, no INFO logs. The embedded corpus is built here on first
# use (seconds; cached under ~/.cache/moe_jax or $MOE_JAX_DATA_DIR) so that its build messages
# stay out of the training output.
import contextlib
import io

import tensorflow_datasets as tfds
from absl import logging as absl_logging

from moe_jax.data import corpus

tfds.disable_progress_bar()
absl_logging.set_verbosity(absl_logging.WARNING)
with contextlib.redirect_stdout(io.StringIO()):
    corpus.prepare_embedded_corpus(config_name="tiny" if FAST else "default")

import tempfile

from moe_jax import schema
from moe_jax.main import MAIN_JOB, MAIN_JOB_SETTINGS, comparison_table
from moe_jax.train.loop import train_and_evaluate
from moe_jax.train.metrics import read_metrics

settings = {**MAIN_JOB_SETTINGS, "train.num_train_steps": 300, "train.eval_every": 50,
            "train.progress_bar": False}
if FAST:
    settings.update({"data.name": "embedded_tiny", "data.eval_batches": 2,
                     "train.num_train_steps": 30, "train.batch_size": 8,
                     "train.warmup_steps": 5, "train.eval_every": 10, "train.log_every": 2,
                     "train.checkpoint_every": 0})
runs_dir = tempfile.mkdtemp(prefix="moe_jax_quickstart_")
rows = []
for name, spec in MAIN_JOB:
    print(f"== {name}: configs/{spec}")
    config = schema.override(schema.load_config(spec), settings)
    rows.append((name, spec, train_and_evaluate(config, os.path.join(runs_dir, name))))
print(comparison_table(rows))

# %%
fig, ax = plt.subplots(figsize=(7.5, 4.5))
for (name, spec, _), color in zip(rows, ("tab:gray", "tab:orange"), strict=True):
    metrics = read_metrics(os.path.join(runs_dir, name))
    train = [(s, m["train/cross_entropy"]) for s, m in sorted(metrics.items())
             if "train/cross_entropy" in m]
    evals = [(s, m["eval/loss"]) for s, m in sorted(metrics.items()) if "eval/loss" in m]
    ax.plot(*zip(*train, strict=True), color=color, label=f"{name} ({spec}), train cross-entropy")
    ax.plot(*zip(*evals, strict=True), "o--", color=color, label=f"{name}, validation loss")
ax.set(xlabel="training step", ylabel="cross-entropy (nats/token)",
       title=f"Dense vs FLOP-matched Switch, {settings['train.batch_size']} x 128 tokens/step")
ax.grid(alpha=0.3)
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# With a few hundred steps the gap between the two is small and within the seed-to-seed spread
# (README, *the main job*); `experiments/` runs the comparison over seeds and more experts
# (`scaling_results.ipynb` shows the results).
