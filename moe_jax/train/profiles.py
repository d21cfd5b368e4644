"""Routing profiles: how each MoE layer routes each domain of the evaluation data, saved at
every evaluation, and the divergences that compare profiles (domains, checkpoints, runs).

    profile = from_totals(sums.totals, model_config, moe_config, domain_names, step=200)
    save(workdir, profile)                        # workdir/routing_profiles/200.json
    a, b = load(workdir, 100), load(workdir, 200)
    drift(a, b)                                   # per layer: JS divergence, movers, verdict

A profile (JSON) holds step, num_experts, top_k, router, layers (MoE block indices), domains,
gate_bins, and per_layer[str(layer)][domain]:
  tokens     routed tokens of the domain
  share      [E] each expert's share of the assignments before capacity (sums to 1)
  load       [E] the kept assignments' shares (sums to 1 - dropped); None for expert choice
             and soft routers, whose drops are not per token
  dropped    dropped share of the domain's assignments (None where load is None)
  entropy    mean per-token router entropy (nats; ln E is uniform)
  top1_gate  [gate_bins] share of tokens per bin of their first choice's gate over [0, 1]
Without domain labels (datasets other than the embedded corpus) the one domain is "all", built
from the layer statistics: share is the kept load renormalised (the assignment share when
nothing drops) and there is no gate histogram; `routing_report --eval_data` routes labelled
documents instead.

Divergences are Jensen-Shannon divergences in bits (Lin 1991): 0 for equal distributions, 1 for
disjoint ones, symmetric and always finite.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from moe_jax.config import MoeConfig
from moe_jax.models.config import ModelConfig
from moe_jax.train.evaluate import GATE_BINS
from moe_jax.train.metrics import write_json
from moe_jax.utils import storage

PROFILES_DIR = "routing_profiles"
Profile = dict[str, Any]
# Drift verdict thresholds (bits of JS divergence between two profiles of a layer, the largest
# over domains): below the first "stable", below the second "drifting", else "shifted".
DRIFT_THRESHOLDS = (0.01, 0.05)
VERDICTS = ("stable", "drifting", "shifted")


def from_totals(totals: dict[str, np.ndarray], model: ModelConfig, moe: MoeConfig,
                domain_names: Sequence[str], *, step: int) -> Profile:
    """The profile of one evaluation from its sums (`evaluate.EvalSums().totals`)."""
    per_layer: dict[str, dict[str, Any]] = {}
    by_domain = "domain/expert_share" in totals
    for m, layer in enumerate(model.sparse_layers):
        if by_domain:
            per_layer[str(layer)] = {
                name: _domain_entry(totals, m, d) for d, name in enumerate(domain_names)
                if float(totals["domain/routed_tokens"][d]) > 0}
        else:
            per_layer[str(layer)] = {"all": _layer_entry(totals, m)}
    present = {d for entry in per_layer.values() for d in entry}
    domains = [d for d in domain_names if d in present] if by_domain else sorted(present)
    return {"step": int(step), "num_experts": moe.num_experts, "top_k": moe.top_k,
            "router": moe.router, "layers": list(model.sparse_layers), "domains": domains,
            "gate_bins": GATE_BINS, "per_layer": per_layer}


def _domain_entry(totals: dict[str, np.ndarray], m: int, d: int) -> dict[str, Any]:
    routed = float(totals["domain/routed_tokens"][d])
    load = (totals["domain/expert_load"][m, d] / routed if "domain/expert_load" in totals
            else None)
    return {"tokens": routed, "share": (totals["domain/expert_share"][m, d] / routed).tolist(),
            "load": None if load is None else load.tolist(),
            "dropped": None if load is None else float(1.0 - load.sum()),
            "entropy": float(totals["domain/router_entropy"][m, d]) / routed,
            "top1_gate": (totals["domain/top1_gate"][m, d] / routed).tolist()}


def _layer_entry(totals: dict[str, np.ndarray], m: int) -> dict[str, Any]:
    routed = max(float(totals["routed_tokens"]), 1e-12)
    load = totals["layer/expert_load"][m] / routed
    return {"tokens": routed, "share": (load / max(load.sum(), 1e-12)).tolist(),
            "load": load.tolist(), "dropped": float(totals["layer/dropped_fraction"][m]) / routed,
            "entropy": float(totals["layer/router_entropy"][m]) / routed, "top1_gate": None}


# --- files ---------------------------------------------------------------------------------------

def directory(workdir: str) -> str:
    return storage.join(workdir, PROFILES_DIR)


def save(workdir: str, profile: Profile) -> str:
    """Writes workdir/routing_profiles/<step>.json (atomically); returns its path."""
    storage.makedirs(directory(workdir))
    path = storage.join(directory(workdir), f"{profile['step']}.json")
    write_json(path, profile)
    return path


def steps(workdir: str) -> list[int]:
    """The steps with a saved profile, ascending."""
    return sorted(int(name[:-5]) for name in storage.listdir(directory(workdir))
                  if name.endswith(".json") and name[:-5].isdigit())


def load(workdir: str, step: int) -> Profile:
    path = storage.join(directory(workdir), f"{step}.json")
    if not storage.exists(path):
        raise FileNotFoundError(f"no routing profile of step {step} in {directory(workdir)}; "
                                f"saved steps: {steps(workdir) or 'none'}.")
    return json.loads(storage.read_text(path))


# --- divergences ---------------------------------------------------------------------------------

def js_divergence(p: Sequence[float], q: Sequence[float]) -> float:
    """Jensen-Shannon divergence in bits between two distributions (normalised here):
    JS = KL(p || m) / 2 + KL(q || m) / 2 with m = (p + q) / 2 (Lin 1991)."""
    p = np.clip(np.asarray(p, np.float64), 0, None)
    q = np.clip(np.asarray(q, np.float64), 0, None)
    p, q = p / max(p.sum(), 1e-300), q / max(q.sum(), 1e-300)
    m = (p + q) / 2

    def kl(a: np.ndarray) -> float:
        nz = a > 0
        return float(np.sum(a[nz] * np.log2(a[nz] / m[nz])))

    return max(0.0, (kl(p) + kl(q)) / 2)


def overall_share(profile: Profile, layer: int | str, domains: Sequence[str] | None = None
                  ) -> np.ndarray:
    """[E] a layer's assignment share over `domains` (default all), token-weighted."""
    entry = profile["per_layer"][str(layer)]
    names = [d for d in (domains if domains is not None else entry) if d in entry]
    weights = np.array([entry[d]["tokens"] for d in names], np.float64)
    shares = np.array([entry[d]["share"] for d in names], np.float64)
    return weights @ shares / max(weights.sum(), 1e-300)


