"""Writes the Colab notebooks of notebooks/ from the cell lists below, and executes them.

    python notebooks/build.py                                  # rewrite the .ipynb sources
    python notebooks/build.py --execute scaling_results        # ... and run one, saving outputs
    MOE_JAX_FAST=1 python notebooks/build.py --execute         # all four, in fast mode

The notebooks are generated: edit the cells here, not in the .ipynb files (a test checks that the
committed sources equal these). Rewriting keeps the outputs of every cell whose source did not
change; `--execute` runs the named notebooks top to bottom in a fresh kernel with the notebooks
directory as working directory (the same function the test suite uses) and saves them with their
outputs. Each notebook's backend cell prints the mode that produced its outputs.

Publishing: set `GITHUB_REPO` ("owner/name" on GitHub) and run this script once; it rewrites the
Colab badges and clone URL of every notebook (cells without outputs, so no rerun is needed) and the
Notebooks section of the top-level README.md.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import nbformat

GITHUB_REPO = "OWNER/moe_jax"  # set at publication: the GitHub "owner/name" of the repository
BRANCH = "main"

NOTEBOOKS_DIR = Path(__file__).resolve().parent
README = NOTEBOOKS_DIR.parent / "README.md"
README_BEGIN = "<!-- notebooks: written by notebooks/build.py -->"
README_END = "<!-- end notebooks -->"
FAST_ENV = "MOE_JAX_FAST"


def colab_url(name: str) -> str:
    return (f"https://colab.research.google.com/github/{GITHUB_REPO}/blob/{BRANCH}/notebooks/"
            f"{name}.ipynb")


def badge(name: str) -> str:
    return (f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
            f"({colab_url(name)})")


# --- cells shared by every notebook -------------------------------------------------------------

INSTALL = f'''\
# Install moe_jax when it is not importable (a fresh Colab runtime): clone the repository
# (configs/ and experiments/ live there) and install it in editable mode.
import importlib
import importlib.util
import os
import subprocess
import sys

REPO_URL = "https://github.com/{GITHUB_REPO}"
if importlib.util.find_spec("moe_jax") is None:
    clone = os.path.abspath("moe_jax")
    if not os.path.isdir(clone):
        subprocess.run(["git", "clone", "--depth=1", REPO_URL, clone], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", clone], check=True)
    sys.path.insert(0, clone)
    importlib.invalidate_caches()
'''

# Finds the repository of the installed package (configs/, experiments/, committed results).
REPO = '''\
import moe_jax

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(moe_jax.__file__)))
if not os.path.isdir(os.path.join(REPO_ROOT, "configs")):
    raise RuntimeError("moe_jax is installed without its repository (configs/, experiments/); "
                       f"install it from a clone: git clone {REPO_URL} && pip install -e moe_jax")
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)  # experiments/ is a folder of the repository, not installed
FAST = os.environ.get("MOE_JAX_FAST", "0") == "1"  # fast mode: few steps (the test suite's)
'''

BACKEND = '''\
import jax

backend = jax.default_backend()
devices = jax.devices()
print(f"backend: {backend.upper()}, {len(devices)} x {devices[0].device_kind}; jax "
      f"{jax.__version__}")
print("mode:", "fast (MOE_JAX_FAST=1: few steps, small data)" if FAST else
      "full (unset MOE_JAX_FAST)")
'''

QUIET = '''\
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
'''


def intro(name: str, title: str, text: str) -> str:
    return (f"{badge(name)}\n\n# {title}\n\n{text}\n\n"
            "Runs on a fresh Colab runtime (CPU, GPU or TPU) and in a local clone "
            "(`pip install -e .` first). **Fast mode:** set the environment variable "
            "`MOE_JAX_FAST=1` to shrink steps and data (the test suite runs every notebook this "
            "way); the backend cell below prints which mode produced the outputs you see.")


def setup_cells() -> list[tuple[str, str]]:
    """The install cell (always the first code cell), then the repository and backend cell."""
    return [("code", INSTALL), ("code", "\n".join([REPO, BACKEND]))]


# --- quickstart ---------------------------------------------------------------------------------

QUICKSTART = [
    ("markdown", intro("quickstart", "moe_jax quickstart: one MoE layer, then dense vs Switch",
                       "Build a Mixture-of-Experts layer with the pure API (`moe.init_params`, "
                       "`moe.apply`), route a batch and look at the routing: which expert each "
                       "token chose, how loaded the experts are and which assignments were "
                       "dropped for lack of capacity. Then train a tiny dense Transformer and "
                       "its FLOP-matched Switch Transformer on the embedded corpus and compare "
                       "their loss curves.")),
    *setup_cells(),
    ("markdown", "## 1. One MoE layer\n\n"
     "8 experts, top-2 routing, capacity factor 1.0: each expert takes at most "
     "`C = ceil(k * T * capacity_factor / E)` of the `T * k` assignments of a routing group "
     "(GShard Sec. 2.2); the rest are dropped and those tokens keep only the residual path. "
     "`moe.apply` returns the output and the routing statistics in `aux`."),
    ("code", '''\
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
'''),
    ("markdown", "The same routing, step by step with the functions `moe.apply` composes: router "
     "probabilities, top-k choice, and slot assignment with capacity (all first choices before "
     "any second choice, earlier tokens first)."),
    ("code", '''\
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
'''),
    ("markdown", "## 2. Dense vs Switch, trained on the embedded corpus\n\n"
     "The main job of `python -m moe_jax.main`: `configs/dense.py:tiny` (1.9M parameters) and "
     "`configs/switch.py:e8` (every other block an 8-expert top-1 layer, experts FLOP-matched to "
     "the dense FFN: ~3x the parameters at the same FLOPs per token). The embedded corpus "
     "(code, prose and arithmetic built from the Python standard library, no download) is built "
     "on first use. Full mode trains each model 300 steps of 16 x 128 byte tokens (a few minutes "
     "per model on 2 CPU cores); fast mode 30 steps of 8 x 128 on the tiny "
     "corpus, enough to see the curves fall, not to compare the models."),
    ("code", QUIET + '''
import tempfile

from moe_jax import schema
from moe_jax.main import MAIN_JOB, MAIN_JOB_SETTINGS, apply_settings, comparison_table
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
    config = apply_settings(schema.load_config(spec), settings)
    rows.append((name, spec, train_and_evaluate(config, os.path.join(runs_dir, name))))
print(comparison_table(rows))
'''),
    ("code", '''\
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
'''),
    ("markdown", "With a few hundred steps the gap between the two is small and within the "
     "seed-to-seed spread (README, *the main job*); `experiments/` runs the comparison over "
     "seeds and more experts (`scaling_results.ipynb` shows the results)."),
]


# --- routing explorer ---------------------------------------------------------------------------

ROUTING_EXPLORER = [
    ("markdown", intro("routing_explorer", "Routing explorer: what a trained top-2 router does",
                       "Train (or restore) a small Mixtral-style model, `configs/mixtral.py:e8` "
                       "(every block sparse, top-2 of 8 SwiGLU experts, dropless), then look at "
                       "its routers on the validation batches: expert use per domain (code, "
                       "prose, math) and per byte class, the per-layer router entropy, and how "
                       "many assignments a capacity-limited dispatch would drop at each "
                       "evaluation capacity factor. The analysis is "
                       "`experiments/suites/routing_stats.py`, the same code as the "
                       "`routing_analysis` suite, and so are the first three figures.")),
    *setup_cells(),
    ("markdown", "## 1. Train, or restore a run\n\n"
     "Set `RESTORE_FROM` (or the environment variable `MOE_JAX_ROUTING_WORKDIR`) to a run "
     "directory written by `python -m experiments.run --suite=routing_analysis` (e.g. "
     "`experiments/results/routing_analysis/runs/tiny/mixtral_e8_s0`) to analyse it without "
     "training. Otherwise this trains the suite's run: 600 steps of 16 x 128 tokens in full "
     "mode (~6 min on 2 CPU cores), 40 steps of 8 x 128 on the tiny corpus in fast mode."),
    ("code", QUIET + '''
import json
import tempfile

from experiments.suites import routing_analysis, routing_stats
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
'''),
    ("markdown", "## 2. Expert use per domain and byte class, entropy per layer\n\n"
     "`routing_stats.route_batches` restores the checkpoint, routes the validation batches and "
     "computes the statistics (each token's two choices count 1/2 each, before capacity). The "
     "figures are the `routing_analysis` suite's, drawn from this one run."),
    ("code", '''\
from IPython.display import Image, display

from experiments.suites.results import Results

%matplotlib inline

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
'''),
    ("code", '''\
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
'''),
    ("markdown", "## 3. Dropped assignments vs the evaluation capacity factor\n\n"
     "The model was trained dropless (no capacity, nothing dropped, so the causal LM never "
     "sees the future through capacity). Here each sparse layer's inputs on the validation "
     "batches are sent through the same layer with a capacity-limited `gather` dispatch, "
     "`C = ceil(k * T * eval_capacity_factor / E)` per routing group (one batch), to see how "
     "much capacity this router needs: the dropped fraction falls to zero once every expert's "
     "busiest group fits."),
    ("code", '''\
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from moe_jax import moe
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
def layer_inputs(batch):
    """The normalised inputs [B, L, d] of every sparse layer's router."""
    _, captured = model.apply({"params": params, **model_state}, batch["inputs"],
                              **model_inputs(batch), train=False,
                              capture_intermediates=evaluate.is_router_input,
                              mutable=["intermediates"])
    return [evaluate.router_input(captured, i) for i in sparse]


