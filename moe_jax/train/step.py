"""The train step: loss, gradients (with accumulation), optimiser update, router-state update.

    train_step = make_train_step(model, optimizer, experiment, grad_accum_steps=2)
    state, metrics = jax.jit(train_step, donate_argnums=0)(state, batch)

Batches are dicts of [B, L] arrays (see `moe_jax.train.objective`). With A = grad_accum_steps the
batch is split into A micro-batches of B / A rows, scanned in order; micro-batch i's loss is
weighted by its share of the batch's target tokens, so the accumulated gradient equals the
gradient of the full batch's token-averaged loss (exactly for the cross-entropy; the per-micro
auxiliary losses are token-weighted means of the micro-batch values).
Randomness: micro-batch i of step s uses key = fold_in(fold_in(rng, s), i), split into the
"dropout" and "router" streams; with objective="masked_lm" its masks come from
fold_in(key, MASK_STREAM), so they differ per step and per micro-batch and a resumed run draws
the same ones. The micro-batch shares are counted after masking (masked tokens are the targets).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from moe_jax import layers, routing
from moe_jax.config import MoeConfig
from moe_jax.models import transformer
from moe_jax.models.config import ModelConfig
from moe_jax.train import objective
from moe_jax.train.state import TrainState

Array = jax.Array
Batch = dict[str, Array]
Metrics = dict[str, Array]

# Micro-batch metrics that add up over micro-batches; the others combine by `routing.reduction`
# (a token-weighted mean, or the max).
SUMMED_METRICS = ("num_tokens", "nll_sum", "num_bytes")
# The masked-LM stream of a micro-batch key. split(key) into dropout and router keys gives
# fold_in(key, 0) and fold_in(key, 1) (partitionable threefry), so 2 is a fresh stream.
MASK_STREAM = 2


def model_inputs(batch: Batch) -> dict[str, Array]:
    """Keyword arguments of `Transformer.__call__` from a batch (inputs, segment_ids, positions)."""
    return {"segment_ids": batch.get("segment_ids"), "positions": batch.get("positions")}


def split_micro_batches(batch: Batch, num_micro: int) -> Batch:
    """[B, ...] arrays -> [A, B / A, ...] (consecutive rows form one micro-batch)."""
    def split(x: Array) -> Array:
        if x.shape[0] % num_micro:
            raise ValueError(f"batch of {x.shape[0]} rows does not split into {num_micro} "
                             "micro-batches; make batch_size a multiple of grad_accum_steps.")
        return x.reshape(num_micro, x.shape[0] // num_micro, *x.shape[1:])
    return jax.tree.map(split, batch)


def combine_micro_metrics(metrics: Metrics, share: Array) -> Metrics:
    """Metrics stacked over A micro-batches ([A]-leading) -> one step's metrics.

    share: [A] each micro-batch's share of the batch's target tokens (sums to 1).
    """
    out = {}
    for name, value in metrics.items():
        if name in SUMMED_METRICS:
            out[name] = jnp.sum(value, axis=0)
        elif routing.reduction(name) == "max":
            out[name] = jnp.max(value, axis=0)
        else:
            out[name] = jnp.tensordot(share, value, axes=1)
    if "num_bytes" in out:
        out["bits_per_byte"] = out["nll_sum"] / math.log(2) / jnp.maximum(out["num_bytes"], 1e-8)
    return out


def update_moe_state(model_state: dict[str, Any], assignment_fraction: Array, model: ModelConfig,
                     moe: MoeConfig) -> dict[str, Any]:
    """Moves each sparse block's router state after a step (`routing.Router.update_state`, e.g.
    DeepSeek-V3's auxiliary-loss-free balancing: the score bias +/- `bias_update_rate` toward
    uniform load).

    assignment_fraction: [M, E], the share of assignments of each expert in each of the M sparse
    blocks (block order, as the model stacks its aux). A no-op for a router without one.
    """
    update = routing.ROUTERS[moe.router].update_state
    if update is None or not model.sparse_layers:
        return model_state
    state = model_state[layers.STATE]
    moved = [update(v, assignment_fraction[m], moe)
             for m, v in enumerate(transformer.moe_layer_variables(state, model))]
    return {**model_state,
            layers.STATE: transformer.with_moe_layer_variables(state, model, moved)}


def objective_micro_batches(micro: Batch, step_key: Array, *, objective_name: str,
                            model_config: ModelConfig, mask_rate: float) -> Batch:
    """[A, B / A, L] micro-batches -> the batches their loss is computed on
    (`objective.objective_batch`); masked_lm corrupts micro-batch i with
    fold_in(fold_in(step_key, i), MASK_STREAM). causal_lm returns `micro` itself."""
    if objective_name == "causal_lm":
        return micro
    num_micro = micro["inputs"].shape[0]
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(step_key, i), MASK_STREAM))(
        jnp.arange(num_micro))
    return jax.vmap(lambda key, b: objective.objective_batch(
        key, b, objective=objective_name, model=model_config, mask_rate=mask_rate))(keys, micro)


def accumulate_gradients(grad_fn: Callable[..., Any], state: TrainState, micro: Batch,
                         share: Array) -> tuple[Any, Metrics, Array]:
    """Scans the A micro-batches in order, summing their gradients.

    grad_fn(params, model_state, batch, key, weight) -> ((loss, (metrics, aux)), grads), the
    loss already weighted; micro: [A, B / A, L] batches; share: [A] their weights. Micro-batch
    i draws from fold_in(step key, i). Returns (grads, [A]-stacked metrics, [A, M, E] assignment
    fractions, or an empty array for a dense model).
    """
    step_key = state.step_key()

    def accumulate(grads: Any, xs: tuple[Batch, Array, Array]) -> tuple[Any, Any]:
        micro_batch, weight, index = xs
        key = jax.random.fold_in(step_key, index)
        (_, (metrics, aux)), micro_grads = grad_fn(state.params, state.model_state,
                                                   micro_batch, key, weight)
        fraction = aux.get("assignment_fraction", jnp.zeros((0,), jnp.float32))
        return jax.tree.map(jnp.add, grads, micro_grads), (metrics, fraction)

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    grads, (metrics, fraction) = jax.lax.scan(
        accumulate, zeros, (micro, share, jnp.arange(share.shape[0])))
    return grads, metrics, fraction


def make_train_step(model: nn.Module, optimizer: optax.GradientTransformation,
                    model_config: ModelConfig, moe_config: MoeConfig, *,
                    grad_accum_steps: int = 1,
                    schedule: optax.Schedule | None = None,
                    objective_name: str = "causal_lm", mask_rate: float = 0.15
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """The pure train step `(state, batch) -> (state, metrics)`; jit it (donating the state).

    objective_name / mask_rate: `TrainConfig.objective` / `mask_rate` (checked against the model
    by `objective.check_objective`). metrics (float32 scalars): those of
    `objective.compute_loss` (loss, cross_entropy, accuracy, bits_per_byte (causal_lm only), aux
    losses, routing summaries), each routing statistic per MoE layer as `layer/<name>` ([M] or
    [M, E], block order; `metrics.per_layer` names them by block), plus grad_norm (global norm
    of the accumulated gradient, before clipping) and, with `schedule`, learning_rate.
    """
    objective.check_objective(objective_name, model_config)

    def loss_fn(params: Any, model_state: dict[str, Any], batch: Batch, key: Array,
                weight: Array) -> tuple[Array, tuple[Metrics, dict[str, Array]]]:
        k_dropout, k_router = jax.random.split(key)
        logits, aux = model.apply({"params": params, **model_state}, batch["inputs"],
                                  **model_inputs(batch), train=True,
                                  rngs={"dropout": k_dropout, "router": k_router})
        aux, mtp_logits = objective.split_mtp(aux)
        loss, metrics = objective.compute_loss(logits, batch, aux, moe_config,
                                               mtp_logits=mtp_logits,
                                               mtp_loss_weight=model_config.mtp_loss_weight)
        metrics |= {f"layer/{name}": value for name, value in aux.items()}  # [M] or [M, E]
        return loss * weight, (metrics, aux)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        micro = split_micro_batches(batch, grad_accum_steps)
        # On a mesh, every micro-batch is spread over all batch devices (no-op without rules).
        micro = jax.tree.map(lambda x: nn.with_logical_constraint(x, (None, "batch", "length")),
                             micro)
        micro = objective_micro_batches(micro, state.step_key(), objective_name=objective_name,
                                        model_config=model_config, mask_rate=mask_rate)
        tokens = jnp.sum(micro["weights"].astype(jnp.float32),
                         axis=tuple(range(1, micro["weights"].ndim)))  # [A]
        share = tokens / jnp.maximum(jnp.sum(tokens), 1.0)
        grads, metrics, fraction = accumulate_gradients(grad_fn, state, micro, share)
        metrics = combine_micro_metrics(metrics, share)
        metrics["grad_norm"] = optax.tree.norm(grads)
        if schedule is not None:
            metrics["learning_rate"] = jnp.asarray(schedule(state.step), jnp.float32)

        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        model_state = state.model_state
        if fraction.size:
            model_state = update_moe_state(model_state, jnp.tensordot(share, fraction, axes=1),
                                           model_config, moe_config)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                  model_state=model_state)
        return new_state, metrics

    return train_step