def domain_divergence(profile: Profile, layer: int | str) -> tuple[list[str], np.ndarray]:
    """(domains, [D, D] pairwise JS divergence of their expert shares) of one layer."""
    entry = profile["per_layer"][str(layer)]
    names = [d for d in profile["domains"] if d in entry]
    matrix = np.array([[js_divergence(entry[a]["share"], entry[b]["share"]) for b in names]
                       for a in names])
    return names, matrix


def verdict(js: float, thresholds: Sequence[float] = DRIFT_THRESHOLDS) -> str:
    """stable / drifting / shifted for a drift of `js` bits."""
    if not math.isfinite(js):
        return "unknown"
    return VERDICTS[sum(js >= t for t in thresholds)]


def drift(before: Profile, after: Profile, *, top: int = 3,
          thresholds: Sequence[float] = DRIFT_THRESHOLDS) -> dict[str, dict[str, Any]]:
    """Per layer present in both profiles: js (overall shares), js_by_domain (domains in both),
    worst (the largest of those), the `top` experts whose share moved most ([expert, before,
    after]), the entropy and dropped-share changes, and the verdict of `worst`."""
    if before["num_experts"] != after["num_experts"]:
        raise ValueError(f"cannot compare routing over {before['num_experts']} experts with "
                         f"routing over {after['num_experts']}: the models differ.")
    out = {}
    for layer in (str(x) for x in before["layers"] if str(x) in after["per_layer"]):
        a, b = before["per_layer"][layer], after["per_layer"][layer]
        common = [d for d in before["domains"] if d in a and d in b]
        share_a, share_b = overall_share(before, layer, common), overall_share(after, layer,
                                                                               common)
        by_domain = {d: js_divergence(a[d]["share"], b[d]["share"]) for d in common}
        overall = js_divergence(share_a, share_b)
        worst = max([overall, *by_domain.values()])
        moved = np.argsort(-np.abs(share_b - share_a), kind="stable")[:top]
        out[layer] = {
            "js": overall, "js_by_domain": by_domain, "worst": worst,
            "movers": [[int(e), float(share_a[e]), float(share_b[e])] for e in moved],
            "entropy_change": _mean_change(a, b, common, "entropy"),
            "dropped_change": _mean_change(a, b, common, "dropped"),
            "verdict": verdict(worst, thresholds)}
    return out


def _mean_change(a: dict[str, Any], b: dict[str, Any], domains: Sequence[str], key: str
                 ) -> float | None:
    """Token-weighted mean of `key` after minus before, over `domains` (None if unknown)."""
    def mean(entry: dict[str, Any]) -> float | None:
        values = [(entry[d]["tokens"], entry[d][key]) for d in domains]
        if not values or any(v is None for _, v in values):
            return None
        return sum(t * v for t, v in values) / max(sum(t for t, _ in values), 1e-300)

    before, after = mean(a), mean(b)
    return None if before is None or after is None else after - before