def capacity_stats(cf):
    """jitted (layer params, x, mask) -> (dropped fraction, kept load [E], assigned share [E])."""
    layer_config = experiment.moe.replace(dispatch="gather", eval_capacity_factor=cf)

    def stats(layer_params, x, mask):
        _, aux = moe.apply(layer_params, x, layer_config, train=False, token_mask=mask)
        return aux["dropped_fraction"], aux["expert_load"], aux["assignment_fraction"]
    return jax.jit(stats)


group = experiment.moe.group_size or experiment.train.batch_size * seq_len  # T per group
sweep = {}  # (layer, cf) -> token-weighted means over the validation batches
batches = [{k: jnp.asarray(v) for k, v in b.items()} for b in data.eval_batches()]
inputs = [layer_inputs(b) for b in batches]
weights = np.array([float((b["segment_ids"] > 0).sum()) for b in batches])
for cf in CAPACITY_FACTORS:
    stats = capacity_stats(cf)
    for m, layer in enumerate(sparse):
        outs = [stats(params[f"block_{layer}"]["moe"], xs[m], b["segment_ids"] > 0)
                for xs, b in zip(inputs, batches, strict=True)]
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
'''),
    ("markdown", "Per expert: the share of assignments the router sent to each expert (before "
     "capacity) against the share that found a slot. With `ipywidgets` (as on Colab) pick the "
     "capacity factor and layer with the sliders; without it, or on a static page, the figure "
     "below shows three capacity factors for the deepest layer."),
    ("code", '''\
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
'''),
]


# --- scaling results ----------------------------------------------------------------------------

SCALING_RESULTS = [
    ("markdown", intro("scaling_results", "Scaling results: dense vs sparse at matched FLOPs",
                       "The committed results of the paper-reproduction suites "
                       "(`experiments/results/<suite>/tiny.json`, written by "
                       "`python -m experiments.run`), drawn with the suites' own figures and "
                       "tables (`experiments/report.py`), and the FLOP/parameter tables of the "
                       "paper-scale configs. Nothing is trained here; fast mode changes "
                       "nothing.")),
    *setup_cells(),
    ("markdown", "## Which results are there\n\n"
     "Each suite's results file is looked up in the repository. A missing `switch_scaling` "
     "file falls back to the test fixture, which holds **synthetic numbers** (made up for the "
     "tests, not a measurement) so that the figures can be previewed; other missing suites are "
     "skipped with a note. Rerun this notebook when results are committed."),
    ("code", '''\
