"""Expert parallelism: the MoE layer's `moe.Layout` on a mesh (`MoeSharding`).

Two forms (`MoeSharding.form`, `sharding.EXPERT_PARALLEL_FORMS`):
- "gspmd": the MoE layer runs on global arrays; sharding constraints put the routing groups
  `[G, T, d]` on the batch axes and the expert buffers `[G, E, C, d]` on (data, expert), so XLA
  inserts the all-to-all between them (GShard, Lepikhin et al. 2020, Sec. 3).
- "explicit": `jax.shard_map` over the mesh; each device routes its own tokens, exchanges
  fixed-capacity buffers with `jax.lax.all_to_all` over the expert axis, runs its local experts,
  and sends the outputs back (the same exchange, written by hand). Dropless dispatch exchanges
  exactly the routed rows instead, with a ragged all-to-all (`ragged_exchange`).
Routing groups never span devices in the explicit form, so `MoeConfig.group_size` must divide
the tokens of one device; use the same group size unsharded to get identical routing.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from moe_jax import dispatch, experts, moe, routing
from moe_jax.config import MoeConfig
from moe_jax.parallel import ragged_exchange
from moe_jax.parallel.sharding import DEFAULT_RULES, EXPERT_PARALLEL_FORMS, mesh_axes


@dataclasses.dataclass(frozen=True)
class MoeSharding(moe.Layout):
    """How one MoE layer is laid out on a mesh: the `moe.Layout` of expert parallelism (static:
    hashable, usable as a jit static arg). The layer calls the five `Layout` methods; only this
    class knows which form they take."""

    mesh: Mesh
    form: str = "gspmd"
    batch_axes: tuple[str, ...] = ("data", "expert")
    expert_axis: str = "expert"
    model_axis: str | None = "model"

    def __post_init__(self) -> None:
        if self.form not in EXPERT_PARALLEL_FORMS:
            raise ValueError(f"MoeSharding.form={self.form!r}; use one of "
                             f"{EXPERT_PARALLEL_FORMS}.")

    @classmethod
    def from_rules(cls, mesh: Mesh, form: str,
                   rules: Sequence[tuple[str, Any]] = DEFAULT_RULES) -> MoeSharding:
        """The layout that `rules` give: tokens over the "batch" axes, experts over the one
        "expert" axis, expert hidden units over the "mlp" axis (if any)."""
        experts_axes, hidden = mesh_axes("expert", rules), mesh_axes("mlp", rules)
        if len(experts_axes) != 1 or len(hidden) > 1:
            raise ValueError(f"mesh rules map 'expert' to {experts_axes} and 'mlp' to {hidden}; "
                             "expert parallelism needs exactly one mesh axis for 'expert' and at "
                             "most one for 'mlp' (e.g. rules 'expert=expert,mlp=model').")
        return cls(mesh, form=form, batch_axes=mesh_axes("batch", rules),
                   expert_axis=experts_axes[0], model_axis=hidden[0] if hidden else None)

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

    @property
    def _uses_model_axis(self) -> bool:
        return self.model_axis is not None and self.axis_size(self.model_axis) > 1

    # --- moe.Layout ---

    def run(self, layer: moe.LayerFn, params: moe.Params, state: routing.State, x: jax.Array,
            rng: jax.Array | None, token_mask: jax.Array | None, config: MoeConfig
            ) -> tuple[jax.Array, dict[str, jax.Array], routing.TokenRouting]:
        """gspmd: the layer on the global arrays. explicit: the layer per device under
        `jax.shard_map`; devices' statistics (means over their unmasked tokens) combine by
        `routing.reduction`, weighted by their tokens, so they equal the unsharded ones."""
        if self.form == "gspmd":
            return super().run(layer, params, state, x, rng, token_mask, config)
        self._check_explicit(x, config)

        def per_device(params: moe.Params, state: routing.State, x: jax.Array,
                       rng: jax.Array | None, token_mask: jax.Array | None):
            if rng is not None:  # independent noise per batch shard
                rng = jax.random.fold_in(rng, jax.lax.axis_index(self.batch_axes))
            y, routed = layer(params, state, x, rng, token_mask)
            num = routed.num_tokens
            total = jax.lax.psum(num, self.batch_axes)
            statistics = {
                k: (jax.lax.pmax(v, self.batch_axes) if routing.reduction(k) == "max"
                    else jax.lax.psum(v * num, self.batch_axes) / jax.numpy.maximum(total, 1.0))
                for k, v in routed.statistics.items()}
            return y, statistics, routed.tokens

        param_specs = expert_param_specs(params, self)
        rng_spec = None if rng is None else PartitionSpec()
        mask_spec = None if token_mask is None else self.token_spec
        fn = jax.shard_map(
            per_device, mesh=self.mesh,
            in_specs=(param_specs, jax.tree.map(lambda _: PartitionSpec(), state),
                      self.token_spec, rng_spec, mask_spec),
            out_specs=(self.token_spec, PartitionSpec(), PartitionSpec(self.batch_axes)),
            check_vma=False)
        return fn(params, state, x, rng, token_mask)

    def constrain_tokens(self, grouped: jax.Array) -> jax.Array:
        return self.constrain(grouped, self.token_spec) if self.form == "gspmd" else grouped

    def expert_stage(self, expert_params: experts.Params, activation: str,
                     dropout: experts.Dropout | None = None) -> dispatch.ExpertStage:
        """gspmd: the experts between sharding constraints that put buffers [G, E, C, d] on
        (groups, experts), so XLA inserts the all-to-all (GShard Sec. 3). explicit: this
        device's buffers exchanged over the expert axis, its local experts run, and back."""
        def gspmd(buffers: jax.Array) -> jax.Array:
            buffers = self.constrain(buffers, self.buffer_spec)
            out = experts.expert_ffn(expert_params, buffers, activation, expert_axis=1,
                                     dropout=dropout)
            return self.constrain(out, self.buffer_spec)

        def explicit(buffers: jax.Array) -> jax.Array:  # local groups, all experts
            received = jax.lax.all_to_all(buffers, self.expert_axis, 1, 0,
                                          tiled=True)  # [G*n, E/n, C, d]
            out = experts.expert_ffn(expert_params, received, activation, expert_axis=1,
                                     dropout=dropout)
            return jax.lax.all_to_all(self.model_sum(out), self.expert_axis, 0, 1, tiled=True)

        return gspmd if self.form == "gspmd" else explicit

    def grouped_stage(self, expert_params: experts.Params, activation: str,
                      grouped_matmul: str, dropout: experts.Dropout | None = None
                      ) -> dispatch.GroupedStage:
        """gspmd: the grouped experts on the global rows (GSPMD cannot partition the Mosaic
        kernels: "auto" is XLA's ragged_dot there on accelerators). explicit: this device's
        rows sorted by expert are exchanged over the expert axis with a ragged all-to-all, its
        local experts run on what it receives, and the results go back (`ragged_exchange`)."""
        if self.form == "gspmd":
            return functools.partial(experts.grouped_ffn, expert_params, activation=activation,
                                     impl=grouped_matmul, partitioned=self.mesh.size > 1,
                                     dropout=dropout)
        local = super().grouped_stage(expert_params, activation, grouped_matmul, dropout)

        def explicit(rows: jax.Array, group_sizes: jax.Array) -> jax.Array:
            return ragged_exchange.exchange_experts(
                rows, group_sizes, lambda r, sizes: self.model_sum(local(r, sizes)),
                self.expert_axis)

        return explicit

    def model_sum(self, y: jax.Array) -> jax.Array:
        if self.form == "explicit" and self._uses_model_axis:
            return jax.lax.psum(y, self.model_axis)
        return y

    def _check_explicit(self, x: jax.Array, config: MoeConfig) -> None:
        """Refuses what the explicit form cannot run, naming the numbers and the fix."""
        n_expert = self.axis_size(self.expert_axis)
        if config.num_experts % n_expert:
            raise ValueError(f"num_experts={config.num_experts} does not divide over the expert "
                             f"axis of size {n_expert}; use a multiple of {n_expert} experts.")
        batch_shards = math.prod(self.mesh.shape[a] for a in self.batch_axes)
        if x.shape[0] % batch_shards:
            raise ValueError(f"the leading dimension of x.shape={x.shape} does not divide over "
                             f"the {batch_shards} devices of batch axes {self.batch_axes}; use a "
                             f"batch divisible by {batch_shards}.")
        tokens_per_device = math.prod(x.shape[:-1]) // batch_shards
        if config.group_size and tokens_per_device % config.group_size:
            raise ValueError(f"MoeConfig.group_size={config.group_size} does not divide the "
                             f"{tokens_per_device} tokens per device (x.shape={x.shape} over "
                             f"{batch_shards} devices); routing groups cannot span devices in "
                             "the explicit form.")


