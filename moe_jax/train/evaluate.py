"""Evaluation: exact sums over the validation batches, routing statistics per MoE layer and per
domain, and the per-token routing the statistics are built from.

    eval_step = make_eval_step(model, model_config, moe_config, num_domains=3)
    sums = EvalSums()
    for i, batch in enumerate(batches):
        sums.add(jax.jit(eval_step)(state.params, state.model_state, batch, i))
    metrics = summarize(sums.totals, model_config, domain_names)

The step returns sums (token-weighted where a statistic is a mean), so `summarize` gives the
exact loss over all evaluated tokens however the batches fall. Losses are per target token (the
masked tokens under masked_lm); routing statistics are per routed token (every position the
data pipeline weights, masked or not), so under masked_lm they describe the whole corrupted input
and not only the [MASK] positions. Under causal_lm the two sets are the same. Masked-LM eval
masks are fixed: batch i is corrupted with `eval_mask_key(seed, i)`, independent of the training
step, so eval losses compare across steps and runs. Shape letters: B batch, L length,
N = B * L tokens, M sparse blocks, E experts, K choices, D domains.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moe_jax import losses, moe, objective, routing
from moe_jax.config import MoeConfig
from moe_jax.models.config import ModelConfig
from moe_jax.train.step import model_inputs

Array = jax.Array
Batch = dict[str, Array]

# Per-layer MoE aux entries that are token-weighted means over evaluation batches.
LAYER_MEANS = ("expert_load", "dropped_fraction", "router_entropy", "router_z_loss",
               "load_balancing_loss")
# The eval masks' stream of key(seed): init_train_state splits key(seed) into fold_in(key, 0)
# (parameters) and fold_in(key, 1) (training randomness), so 2 is a fresh stream.
EVAL_MASK_STREAM = 2


def eval_mask_key(seed: int, batch_index: Array | int) -> Array:
    """The masked-LM key of evaluation batch `batch_index`: fold_in(fold_in(key(seed),
    EVAL_MASK_STREAM), batch_index). The same for every evaluation of a run and of its resumes."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), EVAL_MASK_STREAM),
                              batch_index)


def token_routing(router_logits: Array, moe_config: MoeConfig,
                  score_bias: Array | None = None) -> tuple[Array, Array]:
    """Per-token routing of one MoE layer, for statistics.

    router_logits: [N, E] (Soft MoE: [N, E * slots]). Returns
      share:   [N, E], how the token's routing splits over experts, rows summing to 1. Token-choice
               routers (top_k, sigmoid_bias): 1/K for each of the K chosen experts, before
               capacity (a dropped choice still counts; drops are reported per layer).
               expert_choice and soft: the router probabilities (softmax; soft: combine weights
               summed over each expert's slots), since there a token does not choose.
      entropy: [N], entropy (nats) of the routing distribution, as `losses.router_entropy`.
    """
    c = moe_config
    logits = router_logits.astype(jnp.float32)
    if c.router == "sigmoid_bias":
        scores = jax.nn.sigmoid(logits)
        probs = scores / jnp.sum(scores, axis=-1, keepdims=True)
        bias = jnp.zeros(c.num_experts) if score_bias is None else score_bias
        choice = routing.route_sigmoid_bias(scores, bias, c.top_k)
    elif c.router == "soft":
        probs = jax.nn.softmax(logits, axis=-1)
        share = probs.reshape(probs.shape[0], c.num_experts, -1).sum(-1)
        return share, _entropy(probs)
    else:
        probs = jax.nn.softmax(logits, axis=-1)
        if c.router == "expert_choice":
            return probs, _entropy(probs)
        choice = routing.route_top_k(probs, c.top_k, renormalize=False)
    share = jnp.sum(jax.nn.one_hot(choice.expert_index, c.num_experts), axis=1) / c.top_k
    return share, _entropy(probs)


def _entropy(probs: Array) -> Array:
    """[N] entropies; `losses.router_entropy` is their mean."""
    return jax.vmap(lambda p: losses.router_entropy(p[None]))(probs)


def is_router_input(module: nn.Module, method_name: str) -> bool:
    """`capture_intermediates` filter of `model.apply` that keeps each block's FFN norm output:
    the input of a sparse block's router (read it back with `router_input`)."""
    return module.name == "ffn_norm" and method_name == "__call__"


def router_input(captured: dict[str, Any], layer: int) -> Array:
    """The router input [B, L, d] of block `layer` from the `captured` collections of a
    `model.apply(..., capture_intermediates=is_router_input, mutable=["intermediates"])`."""
    return captured["intermediates"][f"block_{layer}"]["ffn_norm"]["__call__"][0]