from IPython.display import Image, Markdown, display

from experiments import report, suites
from experiments.suites.results import Results

%matplotlib inline

RESULTS_DIR = os.path.join(REPO_ROOT, "experiments", "results")
FIXTURE = os.path.join(REPO_ROOT, "tests", "fixtures", "experiments_switch_scaling_tiny.json")
SCALE = "tiny"


def load_results(name):
    """(Results, where from) of a suite, the synthetic fixture for switch_scaling, or None."""
    path = os.path.join(RESULTS_DIR, name, f"{SCALE}.json")
    if os.path.exists(path):
        return Results.load(path), f"experiments/results/{name}/{SCALE}.json"
    if name == "switch_scaling" and os.path.exists(FIXTURE):
        return Results.load(FIXTURE), "SYNTHETIC test fixture (no results committed yet)"
    return None


found = {name: load_results(name) for name in suites.SUITES}
for name, loaded in found.items():
    if loaded is None:
        print(f"{name:>17}: no {SCALE}.json yet; run `python -m experiments.run --suite={name}`")
    else:
        results, source = loaded
        finished = sum(r["status"] == "finished" for r in results.runs)
        print(f"{name:>17}: {source}, {finished}/{len(results.runs)} runs finished, "
              f"created {results.data.get('created', '?')}")
