"""Training objectives: the one place where the MoE auxiliary losses join the task loss, and
the task itself (`TrainConfig.objective`): next-token prediction ("causal_lm", the batch as the
data pipeline gives it) or BERT-style masked LM ("masked_lm", the batch corrupted by
`mask_for_mlm`; see `objective_batch` and `check_objective`).

    total = cross_entropy
            + load_balance_coef * sum over MoE layers of load_balancing_loss   (Switch eq. 4-6)
            + z_loss_coef       * sum over MoE layers of router_z_loss         (ST-MoE eq. 5)
            + mtp_loss_weight   * multi-token-prediction loss (DeepSeek-V3 eq. 25; mtp_depth)

Summing over layers (not averaging) follows Switch/ST-MoE and flaxformer: every sparse layer
gets its own balancing pressure of weight `coef`, so adding layers does not dilute it.

Batches are dicts of [B, L] arrays (shape letters: B batch, L length, V vocabulary):
inputs int32, targets int32, weights float32 (0 for padding and ignored positions),
segment_ids int32 (0 = padding), positions int32, domains int32, target_bytes float32 (UTF-8
bytes each target token stands for; enables bits per byte).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from moe_jax import routing
from moe_jax.config import MoeConfig
from moe_jax.models import multi_token
from moe_jax.models.config import ModelConfig

Array = jax.Array
Batch = dict[str, Array]

# Byte tokenizer special ids (pad=0, bos=1, eos=2; byte b is token b + 3).
NUM_SPECIAL_TOKENS = 3


def token_nll(logits: Array, targets: Array) -> Array:
    """[B, L] negative log-likelihood (nats) of each target under float32 logits [B, L, V]."""
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return log_z - target_logit


def split_mtp(aux: dict[str, Array]) -> tuple[dict[str, Array], Array | None]:
    """(the MoE aux, the multi-token-prediction logits [D, B, L, V] or None) of a model's aux."""
    aux = dict(aux)
    return aux, aux.pop(multi_token.MTP_LOGITS, None)


def mtp_loss(mtp_logits: Array, batch: Batch) -> Array:
    """DeepSeek-V3's MTP loss before its weight (Sec. 2.2, eqs. 24-25): the mean over the D
    modules of module k's weight-averaged cross-entropy on the targets k places later
    (`multi_token.mtp_targets`). mtp_logits: [D, B, L, V]."""
    segments = batch.get("segment_ids", jnp.ones_like(batch["targets"]))
    losses = []
    for k in range(1, mtp_logits.shape[0] + 1):
        targets, weights = multi_token.mtp_targets(
            batch["targets"], batch["weights"].astype(jnp.float32), segments, k)
        nll = token_nll(mtp_logits[k - 1], targets)
        losses.append(jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1e-8))
    return jnp.mean(jnp.stack(losses))


def compute_loss(logits: Array, batch: Batch, aux: dict[str, Array],
                 moe: MoeConfig, *, mtp_logits: Array | None = None,
                 mtp_loss_weight: float = 0.0) -> tuple[Array, dict[str, Array]]:
    """The training loss and its metrics for one batch.

    logits: [B, L, V] from `Transformer`; batch: dict with at least "targets" and "weights";
    aux: the model's stacked MoE aux ([M]-leading arrays, or {} for a dense model); moe: supplies
    `load_balance_coef` and `z_loss_coef`.

    Returns (loss, metrics). Cross-entropy is the weight-averaged token NLL. Metrics (float32
    scalars): loss, cross_entropy, load_balancing_loss and router_z_loss (each summed over the
    MoE layers, before the coefficient), accuracy, num_tokens (sum of weights), nll_sum; with
    "target_bytes" in the batch also bits_per_byte and num_bytes; with MoE layers also
    dropped_fraction and router_entropy (means over layers) and max_router_logit (max).
    Sums (nll_sum, num_tokens, num_bytes) let an evaluation loop aggregate exactly.
    With `mtp_logits` (`split_mtp`), the loss adds mtp_loss_weight * `mtp_loss` (lambda of
    DeepSeek-V3 eq. 25), reported as mtp_cross_entropy (before the weight).
    """
    weights = batch["weights"].astype(jnp.float32)
    nll = token_nll(logits, batch["targets"])
    num_tokens = jnp.sum(weights)
    nll_sum = jnp.sum(nll * weights)
    cross_entropy = nll_sum / jnp.maximum(num_tokens, 1e-8)
    correct = (jnp.argmax(logits, axis=-1) == batch["targets"]).astype(jnp.float32)

    zero = jnp.zeros((), jnp.float32)
    lb = jnp.sum(aux["load_balancing_loss"]) if aux else zero
    z = jnp.sum(aux["router_z_loss"]) if aux else zero
    loss = cross_entropy + moe.load_balance_coef * lb + moe.z_loss_coef * z
    extra = {}
    if mtp_logits is not None:
        extra["mtp_cross_entropy"] = mtp_loss(mtp_logits, batch)
        loss = loss + mtp_loss_weight * extra["mtp_cross_entropy"]

    metrics = {
        "loss": loss, "cross_entropy": cross_entropy, "load_balancing_loss": lb,
        "router_z_loss": z, "accuracy": jnp.sum(correct * weights) / jnp.maximum(num_tokens, 1e-8),
        "num_tokens": num_tokens, "nll_sum": nll_sum, **extra,
    }
    if "target_bytes" in batch:
        num_bytes = jnp.sum(batch["target_bytes"].astype(jnp.float32) * weights)
        metrics["num_bytes"] = num_bytes
        metrics["bits_per_byte"] = nll_sum / math.log(2) / jnp.maximum(num_bytes, 1e-8)
    for name in ("dropped_fraction", "router_entropy", "max_router_logit") if aux else ():
        over_layers = jnp.max if routing.reduction(name) == "max" else jnp.mean
        metrics[name] = over_layers(aux[name])
    return loss, metrics


