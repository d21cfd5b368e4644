"""Where the train state and the batches live on a mesh (`moe_jax.parallel.sharding` builds the
mesh).

    check_experiment(mesh, experiment, rules)                  # clear errors before any work
    shardings = state_shardings(abstract_state, logical, mesh, rules)
    init = jax.jit(init_fn, out_shardings=shardings)           # the state is born sharded
    batch = global_batch(local_rows, batch_sharding(mesh, rules), batch_size)

Parameters and model state take the `NamedSharding` that the mesh rules give their logical axis
names (`state.logical_axes`); optimizer statistics follow the parameter they belong to (same
shape: same sharding; Adafactor's factored statistics, one dimension fewer: the parameter's
sharding without that dimension; anything else, such as step counts: replicated). The step
and the RNG key are replicated. Batches `[B, L]` are split over the "batch" axes; each process
supplies its own rows and `jax.make_array_from_process_local_data` assembles the global array.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from moe_jax.parallel import sharding
from moe_jax.train.state import TrainState

PyTree = Any
Rules = sharding.Rules


def batch_shards(mesh: Mesh, rules: Rules) -> int:
    """Devices a batch is split over: the product of the "batch" axes' sizes."""
    return math.prod(mesh.shape[a] for a in sharding.mesh_axes("batch", rules))


def check_experiment(mesh: Mesh, experiment: Any, rules: Rules) -> None:
    """Raises ValueError naming the numbers and the fix when the experiment does not split over
    the mesh: experts, batch and micro-batch, heads, and (explicit form) routing groups.
    Parameter dimensions are checked one by one in `state_shardings`."""
    train, model, moe = experiment.train, experiment.model, experiment.moe
    sparse = bool(model.sparse_layers)
    sharding.check_divisible(mesh, num_experts=moe.num_experts if sparse else None,
                             global_batch=train.batch_size, num_heads=model.num_heads,
                             num_kv_heads=model.kv_heads, rules=rules)
    shards = batch_shards(mesh, rules)
    micro = train.micro_batch_size
    if micro % shards:
        raise ValueError(
            f"the micro-batch of train.batch_size / train.grad_accum_steps = {train.batch_size} "
            f"/ {train.grad_accum_steps} = {micro} sequences does not divide over the {shards} "
            f"devices of the batch axes {sharding.mesh_axes('batch', rules)}; make it a multiple "
            f"of {shards} (raise batch_size or lower grad_accum_steps).")
    seq_len = train.seq_len or model.max_seq_len
    tokens = micro // shards * seq_len
    if (sparse and experiment.mesh.expert_parallel == "explicit" and moe.group_size
            and tokens % moe.group_size):
        raise ValueError(
            f"moe.group_size={moe.group_size} does not divide the {tokens} tokens of one device "
            f"({micro // shards} sequences of {seq_len}); routing groups cannot span devices in "
            f"the explicit expert-parallel form: use a divisor of {tokens}, e.g. {seq_len}.")


def _check_divides(path: str, shape: tuple[int, ...], names: tuple[str | None, ...],
                   spec: PartitionSpec, mesh: Mesh) -> None:
    for dim, (size, axes) in enumerate(zip(shape, spec)):
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        shards = math.prod(mesh.shape[a] for a in axes)
        if size % shards:
            raise ValueError(
                f"{path} of shape {shape}: dimension {dim} ({names[dim]!r}, size {size}) does "
                f"not divide over mesh axes {axes} of total size {shards} (mesh "
                f"{dict(mesh.shape)}); choose sizes divisible by {shards}, change the mesh, or "
                f"replicate it with --config.mesh.rules='{names[dim]}='.")


def path_keys(path: tuple[Any, ...]) -> tuple[str, ...]:
    """A pytree key path as plain strings: ("block_1", "moe", "experts", "wi")."""
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def variable_shardings(logical: PyTree, abstract: PyTree, mesh: Mesh, rules: Rules) -> PyTree:
    """NamedShardings of model variables from their logical names (a tree of PartitionSpecs of
    logical names, `state.logical_axes`); raises ValueError naming a variable whose dimension
    does not divide over its mesh axes."""
    def one(path: tuple[Any, ...], names: PartitionSpec, leaf: Any) -> NamedSharding:
        names = tuple(names) + (None,) * (len(leaf.shape) - len(names))
        spec = sharding.logical_to_spec(names, rules)
        _check_divides("/".join(path_keys(path)), leaf.shape, names, spec, mesh)
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(
        one, logical, abstract, is_leaf=lambda x: isinstance(x, PartitionSpec))