'''),
    ("code", '''\
import tempfile

from experiments.suites import plots

figures_dir = tempfile.mkdtemp(prefix="moe_jax_figures_")
plots.DPI = 90  # the report writes 130 dpi; smaller PNGs keep this notebook light


def show_suite(name):
    """The suite's results table, claims with verdicts, and figures (as experiments.report)."""
    suite = suites.get(name)
    if found[name] is None:
        print(f"No results for suite {name!r}: skipping its tables and figures. Produce them "
              f"with `python -m experiments.run --suite={name}` and rerun this notebook.")
        return
    results, source = found[name]
    if source.startswith("SYNTHETIC"):
        print("NOTE: synthetic numbers from the test fixture, not a measurement.")
    display(Markdown(f"**{suite.title}** ({source})\\n\\n"
                     + report.results_table(results, suite.columns or report.BASE_COLUMNS)))
    claims, _ = report.claims_table(suite, results)
    display(Markdown("Paper claims (verdict: sign of the estimate beyond 2 standard errors "
                     "over seeds, `experiments/suites/stats.py`):\\n\\n" + claims))
    for figure in suite.figures:
        path = os.path.join(figures_dir, f"{name}_{figure.name}.png")
        figure.draw(results, path)
        if os.path.exists(path):
            print(figure.caption)
            display(Image(filename=path))
'''),
    ("markdown", "## Dense vs Switch at matched FLOPs (Switch Transformer, Sec. 3)\n\n"
     "Dense baseline, Switch top-1 with 2 to 64 experts at the same FLOPs per token, and dense "
     "models with 2x and 4x the FLOPs: validation loss against the number of experts, and "
     "training curves against steps and against seconds."),
    ("code", 'show_suite("switch_scaling")'),
    ("markdown", "Quality against parameters: every Switch model has the dense model's FLOPs "
     "per token but more parameters; the bigger dense models pay for theirs in FLOPs."),
    ("code", '''\
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from experiments.suites import plots


