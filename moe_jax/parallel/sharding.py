"""Meshes and logical-axis rules: where arrays live on the devices.

Mesh axes: `data` (batch), `fsdp` (batch, and every parameter and optimizer statistic along
its model dimension: ZeRO-3 / fully sharded data parallelism, Rajbhandari et al. 2020; XLA
gathers each weight where it is used), `expert` (experts; also splits the batch outside the
experts), and `model` (tensor parallelism: FFN hidden units, attention heads, vocabulary).
Parameters and activations carry logical axis names; `DEFAULT_RULES` (with a config's
overrides) alone decides which mesh axes they map to. How the MoE layer runs on a mesh is
`moe_jax.parallel.expert_parallel`; multi-process runs join with
`moe_jax.parallel.distributed.initialize_distributed` first.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from moe_jax.utils import fields

MESH_AXES = ("data", "fsdp", "expert", "model")
EXPERT_PARALLEL_FORMS = ("gspmd", "explicit")

# Logical axis name -> mesh axes. Parameters and activations are annotated with logical names
# (models, layers.LOGICAL_AXES); this table alone decides where they live.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp", "expert")),
    ("expert", "expert"),
    ("mlp", "model"),
    ("heads", "model"),
    ("kv_heads", "model"),
    ("vocab", "model"),
    ("embed", "fsdp"),  # parameters only: activations' "batch" takes fsdp first
    # The latent dimension of multi-head latent attention's up-projections (query_up, kv_up;
    # parameters only), which have no "embed" dimension: without it FSDP would leave them
    # replicated (DeepSeek-V3: 3.3B parameters, 53 GB of training state per device). MaxText
    # shards the same dimensions ("q_lora", "kv_lora") over fsdp.
    ("latent", "fsdp"),
    ("kv", None),
    ("length", None),
    ("layers", None),  # the stacked blocks of a scanned model
)
LOGICAL_NAMES = tuple(name for name, _ in DEFAULT_RULES)
Rules = tuple[tuple[str, "str | tuple[str, ...] | None"], ...]


def parse_rules(text: str) -> Rules:
    """Rule overrides from a config string: "batch=data+expert,mlp=model,vocab=" maps each
    logical name to mesh axes joined by "+" (empty: replicated). Raises ValueError naming the
    bad entry and the allowed names."""
    rules = []
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        name, sep, target = (part.strip() for part in entry.partition("="))
        axes = tuple(a.strip() for a in target.split("+") if a.strip())
        if not sep or name not in LOGICAL_NAMES:
            raise ValueError(f"mesh rule {entry!r}: write logical=axis[+axis...] with a logical "
                             f"name in {LOGICAL_NAMES}, e.g. 'batch=data+expert,mlp=model'.")
        unknown = [a for a in axes if a not in MESH_AXES]
        if unknown or len(set(axes)) != len(axes):
            raise ValueError(f"mesh rule {entry!r}: mesh axes must be distinct names from "
                             f"{MESH_AXES}; got {axes}.")
        rules.append((name, axes[0] if len(axes) == 1 else (axes or None)))
    return tuple(rules)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """The `mesh` section of an experiment: axis sizes, expert-parallel form, rule overrides.

    data, expert, model, fsdp: mesh axis sizes; -1 (at most one axis) takes the devices left
      over. The default (1, 1, 1, 1) runs on one device; `data=-1` spreads the batch over all
      devices; `fsdp=n` also splits parameters and optimizer state n ways.
      Sizes whose product is smaller than the device count use the first devices (a
      multi-process run must use all of them).
    expert_parallel: "gspmd" or "explicit" (see `moe_jax.parallel.expert_parallel`).
    rules: overrides of `DEFAULT_RULES`, e.g. "batch=data,mlp=" (see `parse_rules`).
    """

    data: int = 1
    expert: int = 1
    model: int = 1
    expert_parallel: str = "gspmd"
    rules: str = ""
    fsdp: int = 1

    def __post_init__(self) -> None:
        sizes = {name: getattr(self, name) for name in MESH_AXES}
        for name, size in sizes.items():
            if not isinstance(size, int) or isinstance(size, bool) or (size < 1 and size != -1):
                fields.fail(self, name, "must be a positive integer or -1 (inferred)")
        if list(sizes.values()).count(-1) > 1:
            fields.fail(self, "data", f"and the other sizes {sizes} set more than one axis "
                            "to -1", "infer at most one axis (-1); give the others")
        fields.one_of(self, "expert_parallel", EXPERT_PARALLEL_FORMS)
        if not isinstance(self.rules, str):
            fields.fail(self, "rules", "must be a string",
                            "write e.g. 'batch=data+expert,mlp=model' ('' keeps the defaults)")
        try:
            parse_rules(self.rules)
        except ValueError as err:
            fields.fail(self, "rules", f"is not a rule list: {err}".rstrip("."))

    def logical_rules(self) -> Rules:
        """`DEFAULT_RULES` with this config's overrides in place of the same logical names."""
        overrides = dict(parse_rules(self.rules))
        return tuple((name, overrides.get(name, target)) for name, target in DEFAULT_RULES)

    def shape(self, num_devices: int) -> tuple[int, ...]:
        """The sizes of `MESH_AXES` (data, fsdp, expert, model) on `num_devices` devices, with
        -1 inferred. Fixed sizes may use fewer devices than there are (the first ones), never
        more."""
        sizes = [getattr(self, name) for name in MESH_AXES]
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if num_devices % known:
                raise ValueError(
                    f"mesh {dict(zip(MESH_AXES, sizes))}: the fixed axes ({known} devices) do "
                    f"not divide the {num_devices} available devices; choose sizes whose "
                    f"product divides {num_devices}.")
            sizes[sizes.index(-1)] = num_devices // known
        if math.prod(sizes) > num_devices:
            raise ValueError(
                f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices but "
                f"{num_devices} are available; make the product of the sizes {num_devices}, "
                "or set one axis to -1 to infer it.")
        return tuple(sizes)


