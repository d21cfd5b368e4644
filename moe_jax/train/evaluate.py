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
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from moe_jax import layers, routing
from moe_jax.config import MoeConfig
from moe_jax.models.config import ModelConfig
from moe_jax.models.transformer import layer_routing
from moe_jax.train import objective
from moe_jax.train.step import model_inputs

Array = jax.Array
Batch = dict[str, Array]

# The per-layer routing statistics evaluation reports (`routing.STATISTICS`, without the
# training step's balancing signal `assignment_fraction`; `expert_load` is the load after drops).
LAYER_STATISTICS = tuple(name for name in routing.STATISTICS if name != "assignment_fraction")
# Bins of the top-1 gate histograms over [0, 1] (`domain/top1_gate`).
GATE_BINS = 20
# The eval masks' stream of key(seed): init_train_state splits key(seed) into fold_in(key, 0)
# (parameters) and fold_in(key, 1) (training randomness), so 2 is a fresh stream.
EVAL_MASK_STREAM = 2


def eval_mask_key(seed: int, batch_index: Array | int) -> Array:
    """The masked-LM key of evaluation batch `batch_index`: fold_in(fold_in(key(seed),
    EVAL_MASK_STREAM), batch_index). The same for every evaluation of a run and of its resumes."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), EVAL_MASK_STREAM),
                              batch_index)


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
      layer/<statistic> [M] or [M, E]: each of `LAYER_STATISTICS`, times R where it is a mean
        (`routing.reduction`), as it is where it is a max
      with num_domains > 0 (batch["domains"] [B, L] domain ids): domain/num_tokens,
        domain/num_bytes, domain/nll_sum, domain/correct [D], and, with MoE layers,
        domain/routed_tokens [D], domain/expert_share [M, D, E], domain/router_entropy
        [M, D] (routed-token sums of each token's `routing.TokenRouting.expert_share` and
        `entropy`, as the MoE layers sow them), domain/expert_load [M, D, E] (the same for the
        kept choices only; token-choice routers) and domain/top1_gate [M, D, GATE_BINS]
        (routed tokens per bin of their first choice's gate).
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
        (logits, aux), collections = model.apply(
            {"params": params, **model_state}, batch["inputs"], **model_inputs(batch),
            train=False, mutable=[layers.ROUTING])
        aux, _ = objective.split_mtp(aux)  # evaluation reports the main model's loss
        _, metrics = objective.compute_loss(logits, batch, aux, moe_config)
        per_token = _per_token(logits, batch)
        r = jnp.sum(routed)
        sums = {"num_tokens": metrics["num_tokens"], "nll_sum": metrics["nll_sum"],
                "num_bytes": jnp.sum(per_token["num_bytes"]),
                "correct": jnp.sum(per_token["correct"]), "routed_tokens": r,
                "load_balancing_loss": metrics["load_balancing_loss"] * r,
                "router_z_loss": metrics["router_z_loss"] * r}
        for name in LAYER_STATISTICS if aux else ():
            value = aux[name].astype(jnp.float32)
            sums[f"layer/{name}"] = value if routing.reduction(name) == "max" else value * r
        if num_domains:
            tokens = layer_routing(collections, model_config) if sparse else []
            sums |= _domain_sums(jax.nn.one_hot(batch["domains"], num_domains), per_token,
                                 routed, tokens)
        return sums

    return eval_step


def _per_token(logits: Array, batch: Batch) -> dict[str, Array]:
    """[B, L] weighted per-token sums: nll_sum (nats), correct (top-1), num_bytes."""
    weights = batch["weights"].astype(jnp.float32)
    token_bytes = batch.get("target_bytes", jnp.zeros_like(weights)).astype(jnp.float32)
    correct = (jnp.argmax(logits, -1) == batch["targets"]).astype(jnp.float32)
    return {"nll_sum": objective.token_nll(logits, batch["targets"]) * weights,
            "correct": correct * weights, "num_bytes": token_bytes * weights,
            "num_tokens": weights}


def _domain_sums(domains: Array, per_token: dict[str, Array], routed: Array,
                 tokens: list[routing.TokenRouting]) -> dict[str, Array]:
    """Per-domain sums: domains [B, L, D] one-hot; per_token from `_per_token`; routed [B, L]
    the routed tokens' weights; tokens: each sparse block's per-token routing ([] if dense)."""
    num_domains = domains.shape[-1]
    one_hot = domains.reshape(-1, num_domains)  # [N, D]
    sums = {f"domain/{name}": value.reshape(-1) @ one_hot for name, value in per_token.items()}
    if tokens:
        routed_one_hot = one_hot * routed.reshape(-1, 1)
        sums["domain/routed_tokens"] = jnp.sum(routed_one_hot, 0)
        sums["domain/expert_share"] = jnp.stack(
            [routed_one_hot.T @ t.expert_share() for t in tokens])  # [M, D, E]
        sums["domain/router_entropy"] = jnp.stack(
            [t.entropy() @ routed_one_hot for t in tokens])  # [M, D]
        if tokens[0].choice is not None:
            sums["domain/expert_load"] = jnp.stack(
                [routed_one_hot.T @ t.expert_share(kept=True) for t in tokens])  # [M, D, E]
        sums["domain/top1_gate"] = jnp.stack(
            [routed_one_hot.T @ _gate_bins(t) for t in tokens])  # [M, D, GATE_BINS]
    return sums


def _gate_bins(tokens: routing.TokenRouting) -> Array:
    """[N, GATE_BINS] one-hot bin of each token's first-choice gate (the largest routing weight
    where tokens do not choose) over [0, 1]."""
    gate = (jnp.max(tokens.probs, axis=-1) if tokens.choice is None
            else tokens.choice.gate[:, 0])
    index = jnp.clip(jnp.floor(gate.astype(jnp.float32) * GATE_BINS), 0, GATE_BINS - 1)
    return jax.nn.one_hot(index.astype(jnp.int32), GATE_BINS, dtype=jnp.float32)


class EvalSums:
    """Host-side running totals of eval-step sums (maxima where `routing.reduction` says so)."""

    def __init__(self) -> None:
        self.totals: dict[str, np.ndarray] = {}

    def add(self, sums: dict[str, Array]) -> None:
        for name, value in jax.device_get(sums).items():
            value = np.asarray(value, np.float64)
            if name not in self.totals:
                self.totals[name] = value
            elif routing.reduction(name) == "max":
                self.totals[name] = np.maximum(self.totals[name], value)
            else:
                self.totals[name] = self.totals[name] + value


def evaluate_batches(eval_step: Callable[..., dict[str, Array]], params: Any,
                     model_state: dict[str, Any], batches: Iterable[Batch],
                     to_device: Callable[[Batch], Batch] = lambda batch: batch
                     ) -> dict[str, np.ndarray]:
    """The totals (`EvalSums`) of `eval_step` over `batches` (each placed by `to_device`)."""
    sums = EvalSums()
    for index, batch in enumerate(batches):
        sums.add(eval_step(params, model_state, to_device(batch), np.int32(index)))
    return sums.totals


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
        for name in LAYER_STATISTICS:
            value = totals[f"layer/{name}"][m]
            value = value if routing.reduction(name) == "max" else value / r
            out[prefix + name] = value.tolist() if value.ndim else float(value)
        out[prefix + "load_cv"] = coefficient_of_variation(totals["layer/expert_load"][m])
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
