"""Sparse upcycling: a dense Transformer's parameters become a sparse one's (Komatsuzaki et al.
2022, "Sparse Upcycling", Sec. 3.1), optionally with Drop-Upcycling's partial re-initialisation
(Nakamura et al. 2025, Sec. 3).

    params = upcycle(dense_params, fresh_params, model_config, key=key)

`fresh_params` is a freshly initialised sparse model of the same widths: its routers (and any
shared experts) are kept; each sparse block's E experts are copies of that block's dense FFN;
every other parameter is copied from `dense_params`. With identical experts and gates that sum
to one (renormalised top-k, nothing dropped) the upcycled model computes the dense function.

Shape letters: E experts, d model width, f FFN width.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from moe_jax.models.config import ModelConfig
from moe_jax.models.transformer import MOE_NAME, block_name

Array = jax.Array
DENSE_FFN = "ffn"  # a dense block's FFN submodule (transformer.DenseFfn)
EXPERTS = "experts"
HIDDEN_LAST = ("wi", "wi_gate")  # the FFN matrices whose last axis is f (wo: its first)


def _path(keys: tuple[str, ...]) -> str:
    return "/".join(keys)


def expert_copies(ffn: dict[str, Array], num_experts: int, key: Array, *, noise: float = 0.0,
                  reinit_fraction: float = 0.0) -> dict[str, Array]:
    """E copies of one dense FFN: {"wi": [d, f], "wo": [f, d], ...} -> {"wi": [E, d, f], ...}.

    noise: each copy's weight plus noise * std(weight) * N(0, 1), independent per expert.
    reinit_fraction: Drop-Upcycling (Nakamura et al. 2025, Sec. 3): in each expert
      round(reinit_fraction * f) hidden units, chosen at random per expert, get their columns of
      wi / wi_gate and their row of wo re-drawn from N(mean, std^2) of the dense matrix.
    """
    f = ffn["wo"].shape[0]
    num_reinit = round(reinit_fraction * f)
    noise_key, choose_key, draw_key = jax.random.split(key, 3)
    # [E, f]: True for the hidden units each expert re-initialises
    order = jax.vmap(lambda k: jax.random.permutation(k, f))(
        jax.random.split(choose_key, num_experts))
    dropped = jnp.zeros((num_experts, f), bool).at[
        jnp.arange(num_experts)[:, None], order[:, :num_reinit]].set(True)
    out = {}
    for i, (name, w) in enumerate(sorted(ffn.items())):
        w = jnp.asarray(w)
        copies = jnp.broadcast_to(w, (num_experts, *w.shape))
        std, mean = jnp.std(w), jnp.mean(w)
        if noise:
            copies = copies + noise * std * jax.random.normal(
                jax.random.fold_in(noise_key, i), copies.shape, w.dtype)
        if num_reinit:
            fresh = mean + std * jax.random.normal(jax.random.fold_in(draw_key, i), copies.shape,
                                                   w.dtype)
            mask = dropped[:, None, :] if name in HIDDEN_LAST else dropped[:, :, None]
            copies = jnp.where(mask, fresh, copies)
        out[name] = copies.astype(w.dtype)
    return out


class _Copier:
    """Copies parameters from `source` into the structure of a target tree, collecting every
    mismatch (missing, other shape, left over) for one error."""

    def __init__(self, source: dict[str, Any]) -> None:
        self.source = source
        self.problems: list[str] = []
        self.used: set[str] = set()

    def take(self, keys: tuple[str, ...], like: Any) -> Any:
        """source[keys], checked against `like` (an array or ShapeDtypeStruct) and cast to its
        dtype; `like` itself (after noting the problem) when it does not fit."""
        node = self.source
        for k in keys:
            if not isinstance(node, dict) or k not in node:
                self.problems.append(f"{_path(keys)}: missing from the checkpoint (expected "
                                     f"shape {tuple(like.shape)})")
                return like
            node = node[k]
        self.used.add(_path(keys))
        if tuple(np.shape(node)) != tuple(like.shape):
            self.problems.append(f"{_path(keys)}: the checkpoint has shape "
                                 f"{tuple(np.shape(node))}, this model expects {tuple(like.shape)}")
            return like
        return jnp.asarray(node, like.dtype)

    def walk(self, keys: tuple[str, ...], like: Any) -> Any:
        if isinstance(like, dict):
            return {k: self.walk((*keys, k), v) for k, v in like.items()}
        return self.take(keys, like)

    def finish(self, what: str) -> None:
        unused = sorted(p for p in _leaf_paths(self.source) if p not in self.used)
        if unused:
            self.problems.append(f"checkpoint parameters this model has no place for: "
                                 f"{unused[:8]}" + (" ..." if len(unused) > 8 else ""))
        if self.problems:
            raise ValueError(f"{what}:\n  " + "\n  ".join(self.problems))


def copy_parameters(source: dict[str, Any], like: Any, what: str = "cannot load the "
                    "checkpoint: it does not match this model's config") -> Any:
    """`source` in the structure of `like` (arrays or ShapeDtypeStructs), cast to its dtypes;
    ValueError (starting with `what`) naming every missing, mis-shaped or left-over array."""
    copier = _Copier(source)
    out = copier.walk((), like)
    copier.finish(what)
    return out


def upcycle(dense: dict[str, Any], fresh: dict[str, Any], config: ModelConfig, *, key: Array,
            noise: float = 0.0, reinit_fraction: float = 0.0) -> dict[str, Any]:
    """The upcycled parameters (see the module docstring); `config` is the sparse model's.

    Raises ValueError naming every parameter whose shape differs between `dense` and `fresh`,
    a sparse block without a dense FFN to copy, and dense parameters nothing uses.
    """
    sparse = {block_name(i): i for i in config.sparse_layers}
    if not sparse:
        raise ValueError("upcycling needs a sparse target: set model.moe_every or "
                         "model.moe_layers (the blocks whose FFN becomes E experts).")
    already = sorted(k for k, v in dense.items() if isinstance(v, dict) and MOE_NAME in v)
    if already:
        raise ValueError(f"cannot upcycle: the checkpoint is already sparse ({already} hold MoE "
                         "layers); upcycling takes a dense one. To train this model further, "
                         "start a run from it with --config.init.checkpoint=<its directory>.")
    copier = _Copier(dense)
    out = {}
    for name, subtree in fresh.items():
        if name not in sparse:
            out[name] = copier.walk((name,), subtree)
            continue
        block = {k: copier.walk((name, k), v) for k, v in subtree.items() if k != MOE_NAME}
        moe = dict(subtree[MOE_NAME])
        ffn = {w: copier.take((name, DENSE_FFN, w), v[0]) for w, v in moe[EXPERTS].items()}
        moe[EXPERTS] = expert_copies(ffn, moe[EXPERTS]["wo"].shape[0],
                                     jax.random.fold_in(key, sparse[name]), noise=noise,
                                     reinit_fraction=reinit_fraction)
        out[name] = {**block, MOE_NAME: moe}
    copier.finish("cannot upcycle: the dense checkpoint does not match the sparse config (same "
                  "widths, heads, layers and vocabulary; moe.d_ff = the dense d_ff, "
                  "moe.activation = the dense activation)")
    return out


def _leaf_paths(tree: Any, keys: tuple[str, ...] = ()) -> list[str]:
    if isinstance(tree, dict):
        return [p for k, v in tree.items() for p in _leaf_paths(v, (*keys, k))]
    return [_path(keys)]
