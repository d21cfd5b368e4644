"""Optimisers and learning-rate schedules (optax), built from a `TrainConfig`.

The optimiser sees only the "params" collection. Non-trainable model state, such as the
sigmoid_bias router's `score_bias` (collection "moe_state"), lives beside the parameters in the
train state and is updated by the train step itself (`step.update_moe_state`), never by optax.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from moe_jax.models import stack
from moe_jax.train.config import TrainConfig

Params = Any


def learning_rate_schedule(config: TrainConfig) -> optax.Schedule:
    """step -> learning rate: linear warmup from 0 to `learning_rate`, then `config.schedule`.

    cosine: to learning_rate * end_lr_ratio at num_train_steps (Loshchilov & Hutter 2017).
    rsqrt: learning_rate * sqrt(warmup / step) after warmup (T5, Raffel et al. 2020, Sec. 3.1.2).
    constant: learning_rate after warmup.
    """
    peak, warmup = config.learning_rate, config.warmup_steps
    if config.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, peak, warmup, decay_steps=max(config.num_train_steps, warmup + 1),
            end_value=peak * config.end_lr_ratio)
    if config.schedule == "rsqrt":
        def rsqrt(step: jax.Array) -> jax.Array:
            step = jnp.asarray(step, jnp.float32)
            ramp = step / max(warmup, 1)
            decay = jnp.sqrt(max(warmup, 1) / jnp.maximum(step, 1.0))
            return peak * jnp.where(step < warmup, ramp, jnp.minimum(decay, 1.0))
        return rsqrt
    if config.schedule == "constant":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, peak, max(warmup, 1)), optax.constant_schedule(peak)],
            [warmup])
    raise ValueError(f"unknown schedule {config.schedule!r}; use cosine, rsqrt or constant.")


def weight_decay_mask(params: Params) -> Params:
    """True for parameters that decay: matrices and higher (kernels, embeddings, experts);
    False for vectors (norm scales, biases). The stacked dimension of a scanned model's blocks
    (`models.stack`) does not count."""
    def decays(path: tuple[Any, ...], p: jax.Array) -> bool:
        stacked = any(getattr(k, "key", None) == stack.SCAN_NAME for k in path)
        return p.ndim - stacked >= 2

    return jax.tree_util.tree_map_with_path(decays, params)


def is_router(path: tuple[Any, ...]) -> bool:
    """Whether the parameter at `path` (a key path of the params tree) belongs to a router:
    the MoE layers' `router` group (kernel)."""
    return any(getattr(key, "key", None) == "router" for key in path)


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping (if `grad_clip_norm` > 0) followed by AdamW or Adafactor, both on the
    `learning_rate_schedule`, with decoupled weight decay `lr(step) * weight_decay * param` on
    `weight_decay_mask`. With `freeze_router` the router parameters get zero updates (no decay
    either) and the others the optimizer above, their clipping norm computed without the
    routers' gradients."""
    optimizer = _make_trainable_optimizer(config)
    if not config.freeze_router:
        return optimizer

    def labels(params: Params) -> Params:
        return jax.tree_util.tree_map_with_path(
            lambda path, _: "frozen" if is_router(path) else "trained", params)

    return optax.multi_transform({"trained": optimizer, "frozen": optax.set_to_zero()}, labels)


def _make_trainable_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    schedule = learning_rate_schedule(config)
    if config.optimizer == "adamw":
        optimizer = optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                                weight_decay=config.weight_decay, mask=weight_decay_mask)
    elif config.optimizer == "adafactor":
        # optax adds Adafactor's decay after the learning-rate scaling; scheduling the rate as
        # weight_decay * lr(step) makes it the same decoupled decay as AdamW's.
        decay = None
        if config.weight_decay > 0:
            decay = lambda step: config.weight_decay * schedule(step)
        optimizer = optax.adafactor(schedule, weight_decay_rate=decay,
                                    weight_decay_mask=weight_decay_mask)
    else:
        raise ValueError(f"unknown optimizer {config.optimizer!r}; use adamw or adafactor.")
    if config.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), optimizer)
    return optimizer
