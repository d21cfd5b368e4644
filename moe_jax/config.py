"""`MoeConfig`: every knob of the MoE feed-forward layer, validated once.

Conventions (which paper each comes from) are documented on the fields and in the conventions
table of docs/moe_layer.md. The config is a frozen dataclass so it can be a static argument of
`jax.jit`.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

from moe_jax import routing
from moe_jax.kernels.grouped_matmul import IMPLEMENTATIONS as GROUPED_MATMULS
from moe_jax.utils import fields

DROP_PRIORITIES = ("rank", "batch_priority")
DISPATCHES = ("einsum", "gather", "dropless")
ACTIVATIONS = ("relu", "gelu", "swiglu")
# The experts' activations: the dense FFN's, and GPT-OSS's clamped SwiGLU
# (`experts.clamped_swiglu`, with swiglu_alpha and swiglu_limit).
EXPERT_ACTIVATIONS = (*ACTIVATIONS, "clamped_swiglu")
SECOND_EXPERT_POLICIES = ("all", "random")
ROUTER_DTYPES = ("float32", "bfloat16", "float64", "float16")


@dataclasses.dataclass(frozen=True)
class MoeConfig:
    """Configuration of one MoE feed-forward layer.

    Shape letters used throughout moe_jax: T tokens in a routing group, E experts, C expert
    capacity (slots per expert per group), K choices per token (top_k), d model width, f `d_ff`.
    """

    num_experts: int = 8
    top_k: int = 1
    # Capacity per group of T tokens: C = ceil(top_k * T * capacity_factor / num_experts), >= 1
    # (GShard/Switch, with the k of GShard top-2). `eval_capacity_factor` is used when train=False.
    capacity_factor: float = 1.25
    eval_capacity_factor: float = 2.0
    expert_capacity: int | None = None  # overrides both factors when set
    router: str = "top_k"  # a name of `routing.ROUTERS`
    # Divide the k chosen probabilities by their sum (GShard, Mixtral) before drops; otherwise the
    # gates are the raw softmax probabilities (Switch, ST-MoE).
    renormalize_gates: bool = False
    drop_priority: str = "rank"  # "rank" (GShard) or "batch_priority" (V-MoE BPR)
    # "random": GShard's stochastic second expert (keep choice 2 with probability 2 * g2, g2 the
    # renormalised second gate; GShard Algorithm 2). "all" keeps every choice.
    second_expert_policy: str = "all"
    dispatch: str = "gather"
    # Grouped matmul of the dropless dispatch (moe_jax/kernels/grouped_matmul.py): "ragged_dot"
    # (jax.lax.ragged_dot), "blocked" (per-expert row blocks in XLA; XLA:CPU computes
    # ragged_dot densely over all experts), "blas" (XLA:CPU custom call to the host BLAS; only on
    # a tested jaxlib, see cpu_ffi.TESTED), "megablox" (TPU Pallas kernels; interpret
    # mode off TPU), "tokamax" (GPU kernels, the `gpu` extra) or "auto" (per platform: megablox on
    # TPU, tokamax on GPU if installed else ragged_dot, blas on CPU or blocked with a warning on
    # an untested jaxlib).
    grouped_matmul: str = "auto"
    activation: str = "gelu"
    d_ff: int = 512  # hidden width of each expert
    num_shared_experts: int = 0  # DeepSeekMoE shared experts, always active; each of width d_ff
    # Scale the shared experts' output per token by sigmoid(x @ output_gate), output_gate [d, 1]
    # (Qwen1.5-MoE / Qwen2-MoE: Yang et al. 2024, Sec. 2.2.2, and the released models'
    # `shared_expert_gate`).
    shared_expert_gate: bool = False
    load_balance_coef: float = 1e-2
    z_loss_coef: float = 1e-3
    jitter_eps: float = 0.0  # Switch: multiply router input by U[1 - eps, 1 + eps] in training
    group_size: int | None = None  # tokens per routing group; None = all tokens of the call
    router_dtype: str = "float32"  # Switch "selective precision": router math in float32
    init_scale: float = 1.0  # variance-scaling factor of all MoE weights (Switch Table 3: 0.1)
    slots_per_expert: int = 1  # Soft MoE slots per expert (Puigcerver et al. 2023)
    bias_update_rate: float = 1e-3  # DeepSeek-V3 aux-loss-free bias step gamma (sigmoid_bias)
    # Expert choice and soft routing mix the tokens of a group: `check_causal` refuses them in
    # causal models unless this is set.
    allow_non_causal: bool = False
    # Dropout on the experts' hidden activations in training, at its own rate, separate from
    # ModelConfig.dropout_rate (Switch Sec. 2.4 and Table 4: "expert dropout"; 0.1 outside and
    # 0.4 inside the experts fine-tuned best). Its masks come from the layer's rng.
    expert_dropout: float = 0.0
    # Router temperature tau: routing uses logits / tau (softmax, or the sigmoid of sigmoid_bias)
    # instead of the logits (temperature scaling, Guo et al. 2017, Sec. 4.2); > 1 flattens the
    # routing distribution, < 1 sharpens it. `eval_router_temperature` (None: the same) is used
    # when train=False. The z-loss and max_router_logit are of the scaled logits.
    router_temperature: float = 1.0
    eval_router_temperature: float | None = None
    # sigmoid_bias only (DeepSeek-V3 as released, `routing.route_sigmoid_bias`): the experts
    # form `expert_groups` consecutive groups (n_group) and each token chooses among its
    # `top_expert_groups` best groups (topk_group); the gates are multiplied by
    # `routed_scaling_factor`.
    expert_groups: int = 1
    top_expert_groups: int = 1
    routed_scaling_factor: float = 1.0
    # GPT-OSS (gpt-oss model card, OpenAI 2025): a bias on the router logits, biases on the
    # experts' projections (`experts` module docstring), and activation="clamped_swiglu" with
    # its slope and clamp (`experts.clamped_swiglu`).
    router_bias: bool = False
    expert_bias: bool = False
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    # The gate scales the token before its expert, expert(g x), instead of the expert's output,
    # g expert(x) (Llama 4 as released, `Llama4TextMoe`); token-choice routers only.
    gate_inputs: bool = False

    def __post_init__(self) -> None:
        for name in ("num_experts", "top_k", "d_ff", "slots_per_expert"):
            fields.integer(self, name, minimum=1)
        if self.top_k > self.num_experts:
            fields.fail(self, "top_k", f"is larger than num_experts={self.num_experts}",
                            "set top_k <= num_experts")
        for name in ("capacity_factor", "eval_capacity_factor"):
            fields.number(self, name, above=0, fix="1.0 = exactly enough slots for "
                              "perfectly balanced routing")
        fields.integer(self, "expert_capacity", minimum=1, optional=True)
        fields.integer(self, "group_size", minimum=1, optional=True,
                           fix="None routes all tokens of a call as one group")
        fields.integer(self, "num_shared_experts", minimum=0)
        if self.shared_expert_gate and not self.num_shared_experts:
            fields.fail(self, "shared_expert_gate", "needs shared experts to gate",
                            "set num_shared_experts >= 1 or shared_expert_gate=False")
        for name in ("load_balance_coef", "z_loss_coef", "bias_update_rate"):
            fields.number(self, name, at_least=0)
        fields.number(self, "jitter_eps", at_least=0, below=1)
        fields.number(self, "init_scale", above=0)
        fields.number(self, "expert_dropout", at_least=0, below=1,
                          fix="Switch fine-tuned with 0.4 in the experts")
        fields.number(self, "router_temperature", above=0, fix="1.0 leaves the logits as "
                          "they are")
        if self.eval_router_temperature is not None:
            fields.number(self, "eval_router_temperature", above=0,
                              fix="None uses router_temperature")
        self._check_expert_groups()
        fields.one_of(self, "router", tuple(routing.ROUTERS))
        fields.one_of(self, "drop_priority", DROP_PRIORITIES)
        fields.one_of(self, "dispatch", DISPATCHES)
        fields.one_of(self, "activation", EXPERT_ACTIVATIONS)
        for name in ("swiglu_alpha", "swiglu_limit"):
            fields.number(self, name, above=0, fix="GPT-OSS uses alpha 1.702 and limit 7.0")
        fields.boolean(self, "router_bias")
        fields.boolean(self, "expert_bias")
        fields.one_of(self, "grouped_matmul", GROUPED_MATMULS)
        fields.one_of(self, "second_expert_policy", SECOND_EXPERT_POLICIES)
        fields.one_of(self, "router_dtype", ROUTER_DTYPES)
        fields.boolean(self, "renormalize_gates")
        fields.boolean(self, "allow_non_causal")
        fields.boolean(self, "shared_expert_gate")
        fields.boolean(self, "gate_inputs")
        if self.second_expert_policy == "random" and (self.router != "top_k" or self.top_k != 2):
            fields.fail(self, "second_expert_policy",
                            "is GShard's top-2 rule and needs router='top_k' and top_k=2 (got "
                            f"router={self.router!r}, top_k={self.top_k})",
                            "set second_expert_policy='all' or use top-2 routing")
        router = routing.ROUTERS[self.router]
        if self.gate_inputs and not router.token_choice:
            fields.fail(self, "gate_inputs", f"scales each token's input to its chosen experts, "
                        f"and router={self.router!r} does not let tokens choose",
                        "use a token-choice router or gate_inputs=False")
        if router.dispatches is not None and self.dispatch not in router.dispatches:
            allowed = " or ".join(map(repr, router.dispatches))
            fields.fail(self, "dispatch", f"does not apply to router={self.router!r}: "
                        f"{router.why}", f"use dispatch={allowed}")

    def _check_expert_groups(self) -> None:
        fields.integer(self, "expert_groups", minimum=1)
        fields.integer(self, "top_expert_groups", minimum=1)
        fields.number(self, "routed_scaling_factor", above=0)
        groups, top = self.expert_groups, self.top_expert_groups
        if self.num_experts % groups:
            fields.fail(self, "expert_groups", f"does not divide num_experts={self.num_experts}",
                        "use a divisor of num_experts")
        if top > groups:
            fields.fail(self, "top_expert_groups", f"exceeds expert_groups={groups}",
                        "set top_expert_groups <= expert_groups")
        if self.top_k > top * (self.num_experts // groups):
            fields.fail(self, "top_k", f"exceeds the {top * (self.num_experts // groups)} experts "
                        "of the top_expert_groups groups", "raise top_expert_groups")
        if (groups > 1 or self.routed_scaling_factor != 1.0) and self.router != "sigmoid_bias":
            fields.fail(self, "expert_groups", "and routed_scaling_factor apply to "
                        "router='sigmoid_bias' only", "set router='sigmoid_bias' or leave them at "
                        "1", value=groups)

    @property
    def is_causal_safe(self) -> bool:
        """Whether a token's output depends only on that token (no mixing across the group)."""
        return routing.ROUTERS[self.router].token_choice

    def check_causal(self, causal: bool) -> None:
        """Refuses a router that mixes tokens (expert choice, Soft MoE: a token's output depends
        on later tokens of its group) in a causal model, unless `allow_non_causal` is set."""
        if causal and not self.is_causal_safe and not self.allow_non_causal:
            choosers = ", ".join(repr(n) for n, r in routing.ROUTERS.items() if r.token_choice)
            raise ValueError(
                f"MoeConfig.router={self.router!r} mixes tokens across the sequence and leaks "
                f"future tokens in a causal model; use a token-choice router ({choosers}), a "
                "bidirectional encoder (model.causal=False, with the masked-LM objective), or "
                "set allow_non_causal=True if you accept the leak.")

    def uses_rng(self, train: bool) -> bool:
        """Whether the layer draws random numbers: router jitter, GShard's random second
        expert or expert dropout, all in training only."""
        return train and (self.jitter_eps > 0 or self.second_expert_policy == "random"
                          or self.expert_dropout > 0)

    def temperature(self, *, train: bool) -> float:
        """The router temperature: `router_temperature`, or `eval_router_temperature` (when
        set) for train=False."""
        if not train and self.eval_router_temperature is not None:
            return self.eval_router_temperature
        return self.router_temperature

    @property
    def router_jnp_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.router_dtype)

    def capacity(self, num_tokens: int, *, train: bool) -> int:
        """Expert capacity C for a routing group of `num_tokens` tokens.

        C = ceil(top_k * T * capacity_factor / num_experts), at least 1 (GShard eq. in Sec. 2.2;
        Switch eq. 3 with k = 1), unless `expert_capacity` is set.
        """
        if self.expert_capacity is not None:
            return self.expert_capacity
        factor = self.capacity_factor if train else self.eval_capacity_factor
        return max(1, math.ceil(self.top_k * num_tokens * factor / self.num_experts))

    def replace(self, **changes) -> MoeConfig:
        return dataclasses.replace(self, **changes)
