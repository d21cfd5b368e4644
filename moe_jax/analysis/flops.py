"""Exact parameter counts and FLOPs per token, and FLOP-matched sparse configs.

FLOPs follow Kaplan et al. 2020 (Table 1) and Hoffmann et al. 2022 (Chinchilla, appendix F): a
multiply-add is 2 FLOPs, only matmuls are counted (norms, activations, softmax, residual adds
and the embedding lookup, a gather, are O(d) per token and left out), and the backward pass
costs twice the forward, so training = 3 x forward. Per token and per layer, forward:

  attention_projections  2 * (d*H*h + 2*d*K*h + H*h*d)       (Q, K, V, output; GQA: K heads)
  attention_scores       4 * L * H * h                        (q.k and probs.v over the full
                         L x L matrix, as computed; Chinchilla counts this, Kaplan counts half)
  dense_ffn              2 * m * d * f                        (m = 3 matrices for swiglu, else 2)
  router                 2 * d * E                            (E * slots for Soft MoE; + 2 * d
                         for the shared experts' output gate of Qwen2-MoE)
  experts_useful         (k + S) * 2 * m * d * f_e            (k routed + S shared experts;
                         expert choice: E*C/T slots per token; soft: E*slots/T)
  experts_padding        (E*C/T - k) * 2 * m * d * f_e        (capacity slots beyond k, computed
                         filled or not; 0 for dropless; negative when E*C/T < k: capacity
                         factor < 1 guarantees drops, and the total is then what is computed)
  dispatch               4 * E * C * d  (einsum dispatch+combine one-hot matmuls; gather and
                         dropless move rows without FLOPs; soft: 4 * E * slots * d)
and once per token: logits 2 * d * V_padded.
C is the capacity (`MoeConfig.capacity`; training factor, or evaluation with train=False) of a
routing group of T tokens: T = `group_size` or, when that is None (the whole batch), the
`tokens_per_group` passed here (default: one sequence). `tests/test_flops.py` checks these
against XLA's cost analysis.

Parameters: total counts every parameter (padded vocabulary rows included; the sigmoid_bias
router's `score_bias` is state, not a parameter; the multi-token-prediction modules of
`mtp_depth` included, their FLOPs not; biases and GPT-OSS's attention sinks included, their
O(d) additions not in the FLOPs). Active = total minus the experts a token
does not use: k routed of E (expert choice: E*C/T on average; Soft MoE: all). Embedding
parameters = token embedding + learned position table + untied output matrix.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import ml_collections

from moe_jax import schema
from moe_jax.config import MoeConfig
from moe_jax.models import latent_attention
from moe_jax.models.config import ModelConfig
from moe_jax.utils import cli

# Bytes per parameter of each weight precision (int8/int4: weight-only quantization, scales
# not counted); `moe_jax.analysis.memory` plans training state, KV cache and per-device bytes
# with them.
BYTES_PER_PARAM: dict[str, float] = {"float32": 4.0, "bfloat16": 2.0, "int8": 1.0, "int4": 0.5}

PARTS = ("attention_projections", "attention_scores", "dense_ffn", "router", "experts_useful",
         "experts_padding", "dispatch", "logits")


@dataclasses.dataclass(frozen=True)
class Count:
    """Parameters and forward FLOPs per token (by part, see `PARTS`) of one config."""

    total_params: int
    active_params: float
    embedding_params: int
    forward_flops: dict[str, float]
    seq_len: int

    @property
    def non_embedding_params(self) -> int:
        return self.total_params - self.embedding_params

    @property
    def forward_flops_per_token(self) -> float:
        return sum(self.forward_flops.values())

    @property
    def useful_forward_flops_per_token(self) -> float:
        """Forward FLOPs without capacity padding and dispatch: what `match_flops` matches."""
        f = self.forward_flops
        return self.forward_flops_per_token - f["experts_padding"] - f["dispatch"]

    def weight_bytes(self, precision: str = "bfloat16", *, active: bool = False) -> float:
        """Bytes of the parameters (active: those one token uses) at `precision`, one of
        `BYTES_PER_PARAM`."""
        if precision not in BYTES_PER_PARAM:
            raise ValueError(f"precision {precision!r}: use one of {tuple(BYTES_PER_PARAM)}.")
        return (self.active_params if active else self.total_params) * BYTES_PER_PARAM[precision]

    @property
    def training_flops_per_token(self) -> float:
        """3 x forward (backward = 2 x forward; Kaplan et al. 2020 Sec. 2.1, Chinchilla App. F)."""
        return 3 * self.forward_flops_per_token


def _ffn_matrices(activation: str) -> int:
    return 3 if activation in ("swiglu", "clamped_swiglu") else 2


def _expert_slots_per_token(moe: MoeConfig, tokens_per_group: int,
                            train: bool) -> tuple[float, float]:
    """(computed, useful) routed-expert rows per token.

    Token choice: k useful rows; capacity dispatch computes E*C/T rows (dropless: exactly k).
    Expert choice and Soft MoE: every computed slot is useful (E*C/T, E*slots/T).
    """
    e, k, t = moe.num_experts, moe.top_k, tokens_per_group
    if moe.router == "soft":
        slots = e * moe.slots_per_expert / t
        return slots, slots
    if moe.router == "expert_choice":
        slots = e * min(moe.capacity(t, train=train), t) / t
        return slots, slots
    if moe.dispatch == "dropless":
        return float(k), float(k)
    return e * moe.capacity(t, train=train) / t, float(k)


def count_model(model: ModelConfig, moe: MoeConfig, *, seq_len: int | None = None,
                tokens_per_group: int | None = None, train: bool = True) -> Count:
    """`Count` of a (ModelConfig, MoeConfig) pair; see the module docstring for the formulas.

    seq_len: context length for the attention scores (default model.max_seq_len);
    tokens_per_group: routing group size T when moe.group_size is None (default seq_len);
    train: capacity from capacity_factor (True) or eval_capacity_factor (False).
    """
    seq_len = seq_len or model.max_seq_len
    t = moe.group_size or tokens_per_group or seq_len
    d, h, n_q, n_kv = model.d_model, model.head_size, model.num_heads, model.kv_heads
    vocab = model.padded_vocab_size
    norm_params = d if model.norm == "rmsnorm" else 2 * d

    attn_params = d * n_q * h + 2 * d * n_kv * h + n_q * h * d
    attn_params += (n_q + 2 * n_kv) * h if model.qkv_bias else 0
    attn_params += (d if model.out_bias else 0) + (n_q if model.attention_sinks else 0)
    qk_norm_width = {"none": 0, "weightless": 0, "per_head": 2 * h,
                     "projection": (n_q + n_kv) * h}[model.qk_norm]
    attn_params += qk_norm_width * (norm_params // d)
    attn_matmul_params = d * n_q * h + 2 * d * n_kv * h + n_q * h * d
    score_flops = 4.0 * seq_len * n_q * h
    if model.latent_attention:
        attn_matmul_params = latent_attention.projection_params(model)
        attn_params = attn_matmul_params + latent_attention.norm_params(model)
        score_flops = latent_attention.score_flops_per_token(model, seq_len)
    dense_ffn_params = _ffn_matrices(model.activation) * d * model.d_ff
    expert_matrix_params = _ffn_matrices(moe.activation) * d * moe.d_ff
    # a routed expert's biases (`expert_bias`): wi and wi_gate f each, wo d
    expert_bias = (_ffn_matrices(moe.activation) - 1) * moe.d_ff + d if moe.expert_bias else 0
    expert_params = expert_matrix_params + expert_bias
    router_cols = moe.num_experts * (moe.slots_per_expert if moe.router == "soft" else 1)
    shared_gate = d if moe.shared_expert_gate else 0  # Qwen2-MoE's [d, 1] output gate
    router_bias = router_cols if moe.router_bias else 0
    moe_params = (d * router_cols + router_bias + moe.num_experts * expert_params
                  + moe.num_shared_experts * expert_matrix_params + shared_gate)
    computed, useful = _expert_slots_per_token(moe, t, train)
    active_experts = moe.num_experts if moe.router == "soft" else useful

    num_sparse = len(model.sparse_layers)
    num_dense = model.num_layers - num_sparse
    embedding_params = vocab * d + (model.max_seq_len * d if model.positions == "learned" else 0)
    embedding_params += 0 if model.tie_embeddings else d * vocab
    total = (embedding_params + norm_params  # final norm
             + model.num_layers * (attn_params + 2 * norm_params)
             + num_dense * dense_ffn_params + num_sparse * moe_params)
    active = total - num_sparse * (moe.num_experts - active_experts) * expert_params
    if model.mtp_depth:  # DeepSeek-V3's MTP modules: 3 norms, [2d, d], a block like the last
        last_sparse = (model.num_layers - 1) in model.sparse_layers
        block = attn_params + 2 * norm_params + (moe_params if last_sparse else dense_ffn_params)
        unused = (moe.num_experts - active_experts) * expert_params if last_sparse else 0
        mtp = model.mtp_depth * (3 * norm_params + 2 * d * d + block)
        total, active = total + mtp, active + mtp - model.mtp_depth * unused

    expert_flops = 2 * expert_matrix_params  # one expert row
    if moe.router == "soft":
        dispatch = 4 * router_cols * d
    elif moe.dispatch == "einsum":
        dispatch = 4.0 * computed * t * d  # [E, C, T] x [T, d] twice per group, over T tokens
    else:
        dispatch = 0.0
    flops = {
        "attention_projections": model.num_layers * 2.0 * attn_matmul_params,
        "attention_scores": model.num_layers * score_flops,
        "dense_ffn": num_dense * 2.0 * dense_ffn_params,
        "router": num_sparse * 2.0 * (d * router_cols + shared_gate),
        "experts_useful": num_sparse * (useful + moe.num_shared_experts) * expert_flops,
        "experts_padding": num_sparse * (computed - useful) * expert_flops,
        "dispatch": num_sparse * dispatch,
        "logits": 2.0 * d * vocab,
    }
    return Count(total_params=total, active_params=active, embedding_params=embedding_params,
                 forward_flops=flops, seq_len=seq_len)


def count(config: Any, *, seq_len: int | None = None, tokens_per_group: int | None = None,
          train: bool = True) -> Count:
    """`Count` of an experiment: a ConfigDict (validated here) or a parsed `schema.Experiment`."""
    if isinstance(config, ml_collections.ConfigDict):
        config = schema.parse_config(config)
    return count_model(config.model, config.moe, seq_len=seq_len,
                       tokens_per_group=tokens_per_group, train=train)


@dataclasses.dataclass(frozen=True)
class FlopMatch:
    """A sparse config FLOP-matched to a dense one, and how well it matches."""

    config: ml_collections.ConfigDict
    dense_flops: float  # useful forward FLOPs per token
    sparse_flops: float

    @property
    def relative_mismatch(self) -> float:
        return self.sparse_flops / self.dense_flops - 1.0


def match_flops(dense: ml_collections.ConfigDict, *, num_experts: int, top_k: int = 1,
                moe_every: int = 2, moe_layers: tuple[int, ...] | None = None,
                num_shared_experts: int = 0, expert_d_ff: int | None = None,
                multiple_of: int = 1, matched_to: str = "",
                **moe_changes: Any) -> FlopMatch:
    """The sparse variant of `dense` whose useful forward FLOPs per token equal the dense ones.

    Sparse blocks are chosen by `moe_every` / `moe_layers` (ModelConfig semantics); the experts
    use the dense FFN's activation; `moe_changes` sets any other MoeConfig field (router,
    capacity_factor, ...). Unless `expert_d_ff` is given, the expert width f_e solves
    FLOPs(sparse) = FLOPs(dense) exactly (FLOPs are linear in f_e) and is rounded to a multiple
    of `multiple_of`. With top-1 this gives experts of the dense FFN's width minus the router's
    share (Switch-Base vs T5-Base); with k routed and S shared experts about f / (k + S)
    (GShard, DeepSeekMoE fine-grained segmentation); with expert choice f / (E*C/T). Capacity
    padding and dispatch are not matched (reported separately by `count`). The residual from
    rounding is reported as `relative_mismatch`.
    """
    unknown = sorted(set(moe_changes) - {f.name for f in dataclasses.fields(MoeConfig)})
    if unknown:
        raise ValueError(f"match_flops got {unknown[0]!r}, which is not a MoeConfig field.")
    target = count(dense).useful_forward_flops_per_token
    config = copy.deepcopy(dense)
    config.model.moe_every = moe_every
    config.model.moe_layers = moe_layers
    config.moe.num_experts = num_experts
    config.moe.top_k = top_k
    config.moe.num_shared_experts = num_shared_experts
    config.moe.activation = config.model.activation
    for key, value in moe_changes.items():
        config.moe[key] = value
    config.matched_to = matched_to

    def flops_at(width: int) -> float:
        config.moe.d_ff = width
        return count(config).useful_forward_flops_per_token

    if expert_d_ff is None:
        slope = flops_at(2) - flops_at(1)
        intercept = flops_at(1) - slope
        if slope <= 0 or target <= intercept:
            raise ValueError(
                f"cannot FLOP-match: the sparse model without expert FLOPs already costs "
                f"{intercept:.4g} >= the dense {target:.4g} FLOPs/token; use fewer experts per "
                "token, fewer sparse blocks, or pass expert_d_ff.")
        width = (target - intercept) / slope
        expert_d_ff = max(multiple_of, multiple_of * round(width / multiple_of))
    sparse_flops = flops_at(expert_d_ff)
    return FlopMatch(config=schema.checked(config), dense_flops=target, sparse_flops=sparse_flops)


def human(value: float | None) -> str:
    """A count with three significant digits and a T/G/M/k suffix ("-" for None)."""
    if value is None:
        return "-"
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.3g}"


COLUMNS = ("config", "total", "active", "non-emb", "fwd FLOPs/tok", "pad+dispatch",
           "train FLOPs/tok", "vs matched")


def table_row(name: str, config: ml_collections.ConfigDict,
              tokens_per_group: int | None = None) -> tuple[str, ...]:
    """One row of the CLI table: params, FLOPs per token, the share of forward FLOPs spent on
    capacity padding and einsum dispatch, and for matched configs the useful-FLOP mismatch."""
    c = count(config, tokens_per_group=tokens_per_group)
    overhead = c.forward_flops["experts_padding"] + c.forward_flops["dispatch"]
    mismatch = "-"
    if config.matched_to:
        dense = count(schema.load_config(config.matched_to)).useful_forward_flops_per_token
        mismatch = f"{c.useful_forward_flops_per_token / dense - 1:+.2%} ({config.matched_to})"
    return (name, human(c.total_params), human(c.active_params), human(c.non_embedding_params),
            human(c.forward_flops_per_token), f"{overhead / c.forward_flops_per_token:.1%}",
            human(c.training_flops_per_token), mismatch)


def format_table(rows: list[tuple[str, ...]], columns: tuple[str, ...] = COLUMNS) -> str:
    """Markdown table of rows under `columns`, its columns padded for reading as text."""
    return cli.markdown_table(columns, rows, aligned=True)


def format_parts(config: ml_collections.ConfigDict, tokens_per_group: int | None = None) -> str:
    """Forward FLOPs per token of one config, by part."""
    c = count(config, tokens_per_group=tokens_per_group)
    total = c.forward_flops_per_token
    lines = [f"forward FLOPs per token at seq_len={c.seq_len}:"]
    for part in PARTS:
        value = c.forward_flops[part]
        lines.append(f"  {part:<22} {human(value):>8}  {value / total:6.1%}")
    lines.append(f"  {'total':<22} {human(total):>8}   (training = 3x = "
                 f"{human(c.training_flops_per_token)}; Kaplan's 6N = "
                 f"{human(6 * c.active_params)})")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    """Prints the table for `--config=FILE.py[:member]` (accepts `--config.moe.x=...`
    overrides) or for every member of `--family=FILE.py`. Paths are as given or relative to
    configs/. `--tokens_per_group` sets T for capacity when group_size is None."""
    from absl import app, flags

    del argv
    family, tokens = flags.FLAGS.family, flags.FLAGS.tokens_per_group
    if family:
        members = schema.family_members(family) or ("",)
        rows = [table_row(m or family, schema.load_config(f"{family}:{m}" if m else family),
                          tokens) for m in members]
        print(format_table(rows))
        return
    config = flags.FLAGS.config
    if config is None:
        raise app.UsageError("pass --config=configs/FILE.py[:member] or --family=configs/FILE.py")
    schema.checked(config)
    print(format_table([table_row(flags.FLAGS["config"].config_filename, config, tokens)]))
    print()
    print(format_parts(config, tokens))


if __name__ == "__main__":
    from absl import app, flags

    schema.define_config_flag("Experiment config file[:member].")
    flags.DEFINE_string("family", None, "Config family file: print every member in MEMBERS.")
    flags.DEFINE_integer("tokens_per_group", None, "Routing group size T for the capacity when "
                         "moe.group_size is None (the whole batch); default one sequence.")
    app.run(main)
