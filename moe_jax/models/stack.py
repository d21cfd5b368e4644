"""The stack of Transformer blocks: unrolled, or scanned over its repeating unit; each block
optionally rematerialised.

Unrolled, block i is the submodule `block_name(i)`. Scanned (`ModelConfig.scan_layers`), the
blocks split as `scan_plan` says: an unrolled prefix of blocks 0 .. s-1 (`block_name(i)`), then
R repeats of a unit of p blocks run by one `nn.scan`, the submodule `SCAN_NAME`, whose member
`block_name(j)` (j < p) holds the variables of blocks s + r p + j (r < R) stacked [R, ...] along
the logical axis "layers". For moe_every=2 the unit is a dense and a sparse block (s = 0); for
DeepSeekMoE-16B (block 0 dense, then 27 sparse) s = 1 and the unit is one sparse block. The
traced program holds s + p blocks instead of s + R p, which is what makes deep models compile
fast. `convert_layout` moves variables (parameters, model state, optimizer statistics) between
the two layouts.

`ModelConfig.remat_policy` wraps each block in `nn.remat` (jax.checkpoint; Chen et al. 2016,
"Training Deep Nets with Sublinear Memory Cost"): the backward pass recomputes what the policy
does not save.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from moe_jax.config import MoeConfig
from moe_jax.models.config import ModelConfig

Array = jax.Array
Aux = dict[str, Array]

# Block i is the submodule `block_name(i)`; a sparse block's MoE layer is its submodule MOE_NAME;
# the scanned blocks are the submodule SCAN_NAME.
MOE_NAME = "moe"
SCAN_NAME = "scanned"
LAYERS_AXIS = "layers"  # the logical name of the stacked dimension (replicated by the rules)
# remat_policy -> jax.checkpoint policy ("full": None, save nothing).
CHECKPOINT_POLICIES = {"full": None,
                       "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def block_name(layer: int) -> str:
    return f"block_{layer}"


@dataclasses.dataclass(frozen=True)
class ScanPlan:
    """Blocks 0 .. prefix-1 unrolled, then `repeats` repeats of `unit` (its blocks' sparse
    flags)."""

    prefix: int
    unit: tuple[bool, ...]
    repeats: int

    @property
    def period(self) -> int:
        return len(self.unit)


def scan_plan(config: ModelConfig) -> ScanPlan:
    """The split of the blocks with the fewest blocks to trace (prefix + period), the shortest
    prefix among those; every repeat has the same sparse flags and attention kinds
    (`ModelConfig.attention_kind`: NoPE, chunked). When no unit repeats (sparse blocks without
    a regular tail), every block is unrolled: ScanPlan(num_layers, (), 0)."""
    sparse = set(config.sparse_layers)
    n = config.num_layers
    kinds = [(i in sparse, config.attention_kind(i)) for i in range(n)]
    best: tuple[tuple[int, int], int, int] | None = None
    for s in range(n):
        for p in range(1, n - s + 1):
            if (n - s) % p == 0 and all(kinds[i] == kinds[s + (i - s) % p] for i in range(s, n)):
                if best is None or (s + p, s) < best[0]:
                    best = ((s + p, s), s, p)
                break
    _, s, p = best
    if s + p == n:
        return ScanPlan(n, (), 0)
    return ScanPlan(s, tuple(i in sparse for i in range(s, s + p)), (n - s) // p)


def _remat(block: type[nn.Module], policy: str, *, in_scan: bool) -> type[nn.Module]:
    """`block` rematerialised under `policy`; its `train` argument (4th, after self) static."""
    if policy == "none":
        return block
    return nn.remat(block, policy=CHECKPOINT_POLICIES[policy], prevent_cse=not in_scan,
                    static_argnums=(4,))


def _run_blocks(block: type[nn.Module], blocks: list[tuple[str, bool, int]],
                config: ModelConfig, moe: MoeConfig, moe_sharding: Any, x: Array,
                segment_ids: Array, positions: Array, train: bool) -> tuple[Array, list[Aux]]:
    """Applies the named blocks (name, sparse, layer index) in order; returns (x, each sparse
    block's aux)."""
    auxes = []
    for name, sparse, layer in blocks:
        x, aux = block(config, moe if sparse else None, moe_sharding, layer, name=name)(
            x, segment_ids, positions, train)
        if aux is not None:
            auxes.append(aux)
    return x, auxes


class _Unit(nn.Module):
    """One repeat of the scanned unit: (x, segment_ids, positions) -> (x, (aux of each sparse
    member,))."""

    block: Any
    config: ModelConfig
    moe: MoeConfig
    moe_sharding: Any
    unit: tuple[bool, ...]
    train: bool
    first_layer: int = 0  # the block index of the unit's first member in the first repeat

    @nn.compact
    def __call__(self, x: Array, segment_ids: Array, positions: Array
                 ) -> tuple[Array, tuple[Aux, ...]]:
        members = [(block_name(j), sparse, self.first_layer + j)
                   for j, sparse in enumerate(self.unit)]
        x, auxes = _run_blocks(self.block, members, self.config, self.moe, self.moe_sharding,
                               x, segment_ids, positions, self.train)
        return x, tuple(auxes)


def _stack_aux(unrolled: list[Aux], scanned: tuple[Aux, ...]) -> Aux:
    """Per-block aux in block order, stacked [M, ...]: the unrolled blocks', then the scanned
    ones' ([R, ...] per sparse unit member; block order is repeat-major)."""
    parts = []
    if unrolled:
        parts.append({k: jnp.stack([a[k] for a in unrolled]) for k in unrolled[0]})
    if scanned:
        parts.append({k: jnp.stack([a[k] for a in scanned], axis=1).reshape(
            (-1, *scanned[0][k].shape[1:])) for k in scanned[0]})
    if len(parts) < 2:
        return parts[0] if parts else {}
    return {k: jnp.concatenate([p[k] for p in parts]) for k in parts[0]}


def apply_blocks(block: type[nn.Module], config: ModelConfig, moe: MoeConfig, moe_sharding: Any,
                 x: Array, segment_ids: Array, positions: Array, *, train: bool
                 ) -> tuple[Array, Aux]:
    """Runs the blocks of `config` on x [B, L, d], unrolled or scanned, as submodules of the
    calling module (call it from its compact `__call__`). `block(config, moe or None,
    moe_sharding, name=...)` builds one block, called as (x, segment_ids, positions, train) ->
    (x, aux or None). Returns (x, the sparse blocks' aux stacked [M, ...] in block order, {} for
    a dense model)."""
    sparse = set(config.sparse_layers)
    plan = scan_plan(config) if config.scan_layers else ScanPlan(config.num_layers, (), 0)
    unrolled = [(block_name(i), i in sparse, i) for i in range(plan.prefix)]
    x, auxes = _run_blocks(_remat(block, config.remat_policy, in_scan=False), unrolled, config,
                           moe, moe_sharding, x, segment_ids, positions, train)
    scanned_aux: tuple[Aux, ...] = ()
    if plan.repeats:
        scan = nn.scan(_Unit, variable_axes={True: 0}, split_rngs={True: True},
                       in_axes=(nn.broadcast, nn.broadcast), length=plan.repeats,
                       metadata_params={nn.PARTITION_NAME: LAYERS_AXIS})
        cls = _remat(block, config.remat_policy, in_scan=True)
        x, scanned_aux = scan(cls, config, moe, moe_sharding, plan.unit, train, plan.prefix,
                              name=SCAN_NAME)(x, segment_ids, positions)
    return x, _stack_aux(auxes, scanned_aux)


# --- layouts -----------------------------------------------------------------------------------


def _to_scanned(root: dict[str, Any], plan: ScanPlan) -> dict[str, Any]:
    out = dict(root)
    members = {}
    for j in range(plan.period):
        names = [block_name(plan.prefix + r * plan.period + j) for r in range(plan.repeats)]
        present = [name in root for name in names]
        if not any(present):
            continue
        if not all(present):
            raise ValueError(f"cannot stack blocks {names}: only {present.count(True)} of them "
                             "are in the tree; convert a whole variable collection.")
        members[block_name(j)] = jax.tree.map(lambda *xs: jnp.stack(xs),
                                              *[out.pop(name) for name in names])
    if members:
        out[SCAN_NAME] = members
    return out


def _to_unrolled(root: dict[str, Any], plan: ScanPlan) -> dict[str, Any]:
    out = dict(root)
    for member, value in out.pop(SCAN_NAME).items():
        j = next(j for j in range(plan.period) if block_name(j) == member)
        for r in range(plan.repeats):
            out[block_name(plan.prefix + r * plan.period + j)] = jax.tree.map(
                lambda a, r=r: a[r], value)
    return out


def convert_layout(tree: Any, config: ModelConfig, *, scanned: bool) -> Any:
    """`tree` with every dict of `config`'s blocks in it (a variable collection, the parameters
    inside an optimizer state, ...) moved to the scanned (True) or the unrolled (False) layout
    of `config`'s `scan_plan`. Dicts already in the target layout are returned unchanged."""
    plan = scan_plan(config)
    source = {block_name(i) for i in range(plan.prefix, config.num_layers)}

    def is_root(x: Any) -> bool:
        return isinstance(x, dict) and (SCAN_NAME in x if not scanned else bool(source & set(x)))

    def convert(x: Any) -> Any:
        if not is_root(x):
            return x
        return _to_scanned(x, plan) if scanned else _to_unrolled(x, plan)

    return jax.tree.map(convert, tree, is_leaf=is_root)