def mask_for_mlm(rng: Array, batch: Batch, *, mask_id: int, vocab_size: int,
                 mask_rate: float = 0.15) -> Batch:
    """Masked-LM corruption (BERT, Devlin et al. 2019, Sec. 3.1) for the bidirectional encoder.

    Selects each real token (segment_ids != 0) with probability `mask_rate`; a selected input
    becomes `mask_id` with probability 0.8, a random non-special token with 0.1, or stays
    unchanged with 0.1. Returns a new batch whose targets are the original inputs and whose
    weights are 1 exactly on the selected positions (`target_bytes` is dropped: it describes
    the next-token targets). For the byte tokenizer use mask_id = vocab_size (259), the first
    padded embedding row: `ModelConfig.padded_vocab_size` must exceed it, and the model never
    predicts it because logits cover the real vocabulary only.
    """
    if not 0 < mask_rate < 1:
        raise ValueError(f"mask_rate={mask_rate} must be in (0, 1).")
    inputs = batch["inputs"]
    k_select, k_kind, k_token = jax.random.split(rng, 3)
    real = batch["segment_ids"] != 0
    selected = real & jax.random.bernoulli(k_select, mask_rate, inputs.shape)
    kind = jax.random.uniform(k_kind, inputs.shape)
    random_tokens = jax.random.randint(k_token, inputs.shape, NUM_SPECIAL_TOKENS, vocab_size,
                                       inputs.dtype)
    corrupted = jnp.where(kind < 0.8, jnp.asarray(mask_id, inputs.dtype),
                          jnp.where(kind < 0.9, random_tokens, inputs))
    out = {k: v for k, v in batch.items() if k != "target_bytes"}
    out["inputs"] = jnp.where(selected, corrupted, inputs)
    out["targets"] = inputs
    out["weights"] = selected.astype(jnp.float32)
    return out


def check_objective(objective: str, model: ModelConfig) -> None:
    """Refuses objective/model pairs that leak the targets or cannot mask (ValueError naming the
    fix). causal_lm needs a causal model; masked_lm needs a bidirectional encoder and a padded
    embedding row for the mask token (`mask_token_id`)."""
    if objective == "causal_lm":
        if not model.causal:
            raise ValueError(
                "train.objective='causal_lm' with model.causal=False leaks the targets: the "
                "bidirectional encoder attends to position t + 1, whose input is the target of "
                "position t, so the loss falls to ~0 without learning anything. Train an encoder "
                "with train.objective='masked_lm', or set model.causal=True for a next-token LM.")
    elif objective == "masked_lm":
        if model.causal:
            raise ValueError(
                "train.objective='masked_lm' with model.causal=True: a causal model sees only "
                "the left context of each masked token, which defeats the masked-LM objective "
                "(and is most likely a forgotten model.causal=False). Set model.causal=False "
                "(e.g. configs/dense.py:tiny_encoder), or use train.objective='causal_lm'.")
        if model.padded_vocab_size <= model.vocab_size:
            raise ValueError(
                f"train.objective='masked_lm' uses token id model.vocab_size={model.vocab_size} "
                "as the mask token, a padded embedding row, but the padded vocabulary is "
                f"{model.padded_vocab_size} rows; change model.vocab_multiple (or add one to "
                "model.vocab_size) so that the padded vocabulary exceeds vocab_size.")
    else:
        raise ValueError(f"train.objective={objective!r} is unknown; use 'causal_lm' or "
                         "'masked_lm'.")


def mask_token_id(model: ModelConfig) -> int:
    """The [MASK] input id: the first padded embedding row, never a real token or a logit."""
    return model.vocab_size


def objective_batch(rng: Array | None, batch: Batch, *, objective: str, model: ModelConfig,
                    mask_rate: float = 0.15) -> Batch:
    """The batch the loss is computed on: `batch` itself for causal_lm; for masked_lm the
    `mask_for_mlm` corruption drawn from `rng` (inputs corrupted, targets = original inputs,
    weights 1 on the selected real tokens only). Call `check_objective` first."""
    if objective == "causal_lm":
        return batch
    if rng is None:
        raise ValueError("the masked_lm objective draws its masks from a PRNG key; pass rng.")
    return mask_for_mlm(rng, batch, mask_id=mask_token_id(model), vocab_size=model.vocab_size,
                        mask_rate=mask_rate)
