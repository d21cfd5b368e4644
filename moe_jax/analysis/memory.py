"""Bytes: weights at each precision, the AdamW training state, and the KV cache, per device.

    python -m moe_jax.analysis.memory                  # the published models
    python -m moe_jax.analysis.memory --config=configs/published/mixtral_8x7b.py \
        --axis_sizes=expert=8,fsdp=4

    plan = memory.plan(experiment, axis_sizes={"expert": 8, "model": 2})
    plan.weight_bytes["bfloat16"]   # all parameters at 2 bytes
    plan.active_weight_bytes["bfloat16"]
    plan.per_device["training_state"]

Parameter counts come from `flops.count` (total, and active: the parameters one token uses).
Bytes are counts times the bytes of a number: float32 4, bfloat16 2, int8 1, int4 1/2
(weight-only quantization; the scales it also stores are left out, e.g. one float per output
channel). Training state (mixed precision as `moe_jax.train` runs it): parameters and
gradients in `param_dtype` and two AdamW moments (Loshchilov & Hutter 2019, Alg. 2; optax
keeps them in the parameter dtype), so 16 bytes per float32 parameter; activations are left
out (they depend on the batch, the sequence and rematerialisation). KV cache: keys and values
of every layer, 2 * layers * K * h numbers per token per sequence (multi-head latent
attention: the latent and rotary key, layers * (c + r), with the grouped-query figure of the
same heads beside it), in the activation dtype
(`attention.cached_keys_values` also keeps a position and a flag per slot, 5 bytes per layer,
left out).

Per device: each parameter's dimensions are split over the mesh axes its logical axis names map
to (`sharding` rules: experts over `expert`, FFN/heads/vocabulary over `model`, ...; rounded
up where a dimension does not divide), read from the model's abstract parameters, so the figure
is that of the sharded arrays. `axis_sizes` gives the shard count of each mesh axis. An `fsdp`
axis that no rule names shards every parameter, its gradient and its optimizer state
(ZeRO-3 / FSDP: parameters and optimizer state divided by the fsdp size); the KV cache is
split over the axes of `batch` and `kv_heads`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax import schema
from moe_jax.analysis import flops
from moe_jax.models import Transformer, latent_attention
from moe_jax.parallel import sharding

PRECISIONS = flops.BYTES_PER_PARAM
ADAMW_MOMENTS = 2
FSDP_AXIS = "fsdp"


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Bytes of one experiment on one mesh.

    weight_bytes / active_weight_bytes: {precision: bytes} of all parameters / of the
      parameters one token uses (`flops.Count.active_params`).
    per_device: bytes on one device: `weights` {precision: bytes} and `training_state`
      (parameters + gradients + AdamW moments), `params_per_device` (count), `kv_cache_per_token`
      (one token of one sequence's share on this device).
    kv_cache_per_token: bytes of one token's keys and values in one sequence (all layers).
    attention_cache_per_token: what grouped-query attention with the model's heads would cache
      per token (the same as kv_cache_per_token, except for multi-head latent attention, which
      caches the latent instead; see `kv_cache_bytes_per_token`).
    """

    total_params: int
    active_params: float
    weight_bytes: dict[str, float]
    active_weight_bytes: dict[str, float]
    training_state_bytes: float
    kv_cache_per_token: float
    max_seq_len: int
    axis_sizes: dict[str, int]
    per_device: dict[str, Any]
    attention_cache_per_token: float = 0.0


def _mesh_axes(logical: str | None, rules: sharding.Rules) -> tuple[str, ...]:
    """The mesh axes a logical axis name maps to under `rules` (() when replicated)."""
    target = dict(rules).get(logical) if logical is not None else None
    if target is None:
        return ()
    return (target,) if isinstance(target, str) else tuple(target)


def shards(logical_axes: tuple[str | None, ...], axis_sizes: Mapping[str, int],
           rules: sharding.Rules) -> tuple[int, ...]:
    """How many ways each dimension of an array with these logical axis names is split."""
    return tuple(math.prod(axis_sizes.get(a, 1) for a in _mesh_axes(name, rules))
                 for name in logical_axes)


def abstract_parameters(experiment: schema.Experiment) -> dict[str, Any]:
    """The model's parameters as ShapeDtypeStructs boxed with their logical axis names (nothing
    is allocated; one traced token)."""
    model = Transformer(experiment.model, experiment.moe)
    tokens = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(lambda k: model.init({"params": k}, tokens, train=False),
                          jax.random.key(0))["params"]


