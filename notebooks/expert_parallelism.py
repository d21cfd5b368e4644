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
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/OWNER/moe_jax/blob/main/notebooks/expert_parallelism.ipynb)
#
# # Expert parallelism on a mesh of 8 devices
#
# Lay one MoE layer out on a (data, expert, model) mesh: see which device holds which experts, find
# the all-to-all in the compiled HLO, and compare the two expert-parallel forms of
# `moe_jax.parallel.expert_parallel`: `gspmd` (sharding constraints, XLA inserts the collectives;
# GShard) and `explicit` (`jax.shard_map` with two hand-written `jax.lax.all_to_all`s). Without a
# TPU the 8 devices are simulated on the CPU, which is enough to check the plumbing but says nothing
# about speed.
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
# ## 1. A mesh and where the experts live
#
# Mesh `data=2, expert=4`: the batch is split over all 8 devices (`batch` maps to `data` and
# `expert`), the 8 experts over the 4 positions of the `expert` axis (2 experts per device, each
# held by the 2 devices of its `data` column). Shapes: E experts, d model width, f expert width.

# %%
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from jax.sharding import NamedSharding

from moe_jax import MoeConfig, moe
from moe_jax.parallel import expert_parallel, sharding

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
    layout = expert_parallel.MoeSharding(mesh, form=form)
    specs = expert_parallel.expert_param_specs(params, layout)
    placed = jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), params, specs)
    return layout, placed, jax.device_put(x, NamedSharding(mesh, layout.token_spec))


layout, sharded_params, sharded_x = place(params, x, "gspmd")
wi = sharded_params["experts"]["wi"]
print("experts/wi", wi.shape, "[E, d, f]:", wi.sharding.spec)
print("router/kernel:", sharded_params["router"]["kernel"].sharding.spec, "(replicated)")
print("x", sharded_x.shape, "[tokens, d]:", sharded_x.sharding.spec)

# %%
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

# %% [markdown]
# ## 2. The all-to-all in the compiled HLO
#
# Compile the layer's forward pass in both forms and count the collectives XLA emitted. The explicit
# form has exactly two all-to-alls per layer (tokens to their experts, outputs back), over the 4
# devices of each `expert` group; the gspmd form leaves the choice to XLA's sharding propagation.

# %%
import re

COLLECTIVES = ("all-to-all", "all-gather", "all-reduce", "reduce-scatter", "collective-permute")
forms = {}
for form in ("gspmd", "explicit"):
    layout, p, xs = place(params, x, form)
    forward = jax.jit(lambda p, x, layout=layout: moe.apply(p, x, config, train=True,
                                                            sharding=layout))
    hlo = forward.lower(p, xs).compile().as_text()
    forms[form] = (forward, p, xs, hlo)
    counts = {c: len(re.findall(rf"\s{c}(?:-start)?\(", hlo)) for c in COLLECTIVES}
    print(f"{form:>8}:", ", ".join(f"{c} x{k}" for c, k in counts.items() if k) or "none")

print("\nall-to-all instructions of the explicit form:")
for line in forms["explicit"][3].splitlines():
    if re.search(r"\sall-to-all\(", line):
        result = re.sub(r"\{[0-9,]+\}", "", line.split(" all-to-all(")[0].strip())  # no layouts
        groups = re.search(r"replica_groups=\{[{}0-9,]*\}", line)
        print(f"  {result} all-to-all(...), {groups.group(0) if groups else ''}")

# %% [markdown]
# ## 3. The two forms compute the same function
#
# Both forms, and the layer on one device without any sharding, give the same outputs (same routing
# groups, so the same drops). The step times below are fwd+bwd of the layer, measured by
# `experiments/benchmarks/expert_parallel.py`; on simulated CPU devices they only show that both
# forms run, not which is faster on real hardware.

# %%
reference, ref_aux = jax.jit(lambda p, x: moe.apply(p, x, config, train=True))(params, x)
for form, (forward, p, xs, _) in forms.items():
    y, aux = forward(p, xs)
    diff = float(jnp.max(jnp.abs(y - reference)))
    print(f"{form:>8}: max |y - unsharded y| = {diff:.2e}, dropped fraction "
          f"{float(aux['dropped_fraction']):.4f} "
          f"(unsharded {float(ref_aux['dropped_fraction']):.4f})")
    np.testing.assert_allclose(np.asarray(y), np.asarray(reference), atol=1e-4, rtol=1e-4)

# %%
from experiments.benchmarks.expert_parallel import time_forms

rows = time_forms(MESH_SHAPE, tokens_per_device=tokens_per_device, d_model=d_model, d_ff=d_ff,
                  repeats=3 if FAST else 5)
for row in rows:
    t = row["timing"]
    print(f"{row['form']:>8}: compile {t['compile_s']:.1f} s, step (fwd+bwd) median "
          f"{t['median_s'] * 1e3:.1f} ms over {t['repeats']} runs, {row['tokens']} tokens")