def make_eval_step(model: nn.Module, model_config: ModelConfig, moe_config: MoeConfig, *,
                   num_domains: int = 0, objective_name: str = "causal_lm",
                   mask_rate: float = 0.15, seed: int = 0
                   ) -> Callable[..., dict[str, Array]]:
    """The pure eval step `(params, model_state, batch, batch_index=None) -> sums` (train=False:
    no dropout, the evaluation capacity factor). objective_name / mask_rate: as the train step's;
    masked_lm corrupts batch `batch_index` (required then) with `eval_mask_key(seed,
    batch_index)`. Sums (float32; `T` = sum of the target weights, `R` = sum of the weights the
    data pipeline gives, the routed tokens; R = T for causal_lm):

      num_tokens (T), num_bytes, nll_sum, correct, routed_tokens (R), load_balancing_loss * R,
      router_z_loss * R
      layer/<aux> [M] or [M, E]: each per-layer aux of `LAYER_MEANS` times R; max_router_logit
        [M] as a max
      with num_domains > 0 (batch["domains"] [B, L] domain ids): domain/num_tokens,
        domain/num_bytes, domain/nll_sum, domain/correct [D], and, with MoE layers,
        domain/routed_tokens [D], domain/expert_share [M, D, E] and domain/router_entropy
        [M, D] (routed-token sums of `token_routing`'s share and entropy; the router input is
        captured from the model).
    """
    objective.check_objective(objective_name, model_config)
    sparse = model_config.sparse_layers

    def eval_step(params: Any, model_state: dict[str, Any], batch: Batch,
                  batch_index: Array | int | None = None) -> dict[str, Array]:
        routed = batch["weights"].astype(jnp.float32)  # [B, L]
        key = None if batch_index is None else eval_mask_key(seed, batch_index)
        if objective_name != "causal_lm" and key is None:
            raise ValueError("masked_lm evaluation needs the batch's index (eval_step(params, "
                             "model_state, batch, batch_index)) to draw its fixed masks.")
        batch = objective.objective_batch(key, batch, objective=objective_name,
                                          model=model_config, mask_rate=mask_rate)
        variables = {"params": params, **model_state}
        (logits, aux), captured = model.apply(
            variables, batch["inputs"], **model_inputs(batch), train=False,
            capture_intermediates=is_router_input if (num_domains and sparse) else False,
            mutable=["intermediates"])
        _, metrics = objective.compute_loss(logits, batch, aux, moe_config)
        weights = batch["weights"].astype(jnp.float32)
        nll = objective.token_nll(logits, batch["targets"])
        correct = (jnp.argmax(logits, -1) == batch["targets"]).astype(jnp.float32) * weights
        token_bytes = batch.get("target_bytes", jnp.zeros_like(weights)).astype(jnp.float32)
        r = jnp.sum(routed)
        sums = {"num_tokens": metrics["num_tokens"], "nll_sum": metrics["nll_sum"],
                "num_bytes": jnp.sum(token_bytes * weights), "correct": jnp.sum(correct),
                "routed_tokens": r,
                "load_balancing_loss": metrics["load_balancing_loss"] * r,
                "router_z_loss": metrics["router_z_loss"] * r}
        if aux:
            for name in LAYER_MEANS:
                sums[f"layer/{name}"] = aux[name].astype(jnp.float32) * r
            sums["layer/max_router_logit"] = aux["max_router_logit"].astype(jnp.float32)
        if num_domains:
            domains = jax.nn.one_hot(batch["domains"], num_domains)  # [B, L, D]
            one_hot = (domains * weights[..., None]).reshape(-1, num_domains)  # [N, D]
            sums["domain/num_tokens"] = jnp.sum(one_hot, 0)
            sums["domain/num_bytes"] = token_bytes.reshape(-1) @ one_hot
            sums["domain/nll_sum"] = nll.reshape(-1) @ one_hot
            sums["domain/correct"] = correct.reshape(-1) @ one_hot
            if sparse:
                routed_one_hot = (domains * routed[..., None]).reshape(-1, num_domains)
                sums["domain/routed_tokens"] = jnp.sum(routed_one_hot, 0)
                share, entropy = [], []
                for layer in sparse:
                    name = f"block_{layer}"
                    x = router_input(captured, layer)
                    x = x.reshape(-1, x.shape[-1])
                    layer_params = params[name]["moe"]
                    bias = model_state.get("moe_state", {}).get(name, {}).get("moe", {}).get(
                        "score_bias")
                    logits_m = moe.router_logits(layer_params, x, moe_config, train=False,
                                                 rng=None)
                    s, h = token_routing(logits_m, moe_config, bias)
                    share.append(routed_one_hot.T @ s)  # [D, E]
                    entropy.append(h @ routed_one_hot)  # [D]
                sums["domain/expert_share"] = jnp.stack(share)
                sums["domain/router_entropy"] = jnp.stack(entropy)
        return sums

    return eval_step