def loss_vs_params(results):
    """Validation loss against total parameters: dense members vs Switch members."""
    _, ax = plt.subplots(figsize=(7, 4.5))
    groups = {"dense (1x, 2x, 4x FLOPs)": [m for m in results.members() if m.startswith("dense")],
              "Switch top-1 (1x FLOPs)": [m for m in results.members() if m.startswith("switch")]}
    for i, (label, members) in enumerate(groups.items()):
        members = [m for m in members if results.values(m, "params_total")]
        params = [np.mean(results.values(m, "params_total")) / 1e6 for m in members]
        plots.series(ax, params, [results.values(m, "eval_loss") for m in members], label,
                     plots.COLORS[i])
        for m, p in zip(members, params, strict=True):
            ax.annotate(m, (p, np.mean(results.values(m, "eval_loss") or [np.nan])),
                        fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    plots.label_axes(ax, "total parameters (millions, log scale)",
                     "validation loss (nats/token)")
    ax.set_title(f"Quality vs parameters ({results.scale}; mean ± SD over seeds)")
    plt.show()


if found["switch_scaling"] is None:
    print("No switch_scaling results: nothing to draw.")
else:
    loss_vs_params(found["switch_scaling"][0])
'''),
    ("markdown", "## The other suites\n\n"
     "Capacity factor (Switch Table 1, ST-MoE), load balancing (Switch, DeepSeek-V3), router "
     "stability (ST-MoE), router families, expert granularity (DeepSeekMoE) and the routing "
     "analysis (Mixtral Sec. 5), each where its results file exists."),
    ("code", '''\
for name in suites.SUITES:
    if name != "switch_scaling":
        display(Markdown(f"### `{name}`"))
        show_suite(name)
'''),
    ("markdown", "## FLOPs and parameters at paper scale\n\n"
     "The `switch_scaling` members at the paper's scale (T5-Base width, not run here), and the "
     "published MoE models of `configs/published/` (the same tables as "
     "`python -m moe_jax.flops --family=...`; forward FLOPs per token, training = 3x)."),
    ("code", '''\
import glob

from moe_jax import flops, schema

display(Markdown("**switch_scaling, paper scale**\\n\\n"
                 + report.flops_table(suites.get("switch_scaling"), "paper")))
published = sorted(glob.glob(os.path.join(REPO_ROOT, "configs", "published", "*.py")))
rows = [flops.table_row(os.path.basename(p)[:-3], schema.load_config(p)) for p in published]
display(Markdown("**Published models** (`configs/published/`)\\n\\n" + flops.format_table(rows)))
'''),
]


# --- expert parallelism -------------------------------------------------------------------------

EP_DEVICES = '''\
# Before jax is imported: without a TPU, simulate 8 devices on the host CPU. (A single GPU
# cannot show expert parallelism either, so a GPU runtime uses the simulated CPU devices too.)
import glob

TPU = bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")
           or {"COLAB_TPU_ADDR", "TPU_NAME", "TPU_ACCELERATOR_TYPE"} & set(os.environ))
if not TPU:
    if "jax" in sys.modules:
        print("jax is already imported: restart the runtime so that XLA_FLAGS takes effect.")
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=8".strip()
    os.environ["JAX_PLATFORMS"] = "cpu"
'''

EXPERT_PARALLELISM = [
    ("markdown", intro("expert_parallelism", "Expert parallelism on a mesh of 8 devices",
                       "Lay one MoE layer out on a (data, expert, model) mesh: see which "
                       "device holds which experts, find the all-to-all in the compiled HLO, and "
                       "compare the two expert-parallel forms of `moe_jax.sharding`: `gspmd` "
                       "(sharding constraints, XLA inserts the collectives; GShard) and "
                       "`explicit` (`jax.shard_map` with two hand-written "
                       "`jax.lax.all_to_all`s). Without a TPU the 8 devices are simulated on the "
                       "CPU, which is enough to check the plumbing but says nothing about "
                       "speed.")),
    ("code", INSTALL + "\n" + EP_DEVICES),
    ("code", "\n".join([REPO, BACKEND])),
    ("markdown", "## 1. A mesh and where the experts live\n\n"
     "Mesh `data=2, expert=4`: the batch is split over all 8 devices (`batch` maps to "
     "`data` and `expert`), the 8 experts over the 4 positions of the `expert` axis (2 experts "
     "per device, each held by the 2 devices of its `data` column). Shapes: E experts, "
     "d model width, f expert width."),
    ("code", '''\
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from jax.sharding import NamedSharding

from moe_jax import MoeConfig, moe, sharding