def expert_param_specs(params: dict[str, dict[str, Any]], sharding: MoeSharding
                       ) -> dict[str, dict[str, PartitionSpec]]:
    """PartitionSpecs of one MoE layer's params for the explicit form (experts on the expert
    axis, hidden units on the model axis, router replicated)."""
    e, m = sharding.expert_axis, sharding.model_axis
    if ("wo_bias" in params.get("experts", {}) and sharding.form == "explicit"
            and sharding._uses_model_axis):
        raise ValueError("expert biases (MoeConfig.expert_bias, GPT-OSS) with the experts' "
                         f"hidden units split over the model axis {m!r}: the explicit form sums "
                         "the partial outputs over that axis and would add the output bias once "
                         "per shard; use form='gspmd' or a mesh without a model axis.")
    specs = {"wi": PartitionSpec(e, None, m), "wi_gate": PartitionSpec(e, None, m),
             "wo": PartitionSpec(e, m, None), "wi_bias": PartitionSpec(e, m),
             "wi_gate_bias": PartitionSpec(e, m), "wo_bias": PartitionSpec(e, None)}
    shared = {"wi": PartitionSpec(None, m), "wi_gate": PartitionSpec(None, m),
              "wo": PartitionSpec(m, None)}
    by_group = {"experts": specs, "shared": shared}
    return {group: {name: by_group.get(group, {}).get(name, PartitionSpec()) for name in leaves}
            for group, leaves in params.items()}