def make_mesh(config: MeshConfig, devices: Sequence[Any] | None = None) -> Mesh:
    """A mesh of `MESH_AXES` with Auto axis types (GSPMD propagation) over `devices`
    (default: all devices of all processes, in `jax.devices()` order, so each process holds
    consecutive positions along the flattened batch axes)."""
    devices = list(devices) if devices is not None else jax.devices()
    shape = config.shape(len(devices))
    used = math.prod(shape)
    if used < len(devices):
        if jax.process_count() > 1:
            raise ValueError(
                f"mesh {dict(zip(MESH_AXES, shape))} uses {used} of the {len(devices)} devices; "
                "a multi-process run must use every device: set one axis to -1.")
        logging.getLogger(__name__).warning(
            "mesh %s uses %d of the %d devices; set one axis to -1 (e.g. --config.mesh.data=-1) "
            "to use all.", dict(zip(MESH_AXES, shape)), used, len(devices))
    try:
        return jax.make_mesh(shape, MESH_AXES,
                             axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
                             devices=devices[:used])
    except NotImplementedError as err:  # TPU: an axis that cuts across the chip grid's axes
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, shape))} does not lay out on the TPU chip grid: each "
            "mesh axis must be a product of some of the grid's dimensions (on 4x4x4: 4, 16 or "
            "64, not 8); choose other --config.mesh sizes. "
            f"({str(err).splitlines()[0][:160]})") from err


def check_divisible(mesh: Mesh, *, num_experts: int | None = None,
                    global_batch: int | None = None, num_heads: int | None = None,
                    num_kv_heads: int | None = None,
                    rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> None:
    """Raises ValueError naming the numbers when a dimension does not split over its axes."""
    checks = [("num_experts", num_experts, "expert"), ("global batch", global_batch, "batch"),
              ("num_heads", num_heads, "heads"), ("num_kv_heads", num_kv_heads, "kv_heads")]
    for what, value, logical in checks:
        if value is None:
            continue
        axes = mesh_axes(logical, rules)
        shards = math.prod(mesh.shape[a] for a in axes)
        if value % shards:
            raise ValueError(
                f"{what}={value} does not divide over mesh axes {axes} of total size {shards} "
                f"(mesh {dict(mesh.shape)}); choose {what} divisible by {shards} or change the "
                "mesh.")


def mesh_axes(logical: str, rules: Sequence[tuple[str, Any]] = DEFAULT_RULES
              ) -> tuple[str, ...]:
    """The mesh axes a logical name maps to under `rules` (() when replicated)."""
    target = dict(rules).get(logical)
    if target is None:
        return ()
    return (target,) if isinstance(target, str) else tuple(target)


def logical_to_spec(names: Sequence[str | None],
                    rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> PartitionSpec:
    """PartitionSpec for an array whose dimensions have these logical names. A mesh axis is used
    at most once per array (the first dimension that claims it wins)."""
    used: set[str] = set()
    spec = []
    for name in names:
        axes = tuple(a for a in mesh_axes(name, rules) if a not in used) if name else ()
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else (axes or None))
    return PartitionSpec(*spec)


def device_bytes(x: jax.Array) -> int:
    """Bytes of `x` held by one device (its first addressable shard)."""
    shard = x.addressable_shards[0].data
    return int(np.prod(shard.shape)) * shard.dtype.itemsize