n = len(jax.devices())
MESH_SHAPE = (2, 4, 1) if n >= 8 else (1, n, 1)
mesh = sharding.make_mesh(sharding.MeshConfig(*MESH_SHAPE), jax.devices()[:np.prod(MESH_SHAPE)])
print("mesh:", dict(mesh.shape), "- device ids, rows: data, columns: expert")
print(mesh.device_ids[..., 0])

tokens_per_device = 128 if FAST else 1024
d_model, d_ff = (64, 256) if FAST else (256, 1024)
batch_shards = MESH_SHAPE[0] * MESH_SHAPE[1]
# group_size = tokens per device: routing groups never span devices (the explicit form needs
# it), and routing is the same on any mesh and on one device.
config = MoeConfig(num_experts=8, top_k=2, d_ff=d_ff, capacity_factor=1.25,
                   group_size=tokens_per_device, dispatch="gather", activation="gelu")
params = moe.init_params(jax.random.key(0), config, d_model)
x = jax.random.normal(jax.random.key(1), (batch_shards * tokens_per_device, d_model))


def place(params, x, form):
    """Params with experts on the expert axis (router replicated), tokens over the batch."""
    layout = sharding.MoeSharding(mesh, form=form)
    specs = sharding.expert_param_specs(params, layout)
    placed = jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), params, specs)
    return layout, placed, jax.device_put(x, NamedSharding(mesh, layout.token_spec))


layout, sharded_params, sharded_x = place(params, x, "gspmd")
wi = sharded_params["experts"]["wi"]
print("experts/wi", wi.shape, "[E, d, f]:", wi.sharding.spec)
print("router/kernel:", sharded_params["router"]["kernel"].sharding.spec, "(replicated)")
print("x", sharded_x.shape, "[tokens, d]:", sharded_x.sharding.spec)
'''),
    ("code", '''\
# Each device's shard of the expert weights: which experts (rows of wi) it holds.
coords = {d.id: tuple(int(i) for i in np.argwhere(mesh.devices == d)[0]) for d in mesh.devices.flat}
held = np.zeros((len(coords), config.num_experts))
token_rows = np.zeros((len(coords), x.shape[0]))
device_ids = sorted(coords)
print(f"{'device':>6} {'(data, expert, model)':>22} {'experts':>8} {'tokens':>10} {'wi bytes':>9}")
for shard, token_shard in zip(sorted(wi.addressable_shards, key=lambda s: s.device.id),
                              sorted(sharded_x.addressable_shards, key=lambda s: s.device.id),
                              strict=True):
    row = device_ids.index(shard.device.id)
    experts = range(*shard.index[0].indices(config.num_experts))
    rows = range(*token_shard.index[0].indices(x.shape[0]))
    held[row, list(experts)] = 1
    token_rows[row, list(rows)] = 1
    print(f"{shard.device.id:>6} {coords[shard.device.id]!s:>22} "
          f"{f'{experts.start}-{experts.stop - 1}':>8} {f'{rows.start}-{rows.stop - 1}':>10} "
          f"{shard.data.nbytes:>9}")
print(f"one device holds {sharding.device_bytes(wi)} of the {wi.nbytes} bytes of wi")

fig, (ax_e, ax_t) = plt.subplots(1, 2, figsize=(12, 3.8), gridspec_kw={"width_ratios": [1, 2]})
ax_e.imshow(held, cmap="Greens", aspect="auto", vmin=0, vmax=1.3)
ax_e.set(xlabel="expert", ylabel="device (data, expert)", xticks=range(config.num_experts),
         yticks=range(len(device_ids)),
         yticklabels=[f"{i} {coords[i][:2]}" for i in device_ids],
         title="Expert weights held by each device")
ax_t.imshow(token_rows, cmap="Blues", aspect="auto", vmin=0, vmax=1.3, interpolation="nearest")
ax_t.set(xlabel="token (row of x)", ylabel="device", yticks=range(len(device_ids)),
         yticklabels=[str(i) for i in device_ids],
         title="Tokens held by each device (before the all-to-all)")
