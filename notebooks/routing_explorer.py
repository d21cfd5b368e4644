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
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/OWNER/moe_jax/blob/main/notebooks/routing_explorer.ipynb)
#
# # Routing explorer: what a trained top-2 router does
#
# Train (or restore) a small Mixtral-style model, `configs/mixtral.py:e8` (every block sparse, top-2
# of 8 SwiGLU experts, dropless), then look at its routers on the validation batches: expert use per
# domain (code, prose, math) and per byte class, the per-layer router entropy, and how many
# assignments a capacity-limited dispatch would drop at each evaluation capacity factor. The
# analysis is `experiments/analyses/routing_stats.py`, the same code as the `routing_analysis`
# suite, and so are the first three figures.
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
# ## 1. Train, or restore a run
#
# Set `RESTORE_FROM` (or the environment variable `MOE_JAX_ROUTING_WORKDIR`) to a run directory
# written by `python -m experiments.run --suite=routing_analysis` (e.g.
# `experiments/results/routing_analysis/runs/tiny/mixtral_e8_s0`) to analyse it without training.
# Otherwise this trains the suite's run: 600 steps of 16 x 128 tokens in full mode (~6 min on 2 CPU
# cores), 40 steps of 8 x 128 on the tiny corpus in fast mode.

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

import json
import tempfile

from experiments.analyses import routing_stats
from experiments.suites import routing_analysis
from moe_jax.train.loop import train_and_evaluate

RESTORE_FROM = os.environ.get("MOE_JAX_ROUTING_WORKDIR", "")  # or a run directory
fast = {"train.num_train_steps": 40, "train.warmup_steps": 5, "train.batch_size": 8,
        "data.name": "embedded_tiny"}
if RESTORE_FROM:
    workdir = RESTORE_FROM
else:
    spec = routing_analysis.SUITE.expand("tiny", seeds=1, extra=fast if FAST else None)[0]
    workdir = tempfile.mkdtemp(prefix="moe_jax_routing_")
    # routing_stats rebuilds the config from request.json, as experiments.run records it.
    with open(os.path.join(workdir, "request.json"), "w") as f:
        json.dump({"config": spec.config, "overrides": dict(spec.overrides)}, f)
    print(f"training configs/{spec.config} for {spec.num_train_steps} steps")
    summary = train_and_evaluate(spec.build_config(), workdir)
    print(f"validation loss {summary['eval_loss']:.3f} nats/token, "
          f"{summary['eval_bits_per_byte']:.3f} bits/byte")

# %% [markdown]
# ## 2. Expert use per domain and byte class, entropy per layer
#
# `routing_stats.route_batches` restores the checkpoint, routes the validation batches and computes
# the statistics (each token's two choices count 1/2 each, before capacity). The figures are the
# `routing_analysis` suite's, drawn from this one run.

# %%
from IPython.display import Image, display

from experiments.library.results import Results

# %matplotlib inline

analysis = routing_stats.route_batches(workdir)
one_run = Results({"suite": "routing_analysis", "scale": "this run", "runs": [
    {"member": routing_analysis.MEMBER, "seed": 0, "status": "finished",
     "analysis": analysis}]})
figures_dir = tempfile.mkdtemp(prefix="moe_jax_figures_")
for figure in routing_analysis.SUITE.figures:
    path = os.path.join(figures_dir, f"{figure.name}.png")
    figure.draw(one_run, path)
    print(figure.caption)
    display(Image(filename=path))

# %%
print(f"{analysis['tokens']} validation tokens; chance: first choice repeated "
      f"{analysis['chance_repeat_first']:.1%}, any of the top-2 "
      f"{analysis['chance_repeat_any']:.1%}")
print(f"{'layer':>5} {'entropy':>8} {'of load':>8} {'MI(domain)':>11} {'MI(class)':>10} "
      f"{'repeat 1st':>10} {'repeat any':>10}")
for layer, s in analysis["per_layer"].items():
    print(f"{layer:>5} {s['entropy']:>8.3f} {s['marginal_entropy']:>8.3f} "
          f"{s['mi_domain_bits']:>9.3f} b {s['mi_class_bits']:>8.3f} b "
          f"{s['repeat_first']:>10.1%} {s['repeat_any']:>10.1%}")
print(f"entropies in nats; ln E = {analysis['ln_experts']:.3f} is a uniform router")

# %% [markdown]
# ## 3. Dropped assignments vs the evaluation capacity factor
#
# The model was trained dropless (no capacity, nothing dropped, so the causal LM never sees the
# future through capacity). Here each sparse layer's router logits on the validation batches (each
# layer sows its per-token routing) are routed again by `routing.route` with a capacity-limited
# `gather` dispatch, `C = ceil(k * T * eval_capacity_factor / E)` per routing group (one batch),
# to see how much capacity this router needs: the dropped fraction falls to zero once every
# expert's busiest group fits.

