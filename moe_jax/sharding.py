"""Meshes, logical-axis rules and expert parallelism: the one module that knows about devices.

Mesh axes: `data` (batch), `expert` (experts; also splits the batch outside the experts), and
`model` (tensor parallelism: FFN hidden units, attention heads, vocabulary).

Expert parallelism comes in two forms (`MoeSharding.form`):
- "gspmd": the MoE layer runs on global arrays; sharding constraints put the routing groups
  `[G, T, d]` on the batch axes and the expert buffers `[G, E, C, d]` on (data, expert), so XLA
  inserts the all-to-all between them (GShard, Lepikhin et al. 2020, Sec. 3).
- "explicit": `jax.shard_map` over the mesh; each device routes its own tokens, exchanges
  fixed-capacity buffers with `jax.lax.all_to_all` over the expert axis, runs its local experts,
  and sends the outputs back (the same exchange, written by hand).
Routing groups never span devices in the explicit form, so `MoeConfig.group_size` must divide
the tokens of one device; use the same group size unsharded to get identical routing.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "expert", "model")
EXPERT_PARALLEL_FORMS = ("gspmd", "explicit")

# Logical axis name -> mesh axes. Parameters and activations are annotated with logical names
# (models, layers.LOGICAL_AXES); this table alone decides where they live.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "expert")),
    ("expert", "expert"),
    ("mlp", "model"),
    ("heads", "model"),
    ("kv_heads", "model"),
    ("vocab", "model"),
    ("embed", None),
    ("kv", None),
    ("length", None),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes (-1: the devices left over; at most one) and the expert-parallel form."""

    data: int = -1
    expert: int = 1
    model: int = 1
    expert_parallel: str = "gspmd"

    def __post_init__(self) -> None:
        sizes = {name: getattr(self, name) for name in MESH_AXES}
        for name, size in sizes.items():
            if not isinstance(size, int) or (size < 1 and size != -1):
                raise ValueError(f"MeshConfig.{name}={size!r} must be a positive int or -1.")
        if list(sizes.values()).count(-1) > 1:
            raise ValueError(f"MeshConfig {sizes}: at most one axis may be -1 (inferred).")
        if self.expert_parallel not in EXPERT_PARALLEL_FORMS:
            raise ValueError(f"MeshConfig.expert_parallel={self.expert_parallel!r}; use one of "
                             f"{EXPERT_PARALLEL_FORMS}.")

    def shape(self, num_devices: int) -> tuple[int, int, int]:
        """(data, expert, model) sizes for `num_devices` devices, with -1 inferred."""
        sizes = [getattr(self, name) for name in MESH_AXES]
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if num_devices % known:
                raise ValueError(
                    f"mesh {dict(zip(MESH_AXES, sizes))}: the fixed axes ({known} devices) do "
                    f"not divide the {num_devices} available devices; choose sizes whose "
                    f"product divides {num_devices}.")
            sizes[sizes.index(-1)] = num_devices // known
        if math.prod(sizes) != num_devices:
            raise ValueError(
                f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices but "
                f"{num_devices} are available; make the product of the sizes {num_devices}, "
                "or set one axis to -1 to infer it.")
        return tuple(sizes)


def make_mesh(config: MeshConfig, devices: Sequence[Any] | None = None) -> Mesh:
    """A (data, expert, model) mesh with Auto axis types (GSPMD propagation) over `devices`."""
    devices = list(devices) if devices is not None else jax.devices()
    shape = config.shape(len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3,
                         devices=devices)


def check_divisible(mesh: Mesh, *, num_experts: int | None = None,
                    global_batch: int | None = None, num_heads: int | None = None,
                    rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> None:
    """Raises ValueError naming the numbers when a dimension does not split over its axes."""
    checks = [("num_experts", num_experts, "expert"), ("global batch", global_batch, "batch"),
              ("num_heads", num_heads, "heads")]
    for what, value, logical in checks:
        if value is None:
            continue
        axes = _mesh_axes(logical, rules)
        shards = math.prod(mesh.shape[a] for a in axes)
        if value % shards:
            raise ValueError(
                f"{what}={value} does not divide over mesh axes {axes} of total size {shards} "
                f"(mesh {dict(mesh.shape)}); choose {what} divisible by {shards} or change the "
                "mesh.")


def _mesh_axes(logical: str, rules: Sequence[tuple[str, Any]]) -> tuple[str, ...]:
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
        axes = tuple(a for a in _mesh_axes(name, rules) if a not in used) if name else ()
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else (axes or None))
    return PartitionSpec(*spec)


@dataclasses.dataclass(frozen=True)
class MoeSharding:
    """How one MoE layer is laid out on a mesh (static: hashable, usable as a jit static arg)."""

    mesh: Mesh
    form: str = "gspmd"
    batch_axes: tuple[str, ...] = ("data", "expert")
    expert_axis: str = "expert"
    model_axis: str | None = "model"

    def __post_init__(self) -> None:
        if self.form not in EXPERT_PARALLEL_FORMS:
            raise ValueError(f"MoeSharding.form={self.form!r}; use one of "
                             f"{EXPERT_PARALLEL_FORMS}.")

    def axis_size(self, axis: str | None) -> int:
        return self.mesh.shape[axis] if axis else 1

    @property
    def token_spec(self) -> PartitionSpec:
        """Tokens and routing groups: leading dimension over the batch axes."""
        return PartitionSpec(self.batch_axes)

    @property
    def buffer_spec(self) -> PartitionSpec:
        """Expert buffers [G, E, C, d]: groups over the non-expert batch axes, experts over
        the expert axis."""
        group_axes = tuple(a for a in self.batch_axes if a != self.expert_axis)
        return PartitionSpec(group_axes or None, self.expert_axis)

    def constrain(self, x: jax.Array, spec: PartitionSpec) -> jax.Array:
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))


