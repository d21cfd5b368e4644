"""A float64 NumPy reference of the MoE layer, written as a plain loop over tokens.

Independent of moe_jax's vectorised code: it re-derives routing, priority, capacity and combine
from the conventions in docs/moe_layer.md so that `moe.apply` can be checked against it.
"""

import math

import numpy as np

from moe_jax.config import MoeConfig


def _act(h: np.ndarray, name: str) -> np.ndarray:
    if name == "relu":
        return np.maximum(h, 0)
    # jax.nn.gelu defaults to the tanh approximation.
    return 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h**3)))


def _ffn(p: dict, e: int | None, x: np.ndarray, activation: str) -> np.ndarray:
    get = (lambda n: p[n][e]) if e is not None else (lambda n: p[n])
    pre = x @ get("wi")
    if activation == "swiglu":
        g = x @ get("wi_gate")
        h = g / (1 + np.exp(-g)) * pre
    else:
        h = _act(pre, activation)
    return h @ get("wo")


def reference_apply(params: dict, x: np.ndarray, config: MoeConfig, *, train: bool):
    """Returns (y, dropped_fraction, expert_load) for token-choice top-k routing."""
    c = config
    p = {g: {n: np.asarray(v, np.float64) for n, v in d.items()} for g, d in params.items()}
    d = x.shape[-1]
    tokens = np.asarray(x, np.float64).reshape(-1, d)
    n = tokens.shape[0]
    group = c.group_size or n
    y = np.zeros_like(tokens)
    kept_per_expert = np.zeros(c.num_experts)
    dropped = 0
    for g0 in range(0, n, group):
        xg = tokens[g0:g0 + group]
        logits = xg @ p["router"]["kernel"]
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        chosen = np.argsort(-probs, axis=-1, kind="stable")[:, : c.top_k]
        gates = np.take_along_axis(probs, chosen, -1)
        if c.renormalize_gates:
            gates = gates / gates.sum(-1, keepdims=True)
        capacity = math.inf if c.dispatch == "dropless" else c.capacity(group, train=train)
        order = list(range(group))
        if c.drop_priority == "batch_priority":
            order = sorted(order, key=lambda t: -probs[t].max())
        fill = np.zeros(c.num_experts)
        for rank in range(c.top_k):
            for t in order:
                e = chosen[t, rank]
                if fill[e] >= capacity:
                    dropped += 1
                    continue
                fill[e] += 1
                y[g0 + t] += gates[t, rank] * _ffn(p["experts"], e, xg[t], c.activation)
        kept_per_expert += fill
    if "shared" in p:
        y += _ffn(p["shared"], None, tokens, c.activation)
    total = n * c.top_k
    return y.reshape(x.shape), dropped / total, kept_per_expert / total