fig.tight_layout()
plt.show()
'''),
    ("markdown", "## 2. The all-to-all in the compiled HLO\n\n"
     "Compile the layer's forward pass in both forms and count the collectives XLA emitted. "
     "The explicit form has exactly two all-to-alls per layer (tokens to their experts, outputs "
     "back), over the 4 devices of each `expert` group; the gspmd form leaves the choice to "
     "XLA's sharding propagation."),
    ("code", '''\
import re

COLLECTIVES = ("all-to-all", "all-gather", "all-reduce", "reduce-scatter", "collective-permute")
forms = {}
for form in ("gspmd", "explicit"):
    layout, p, xs = place(params, x, form)
    forward = jax.jit(lambda p, x, layout=layout: moe.apply(p, x, config, train=True,
                                                            sharding=layout))
    hlo = forward.lower(p, xs).compile().as_text()
    forms[form] = (forward, p, xs, hlo)
    counts = {c: len(re.findall(rf"\\s{c}(?:-start)?\\(", hlo)) for c in COLLECTIVES}
    print(f"{form:>8}:", ", ".join(f"{c} x{k}" for c, k in counts.items() if k) or "none")

print("\\nall-to-all instructions of the explicit form:")
for line in forms["explicit"][3].splitlines():
    if re.search(r"\\sall-to-all\\(", line):
        result = re.sub(r"\\{[0-9,]+\\}", "", line.split(" all-to-all(")[0].strip())  # no layouts
        groups = re.search(r"replica_groups=\\{[{}0-9,]*\\}", line)
        print(f"  {result} all-to-all(...), {groups.group(0) if groups else ''}")
'''),
    ("markdown", "## 3. The two forms compute the same function\n\n"
     "Both forms, and the layer on one device without any sharding, give the same outputs "
     "(same routing groups, so the same drops). The step times below are fwd+bwd of the layer, "
     "measured by `experiments/benchmarks/expert_parallel.py`; on simulated CPU devices they "
     "only show that both forms run, not which is faster on real hardware."),
    ("code", '''\
reference, ref_aux = jax.jit(lambda p, x: moe.apply(p, x, config, train=True))(params, x)
for form, (forward, p, xs, _) in forms.items():
    y, aux = forward(p, xs)
    diff = float(jnp.max(jnp.abs(y - reference)))
    print(f"{form:>8}: max |y - unsharded y| = {diff:.2e}, dropped fraction "
          f"{float(aux['dropped_fraction']):.4f} "
          f"(unsharded {float(ref_aux['dropped_fraction']):.4f})")
    np.testing.assert_allclose(np.asarray(y), np.asarray(reference), atol=1e-4, rtol=1e-4)
'''),
    ("code", '''\
from experiments.benchmarks.expert_parallel import time_forms

rows = time_forms(MESH_SHAPE, tokens_per_device=tokens_per_device, d_model=d_model, d_ff=d_ff,
                  repeats=3 if FAST else 5)
for row in rows:
    t = row["timing"]
    print(f"{row['form']:>8}: compile {t['compile_s']:.1f} s, step (fwd+bwd) median "
          f"{t['median_s'] * 1e3:.1f} ms over {t['repeats']} runs, {row['tokens']} tokens")
