"""`TrainConfig`: optimiser, schedule, batch and bookkeeping settings of a run, validated once.

The defaults are the main job's (`python -m moe_jax.main` with no arguments): a tiny model on
the embedded corpus, sized to finish on 2 CPU cores in a few minutes. Larger configs set their
own `train` section. Activation precision is a model setting (`model.dtype="bfloat16"` with
`model.param_dtype="float32"`; the router always runs in `moe.router_dtype`, float32 by default).
"""

from __future__ import annotations

import dataclasses

from moe_jax.utils import fields

OPTIMIZERS = ("adamw", "adafactor")
SCHEDULES = ("cosine", "rsqrt", "constant")
OBJECTIVES = ("causal_lm", "masked_lm")
# The routing alarms of `MonitorConfig` (moe_jax/train/monitor.py raises them).
ALARMS = ("collapse", "imbalance", "drops", "instability", "non_finite")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Settings of the training loop (`moe_jax.train.loop.train_and_evaluate`)."""

    num_train_steps: int = 500
    # "causal_lm": next-token prediction (the data pipeline's targets; needs model.causal=True).
    # "masked_lm": BERT-style masked LM (`objective.mask_for_mlm`: targets are the original
    # inputs at the corrupted positions; needs a bidirectional encoder, model.causal=False).
    objective: str = "causal_lm"
    mask_rate: float = 0.15  # masked_lm: share of real tokens selected (BERT, Sec. 3.1)
    batch_size: int = 16  # global batch, in sequences (split over grad_accum_steps micro-batches)
    seq_len: int | None = None  # None = model.max_seq_len
    grad_accum_steps: int = 1  # micro-batches per step; batch_size must be a multiple of it
    optimizer: str = "adamw"  # "adamw" (Loshchilov & Hutter 2019) or "adafactor" (Shazeer 2018)
    learning_rate: float = 3e-3  # peak learning rate, reached after warmup
    # "cosine": linear warmup, then cosine decay to learning_rate * end_lr_ratio at the last step.
    # "rsqrt": linear warmup, then learning_rate * sqrt(warmup_steps / step) (T5, Raffel et al.
    # 2020, with the peak at the end of warmup). "constant": warmup, then flat.
    schedule: str = "cosine"
    warmup_steps: int = 50
    end_lr_ratio: float = 0.1
    # Decoupled weight decay (AdamW; Adafactor's weight_decay_rate), on matrices only: embeddings,
    # kernels and experts decay; norm scales and biases (1-D parameters) do not.
    weight_decay: float = 0.1
    # AdamW moments and epsilon. Adafactor uses optax's defaults (factored second moment with
    # decay 0.8, no momentum, update clipping 1.0, parameter-scale updates), as T5 does.
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_clip_norm: float = 1.0  # global-norm clipping threshold; 0 disables
    log_every: int = 25  # train metrics to TensorBoard / metrics.jsonl, and the NaN check
    eval_every: int = 250  # 0: evaluate only at the end
    checkpoint_every: int = 250  # 0: checkpoint only at the end
    max_to_keep: int = 2  # checkpoints kept in workdir/checkpoints (older ones are deleted)
    async_checkpointing: bool = True  # write checkpoints in a background thread
    progress_bar: bool = True  # tqdm bar on the console (process 0 only)
    # Fine-tuning: no update to the routers' kernels (the optimizer gives them zero updates and
    # no weight decay; the sigmoid_bias router's balancing bias still moves unless
    # moe.bias_update_rate=0).
    freeze_router: bool = False

    def __post_init__(self) -> None:
        for name in ("num_train_steps", "batch_size", "grad_accum_steps", "log_every",
                     "max_to_keep"):
            fields.integer(self, name, minimum=1)
        for name in ("warmup_steps", "eval_every", "checkpoint_every"):
            fields.integer(self, name, minimum=0)
        fields.integer(self, "seq_len", minimum=1, optional=True,
                           fix="None uses model.max_seq_len")
        if self.batch_size % self.grad_accum_steps:
            fields.fail(self, "batch_size", f"is not a multiple of grad_accum_steps="
                            f"{self.grad_accum_steps}", "each micro-batch must hold the same "
                            "number of sequences")
        fields.one_of(self, "optimizer", OPTIMIZERS)
        fields.one_of(self, "objective", OBJECTIVES)
        fields.one_of(self, "schedule", SCHEDULES)
        fields.number(self, "mask_rate", above=0, below=1, fix="BERT uses 0.15")
        for name in ("learning_rate", "eps"):
            fields.number(self, name, above=0)
        for name in ("weight_decay", "grad_clip_norm"):
            fields.number(self, name, at_least=0)
        for name in ("b1", "b2", "end_lr_ratio"):
            fields.number(self, name, at_least=0, at_most=1)
        if self.warmup_steps > self.num_train_steps:
            fields.fail(self, "warmup_steps", f"exceeds num_train_steps="
                            f"{self.num_train_steps}", "shorten the warmup or train longer")
        for name in ("progress_bar", "async_checkpointing", "freeze_router"):
            fields.boolean(self, name)

    @property
    def micro_batch_size(self) -> int:
        return self.batch_size // self.grad_accum_steps

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class MonitorConfig:
    """Routing alarms checked at every training log (`moe_jax.train.monitor`), per MoE layer.

    The defaults stay silent on the shipped configs' healthy runs (tiny scale, with and without
    drops) and fire on collapsed, starved or exploding routers. Shares are of the routing
    assignments before capacity (`assignment_fraction`), logged every `train.log_every` steps
    as means over the steps since the last log.
    """

    enabled: bool = True
    # Distribution alarms (collapse, imbalance, drops) ignore logs before this step: routers
    # start from random projections and settle during the first steps.
    grace_steps: int = 100
    # Collapse: an expert's share below collapse_fraction / E for `patience` consecutive logs.
    collapse_fraction: float = 0.1
    # Imbalance: MaxVio = max_e share_e / mean share - 1 (Wang et al. 2024, eq. 7) above this
    # for `patience` consecutive logs (3.0: the busiest expert takes 4x its balanced share).
    max_violation: float = 3.0
    # Drops: dropped share of the assignments above this for `patience` consecutive logs.
    max_dropped_fraction: float = 0.5
    patience: int = 3
    # Instability: the largest router logit or a layer's router z-loss (ST-MoE eq. 5) above
    # these bounds, or the largest logit grown by more than `logit_growth` times over the last
    # `growth_window` logs (and above max_router_logit / 2).
    max_router_logit: float = 30.0
    max_router_z_loss: float = 100.0
    logit_growth: float = 2.0
    growth_window: int = 10
    # Alarms that stop the run (any of `ALARMS`): the run ends with `RoutingAlarmError` naming
    # the alarm, before the step's checkpoint is written, so the last checkpoint is a good one.
    stop_on: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        fields.boolean(self, "enabled")
        for name in ("grace_steps",):
            fields.integer(self, name, minimum=0)
        for name in ("patience", "growth_window"):
            fields.integer(self, name, minimum=1)
        fields.number(self, "collapse_fraction", above=0, below=1,
                          fix="0.1 flags an expert below a tenth of its balanced share")
        for name in ("max_violation", "max_router_logit", "max_router_z_loss"):
            fields.number(self, name, above=0)
        fields.number(self, "max_dropped_fraction", above=0, at_most=1)
        fields.number(self, "logit_growth", above=1)
        if not isinstance(self.stop_on, tuple) or any(a not in ALARMS for a in self.stop_on):
            fields.fail(self, "stop_on", "lists an unknown alarm",
                            f"use a tuple of names from {ALARMS}")


@dataclasses.dataclass(frozen=True)
class InitConfig:
    """Where a run's parameters start: a fresh random init (the default), or a checkpoint's.

    Used only when the run's workdir has no checkpoint of its own: the run then starts at step 0
    with the checkpoint's parameters and model state, a fresh optimizer state and a fresh data
    order; once it has saved a checkpoint, a restart resumes from that, never from `checkpoint`.
    """

    # A run's workdir (its newest checkpoint), a directory written by `python -m moe_jax.convert` or
    # `python -m moe_jax.interop.upcycle`, or one checkpoint directory <workdir>/checkpoints/<step>.
    # Only the parameters and model state are read (not the optimizer state).
    checkpoint: str | None = None
    # Sparse upcycling (Komatsuzaki et al. 2022, Sec. 3.1): `checkpoint` is a dense model of this
    # run's widths; each sparse block's experts start as copies of that block's dense FFN (so
    # moe.d_ff = model.d_ff and moe.activation = model.activation), its router from this run's
    # random init, and every other parameter is copied.
    upcycle: bool = False
    # Upcycled experts: each weight plus expert_noise * std(weight) * N(0, 1), drawn
    # independently per expert, so experts differ from the start (0 = exact copies).
    expert_noise: float = 0.0
    # Drop-Upcycling (Nakamura et al. 2025, Sec. 3): in each expert this share of the hidden
    # units (columns of wi / wi_gate, rows of wo) is re-drawn from N(mean, std^2) of the dense
    # matrix; the paper's best setting is 0.5 (0 = plain copies).
    reinit_fraction: float = 0.0

    def __post_init__(self) -> None:
        fields.text(self, "checkpoint", optional=True,
                        fix="None starts from a random init")
        fields.boolean(self, "upcycle")
        fields.number(self, "expert_noise", at_least=0)
        fields.number(self, "reinit_fraction", at_least=0, at_most=1)
        if self.upcycle and self.checkpoint is None:
            fields.fail(self, "upcycle", "needs a dense checkpoint to upcycle",
                            "set init.checkpoint to the dense run's workdir")
        if (self.expert_noise or self.reinit_fraction) and not self.upcycle:
            fields.fail(self, "expert_noise" if self.expert_noise else "reinit_fraction",
                            "only applies to upcycled experts", "set init.upcycle=True or 0")

    def replace(self, **changes) -> InitConfig:
        return dataclasses.replace(self, **changes)