def params_per_device(experiment: schema.Experiment, axis_sizes: Mapping[str, int],
                      rules: sharding.Rules) -> int:
    """Parameters (numbers) stored on one device: every array's shard, dimension by dimension
    rounded up, as a NamedSharding lays it out."""
    boxed = abstract_parameters(experiment)
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    total = 0
    for leaf in leaves:
        names = leaf.names if isinstance(leaf, nn.Partitioned) else (None,) * leaf.ndim
        shape = nn.unbox(leaf).shape
        total += math.prod(-(-dim // n) for dim, n in zip(shape, shards(names, axis_sizes, rules),
                                                          strict=True))
    return total


def _fsdp_size(axis_sizes: Mapping[str, int], rules: sharding.Rules) -> int:
    """The fsdp axis size when no rule places anything on it (then it splits every parameter)."""
    named = any(FSDP_AXIS in _mesh_axes(name, rules) for name, _ in rules)
    return 1 if named else axis_sizes.get(FSDP_AXIS, 1)


def kv_cache_bytes_per_token(experiment: schema.Experiment, *, dtype: str | None = None,
                             expanded: bool = False) -> float:
    """Keys and values of one token of one sequence, all layers: 2 * layers * K * h numbers.

    Multi-head latent attention caches the latent and the rotary key instead: layers * (c + r)
    numbers (DeepSeek-V2 Table 1). expanded: the keys and values its H heads attend to, as
    attention without the latent would cache them: layers * H * (n + r + v).
    """
    model = experiment.model
    itemsize = jnp.dtype(dtype or model.dtype).itemsize
    if not model.latent_attention:
        return 2.0 * model.num_layers * model.kv_heads * model.head_size * itemsize
    if expanded:
        width = model.qk_nope_head_dim + model.qk_rope_head_dim + model.v_head_dim
        return float(model.num_layers * model.num_heads * width * itemsize)
    return float(model.num_layers * itemsize * latent_attention.cache_numbers_per_token(
        model.kv_lora_rank, model.qk_rope_head_dim))