def expert_param_specs(params: dict[str, dict[str, Any]], sharding: MoeSharding
                       ) -> dict[str, dict[str, PartitionSpec]]:
    """PartitionSpecs of one MoE layer's params for the explicit form (experts on the expert
    axis, hidden units on the model axis, router replicated)."""
    e, m = sharding.expert_axis, sharding.model_axis
    specs = {"wi": PartitionSpec(e, None, m), "wi_gate": PartitionSpec(e, None, m),
             "wo": PartitionSpec(e, m, None)}
    shared = {"wi": PartitionSpec(None, m), "wi_gate": PartitionSpec(None, m),
              "wo": PartitionSpec(m, None)}
    by_group = {"experts": specs, "shared": shared}
    return {group: {name: by_group.get(group, {}).get(name, PartitionSpec()) for name in leaves}
            for group, leaves in params.items()}


LocalApply = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


def explicit_expert_parallel(local_apply: LocalApply, params: dict, x: jax.Array, config: Any,
                             *, train: bool, rng: jax.Array | None,
                             token_mask: jax.Array | None, sharding: MoeSharding
                             ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Runs `local_apply` per device under `jax.shard_map`, with an expert stage that exchanges
    the [G, E, C, d] buffers over the expert axis.

    local_apply(params, x_local, config, train=, rng=, token_mask=, expert_stage_fn=,
    model_sum=) -> (y, aux, num_valid) must route the local tokens and call
    `expert_stage_fn(expert_params)` to get its expert stage. Devices' aux (means over their
    unmasked tokens) are combined weighted by `num_valid`, so they equal the unsharded means.
    """
    mesh, e_axis, m_axis = sharding.mesh, sharding.expert_axis, sharding.model_axis
    n_expert = sharding.axis_size(e_axis)
    if config.num_experts % n_expert:
        raise ValueError(f"num_experts={config.num_experts} does not divide over the expert "
                         f"axis of size {n_expert}; use a multiple of {n_expert} experts.")
    batch_shards = math.prod(mesh.shape[a] for a in sharding.batch_axes)
    if x.shape[0] % batch_shards:
        raise ValueError(f"the leading dimension of x.shape={x.shape} does not divide over the "
                         f"{batch_shards} devices of batch axes {sharding.batch_axes}; use a "
                         f"batch divisible by {batch_shards}.")
    tokens_per_device = math.prod(x.shape[:-1]) // batch_shards
    if config.group_size and tokens_per_device % config.group_size:
        raise ValueError(f"MoeConfig.group_size={config.group_size} does not divide the "
                         f"{tokens_per_device} tokens per device (x.shape={x.shape} over "
                         f"{batch_shards} devices); routing groups cannot span devices in the "
                         "explicit form.")
    use_model = m_axis is not None and sharding.axis_size(m_axis) > 1

    def model_sum(y: jax.Array) -> jax.Array:
        return jax.lax.psum(y, m_axis) if use_model else y

    def expert_stage_fn(expert_params: dict[str, jax.Array]) -> Callable[[jax.Array], jax.Array]:
        from moe_jax import experts  # local import: experts does not depend on sharding

        def stage(buffers: jax.Array) -> jax.Array:  # [G, E, C, d] local groups, all experts
            received = jax.lax.all_to_all(buffers, e_axis, 1, 0, tiled=True)  # [G*n, E/n, C, d]
            out = experts.expert_ffn(expert_params, received, config.activation, expert_axis=1)
            return jax.lax.all_to_all(model_sum(out), e_axis, 0, 1, tiled=True)

        return stage

    def per_device(params: dict, x: jax.Array, rng: jax.Array | None,
                   token_mask: jax.Array | None):
        if rng is not None:  # independent noise per batch shard
            rng = jax.random.fold_in(rng, jax.lax.axis_index(sharding.batch_axes))
        y, aux, num_valid = local_apply(params, x, config, train=train, rng=rng,
                                        token_mask=token_mask, expert_stage_fn=expert_stage_fn,
                                        model_sum=model_sum)
        total = jax.lax.psum(num_valid, sharding.batch_axes)
        reduced = {k: (jax.lax.pmax(v, sharding.batch_axes) if k == "max_router_logit"
                       else jax.lax.psum(v * num_valid, sharding.batch_axes)
                       / jax.numpy.maximum(total, 1.0)) for k, v in aux.items()}
        return y, reduced

    param_specs = expert_param_specs(params, sharding)
    rng_spec = None if rng is None else PartitionSpec()
    mask_spec = None if token_mask is None else sharding.token_spec
    fn = jax.shard_map(per_device, mesh=mesh,
                       in_specs=(param_specs, sharding.token_spec, rng_spec, mask_spec),
                       out_specs=(sharding.token_spec, PartitionSpec()), check_vma=False)
    return fn(params, x, rng, token_mask)


def device_bytes(x: jax.Array) -> int:
    """Bytes of `x` held by one device (its first addressable shard)."""
    shard = x.addressable_shards[0].data
    return int(np.prod(shard.shape)) * shard.dtype.itemsize