class EvalSums:
    """Host-side running totals of eval-step sums (max for `layer/max_router_logit`)."""

    def __init__(self) -> None:
        self.totals: dict[str, np.ndarray] = {}

    def add(self, sums: dict[str, Array]) -> None:
        for name, value in jax.device_get(sums).items():
            value = np.asarray(value, np.float64)
            if name not in self.totals:
                self.totals[name] = value
            elif name == "layer/max_router_logit":
                self.totals[name] = np.maximum(self.totals[name], value)
            else:
                self.totals[name] = self.totals[name] + value


def coefficient_of_variation(load: np.ndarray) -> float:
    """std / mean of a load vector [E] (0 = perfectly balanced; Shazeer et al. 2017 Sec. 4)."""
    mean = float(np.mean(load))
    return float(np.std(load) / mean) if mean > 0 else float("nan")


def summarize(totals: dict[str, np.ndarray], model_config: ModelConfig,
              domain_names: Sequence[str] = ()) -> dict[str, Any]:
    """Eval sums -> flat metrics (floats, and lists for per-expert histograms).

    loss is the cross-entropy in nats per target token (the validation loss; the auxiliary losses
    are reported separately; masked_lm: per masked token), bits_per_byte = nll / ln 2 / bytes
    (causal_lm only), accuracy = top-1 on the targets. The routing statistics are means over
    the routed tokens. Per MoE block `layer_{i}/`: expert_load [E] (histogram), load_cv,
    dropped_fraction, router_entropy, router_z_loss, load_balancing_loss, max_router_logit. Per
    domain `domain/{name}/`: loss, bits_per_byte, accuracy, num_tokens, and per block
    expert_share [E], share_cv, router_entropy.
    """
    t = max(float(totals["num_tokens"]), 1e-8)
    r = max(float(totals["routed_tokens"]), 1e-8)
    out: dict[str, Any] = {
        "loss": float(totals["nll_sum"]) / t,
        "accuracy": float(totals["correct"]) / t,
        "num_tokens": float(totals["num_tokens"]),
        "load_balancing_loss": float(totals["load_balancing_loss"]) / r,
        "router_z_loss": float(totals["router_z_loss"]) / r,
    }
    if float(totals["num_bytes"]) > 0:
        out["bits_per_byte"] = float(totals["nll_sum"]) / math.log(2) / float(totals["num_bytes"])
    for m, layer in enumerate(model_config.sparse_layers if "layer/expert_load" in totals else ()):
        prefix = f"layer_{layer}/"
        for name in LAYER_MEANS:
            value = totals[f"layer/{name}"][m] / r
            out[prefix + name] = value.tolist() if value.ndim else float(value)
        out[prefix + "load_cv"] = coefficient_of_variation(totals["layer/expert_load"][m])
        out[prefix + "max_router_logit"] = float(totals["layer/max_router_logit"][m])
    for d, domain in enumerate(domain_names if "domain/num_tokens" in totals else ()):
        tokens = float(totals["domain/num_tokens"][d])
        if tokens == 0:
            continue
        prefix = f"domain/{domain}/"
        out[prefix + "num_tokens"] = tokens
        out[prefix + "loss"] = float(totals["domain/nll_sum"][d]) / tokens
        out[prefix + "accuracy"] = float(totals["domain/correct"][d]) / tokens
        if float(totals["domain/num_bytes"][d]) > 0:
            out[prefix + "bits_per_byte"] = (float(totals["domain/nll_sum"][d]) / math.log(2)
                                             / float(totals["domain/num_bytes"][d]))
        for m, layer in enumerate(model_config.sparse_layers
                                  if "domain/expert_share" in totals else ()):
            routed = float(totals["domain/routed_tokens"][d])
            share = totals["domain/expert_share"][m, d] / routed
            out[prefix + f"layer_{layer}/expert_share"] = share.tolist()
            out[prefix + f"layer_{layer}/share_cv"] = coefficient_of_variation(share)
            out[prefix + f"layer_{layer}/router_entropy"] = float(
                totals["domain/router_entropy"][m, d]) / routed
    return out
