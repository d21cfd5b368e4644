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
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/OWNER/moe_jax/blob/main/notebooks/scaling_results.ipynb)
#
# # Scaling results: dense vs sparse at matched FLOPs
#
# The committed results of the paper-reproduction suites (`experiments/results/<suite>/tiny.json`,
# written by `python -m experiments.run`), drawn with the suites' own figures and tables
# (`experiments/analyses/report.py`), and the FLOP/parameter tables of the paper-scale configs.
# Nothing is trained here; fast mode changes nothing.
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
# ## Which results are there
#
# Each suite's results file is looked up in the repository. A missing `switch_scaling` file falls
# back to the test fixture, which holds **synthetic numbers** (made up for the tests, not a
# measurement) so that the figures can be previewed; other missing suites are skipped with a note.
# Rerun this notebook when results are committed.

# %%
from IPython.display import Image, Markdown, display

from experiments import suites
from experiments.analyses import report
from experiments.library.results import Results

# %matplotlib inline

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

# %%
import tempfile

from experiments.library import plots

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
    display(Markdown(f"**{suite.title}** ({source})\n\n"
                     + report.results_table(results, suite.columns or report.BASE_COLUMNS)))
    claims, _ = report.claims_table(suite, results)
    display(Markdown("Paper claims (verdict: sign of the estimate beyond 2 standard errors "
                     "over seeds, `experiments/library/stats.py`):\n\n" + claims))
    for figure in suite.figures:
        path = os.path.join(figures_dir, f"{name}_{figure.name}.png")
        figure.draw(results, path)
        if os.path.exists(path):
            print(figure.caption)
            display(Image(filename=path))


# %% [markdown]
# ## Dense vs Switch at matched FLOPs (Switch Transformer, Sec. 3)
#
# Dense baseline, Switch top-1 with 2 to 64 experts at the same FLOPs per token, and dense models
# with 2x and 4x the FLOPs: validation loss against the number of experts, and training curves
# against steps and against seconds.

# %%
show_suite("switch_scaling")

# %% [markdown]
# Quality against parameters: every Switch model has the dense model's FLOPs per token but more
# parameters; the bigger dense models pay for theirs in FLOPs.

# %%
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from experiments.library import plots


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

# %% [markdown]
# ## The other suites
#
# Capacity factor (Switch Table 1, ST-MoE), load balancing (Switch, DeepSeek-V3), router stability
# (ST-MoE), router families, expert granularity (DeepSeekMoE) and the routing analysis (Mixtral Sec.
# 5), each where its results file exists.

# %%
for name in suites.SUITES:
    if name != "switch_scaling":
        display(Markdown(f"### `{name}`"))
        show_suite(name)

# %% [markdown]
# ## FLOPs and parameters at paper scale
#
# The `switch_scaling` members at the paper's scale (T5-Base width, not run here), and the published
# MoE models of `configs/published/` (the same tables as
# `python -m moe_jax.analysis.flops --family=...`; forward FLOPs per token, training = 3x).

# %%
from moe_jax import schema
from moe_jax.analysis import flops

display(Markdown("**switch_scaling, paper scale**\n\n"
                 + report.flops_table(suites.get("switch_scaling"), "paper")))
published = [p for p in schema.config_files() if p.startswith("published/")]
rows = [flops.table_row(os.path.basename(p)[:-3], schema.load_config(p)) for p in published]
display(Markdown("**Published models** (`configs/published/`)\n\n" + flops.format_table(rows)))
