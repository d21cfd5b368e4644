"""Routing analysis of a trained token-choice model (Mixtral, Jiang et al. 2024, Sec. 5):
expert use by domain and by byte class, consecutive-token repetition vs chance, router entropy.

    python -m experiments.analyses.routing_stats --workdir=experiments/results/.../mixtral_e8_s0

restores the run's last checkpoint (its config from the workdir's config.json: a training run's,
or a model's converted by `python -m moe_jax.convert`),
routes the validation batches the training loop evaluates on, and writes DIR/analysis.json:

  num_experts, top_k, layers, domains, byte_classes, chance_repeat_first (1/E),
  chance_repeat_any (1 - C(E-k, k) / C(E, k): Mixtral Table 5's ~46% for E=8, k=2), and per
  sparse layer: domain_share [D, E] and class_share [C, E] (each token's k choices count 1/k,
  before capacity), repeat_first / repeat_any (share of consecutive same-document token pairs
  whose first choice is equal / whose choice sets overlap) overall and per domain, entropy
  (mean per-token router entropy, nats; ln E is uniform), mi_domain_bits / mi_class_bits (mutual
  information of the first choice with the domain / byte class), and domain_tv with its
  permutation null (max over domains of the total-variation distance between a domain's expert
  shares and all tokens' shares; documents' domain labels shuffled `PERMUTATIONS` times).

The statistics are pure NumPy functions on [B, L, K] expert indices (tested on hand-made arrays);
the model part reads the per-token routing the MoE layers sow (`evaluate.layer_routing`): the
experts each token chose before capacity, and the entropy of its routing distribution.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import flags

from moe_jax.utils import cli

BYTE_CLASSES = ("letter", "digit", "space", "punct", "non-ascii", "control", "special")
NUM_SPECIAL_TOKENS = 3  # byte tokenizer: pad 0, bos 1, eos 2, byte b -> b + 3
PERMUTATIONS = 200


def byte_class(token_ids: np.ndarray) -> np.ndarray:
    """Class index (into BYTE_CLASSES) of each byte-tokenizer id."""
    ids = np.asarray(token_ids)
    b = ids - NUM_SPECIAL_TOKENS
    letter = ((b >= 65) & (b <= 90)) | ((b >= 97) & (b <= 122))
    digit = (b >= 48) & (b <= 57)
    space = np.isin(b, (9, 10, 13, 32))
    punct = (b >= 33) & (b <= 126) & ~letter & ~digit
    non_ascii = b >= 128
    special = ids < NUM_SPECIAL_TOKENS
    out = np.full(ids.shape, BYTE_CLASSES.index("control"))
    for name, mask in (("letter", letter), ("digit", digit), ("space", space), ("punct", punct),
                       ("non-ascii", non_ascii), ("special", special)):
        out = np.where(mask, BYTE_CLASSES.index(name), out)
    return out


def chance_repeat_any(num_experts: int, k: int) -> float:
    """P(two independent uniform k-subsets of E experts overlap) = 1 - C(E-k, k) / C(E, k)."""
    return 1.0 - math.comb(num_experts - k, k) / math.comb(num_experts, k)


def shares_by_label(expert_index: np.ndarray, labels: np.ndarray, num_labels: int,
                    num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """([num_labels, E] share of each label's assignments per expert, [num_labels] tokens).

    expert_index: [N, K] chosen experts; labels: [N] in [0, num_labels) (others ignored)."""
    valid = (labels >= 0) & (labels < num_labels)
    counts = np.zeros((num_labels, num_experts))
    k = expert_index.shape[1]
    for j in range(k):
        np.add.at(counts, (labels[valid], expert_index[valid, j]), 1.0 / k)
    tokens = counts.sum(axis=1)
    return counts / np.maximum(tokens, 1e-12)[:, None], tokens


def repeat_rates(expert_index: np.ndarray, segment_ids: np.ndarray,
                 labels: np.ndarray | None = None, num_labels: int = 0) -> dict[str, Any]:
    """Consecutive-token repetition (Mixtral Table 5) over pairs (t, t+1) of the same document.

    expert_index: [B, L, K]; segment_ids: [B, L] (0 = padding). Returns repeat_first (same first
    choice), repeat_any (the k-sets share an expert), pairs, and with labels [B, L] the same per
    label (lists, NaN where a label has no pair)."""
    same_doc = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] > 0)
    a, b = expert_index[:, :-1], expert_index[:, 1:]
    first = a[..., 0] == b[..., 0]
    overlap = np.any(a[..., :, None] == b[..., None, :], axis=(-1, -2))

    def rates(mask: np.ndarray) -> tuple[float, float, int]:
        n = int(mask.sum())
        if n == 0:
            return math.nan, math.nan, 0
        return float(first[mask].mean()), float(overlap[mask].mean()), n

    out: dict[str, Any] = dict(zip(("repeat_first", "repeat_any", "pairs"), rates(same_doc),
                                   strict=True))
    if labels is not None:
        per = [rates(same_doc & (labels[:, 1:] == d)) for d in range(num_labels)]
        out["repeat_first_by_label"] = [p[0] for p in per]
        out["repeat_any_by_label"] = [p[1] for p in per]
    return out


def mutual_information_bits(labels: np.ndarray, experts: np.ndarray, num_labels: int,
                            num_experts: int) -> float:
    """I(label; expert) in bits from the empirical joint distribution of [N] pairs."""
    valid = (labels >= 0) & (labels < num_labels)
    joint = np.zeros((num_labels, num_experts))
    np.add.at(joint, (labels[valid], experts[valid]), 1.0)
    joint /= max(joint.sum(), 1.0)
    outer = joint.sum(1, keepdims=True) * joint.sum(0, keepdims=True)
    nz = joint > 0
    return float(np.sum(joint[nz] * np.log2(joint[nz] / outer[nz])))


def max_domain_tv(unit_counts: np.ndarray, unit_labels: np.ndarray, num_labels: int) -> float:
    """max over labels of TV(label's expert shares, all units' shares).

    unit_counts: [U, E] assignment counts of each document (unit); unit_labels: [U]."""
    overall = unit_counts.sum(0) / max(unit_counts.sum(), 1e-12)
    tvs = []
    for d in range(num_labels):
        counts = unit_counts[unit_labels == d].sum(0)
        if counts.sum() > 0:
            tvs.append(0.5 * float(np.abs(counts / counts.sum() - overall).sum()))
    return max(tvs) if tvs else math.nan


def domain_tv_with_null(unit_counts: np.ndarray, unit_labels: np.ndarray, num_labels: int,
                        permutations: int = PERMUTATIONS, seed: int = 0) -> dict[str, float]:
    """The observed max-TV and its null (labels shuffled across documents): mean, SD, z."""
    observed = max_domain_tv(unit_counts, unit_labels, num_labels)
    rng = np.random.default_rng(seed)
    null = np.array([max_domain_tv(unit_counts, rng.permutation(unit_labels), num_labels)
                     for _ in range(permutations)])
    sd = float(null.std(ddof=1)) if null.size > 1 else math.nan
    return {"domain_tv": observed, "domain_tv_null_mean": float(null.mean()),
            "domain_tv_null_sd": sd,
            "domain_tv_z": (observed - float(null.mean())) / sd if sd > 0 else math.nan}


def document_units(expert_index: np.ndarray, segment_ids: np.ndarray, domains: np.ndarray,
                   num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """([U, E] assignment counts, [U] domain) of each (row, segment) document piece."""
    counts, labels = [], []
    for row in range(segment_ids.shape[0]):
        for seg in np.unique(segment_ids[row][segment_ids[row] > 0]):
            mask = segment_ids[row] == seg
            c = np.zeros(num_experts)
            np.add.at(c, expert_index[row][mask].reshape(-1), 1.0)
            counts.append(c)
            labels.append(int(np.bincount(np.maximum(domains[row][mask], 0)).argmax()))
    return np.asarray(counts).reshape(-1, num_experts), np.asarray(labels, np.int64)


def layer_statistics(expert_index: np.ndarray, entropy: np.ndarray, inputs: np.ndarray,
                     segment_ids: np.ndarray, domains: np.ndarray, num_domains: int,
                     num_experts: int) -> dict[str, Any]:
    """All statistics of one sparse layer from [B, L, K] choices and [B, L] per-token data."""
    real = segment_ids > 0
    flat_choice = expert_index[real]
    dom = np.where(real, domains, -1)[real]
    cls = byte_class(inputs)[real]
    domain_share, domain_tokens = shares_by_label(flat_choice, dom, num_domains, num_experts)
    class_share, class_tokens = shares_by_label(flat_choice, cls, len(BYTE_CLASSES), num_experts)
    marginal = np.bincount(flat_choice.reshape(-1), minlength=num_experts) / flat_choice.size
    nz = marginal > 0
    out = {
        "domain_share": domain_share.tolist(), "domain_tokens": domain_tokens.tolist(),
        "class_share": class_share.tolist(), "class_tokens": class_tokens.tolist(),
        "entropy": float(entropy[real].mean()),
        "marginal_entropy": float(-np.sum(marginal[nz] * np.log(marginal[nz]))),
        "mi_domain_bits": mutual_information_bits(dom, flat_choice[:, 0], num_domains,
                                                  num_experts),
        "mi_class_bits": mutual_information_bits(cls, flat_choice[:, 0], len(BYTE_CLASSES),
                                                 num_experts),
        **repeat_rates(expert_index, segment_ids, domains, num_domains),
    }
    units, unit_domains = document_units(expert_index, segment_ids, domains, num_experts)
    out.update(domain_tv_with_null(units, unit_domains, num_domains))
    return out


# --- the model part --------------------------------------------------------------------------

def restore(workdir: str) -> tuple[Any, Any, Any, dict[str, Any]]:
    """(experiment, model, params, model_state) of the run in `workdir` at its last checkpoint
    (`moe_jax.train.restore.restore_run`)."""
    from moe_jax.models import Transformer
    from moe_jax.train.restore import restore_run

    run = restore_run(workdir)
    model = Transformer(run.experiment.model, run.experiment.moe)
    return run.experiment, model, run.params, run.model_state


def route_batches(workdir: str, max_batches: int | None = None) -> dict[str, Any]:
    """Routes the validation batches through the restored model; returns analysis.json's
    content."""
    import jax
    import jax.numpy as jnp

    from moe_jax import layers, routing
    from moe_jax.train import evaluate
    from moe_jax.train import inputs as train_inputs
    from moe_jax.train.step import model_inputs

    experiment, model, params, model_state = restore(workdir)
    c = experiment.moe
    if not routing.ROUTERS[c.router].token_choice:
        choosers = ", ".join(n for n, r in routing.ROUTERS.items() if r.token_choice)
        raise ValueError(f"routing analysis needs a token-choice router ({choosers}); this run "
                         f"uses moe.router={c.router!r}.")
    sparse = experiment.model.sparse_layers
    seq_len = experiment.train.seq_len or experiment.model.max_seq_len

    @jax.jit
    def route(batch: dict[str, Any]) -> tuple[list[jax.Array], list[jax.Array]]:
        _, collections = model.apply({"params": params, **model_state}, batch["inputs"],
                                     **model_inputs(batch), train=False,
                                     mutable=[layers.ROUTING])
        shape = batch["inputs"].shape
        tokens = evaluate.layer_routing(collections, experiment.model)
        return ([t.choice.expert_index.reshape(*shape, c.top_k) for t in tokens],
                [t.entropy().reshape(shape) for t in tokens])

    data = train_inputs.make_inputs(experiment.data, experiment.model,
                                    batch_size=experiment.train.batch_size, seq_len=seq_len,
                                    seed=experiment.seed)
    domain_names = list(train_inputs.domain_names(experiment.data))
    keep: dict[str, list[np.ndarray]] = {"inputs": [], "segment_ids": [], "domains": []}
    choices: list[list[np.ndarray]] = [[] for _ in sparse]
    entropies: list[list[np.ndarray]] = [[] for _ in sparse]
    for i, batch in enumerate(data.eval_batches()):
        if max_batches is not None and i >= max_batches:
            break
        ch, en = jax.device_get(route({k: jnp.asarray(v) for k, v in batch.items()}))
        for name in keep:
            keep[name].append(np.asarray(batch[name]))
        for m in range(len(sparse)):
            choices[m].append(np.asarray(ch[m]))
            entropies[m].append(np.asarray(en[m]))
    arrays = {k: np.concatenate(v) for k, v in keep.items()}
    per_layer = {}
    for m, layer in enumerate(sparse):
        per_layer[str(layer)] = layer_statistics(
            np.concatenate(choices[m]), np.concatenate(entropies[m]), arrays["inputs"],
            arrays["segment_ids"], arrays["domains"], len(domain_names), c.num_experts)
    return {"num_experts": c.num_experts, "top_k": c.top_k, "layers": list(sparse),
            "domains": domain_names, "byte_classes": list(BYTE_CLASSES),
            "tokens": int((arrays["segment_ids"] > 0).sum()),
            "chance_repeat_first": 1.0 / c.num_experts,
            "chance_repeat_any": chance_repeat_any(c.num_experts, c.top_k),
            "ln_experts": math.log(c.num_experts), "per_layer": per_layer}


def define_flags(values: flags.FlagValues) -> None:
    flags.DEFINE_string("workdir", None, "a finished training run", flag_values=values)
    flags.mark_flag_as_required("workdir", flag_values=values)
    flags.DEFINE_integer("max_batches", None, "route at most this many validation batches",
                         flag_values=values)


def main(argv: Sequence[str] | None = None) -> None:
    args, _ = cli.parse_flags(define_flags, argv, __doc__)
    analysis = route_batches(args.workdir, args.max_batches)
    path = os.path.join(args.workdir, "analysis.json")
    with open(path + ".tmp", "w") as f:
        json.dump(analysis, f, indent=1, allow_nan=True)
    os.replace(path + ".tmp", path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