def plan(experiment: schema.Experiment | Any, axis_sizes: Mapping[str, int] | None = None, *,
         rules: sharding.Rules | None = None, kv_dtype: str | None = None) -> MemoryPlan:
    """The `MemoryPlan` of an experiment (a ConfigDict or `schema.Experiment`) on a mesh.

    axis_sizes: shard count per mesh axis, e.g. {"data": 4, "expert": 8, "model": 2, "fsdp": 4}
      (default: the experiment's mesh section, -1 counted as 1). rules: logical-axis rules
      (default: the experiment's `mesh.logical_rules()`). kv_dtype: the cache's dtype
      (default: the model's activation dtype).
    """
    if not isinstance(experiment, schema.Experiment):
        experiment = schema.parse_config(experiment)
    mesh = experiment.mesh
    if axis_sizes is None:
        axis_sizes = {a: max(getattr(mesh, a), 1) for a in sharding.MESH_AXES}
    unknown = sorted(set(axis_sizes) - set(sharding.MESH_AXES) - {FSDP_AXIS})
    if unknown:
        raise ValueError(f"axis_sizes names {unknown}: not mesh axes; use "
                         f"{', '.join((*sharding.MESH_AXES, FSDP_AXIS))}.")
    bad = {a: s for a, s in axis_sizes.items() if not isinstance(s, int) or s < 1}
    if bad:
        raise ValueError(f"axis_sizes {bad}: every mesh axis needs a positive shard count.")
    rules = mesh.logical_rules() if rules is None else rules
    count = flops.count_model(experiment.model, experiment.moe)
    state_per_param = (2 + ADAMW_MOMENTS) * jnp.dtype(experiment.model.param_dtype).itemsize

    fsdp = _fsdp_size(axis_sizes, rules)
    local = -(-params_per_device(experiment, axis_sizes, rules) // fsdp)
    kv = kv_cache_bytes_per_token(experiment, dtype=kv_dtype)
    kv_shards = 1 if experiment.model.latent_attention else math.prod(
        shards(("kv_heads",), axis_sizes, rules))  # the latent has no head axis
    batch_shards = math.prod(shards(("batch",), axis_sizes, rules))
    return MemoryPlan(
        total_params=count.total_params, active_params=count.active_params,
        weight_bytes={p: count.weight_bytes(p) for p in PRECISIONS},
        active_weight_bytes={p: count.weight_bytes(p, active=True) for p in PRECISIONS},
        training_state_bytes=count.total_params * state_per_param,
        kv_cache_per_token=kv, max_seq_len=experiment.model.max_seq_len,
        attention_cache_per_token=kv_cache_bytes_per_token(experiment, dtype=kv_dtype,
                                                           expanded=True),
        axis_sizes=dict(axis_sizes),
        per_device={"params_per_device": local,
                    "weights": {p: local * b for p, b in PRECISIONS.items()},
                    "training_state": local * state_per_param,
                    "kv_cache_per_token": kv / kv_shards,
                    "kv_cache_batch_shards": batch_shards})


def human_bytes(value: float) -> str:
    """Bytes in decimal units (GB = 1e9 bytes, as model cards quote them)."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value:.3g} B"


COLUMNS = ("config", "params total / active", "bf16 weights", "bf16 active / token",
           "int8 / int4 weights", "train state (AdamW, fp32)", "KV cache / token (bf16)",
           "KV @ max_seq_len")


def table_row(name: str, p: MemoryPlan) -> tuple[str, ...]:
    """One row of `format_table`: whole-model figures (one device)."""
    return (name, f"{flops.human(p.total_params)} / {flops.human(p.active_params)}",
            human_bytes(p.weight_bytes["bfloat16"]), human_bytes(p.active_weight_bytes["bfloat16"]),
            f"{human_bytes(p.weight_bytes['int8'])} / {human_bytes(p.weight_bytes['int4'])}",
            human_bytes(p.training_state_bytes), _cache_cell(p),
            f"{human_bytes(p.kv_cache_per_token * p.max_seq_len)} ({p.max_seq_len})")


def _cache_cell(p: MemoryPlan) -> str:
    """The cache per token; for latent attention, with the per-head keys and values that
    multi-head / grouped-query attention of the same heads would cache beside it."""
    if p.attention_cache_per_token == p.kv_cache_per_token:
        return human_bytes(p.kv_cache_per_token)
    return (f"{human_bytes(p.kv_cache_per_token)} latent (per-head K/V: "
            f"{human_bytes(p.attention_cache_per_token)})")


def format_per_device(p: MemoryPlan) -> str:
    """The per-device figures of one plan."""
    d = p.per_device
    weights = ", ".join(f"{k} {human_bytes(v)}" for k, v in d["weights"].items())
    return "\n".join([
        f"per device on mesh {p.axis_sizes}:",
        f"  parameters            {flops.human(d['params_per_device'])} ({weights})",
        f"  training state        {human_bytes(d['training_state'])} (params + grads + 2 AdamW "
        "moments; activations not included)",
        f"  KV cache / token      {human_bytes(d['kv_cache_per_token'])} per sequence; the batch "
        f"splits {d['kv_cache_batch_shards']} ways"])


def parse_axis_sizes(text: str) -> dict[str, int]:
    """"expert=8,model=2,fsdp=4" -> {"expert": 8, "model": 2, "fsdp": 4}."""
    sizes = {}
    for entry in (e.strip() for e in text.split(",") if e.strip()):
        name, _, value = entry.partition("=")
        if not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"mesh axis size {entry!r}: write axis=size with a positive integer, "
                             "e.g. 'expert=8,model=2,fsdp=4'.")
        sizes[name.strip()] = int(value)
    return sizes


def report(configs: list[tuple[str, Any]], axis_sizes: Mapping[str, int] | None = None) -> str:
    """The table of (name, config) pairs, then each one's per-device figures on `axis_sizes`
    (default: each config's mesh section)."""
    plans = [(name, plan(config, axis_sizes, kv_dtype="bfloat16")) for name, config in configs]
    parts = [flops.format_table([table_row(name, p) for name, p in plans], COLUMNS)]
    parts += [f"{name}: {format_per_device(p)}" for name, p in plans]
    return "\n\n".join(parts)


def main(argv: list[str]) -> None:
    """Prints `report` for `--config`, every member of `--family`, or (neither given) every
    published model, with per-device figures on `--axis_sizes`."""
    from absl import flags

    del argv
    family, config = flags.FLAGS.family, flags.FLAGS.config
    if family:
        configs = [(m or family, schema.load_config(f"{family}:{m}" if m else family))
                   for m in schema.family_members(family) or ("",)]
    elif config is not None:
        configs = [(flags.FLAGS["config"].config_filename, schema.checked(config))]
    else:
        configs = [(p.removeprefix("published/").removesuffix(".py"), schema.load_config(p))
                   for p in schema.config_files() if p.startswith("published/")]
    print(report(configs, parse_axis_sizes(flags.FLAGS.axis_sizes) or None))


if __name__ == "__main__":
    from absl import app, flags

    schema.define_config_flag("Experiment config file[:member]; default: the published models.")
    flags.DEFINE_string("family", None, "Config family file: every member in MEMBERS.")
    flags.DEFINE_string("axis_sizes", "", "Shard count per mesh axis, e.g. "
                        "'expert=8,model=2,fsdp=4' (default: the config's mesh section).")
    app.run(main)