def _follow_param(leaf: Any, param: tuple[tuple[int, ...], NamedSharding] | None,
                  mesh: Mesh) -> NamedSharding:
    """The sharding of one optimizer statistic given its parameter's (shape, sharding)."""
    replicated = NamedSharding(mesh, PartitionSpec())
    if param is None:
        return replicated
    shape, named = param
    spec = tuple(named.spec) + (None,) * (len(shape) - len(named.spec))
    if tuple(leaf.shape) == shape:
        return named
    for dim in range(len(shape)):  # factored statistics: the parameter without one dimension
        kept = spec[:dim] + spec[dim + 1:]
        if tuple(leaf.shape) == shape[:dim] + shape[dim + 1:]:
            axes = [(a,) if isinstance(a, str) else tuple(a or ()) for a in kept]
            if all(s % math.prod(mesh.shape[a] for a in ax) == 0
                   for s, ax in zip(leaf.shape, axes)):
                return NamedSharding(mesh, PartitionSpec(*kept))
    return replicated


def opt_state_shardings(abstract_opt_state: PyTree, abstract_params: PyTree,
                        param_shardings: PyTree, mesh: Mesh) -> PyTree:
    """Each optimizer-state leaf follows the parameter whose path ends its own path (optax
    nests copies of the parameter tree inside its states), see `_follow_param`."""
    params = {}
    for (path, leaf), named in zip(jax.tree_util.tree_leaves_with_path(abstract_params),
                                   jax.tree.leaves(param_shardings)):
        params[path_keys(path)] = (tuple(leaf.shape), named)

    def one(path: tuple[Any, ...], leaf: Any) -> NamedSharding:
        keys = path_keys(path)
        match = next((params[keys[i:]] for i in range(len(keys)) if keys[i:] in params), None)
        return _follow_param(leaf, match, mesh)

    return jax.tree_util.tree_map_with_path(one, abstract_opt_state)


def state_shardings(abstract: TrainState, logical: PyTree, mesh: Mesh,
                    rules: Rules) -> TrainState:
    """The TrainState of NamedShardings (see the module docstring). `abstract` is the state's
    shapes (`jax.eval_shape` of the init); `logical` is `state.logical_axes(model, seq_len)`."""
    variables = {"params": abstract.params, **abstract.model_state}
    named = variable_shardings({k: logical[k] for k in variables}, variables, mesh, rules)
    params = named.pop("params")
    replicated = NamedSharding(mesh, PartitionSpec())
    return TrainState(step=replicated, params=params,
                      opt_state=opt_state_shardings(abstract.opt_state, abstract.params, params,
                                                    mesh),
                      model_state=named, rng=replicated)


def with_shardings(abstract: PyTree, shardings: PyTree) -> PyTree:
    """ShapeDtypeStructs carrying shardings: the target of a sharded checkpoint restore."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
    """The sharding of `[B, L]` batch arrays: rows over the "batch" axes."""
    return NamedSharding(mesh, sharding.logical_to_spec(("batch", "length"), rules))


def global_batch(local_batch: dict[str, np.ndarray], batch_sharding: NamedSharding,
                 global_rows: int) -> dict[str, jax.Array]:
    """This process's rows (`[B / P, ...]` numpy arrays) -> global `[B, ...]` arrays.

    Each process's rows go to the row blocks of its own devices, in order, so every row of the
    global batch appears once. Where each process's devices hold consecutive blocks (meshes
    from `sharding.make_mesh` on CPU and GPU, whose devices come in process order), the global
    batch is exactly the single-process one; otherwise its rows are permuted."""
    return {name: jax.make_array_from_process_local_data(
        batch_sharding, value, (global_rows, *value.shape[1:]))
        for name, value in local_batch.items()}


def in_mesh_context(fn: Callable[..., Any], mesh: Mesh, rules: Rules) -> Callable[..., Any]:
    """`fn` traced with the mesh and the logical-axis rules in context, so the models'
    `nn.with_logical_constraint` annotations (activations) bind to mesh axes. Jit the result."""
    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
            return fn(*args, **kwargs)

    return wrapped


def allgather_json(value: Any) -> list[Any]:
    """[value of process 0, value of process 1, ...] for a JSON-serialisable value; every
    process must call it (a collective). One process: [value]."""
    if jax.process_count() == 1:
        return [value]
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(value).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int32)))
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:data.size] = data
    rows = np.asarray(multihost_utils.process_allgather(padded))
    return [json.loads(bytes(row[:n])) for row, n in zip(rows, sizes.reshape(-1))]