'''),
]

NOTEBOOKS: dict[str, list[tuple[str, str]]] = {
    "quickstart": QUICKSTART,
    "routing_explorer": ROUTING_EXPLORER,
    "scaling_results": SCALING_RESULTS,
    "expert_parallelism": EXPERT_PARALLELISM,
}
TITLES = {
    "quickstart": "one MoE layer's routing, then a tiny dense vs Switch model trained side by "
                  "side",
    "routing_explorer": "a trained top-2 router: expert use by domain and byte class, entropy "
                        "per layer, drops vs capacity factor",
    "scaling_results": "the committed experiment results: dense vs sparse figures, claims, "
                       "paper-scale FLOP tables",
    "expert_parallelism": "8 simulated devices: where experts live, the all-to-all in the HLO, "
                          "the two expert-parallel forms",
}


# --- writing and executing ----------------------------------------------------------------------

def notebook(name: str) -> nbformat.NotebookNode:
    """The notebook `name` from its cell list, without outputs."""
    make = {"code": nbformat.v4.new_code_cell, "markdown": nbformat.v4.new_markdown_cell}
    cells = [make[kind](source.rstrip("\n")) for kind, source in NOTEBOOKS[name]]
    for i, cell in enumerate(cells):
        cell.id = f"{name[:12]}-{i:02d}"
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata = {
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"},
        "colab": {"provenance": [], "name": f"{name}.ipynb"},
    }
    return nb


def path_of(name: str) -> Path:
    return NOTEBOOKS_DIR / f"{name}.ipynb"


def sources(nb: nbformat.NotebookNode) -> list[tuple[str, str]]:
    return [(cell.cell_type, cell.source) for cell in nb.cells]


def with_old_outputs(new: nbformat.NotebookNode, path: Path) -> nbformat.NotebookNode:
    """`new` with the outputs of the cells of the notebook at `path` whose source is unchanged."""
    if not path.exists():
        return new
    old = nbformat.read(path, as_version=4)
    unused = [c for c in old.cells if c.cell_type == "code"]
    for cell in new.cells:
        match = next((c for c in unused if c.source == cell.source), None)
        if cell.cell_type == "code" and match is not None:
            cell.outputs, cell.execution_count = match.outputs, match.execution_count
            unused.remove(match)
    return new


def execute(nb: nbformat.NotebookNode, cwd: Path = NOTEBOOKS_DIR,
            timeout: int = 1800) -> nbformat.NotebookNode:
    """Runs every cell in a fresh python3 kernel whose working directory is `cwd`; raises
    nbclient's CellExecutionError at the first failing cell. The kernel inherits os.environ.
    Widget state (interactive views, which static pages cannot show anyway) is not kept."""
    from nbclient import NotebookClient

    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False,
                            resources={"metadata": {"path": str(cwd)}})
    nb = client.execute()
    nb.metadata.pop("widgets", None)
    return nb


def readme_block() -> str:
    lines = [README_BEGIN, "", "| notebook | what |", "| --- | --- |"]
    lines += [f"| {badge(name)} `notebooks/{name}.ipynb` | {TITLES[name]} |" for name in NOTEBOOKS]
    return "\n".join([*lines, "", README_END])


def write_readme(path: Path = README) -> None:
    """Replaces the block between the markers in README.md by `readme_block()`."""
    text = path.read_text()
    if README_BEGIN not in text or README_END not in text:
        raise ValueError(f"{path} lacks the markers {README_BEGIN!r} and {README_END!r} of the "
                         "Notebooks section; put them back where the badges belong and rerun.")
    head, rest = text.split(README_BEGIN, 1)
    path.write_text(head + readme_block() + rest.split(README_END, 1)[1])


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--execute", nargs="*", metavar="NAME", default=None,
                        help=f"execute these notebooks (none named: all of {list(NOTEBOOKS)})")
    args = parser.parse_args(argv)
    to_run = list(NOTEBOOKS) if args.execute == [] else (args.execute or [])
    unknown = [n for n in to_run if n not in NOTEBOOKS]
    if unknown:
        parser.error(f"unknown notebook {unknown[0]!r}; use names from {list(NOTEBOOKS)}")
    for name in NOTEBOOKS:
        nb = notebook(name)
        if name in to_run:
            mode = "fast" if os.environ.get(FAST_ENV) == "1" else "full"
            print(f"executing {name} ({mode} mode) ...", flush=True)
            nb = execute(nb)
            # The generated metadata only: no kernel versions or widget state to churn in diffs.
            nb.metadata = notebook(name).metadata
        else:
            nb = with_old_outputs(nb, path_of(name))
        nbformat.validate(nb)
        nbformat.write(nb, path_of(name))
        size = path_of(name).stat().st_size
        print(f"wrote {path_of(name).relative_to(NOTEBOOKS_DIR.parent)} ({size / 1e3:.0f} kB)")
    write_readme()
    print(f"wrote the Notebooks section of {README.name}")


if __name__ == "__main__":
    sys.exit(main())