# %%
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from moe_jax import layers, routing
from moe_jax.train import evaluate
from moe_jax.train import inputs as train_inputs
from moe_jax.train.step import model_inputs

CAPACITY_FACTORS = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0)
experiment, model, params, model_state = routing_stats.restore(workdir)
sparse = experiment.model.sparse_layers
seq_len = experiment.train.seq_len or experiment.model.max_seq_len
data = train_inputs.make_inputs(experiment.data, experiment.model,
                                batch_size=experiment.train.batch_size, seq_len=seq_len,
                                seed=experiment.seed)


@jax.jit
def layer_routing(batch):
    """Every sparse layer's per-token routing (its router logits among it), as the layers sow it."""
    _, collections = model.apply({"params": params, **model_state}, batch["inputs"],
                                 **model_inputs(batch), train=False, mutable=[layers.ROUTING])
    return evaluate.layer_routing(collections, experiment.model)


def capacity_stats(cf):
    """jitted (token routing, mask) -> (dropped fraction, kept load [E], assigned share [E]): the
    same router logits routed again with a capacity-limited gather dispatch."""
    layer_config = experiment.moe.replace(dispatch="gather", eval_capacity_factor=cf)

    def stats(tokens, mask):
        num_tokens = mask.size
        groups = num_tokens // (layer_config.group_size or num_tokens)
        s = routing.route(tokens.logits, layer_config, num_groups=groups, train=False,
                          token_mask=mask.reshape(-1)).statistics
        return s["dropped_fraction"], s["expert_load"], s["assignment_fraction"]
    return jax.jit(stats)


group = experiment.moe.group_size or experiment.train.batch_size * seq_len  # T per group
sweep = {}  # (layer, cf) -> token-weighted means over the validation batches
batches = [{k: jnp.asarray(v) for k, v in b.items()} for b in data.eval_batches()]
routed = [layer_routing(b) for b in batches]
weights = np.array([float((b["segment_ids"] > 0).sum()) for b in batches])
for cf in CAPACITY_FACTORS:
    stats = capacity_stats(cf)
    for m, layer in enumerate(sparse):
        outs = [stats(tokens[m], b["segment_ids"] > 0)
                for tokens, b in zip(routed, batches, strict=True)]
        sweep[layer, cf] = [np.average(np.stack([np.asarray(o[j]) for o in outs]), axis=0,
                                       weights=weights) for j in range(3)]

fig, ax = plt.subplots(figsize=(7, 4.2))
for layer in sparse:
    ax.plot(CAPACITY_FACTORS, [sweep[layer, cf][0] for cf in CAPACITY_FACTORS], "o-",
            label=f"layer {layer}")
ax.set(xlabel="evaluation capacity factor", ylabel="dropped fraction of the T*k assignments",
       title=f"Dropped assignments vs capacity (top-{experiment.moe.top_k} of "
             f"{experiment.moe.num_experts}, groups of {group} tokens)")
ax.grid(alpha=0.3)
ax.legend(fontsize=8)
plt.show()


# %% [markdown]
# Per expert: the share of assignments the router sent to each expert (before capacity) against the
# share that found a slot. With `ipywidgets` (as on Colab) pick the capacity factor and layer with
# the sliders; without it, or on a static page, the figure below shows three capacity factors for
# the deepest layer.

# %%
def plot_expert_load(cf, layer, ax=None):
    dropped, kept, assigned = sweep[layer, cf]
    show = ax is None
    if show:
        _, ax = plt.subplots(figsize=(6, 3.6))
    e = np.arange(len(kept))
    ax.bar(e - 0.2, assigned, width=0.4, color="tab:gray", label="routed (before capacity)")
    ax.bar(e + 0.2, kept, width=0.4, color="tab:blue", label="kept (found a slot)")
    ax.axhline(1 / len(kept), color="k", linestyle=":", label="uniform")
    ax.set(xlabel="expert", ylabel="share of the T*k assignments", xticks=e,
           title=f"layer {layer}, eval capacity factor {cf}: {dropped:.1%} dropped")
    ax.legend(fontsize=7)
    if show:
        plt.show()


static = (0.5, 1.0, 2.0)
fig, axes = plt.subplots(1, len(static), figsize=(5 * len(static), 3.6), sharey=True)
for ax, cf in zip(axes, static, strict=True):
    plot_expert_load(cf, sparse[-1], ax)
fig.tight_layout()
plt.show()

try:
    import ipywidgets as widgets
except ImportError:
    widgets = None
    print("ipywidgets is not installed: the static figure above is all there is.")
if widgets is not None:
    widgets.interact(plot_expert_load,
                     cf=widgets.SelectionSlider(options=CAPACITY_FACTORS, value=1.0,
                                                description="capacity"),
                     layer=widgets.SelectionSlider(options=list(sparse), value=sparse[-1],
                                                   description="layer"),
                     ax=widgets.fixed(None))
